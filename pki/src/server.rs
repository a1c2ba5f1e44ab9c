//! Server certificates for a controller's own endpoints (the zone's agent
//! gRPC port): agents verify the controller by a DNS name (or IP) against
//! the CA they pinned, so this leaf carries those names, not a SPIFFE ID.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use rcgen::{ExtendedKeyUsagePurpose, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use crate::ca::MeshCa;
use crate::issue::IssueError;

/// A server certificate and its freshly generated key. `Debug` does not
/// show the key.
pub struct ServerCert {
    /// The chain in DER: the leaf, then the CA certificate.
    pub chain_der: Vec<CertificateDer<'static>>,
    /// The same chain in PEM.
    pub chain_pem: String,
    /// The private key (PKCS#8 DER), for a rustls `ServerConfig`.
    pub key_der: PrivatePkcs8KeyDer<'static>,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Issues a TLS server certificate (serverAuth only) for `names`, each a
    /// DNS name or an IP address, with a new ECDSA P-256 key, valid for
    /// `lifetime` (never past the CA's own expiry).
    pub fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<ServerCert, IssueError> {
        let mut leaf = self.leaf_params(lifetime)?;
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(IssueError::Sign)?),
            };
            leaf.params.subject_alt_names.push(san);
        }
        leaf.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(IssueError::Sign)?;
        let (chain_der, chain_pem) = self.sign_leaf(&leaf.params, &key)?;
        Ok(ServerCert {
            chain_der,
            chain_pem,
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_after: leaf.not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::client::verify_server_cert_signed_by_trust_anchor;
    use rustls::server::ParsedCertificate;
    use rustls::RootCertStore;
    use rustls_pki_types::{ServerName, UnixTime};

    use super::*;
    use crate::DEFAULT_CA_LIFETIME;

    #[test]
    fn server_certificates_verify_for_their_names_only() {
        let ca = MeshCa::generate("zone-a.zone.weft", DEFAULT_CA_LIFETIME).unwrap();
        let names = ["weft-zone".to_owned(), "10.0.0.7".to_owned()];
        let cert = ca.issue_server(&names, Duration::from_secs(3600)).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let parsed = ParsedCertificate::try_from(&cert.chain_der[0]).unwrap();
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &cert.chain_der[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .unwrap();
        let check = |name: &str| {
            rustls::client::verify_server_name(
                &parsed,
                &ServerName::try_from(name.to_owned()).unwrap(),
            )
        };
        check("weft-zone").unwrap();
        check("10.0.0.7").unwrap();
        assert!(check("other").is_err());
        assert!(!format!("{cert:?}").contains("key_der"));
    }
}
