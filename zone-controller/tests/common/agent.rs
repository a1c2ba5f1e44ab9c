//! A test agent: a tonic client over rustls that pins the zone CA (by the
//! SHA-256 that `GET /v1/zone` gives) and verifies the server as
//! `weft-zone`, with or without the agent's client certificate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use weft_api::proto::agent::v1 as pb;
use weft_api::proto::agent::v1::agent_service_client::AgentServiceClient;
use weft_pki::WorkloadKey;

use super::{Zone, DEADLINE};

/// The zone CA as an agent pins it.
#[derive(Clone)]
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
        hbone_address: String::new(),
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

/// The default HBONE address the test agents announce.
pub const HBONE: &str = "127.0.0.1:15008";

/// A certificate request for `workload` with a fresh key, as an agent
/// sends at enrolment or renewal.
pub fn certificate_request(workload: &str) -> pb::CertificateRequest {
    pb::CertificateRequest {
        workload: workload.to_owned(),
        csr_pem: WorkloadKey::generate()
            .expect("a key")
            .bare_csr()
            .expect("a CSR"),
    }
}

/// Enrols `agent` with `workloads` using the token `secret` over the gRPC
/// API at `addr`; returns the answer and the agent's new identity.
pub async fn enroll_with_token(
    addr: SocketAddr,
    pinned: &Pinned,
    secret: &str,
    agent: &str,
    workloads: Vec<pb::Workload>,
) -> (pb::EnrollResponse, Identity) {
    let (request, key) = enroll_request(secret, agent, HBONE, workloads);
    let mut client = connect(addr, pinned, None).await;
    let response = client.enroll(request).await.expect("enrolled").into_inner();
    let identity = Identity {
        chain_pem: response.agent_chain_pem.clone(),
        key_pem: key.key_pem(),
    };
    (response, identity)
}

/// The Hello an agent opens its config stream with.
pub fn hello(agent: &str, workloads: Vec<pb::Workload>) -> pb::Hello {
    pb::Hello {
        agent_id: agent.to_owned(),
        applied_version: String::new(),
        workloads,
        host: None,
        hbone_address: HBONE.to_owned(),
        features: vec![
            weft_api::proto::agent::ENDPOINT_PATCHES.to_owned(),
            weft_api::proto::agent::SERVICE_PARTS.to_owned(),
        ],
    }
}

/// Verifies an issued chain (leaf first) as a client certificate against
/// the certificates of `bundle_pem` as the only trust anchors.
pub fn verify_chain(chain_pem: &str, bundle_pem: &str) -> Result<(), rustls::Error> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("chain PEM");
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(ca.expect("bundle PEM")).expect("a trust anchor");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .expect("a verifier")
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map(|_| ())
}

/// An open config stream, as an agent holds it: acks are sent only when
/// the test asks, since what is acked drives CA rotation and inventory.
pub struct ConfigStream {
    /// The agent's side of the stream (Hello, Ack, Nack).
    pub send: mpsc::Sender<pb::AgentMessage>,
    /// The zone's updates.
    pub receive: tonic::Streaming<pb::ZoneMessage>,
    /// The whole view as last assembled, the base of the next delta.
    pub current: Option<pb::ConfigUpdate>,
}

impl ConfigStream {
    /// Opens the stream at `addr` as `identity` and sends `hello`.
    pub async fn open(
        addr: SocketAddr,
        pinned: &Pinned,
        identity: &Identity,
        hello: pb::Hello,
    ) -> ConfigStream {
        let mut client = connect(addr, pinned, Some(identity)).await;
        let (send, outgoing) = mpsc::channel(8);
        send.send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(hello)),
        })
        .await
        .expect("queue the Hello");
        let receive = client
            .stream(ReceiverStream::new(outgoing))
            .await
            .expect("stream opened")
            .into_inner();
        ConfigStream {
            send,
            receive,
            current: None,
        }
    }

    /// The next update within `within` (chunks reassembled, a delta
    /// applied on the last one: always the whole view), not acked.
    pub async fn next_update(&mut self, within: Duration) -> pb::ConfigUpdate {
        let deadline = Instant::now() + within;
        let mut whole: Option<pb::ConfigUpdate> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.receive.message())
                .await
                .expect("an update within the deadline")
                .expect("the stream is healthy")
                .expect("the stream is open");
            let Some(pb::zone_message::Message::Config(chunk)) = message.message else {
                panic!("not a config update");
            };
            let more = chunk.more;
            whole = Some(match whole {
                None => chunk,
                Some(mut first) => {
                    assert_eq!(first.version, chunk.version, "chunks of one version");
                    first.services.extend(chunk.services);
                    first.removed_services.extend(chunk.removed_services);
                    first.patched_services.extend(chunk.patched_services);
                    first
                }
            });
            if !more {
                break;
            }
        }
        let mut update = whole.expect("at least one chunk");
        update.more = false;
        weft_agent::view::join_service_parts(&mut update.services);
        // The agent's own code applies it (a delta must be on the view
        // last received).
        let update = weft_agent::view::resolve(self.current.as_ref(), update)
            .expect("the update applies on the view last received");
        self.current = Some(update.clone());
        update
    }

    /// Acks `version`, as an agent that applied it.
    pub async fn ack(&self, version: &str) {
        self.send
            .send(pb::AgentMessage {
                message: Some(pb::agent_message::Message::Ack(pb::Ack {
                    version: version.to_owned(),
                })),
            })
            .await
            .expect("ack");
    }

    /// The first update within `within` that satisfies `want`; nothing is
    /// acked.
    pub async fn first_matching(
        &mut self,
        within: Duration,
        want: impl Fn(&pb::ConfigUpdate) -> bool,
    ) -> pb::ConfigUpdate {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let update = self.next_update(left).await;
            if want(&update) {
                return update;
            }
        }
    }

    /// Updates, each acked, until one satisfies `want` (within
    /// [`DEADLINE`]).
    pub async fn until_acked(
        &mut self,
        want: impl Fn(&pb::ConfigUpdate) -> bool,
    ) -> pb::ConfigUpdate {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let update = self.next_update(left).await;
            self.ack(&update.version).await;
            if want(&update) {
                return update;
            }
        }
    }
}

/// A controller on a fresh SQLite file with one mesh applied, and its CA
/// as agents pin it: where most agent API tests start.
pub struct ZoneWithMesh {
    /// Holds the database file; removed when dropped.
    pub dir: tempfile::TempDir,
    /// The SQLite file, for tests that reach into the store.
    pub db: PathBuf,
    /// The running controller.
    pub zone: Zone,
    /// Its CA.
    pub pinned: Pinned,
}

impl ZoneWithMesh {
    /// Starts a controller and applies `mesh_yaml` through `weftctl`.
    pub async fn start(mesh_yaml: &str) -> ZoneWithMesh {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = dir.path().join("zone.db");
        let zone = Zone::start(&db).await;
        zone.ctl(&["apply", "-f", "-"], mesh_yaml)
            .await
            .expect("apply the mesh");
        let pinned = pinned(&zone).await;
        ZoneWithMesh {
            dir,
            db,
            zone,
            pinned,
        }
    }
}
