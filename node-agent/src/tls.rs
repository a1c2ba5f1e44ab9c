//! Workload identity and the TLS configurations built from it. Peers prove a
//! SPIFFE identity in a URI SAN of a certificate chained to the trust bundle;
//! the usual DNS-name check does not apply to workloads, so both directions
//! use verifiers that check the chain and then the SPIFFE ID.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use weft_api::SpiffeId;

/// ALPN of HBONE tunnels.
pub const ALPN_H2: &[u8] = b"h2";

/// The largest HTTP/2 DATA frame a tunnel accepts. Larger than the 16 KiB
/// default so that one socket read on one side is one socket write on the
/// other, instead of being cut into 16 KiB writes.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;

/// The crypto provider of every TLS configuration the agent builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration builder offering TLS 1.3 only: HBONE tunnels and
/// the zone connection alike accept nothing older.
pub fn tls13_client(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, rustls::Error> {
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
}

/// The transport under a tunnel's TLS: TCP read through a buffer, because
/// rustls asks for 4 KiB per read and a 16 KiB record would otherwise cost
/// four syscalls.
pub type TlsIo = tokio::io::BufReader<tokio::net::TcpStream>;

/// Wraps a tunnel's TCP connection for TLS. The buffer's pages are only
/// touched (and resident) as far as reads fill them.
pub fn tls_io(tcp: tokio::net::TcpStream) -> TlsIo {
    tokio::io::BufReader::with_capacity(64 * 1024, tcp)
}

/// Why the workload identity could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{field}: cannot read {path}: {source}")]
    Read {
        field: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{field}: {path} holds no {what}")]
    Empty {
        field: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("identity.cert: {0}")]
    Certificate(String),
    #[error("identity.key: the key does not match the certificate or is not usable: {0}")]
    Key(rustls::Error),
    #[error("identity.trust_bundle: {0}")]
    Bundle(String),
}

/// The SPIFFE ID carried by a certificate, and whether it is in date.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("malformed subjectAltName: {e}"))?
        .ok_or("no subjectAltName extension (a SPIFFE URI SAN is required)")?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or("no spiffe:// URI SAN")?;
    if uris.next().is_some() {
        return Err("more than one spiffe:// URI SAN".to_owned());
    }
    uri.parse().map_err(|e| format!("{e}"))
}

fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// A workload's key material, loaded once and shared by every connection.
pub struct Identity {
    pub id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    /// Seconds since the epoch when the leaf expires.
    pub not_after: i64,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        field,
        path: path.display().to_string(),
        source,
    })
}

fn certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Certificate(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(IdentityError::Empty {
            field,
            path: path.display().to_string(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

impl Identity {
    /// Loads and checks the chain, key and trust bundle: the leaf must carry
    /// one valid SPIFFE ID, be in date, match the key and chain to the bundle.
    pub fn load(cert: &Path, key: &Path, bundle: &Path) -> Result<Self, IdentityError> {
        let provider = provider();
        let chain = certs("identity.cert", cert)?;
        let key_pem = read("identity.key", key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| IdentityError::Empty {
            field: "identity.key",
            path: key.display().to_string(),
            what: "usable PEM private key",
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certs("identity.trust_bundle", bundle)? {
            roots
                .add(ca)
                .map_err(|e| IdentityError::Bundle(format!("{}: {e}", bundle.display())))?;
        }
        let id = spiffe_id_of(&chain[0]).map_err(IdentityError::Certificate)?;
        let not_after = not_after(&chain[0]).unwrap_or(0);
        let parsed = ParsedCertificate::try_from(&chain[0])
            .map_err(|e| IdentityError::Certificate(format!("{}: {e}", cert.display())))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| {
            IdentityError::Certificate(format!(
                "{} is not usable with the trust bundle: {e}",
                cert.display()
            ))
        })?;
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(IdentityError::Key)?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing_key)
            .keys_match()
            .map_err(IdentityError::Key)?;
        Ok(Identity {
            id,
            chain,
            key,
            roots: Arc::new(roots),
            provider,
            not_after,
        })
    }

    /// Loads the identity that `files` name.
    pub fn load_files(files: &crate::config::IdentityFiles) -> Result<Self, IdentityError> {
        Identity::load(&files.cert, &files.key, &files.trust_bundle)
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// A copy of the private key, for a TLS client of another kind (the
    /// agent's control-plane connection to its zone).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The HBONE server side: TLS 1.3 only, a client certificate chained to
    /// the bundle and carrying a SPIFFE ID is required.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, rustls::Error> {
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier { inner }))
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(cfg)
    }

    /// The HBONE client side towards one peer agent, which must prove `peer`.
    pub fn client_config(&self, peer: SpiffeId) -> Result<rustls::ClientConfig, rustls::Error> {
        let verifier = SpiffeServerVerifier {
            roots: self.roots.clone(),
            algs: self.provider.signature_verification_algorithms,
            expected: peer,
        };
        let mut cfg = tls13_client(self.provider.clone())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        // Resumption tickets would skip the client certificate on later
        // connections; every tunnel re-proves its identity instead.
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(cfg)
    }
}

fn identity_failure(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        BadIdentity(reason),
    ))))
}

/// A certificate whose chain is fine but whose SPIFFE ID is missing, malformed
/// or not the one expected.
#[derive(Debug)]
pub struct BadIdentity(pub String);

impl fmt::Display for BadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadIdentity {}

/// Checks a client chain with webpki, then that the leaf has a SPIFFE ID.
/// Authorization of that ID is per stream, so that refusals are answered
/// (403) and counted rather than showing up as broken handshakes.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_of(end_entity).map_err(identity_failure)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks a peer agent's chain, then that it proves the expected SPIFFE ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    expected: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let got = spiffe_id_of(end_entity).map_err(identity_failure)?;
        if got != self.expected {
            return Err(identity_failure(format!(
                "peer is {got}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Why a handshake failed, as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    UnknownCa,
    Expired,
    BadCertificate,
    NoCertificate,
    BadIdentity,
    Protocol,
    Timeout,
    Io,
}

impl HandshakeFailure {
    /// Classifies an error returned by a tokio-rustls handshake.
    pub fn classify(err: &io::Error) -> Self {
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return HandshakeFailure::Io;
        };
        match tls {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => HandshakeFailure::UnknownCa,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    HandshakeFailure::Expired
                }
                CertificateError::Other(o) if o.0.downcast_ref::<BadIdentity>().is_some() => {
                    HandshakeFailure::BadIdentity
                }
                _ => HandshakeFailure::BadCertificate,
            },
            rustls::Error::NoCertificatesPresented => HandshakeFailure::NoCertificate,
            rustls::Error::AlertReceived(alert) => match alert {
                rustls::AlertDescription::UnknownCA => HandshakeFailure::UnknownCa,
                rustls::AlertDescription::CertificateExpired => HandshakeFailure::Expired,
                rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::CertificateRequired => HandshakeFailure::BadCertificate,
                _ => HandshakeFailure::Protocol,
            },
            _ => HandshakeFailure::Protocol,
        }
    }

    /// The metrics label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::BadIdentity => "bad_identity",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Io => "io",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    use std::path::PathBuf;

    struct Ca(CertifiedIssuer<'static, KeyPair>);

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
        }

        /// Writes a leaf for `uri` (or none) into `dir`, with its CA as bundle.
        fn leaf(
            &self,
            dir: &Path,
            uri: Option<&str>,
            expired: bool,
        ) -> (PathBuf, PathBuf, PathBuf) {
            self.leaf_trusting(dir, uri, expired, self)
        }

        fn leaf_trusting(
            &self,
            dir: &Path,
            uri: Option<&str>,
            expired: bool,
            trust: &Ca,
        ) -> (PathBuf, PathBuf, PathBuf) {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            if let Some(uri) = uri {
                params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
            }
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2020, 1, 2);
            }
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.0).unwrap();
            let paths = (
                dir.join("cert.pem"),
                dir.join("key.pem"),
                dir.join("ca.pem"),
            );
            std::fs::write(&paths.0, cert.pem()).unwrap();
            std::fs::write(&paths.1, key.serialize_pem()).unwrap();
            std::fs::write(&paths.2, trust.0.pem()).unwrap();
            paths
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ca_roots(ca: &Ca) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.0.der().clone()).unwrap();
        Arc::new(roots)
    }

    fn load(p: &(PathBuf, PathBuf, PathBuf)) -> Result<Identity, IdentityError> {
        Identity::load(&p.0, &p.1, &p.2)
    }

    const CLIENT: &str = "spiffe://weft.test/ns/default/sa/client";
    const SERVER: &str = "spiffe://weft.test/ns/default/sa/server";

    #[test]
    fn loads_a_valid_identity_and_refuses_bad_ones() {
        let ca = Ca::new("mesh");
        let dir = tempdir("load");
        let id = load(&ca.leaf(&dir, Some(CLIENT), false)).unwrap();
        assert_eq!(id.id.as_str(), CLIENT);

        let err = load(&ca.leaf(&dir, Some(CLIENT), true))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("identity.cert") && err.to_lowercase().contains("expired"),
            "{err}"
        );

        let err = load(&ca.leaf(&dir, None, false)).unwrap_err().to_string();
        assert!(err.contains("subjectAltName"), "{err}");

        let err = load(&ca.leaf(&dir, Some("spiffe://weft.test/nope"), false))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/ns/<namespace>/sa/<service-account>"),
            "{err}"
        );

        // A bundle from another CA: the chain does not lead to it.
        let paths = ca.leaf(&dir, Some(CLIENT), false);
        std::fs::write(&paths.2, Ca::new("other").0.pem()).unwrap();
        let err = load(&paths).unwrap_err().to_string();
        assert!(err.contains("trust bundle"), "{err}");

        // A key that is not the certificate's.
        let paths = ca.leaf(&dir, Some(CLIENT), false);
        std::fs::write(&paths.1, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let err = load(&paths).unwrap_err().to_string();
        assert!(err.contains("identity.key"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Runs a handshake over an in-memory pipe; returns each side's failure.
    async fn handshake(
        client: &Identity,
        expect: &str,
        server: &Identity,
    ) -> (Option<HandshakeFailure>, Option<HandshakeFailure>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(
            client.client_config(expect.parse().unwrap()).unwrap(),
        ));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server.server_config().unwrap()));
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let (c, s) = tokio::join!(
            async {
                use tokio::io::AsyncReadExt;
                // TLS 1.3 reports the server's refusal of the client's
                // certificate on the client's first read.
                let mut tls = connector.connect(name, a).await?;
                let mut byte = [0u8; 1];
                tls.read(&mut byte).await.map(|_| ())
            },
            async {
                use tokio::io::AsyncWriteExt;
                let mut tls = acceptor.accept(b).await?;
                tls.write_all(b"!").await?;
                tls.flush().await
            }
        );
        (
            c.err().map(|e| HandshakeFailure::classify(&e)),
            s.err().map(|e| HandshakeFailure::classify(&e)),
        )
    }

    #[tokio::test]
    async fn handshakes_check_chain_and_identity() {
        let ca = Ca::new("mesh");
        let (cd, sd) = (tempdir("hs-client"), tempdir("hs-server"));
        let client = load(&ca.leaf(&cd, Some(CLIENT), false)).unwrap();
        let server = load(&ca.leaf(&sd, Some(SERVER), false)).unwrap();
        assert_eq!(handshake(&client, SERVER, &server).await, (None, None));

        // The server is not who the client expects.
        let (c, _) = handshake(&client, CLIENT, &server).await;
        assert_eq!(c, Some(HandshakeFailure::BadIdentity));

        // A client from another CA is refused by the server.
        let od = tempdir("hs-other");
        let other = load(&Ca::new("other").leaf_trusting(&od, Some(CLIENT), false, &ca));
        // It cannot even load as an identity: its chain does not lead to
        // its bundle. Build it by hand from the other CA's leaf.
        assert!(other.is_err());
        let rogue = Ca::new("rogue");
        let rogue_paths = rogue.leaf(&od, Some(CLIENT), false);
        let mut other = load(&rogue_paths).unwrap();
        other.roots = ca_roots(&ca);
        let (_, s) = handshake(&other, SERVER, &server).await;
        assert_eq!(s, Some(HandshakeFailure::UnknownCa));
        for d in [cd, sd, od] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
}
