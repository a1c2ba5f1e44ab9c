//! The zone's control-plane CA (trust domain `<zone>.zone.weft`): it
//! certifies the gRPC server (as `weft-zone`) and each enrolled agent's
//! control-plane identity
//! (`spiffe://<zone>.zone.weft/ns/weft-system/sa/<agent>`). Agents pin it by
//! the SHA-256 of its certificate, which `GET /v1/zone` and token issuance
//! show.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use weft_api::SpiffeId;
use weft_pki::{IssueError, IssuedCert, MeshCa, DEFAULT_CA_LIFETIME};
use weft_store::{CaMaterial, Store};
use x509_parser::extensions::GeneralName;

/// The DNS name agents verify the controller's gRPC certificate against.
pub const SERVER_NAME: &str = "weft-zone";
/// The namespace of agents' control-plane identities.
pub const AGENT_NAMESPACE: &str = "weft-system";
/// How long the gRPC server certificate issued at each start is valid.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

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
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

    /// The TLS config of the gRPC server: TLS 1.3, ALPN h2, a certificate
    /// for `weft-zone` and `extra_names` issued now, client certificates
    /// optional (Enroll has none) but verified against this CA when given.
    pub fn server_config(&self, extra_names: &[String]) -> anyhow::Result<ServerConfig> {
        let mut names = vec![SERVER_NAME.to_owned()];
        names.extend(extra_names.iter().cloned());
        let cert = self
            .ca
            .issue_server(&names, SERVER_CERT_LIFETIME)
            .context("cannot issue the gRPC server certificate")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
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
            .with_single_cert(cert.chain_der, cert.key_der.into())
            .context("the gRPC server certificate is unusable")?;
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
