//! The zone's control-plane CA (trust domain `<zone>.zone.weft`): it
//! certifies the gRPC server (as `weft-zone`) and each enrolled agent's
//! control-plane identity
//! (`spiffe://<zone>.zone.weft/ns/weft-system/sa/<agent>`). Agents pin it by
//! the SHA-256 of its certificate, which `GET /v1/zone` and token issuance
//! show.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use weft_api::SpiffeId;
use weft_pki::{IssueError, IssuedCert, MeshCa, DEFAULT_CA_LIFETIME};
use weft_store::{CaMaterial, Store};
use x509_parser::extensions::GeneralName;

/// The DNS name agents verify the controller's gRPC certificate against.
pub const SERVER_NAME: &str = "weft-zone";
/// The namespace of agents' control-plane identities.
pub const AGENT_NAMESPACE: &str = "weft-system";
/// How long each gRPC server certificate is valid; a new one is issued at
/// half its life (see [`ServerCert::renew`]).
pub const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How soon a failed reissue is tried again.
const REISSUE_RETRY: Duration = Duration::from_secs(600);

/// The zone's CA, loaded (or created on first start) from the store.
pub struct ZoneCa {
    ca: MeshCa,
    /// `sha256:<hex>` of the CA certificate's DER: what agents pin.
    pub pin: String,
    /// The CA certificate in PEM.
    pub pem: String,
}

/// `sha256:<lowercase hex>` of a certificate's DER.
pub fn pin_of(der: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(der)))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    text
}

impl ZoneCa {
    /// Loads the zone's CA, generating and storing it on the first start.
    /// Two replicas starting at once end up with the one stored first.
    pub async fn load_or_create(store: &Store, zone: &str) -> anyhow::Result<ZoneCa> {
        let trust_domain = format!("{zone}.zone.weft");
        // Mesh names are DNS labels: a key with a '/' cannot collide.
        let key = format!("zone/{zone}");
        let stored = match store.get_ca(&key).await? {
            Some(stored) => stored,
            None => {
                let fresh = MeshCa::generate(&trust_domain, DEFAULT_CA_LIFETIME)
                    .context("cannot generate the zone CA")?
                    .to_pem();
                let material = CaMaterial {
                    cert_pem: fresh.cert_pem,
                    key_pem: fresh.key_pem,
                };
                let stored = store.put_ca_if_absent(&key, &material).await?;
                if stored == material {
                    tracing::info!(%zone, "zone CA generated");
                }
                stored
            }
        };
        let ca = MeshCa::from_pem(&stored.cert_pem, &stored.key_pem, &trust_domain)
            .with_context(|| format!("the stored zone CA {key:?} is unusable"))?;
        Ok(ZoneCa {
            pin: pin_of(ca.cert_der()),
            pem: ca.cert_pem(),
            ca,
        })
    }

    /// The TLS config of the gRPC server: TLS 1.3, ALPN h2, the
    /// certificate `cert` serves (for `weft-zone` and its extra names),
    /// client certificates optional (Enroll has none) but verified against
    /// this CA when given.
    pub fn server_config(&self, cert: Arc<ServerCert>) -> anyhow::Result<ServerConfig> {
        let provider = cert.provider.clone();
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.cert_der().clone())
            .context("the zone CA cannot be a trust anchor")?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .context("cannot build the client certificate verifier")?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 unavailable")?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(cert);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// An agent's control-plane identity.
    pub fn agent_id(&self, agent: &str) -> Result<SpiffeId, weft_api::IdentityError> {
        SpiffeId::new(self.ca.trust_domain(), AGENT_NAMESPACE, agent)
    }

    /// Signs an agent's control-plane CSR (no SAN, or exactly its identity).
    pub fn sign_agent(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<IssuedCert, IssueError> {
        self.ca.sign_csr(csr_pem, id, lifetime)
    }

    /// The agent named by a client certificate that rustls already verified
    /// against this CA: its SPIFFE URI SAN's last segment, if the identity is
    /// an agent's of this zone.
    pub fn agent_of(&self, cert_der: &[u8]) -> Option<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let mut uris = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            });
        let uri = uris.next()?;
        if uris.next().is_some() {
            return None;
        }
        let id: SpiffeId = uri.parse().ok()?;
        (id.trust_domain() == self.ca.trust_domain() && id.namespace() == AGENT_NAMESPACE)
            .then(|| id.service_account().to_owned())
    }
}

/// The gRPC server's certificate, issued by the zone CA at start and again
/// at half its life, so that a zone running longer than a certificate's
/// lifetime never serves an expired one; handshakes take whichever is
/// current.
#[derive(Debug)]
pub struct ServerCert {
    names: Vec<String>,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCert {
    /// A certificate for `weft-zone` and `extra_names`, valid `lifetime`.
    pub fn issue(ca: &ZoneCa, extra_names: &[String], lifetime: Duration) -> anyhow::Result<Self> {
        let mut names = vec![SERVER_NAME.to_owned()];
        names.extend(extra_names.iter().cloned());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = RwLock::new(certified(ca, &names, lifetime, &provider)?);
        Ok(ServerCert {
            names,
            lifetime,
            provider,
            current,
        })
    }

    /// The certificate handshakes get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Issues a new certificate at half the current one's life, until
    /// `stop`; a failure is logged and tried again (the current one stays).
    pub async fn renew(self: Arc<Self>, ca: Arc<ZoneCa>, mut stop: watch::Receiver<bool>) {
        let mut wait = self.lifetime / 2;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            match certified(&ca, &self.names, self.lifetime, &self.provider) {
                Ok(fresh) => {
                    *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                    tracing::info!(
                        valid_for_s = self.lifetime.as_secs(),
                        "gRPC server certificate reissued"
                    );
                    wait = self.lifetime / 2;
                }
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "cannot reissue the gRPC server certificate; retrying");
                    wait = REISSUE_RETRY.min(self.lifetime / 4);
                }
            }
        }
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn certified(
    ca: &ZoneCa,
    names: &[String],
    lifetime: Duration,
    provider: &CryptoProvider,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let cert = ca
        .ca
        .issue_server(names, lifetime)
        .context("cannot issue the gRPC server certificate")?;
    let key = provider
        .key_provider
        .load_private_key(cert.key_der.into())
        .context("the gRPC server key is unusable")?;
    Ok(Arc::new(CertifiedKey::new(cert.chain_der, key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_after(cert: &CertifiedKey) -> i64 {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.cert[0].as_ref()).unwrap();
        parsed.validity().not_after.timestamp()
    }

    #[tokio::test]
    async fn the_server_certificate_is_reissued_at_half_its_life() {
        let store = Store::open("sqlite::memory:").await.unwrap();
        let ca = Arc::new(ZoneCa::load_or_create(&store, "z").await.unwrap());
        let lifetime = Duration::from_secs(4);
        let cert =
            Arc::new(ServerCert::issue(&ca, &["zone.example".to_owned()], lifetime).unwrap());
        let first = cert.current();
        let (stop_tx, stop) = watch::channel(false);
        let renewing = tokio::spawn(cert.clone().renew(ca, stop));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while Arc::ptr_eq(&cert.current(), &first) {
            assert!(tokio::time::Instant::now() < deadline, "never reissued");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let second = cert.current();
        assert_ne!(second.cert[0], first.cert[0]);
        assert!(not_after(&second) >= not_after(&first));
        stop_tx.send(true).unwrap();
        renewing.await.unwrap();
    }
}
