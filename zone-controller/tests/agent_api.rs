//! The agent gRPC API end to end against the real binary: enrolment with
//! tokens (and every refusal cause), certificates that chain to the trust
//! bundle with the right SPIFFE ID, the config stream (services with a
//! virtual IP and endpoints, new versions when another agent joins, acks
//! and nacks in the inventory), renewal, and mTLS enforcement.

mod common;

use std::time::{Duration, SystemTime};

use common::agent::{connect, enroll_request, pinned, workload, Identity, Pinned};
use common::{eventually, Zone, DEADLINE};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use weft_api::proto::agent::v1 as pb;
use weft_pki::WorkloadKey;
use weft_store::{Store, TokenSpec, WorkloadScope};

const MESH: &str = "\
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: default
spec:
  trustDomain: weft.test
";

struct Setup {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    zone: Zone,
    pinned: Pinned,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = dir.path().join("zone.db");
    let zone = Zone::start(&db).await;
    zone.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply the mesh");
    let pinned = pinned(&zone).await;
    Setup {
        _dir: dir,
        db,
        zone,
        pinned,
    }
}

async fn token(zone: &Zone, args: &[&str]) -> String {
    let mut argv = vec!["token", "issue", "--mesh", "default", "-o", "secret"];
    argv.extend_from_slice(args);
    zone.ctl(&argv, "")
        .await
        .expect("token issue")
        .trim()
        .to_owned()
}

/// Checks an issued chain against the bundle, as a client certificate, and
/// returns the leaf's URI SANs.
fn verify(chain_pem: &str, bundle_pem: &str) -> Vec<String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("chain PEM");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(ca.expect("bundle PEM")).expect("a trust anchor");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider,
    )
    .build()
    .expect("a verifier")
    .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
    .expect("the chain verifies against the bundle");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("a certificate");
    leaf.subject_alternative_name()
        .expect("SAN parses")
        .expect("a SAN")
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// Enrols `agent` with one workload; returns its identity.
async fn enroll(
    setup: &Setup,
    agent: &str,
    workloads: Vec<pb::Workload>,
) -> (pb::EnrollResponse, Identity) {
    let secret = token(&setup.zone, &["--workload-prefix", "web-"]).await;
    let (request, key) = enroll_request(&secret, agent, "127.0.0.1:15008", workloads);
    let mut client = connect(setup.zone.grpc, &setup.pinned, None).await;
    let response = client.enroll(request).await.expect("enrolled").into_inner();
    let identity = Identity {
        chain_pem: response.agent_chain_pem.clone(),
        key_pem: key.key_pem(),
    };
    (response, identity)
}

/// An open config stream.
struct Stream {
    send: mpsc::Sender<pb::AgentMessage>,
    receive: tonic::Streaming<pb::ZoneMessage>,
}

impl Stream {
    async fn open(setup: &Setup, identity: &Identity, hello: pb::Hello) -> Stream {
        let mut client = connect(setup.zone.grpc, &setup.pinned, Some(identity)).await;
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
        Stream { send, receive }
    }

    /// The next update, acked.
    async fn next(&mut self) -> pb::ConfigUpdate {
        let message = tokio::time::timeout(DEADLINE, self.receive.message())
            .await
            .expect("an update within the deadline")
            .expect("the stream is healthy")
            .expect("the stream is open");
        let Some(pb::zone_message::Message::Config(update)) = message.message else {
            panic!("not a config update");
        };
        self.send
            .send(pb::AgentMessage {
                message: Some(pb::agent_message::Message::Ack(pb::Ack {
                    version: update.version.clone(),
                })),
            })
            .await
            .expect("ack");
        update
    }

    /// Updates until one satisfies `want`.
    async fn until(&mut self, want: impl Fn(&pb::ConfigUpdate) -> bool) -> pb::ConfigUpdate {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let update = self.next().await;
            if want(&update) {
                return update;
            }
            assert!(std::time::Instant::now() < deadline, "no matching update");
        }
    }
}

fn hello(agent: &str, workloads: Vec<pb::Workload>) -> pb::Hello {
    pb::Hello {
        agent_id: agent.to_owned(),
        applied_version: String::new(),
        workloads,
        host: None,
        hbone_address: "127.0.0.1:15008".to_owned(),
    }
}

fn endpoints_of<'a>(update: &'a pb::ConfigUpdate, service: &str) -> Option<&'a pb::ServiceView> {
    update.services.iter().find(|s| s.name == service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_stream_nack_renew() {
    let setup = setup().await;
    let web1 = workload("web-1", "web", "10.0.0.1", 8080);
    let (enrolled, identity) = enroll(&setup, "vm-1", vec![web1.clone()]).await;
    assert_eq!(enrolled.mesh, "default");
    assert_eq!(
        enrolled.agent_id,
        "spiffe://default.zone.weft/ns/weft-system/sa/vm-1"
    );
    assert_eq!(enrolled.certificates.len(), 1);
    let cert = &enrolled.certificates[0];
    assert_eq!(cert.spiffe_id, "spiffe://weft.test/ns/default/sa/web");
    assert_eq!(
        verify(&cert.chain_pem, &enrolled.trust_bundle_pem),
        ["spiffe://weft.test/ns/default/sa/web"]
    );
    let lifetime = cert.not_after_unix - cert.not_before_unix;
    assert!(
        lifetime > 23 * 3600 && lifetime <= 24 * 3600 + 300,
        "{lifetime}"
    );
    assert_eq!(
        verify(&enrolled.agent_chain_pem, &enrolled.controller_ca_pem),
        [enrolled.agent_id.as_str()]
    );

    // The stream: the derived service with its VIP and vm-1's endpoint.
    let mut first = Stream::open(&setup, &identity, hello("vm-1", vec![web1.clone()])).await;
    let update = first
        .until(|u| {
            endpoints_of(u, "web").is_some_and(|s| s.endpoints.len() == 1 && s.endpoints[0].ready)
        })
        .await;
    let web = endpoints_of(&update, "web").unwrap();
    assert!(web.virtual_ip.starts_with("240.240."), "{}", web.virtual_ip);
    assert_eq!(web.endpoints[0].address, "10.0.0.1");
    assert_eq!(web.endpoints[0].agent, "127.0.0.1:15008");
    assert_eq!(
        web.endpoints[0].spiffe_id,
        "spiffe://weft.test/ns/default/sa/web"
    );
    assert_eq!(update.inbound.len(), 1);
    assert_eq!(update.inbound[0].allow, ["spiffe://weft.test/*"]);
    assert_eq!(
        (update.mesh.as_str(), update.zone.as_str()),
        ("default", "default")
    );
    assert!(update.trust_bundle_pem.contains("BEGIN CERTIFICATE"));
    assert_eq!(update.version.len(), 64);

    // A second agent joins: the first gets a new version with both.
    let web2 = workload("web-2", "web", "10.0.0.2", 8080);
    let (_, identity2) = enroll(&setup, "vm-2", vec![web2.clone()]).await;
    let mut second = Stream::open(&setup, &identity2, hello("vm-2", vec![web2])).await;
    let both = first
        .until(|u| {
            endpoints_of(u, "web")
                .is_some_and(|s| s.endpoints.len() == 2 && s.endpoints.iter().all(|e| e.ready))
        })
        .await;
    assert_ne!(both.version, update.version);
    // Views are per agent (inbound rules differ), services are the same.
    let seen_by_second = second.until(|u| u.services == both.services).await;
    assert_eq!(seen_by_second.inbound[0].workload, "web-2");

    // A Nack is recorded and shown by inspect; the stream stays up.
    first
        .send
        .send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Nack(pb::Nack {
                version: both.version.clone(),
                reason: "services[0].virtual_ip: test refusal".to_owned(),
            })),
        })
        .await
        .expect("nack");
    let agents = eventually("the nack in inspect", || async {
        let agents = setup.zone.get_json("/v1/inspect/agents").await;
        let vm1 = agents
            .as_array()?
            .iter()
            .find(|a| a["name"] == "vm-1")?
            .clone();
        (vm1["lastNack"]["reason"] == "services[0].virtual_ip: test refusal").then_some(agents)
    })
    .await;
    let vm1 = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "vm-1")
        .unwrap();
    assert_eq!(vm1["online"], true);
    assert_eq!(vm1["lastNack"]["version"], both.version.as_str());
    assert_eq!(vm1["workloads"], serde_json::json!(["web-1"]));
    assert_eq!(vm1["host"]["hostname"], "vm-1");
    assert!(vm1["connectedReplica"].is_string());
    let services = setup.zone.get_json("/v1/inspect/services").await;
    let web = &services.as_array().unwrap()[0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["endpoints"].as_array().unwrap().len(), 2);
    let workloads = setup.zone.get_json("/v1/inspect/workloads").await;
    assert!(workloads
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["ready"] == true));
    let table = setup
        .zone
        .ctl(&["inspect", "agents"], "")
        .await
        .expect("inspect agents");
    assert!(table.contains("vm-1") && table.contains("vm-2"), "{table}");

    // Renew over mTLS: a fresh certificate for its own workload only.
    let mut client = connect(setup.zone.grpc, &setup.pinned, Some(&identity)).await;
    let csr = |name: &str| pb::CertificateRequest {
        workload: name.to_owned(),
        csr_pem: WorkloadKey::generate().unwrap().bare_csr().unwrap(),
    };
    let renewed = client
        .renew(pb::RenewRequest {
            certificates: vec![csr("web-1")],
            agent_csr_pem: WorkloadKey::generate().unwrap().bare_csr().unwrap(),
        })
        .await
        .expect("renewed")
        .into_inner();
    assert_eq!(
        verify(
            &renewed.certificates[0].chain_pem,
            &renewed.trust_bundle_pem
        ),
        ["spiffe://weft.test/ns/default/sa/web"]
    );
    assert!(!renewed.agent_chain_pem.is_empty());
    let err = client
        .renew(pb::RenewRequest {
            certificates: vec![csr("web-2")],
            agent_csr_pem: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("web-2"), "{err}");

    // Without a client certificate, Renew and Stream are refused.
    let mut anonymous = connect(setup.zone.grpc, &setup.pinned, None).await;
    let err = anonymous
        .renew(pb::RenewRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let (_send, outgoing) = mpsc::channel::<pb::AgentMessage>(1);
    let err = anonymous
        .stream(ReceiverStream::new(outgoing))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // A graceful disconnect takes vm-2's endpoint out of ready at once.
    drop(second);
    first
        .until(|u| {
            endpoints_of(u, "web").is_some_and(|s| {
                s.endpoints
                    .iter()
                    .any(|e| e.address == "10.0.0.2" && !e.ready)
            })
        })
        .await;
    // SIGTERM with a stream open: the stream is closed, the exit is clean.
    setup.zone.stop();
    let end = tokio::time::timeout(DEADLINE, first.receive.message())
        .await
        .expect("the stream ends at shutdown");
    assert!(!matches!(end, Ok(Some(_))), "no update after shutdown");
}

/// Issues a token straight into the store (what the API refuses to make).
async fn raw_token(db: &std::path::Path, zone: &str, expires_in: i64) -> String {
    let store = Store::open(&format!("sqlite://{}", db.display()))
        .await
        .expect("open the store");
    let now = SystemTime::now();
    let expires_at = if expires_in >= 0 {
        now + Duration::from_secs(expires_in.unsigned_abs())
    } else {
        now - Duration::from_secs(expires_in.unsigned_abs())
    };
    let (_, secret) = store
        .issue_token(&TokenSpec {
            mesh: "default".to_owned(),
            zone: zone.to_owned(),
            workloads: WorkloadScope::Prefix("web-".to_owned()),
            expires_at,
            max_uses: 1,
        })
        .await
        .expect("issue");
    store.close().await;
    secret
}

async fn refused(setup: &Setup, token: &str, workloads: Vec<pb::Workload>) -> tonic::Status {
    let (request, _) = enroll_request(token, "vm-x", "127.0.0.1:15008", workloads);
    let mut client = connect(setup.zone.grpc, &setup.pinned, None).await;
    client.enroll(request).await.expect_err("refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_workloads_are_refused_with_their_cause() {
    let setup = setup().await;
    let web = || vec![workload("web-1", "web", "10.0.0.1", 80)];
    let cases = [
        (raw_token(&setup.db, "default", -10).await, "expired"),
        (raw_token(&setup.db, "elsewhere", 3600).await, "wrong zone"),
        ("weft-bt1.nope.nope".to_owned(), "unknown"),
    ];
    for (secret, cause) in &cases {
        let err = refused(&setup, secret, web()).await;
        assert_eq!(err.code(), Code::Unauthenticated, "{cause}: {err}");
        assert!(err.message().contains(cause), "{cause}: {err}");
    }
    let revoked = token(&setup.zone, &["--workload-prefix", "web-"]).await;
    let id = revoked.split('.').nth(1).expect("an id").to_owned();
    setup
        .zone
        .ctl(&["token", "revoke", &id], "")
        .await
        .expect("revoke");
    let err = refused(&setup, &revoked, web()).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("revoked"), "{err}");

    // Out of scope, or invalid: refused, and the token is not spent.
    let single = token(&setup.zone, &["--workload", "web-1"]).await;
    let err = refused(
        &setup,
        &single,
        vec![workload("db-1", "db", "10.0.0.9", 5432)],
    )
    .await;
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("db-1"), "{err}");
    let err = refused(
        &setup,
        &single,
        vec![workload("web-1", "web", "not-an-ip", 80)],
    )
    .await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().starts_with("workloads[0].address"), "{err}");

    // The single-use token works once, then it is used up.
    let (request, _) = enroll_request(&single, "vm-1", "127.0.0.1:15008", web());
    let mut client = connect(setup.zone.grpc, &setup.pinned, None).await;
    client.enroll(request).await.expect("the first use works");
    let err = refused(&setup, &single, web()).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("used up"), "{err}");

    setup.zone.stop();
}
