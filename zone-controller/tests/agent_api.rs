//! The agent gRPC API end to end against the real binary: enrolment with
//! tokens (and every refusal cause), certificates that chain to the trust
//! bundle with the right SPIFFE ID, the config stream (services with a
//! virtual IP and endpoints, new versions when another agent joins, acks
//! and nacks in the inventory), renewal, and mTLS enforcement.

mod common;

use std::time::{Duration, SystemTime};

use common::agent::{
    certificate_request, connect, enroll_request, enroll_with_token, hello, verify_chain, workload,
    ConfigStream, Identity, ZoneWithMesh, HBONE,
};
use common::{eventually, DEADLINE, MESH};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use weft_api::proto::agent::v1 as pb;
use weft_pki::WorkloadKey;
use weft_store::{Store, TokenSpec, WorkloadScope};

/// Checks an issued chain against the bundle, as a client certificate, and
/// returns the leaf's URI SANs.
fn verify(chain_pem: &str, bundle_pem: &str) -> Vec<String> {
    verify_chain(chain_pem, bundle_pem).expect("the chain verifies against the bundle");
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .expect("a leaf")
        .expect("chain PEM");
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).expect("a certificate");
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

/// Enrols `agent` with a `web-` prefix token; returns its identity.
async fn enroll(
    setup: &ZoneWithMesh,
    agent: &str,
    workloads: Vec<pb::Workload>,
) -> (pb::EnrollResponse, Identity) {
    let secret = setup.zone.issue_token(&["--workload-prefix", "web-"]).await;
    enroll_with_token(setup.zone.grpc, &setup.pinned, &secret, agent, workloads).await
}

/// Opens `agent`'s config stream.
async fn open(
    setup: &ZoneWithMesh,
    identity: &Identity,
    agent: &str,
    workloads: Vec<pb::Workload>,
) -> ConfigStream {
    ConfigStream::open(
        setup.zone.grpc,
        &setup.pinned,
        identity,
        hello(agent, workloads),
    )
    .await
}

fn endpoints_of<'a>(update: &'a pb::ConfigUpdate, service: &str) -> Option<&'a pb::ServiceView> {
    update.services.iter().find(|s| s.name == service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_stream_nack_renew() {
    let setup = ZoneWithMesh::start(MESH).await;
    let mut web1 = workload("web-1", "web", "10.0.0.1", 8080);
    // Where it runs: sent on with its endpoint, for locality-aware picks.
    for (label, value) in [
        ("topology.kubernetes.io/region", "eu"),
        ("topology.kubernetes.io/zone", "eu-1a"),
    ] {
        web1.labels.insert(label.into(), value.into());
    }
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
    let mut first = open(&setup, &identity, "vm-1", vec![web1.clone()]).await;
    let update = first
        .until_acked(|u| {
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
    // The endpoint's Weft zone is left out (the view's own); its
    // failure domain comes from the workload's labels.
    let e = &web.endpoints[0];
    assert_eq!(
        (
            e.zone.as_str(),
            e.locality_region.as_str(),
            e.locality_zone.as_str(),
            e.locality_subzone.as_str()
        ),
        ("", "eu", "eu-1a", "")
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
    let mut second = open(&setup, &identity2, "vm-2", vec![web2]).await;
    let both = first
        .until_acked(|u| {
            endpoints_of(u, "web")
                .is_some_and(|s| s.endpoints.len() == 2 && s.endpoints.iter().all(|e| e.ready))
        })
        .await;
    assert_ne!(both.version, update.version);
    // Views are per agent (inbound rules differ), services are the same.
    let seen_by_second = second.until_acked(|u| u.services == both.services).await;
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
    let renewed = client
        .renew(pb::RenewRequest {
            certificates: vec![certificate_request("web-1")],
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
            certificates: vec![certificate_request("web-2")],
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

    // Dropping the stream takes vm-2's endpoint out of service at once:
    // out of the list if the zone saw the goodbye (the request side closed
    // cleanly), not ready if it saw the call cancelled (tests/lessons.rs
    // tells the two apart).
    drop(second);
    first
        .until_acked(|u| {
            endpoints_of(u, "web").is_some_and(|s| {
                !s.endpoints
                    .iter()
                    .any(|e| e.address == "10.0.0.2" && e.ready)
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

async fn refused(setup: &ZoneWithMesh, token: &str, workloads: Vec<pb::Workload>) -> tonic::Status {
    let (request, _) = enroll_request(token, "vm-x", HBONE, workloads);
    let mut client = connect(setup.zone.grpc, &setup.pinned, None).await;
    client.enroll(request).await.expect_err("refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_workloads_are_refused_with_their_cause() {
    let setup = ZoneWithMesh::start(MESH).await;
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
    let revoked = setup.zone.issue_token(&["--workload-prefix", "web-"]).await;
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
    let single = setup.zone.issue_token(&["--workload", "web-1"]).await;
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
    let (request, _) = enroll_request(&single, "vm-1", HBONE, web());
    let mut client = connect(setup.zone.grpc, &setup.pinned, None).await;
    client.enroll(request).await.expect("the first use works");
    let err = refused(&setup, &single, web()).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("used up"), "{err}");

    setup.zone.stop();
}
