//! A test agent: a tonic client over rustls that pins the zone CA (by the
//! SHA-256 that `GET /v1/zone` gives) and verifies the server as
//! `weft-zone`, with or without the agent's client certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};
use weft_api::proto::agent::v1 as pb;
use weft_api::proto::agent::v1::agent_service_client::AgentServiceClient;
use weft_pki::WorkloadKey;

use super::Zone;

/// The zone CA as an agent pins it.
pub struct Pinned {
    /// The CA certificate (DER), checked against the pin.
    pub ca: CertificateDer<'static>,
    /// The pin.
    pub pin: String,
}

/// Reads `GET /v1/zone` and checks that the pin is the CA's SHA-256.
pub async fn pinned(zone: &Zone) -> Pinned {
    let info = zone.get_json("/v1/zone").await;
    let pem = info["caPem"].as_str().expect("caPem");
    let pin = info["caPin"].as_str().expect("caPin").to_owned();
    let ca = CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate");
    let digest: String = Sha256::digest(ca.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        pin,
        format!("sha256:{digest}"),
        "the pin is the CA's SHA-256"
    );
    Pinned { ca, pin }
}

/// An agent's control-plane identity: its chain and key.
#[derive(Clone)]
pub struct Identity {
    /// Leaf first.
    pub chain_pem: String,
    /// PKCS#8.
    pub key_pem: String,
}

/// Connects to the zone's gRPC API, verifying it as `weft-zone` against
/// the pinned CA, presenting `identity` if given.
pub async fn connect(
    addr: SocketAddr,
    pinned: &Pinned,
    identity: Option<&Identity>,
) -> AgentServiceClient<Channel> {
    let mut roots = RootCertStore::empty();
    roots.add(pinned.ca.clone()).expect("CA as a root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(identity) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(identity.chain_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("chain PEM");
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let channel = Endpoint::from_static("http://weft-zone")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from("weft-zone").expect("a DNS name");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .expect("connect to the gRPC API");
    AgentServiceClient::new(channel)
}

/// A workload registration.
pub fn workload(name: &str, service: &str, address: &str, port: u32) -> pb::Workload {
    pb::Workload {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        service: service.to_owned(),
        service_account: service.to_owned(),
        address: address.to_owned(),
        ports: vec![pb::Port {
            port,
            protocol: pb::Protocol::Http as i32,
        }],
        labels: Default::default(),
    }
}

/// An enrolment request with fresh keys: CSRs that name nothing (the agent
/// does not know the trust domain yet). Returns the request and the
/// agent's key.
pub fn enroll_request(
    token: &str,
    agent: &str,
    hbone: &str,
    workloads: Vec<pb::Workload>,
) -> (pb::EnrollRequest, WorkloadKey) {
    let agent_key = WorkloadKey::generate().expect("a key");
    let certificates = workloads
        .iter()
        .map(|w| pb::CertificateRequest {
            workload: w.name.clone(),
            csr_pem: WorkloadKey::generate()
                .expect("a key")
                .bare_csr()
                .expect("a CSR"),
        })
        .collect();
    let request = pb::EnrollRequest {
        token: token.to_owned(),
        agent_name: agent.to_owned(),
        workloads,
        certificates,
        host: Some(pb::HostFacts {
            hostname: agent.to_owned(),
            cpus: 2,
            ..Default::default()
        }),
        agent_csr_pem: agent_key.bare_csr().expect("a CSR"),
        hbone_address: hbone.to_owned(),
    };
    (request, agent_key)
}
