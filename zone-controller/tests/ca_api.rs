//! Mesh CA rotation against the real binary: `weftctl mesh ca` and
//! `mesh rotate-ca` (`/v1/meshes/{mesh}/ca[/rotate]`), the pending CA in
//! every bundle while an online agent has not acknowledged it, signing
//! moving to the new CA once it has, the old CA dropped once its
//! certificates have expired, and the leader's automatic rotation of a
//! built-in CA near the end of its life.

mod common;

use std::time::{Duration, Instant};

use common::agent::{connect, enroll_request, pinned, workload, Identity, Pinned};
use common::Zone;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::proto::agent::v1 as pb;
use weft_pki::WorkloadKey;

/// Certificates live 20 s: the retired CA leaves the bundle 20 s after the
/// new one starts signing.
const MESH: &str = "\
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: default
spec:
  trustDomain: weft.test
  workloadCertificateLifetime: 20s
";

/// Longer than [`common::DEADLINE`]: a retired CA stays 20 s.
const LONG: Duration = Duration::from_secs(45);

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cas(view: &Value) -> Vec<(String, String)> {
    view["cas"]
        .as_array()
        .expect("a cas array")
        .iter()
        .map(|c| {
            (
                c["fingerprint"].as_str().unwrap_or_default().to_owned(),
                c["role"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pem_of(view: &Value, fingerprint: &str) -> String {
    view["cas"]
        .as_array()
        .expect("a cas array")
        .iter()
        .find(|c| c["fingerprint"] == fingerprint)
        .and_then(|c| c["certificatePem"].as_str())
        .expect("the CA's PEM")
        .to_owned()
}

fn bundle_len(pem: &str) -> usize {
    CertificateDer::pem_slice_iter(pem.as_bytes()).count()
}

/// Whether `chain_pem` verifies with `ca_pem` as the only trust anchor.
fn signed_by(chain_pem: &str, ca_pem: &str) -> bool {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("chain PEM");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.expect("CA PEM")).expect("a trust anchor");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider,
    )
    .build()
    .expect("a verifier")
    .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
    .is_ok()
}

/// A config stream that acks only when asked to.
struct Stream {
    send: mpsc::Sender<pb::AgentMessage>,
    receive: tonic::Streaming<pb::ZoneMessage>,
}

impl Stream {
    async fn open(zone: &Zone, pinned: &Pinned, identity: &Identity, web: pb::Workload) -> Self {
        let mut client = connect(zone.grpc, pinned, Some(identity)).await;
        let (send, outgoing) = mpsc::channel(8);
        let hello = pb::Hello {
            agent_id: "vm-1".to_owned(),
            applied_version: String::new(),
            workloads: vec![web],
            host: None,
            hbone_address: "127.0.0.1:15008".to_owned(),
        };
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

    /// The next update whose bundle holds `cas` certificates, acking it.
    async fn bundle_of(&mut self, cas: usize) -> pb::ConfigUpdate {
        let deadline = Instant::now() + LONG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.receive.message())
                .await
                .unwrap_or_else(|_| panic!("no update with {cas} CA(s) in time"))
                .expect("the stream is healthy")
                .expect("the stream is open");
            let Some(pb::zone_message::Message::Config(update)) = message.message else {
                panic!("not a config update");
            };
            if bundle_len(&update.trust_bundle_pem) == cas {
                self.send
                    .send(pb::AgentMessage {
                        message: Some(pb::agent_message::Message::Ack(pb::Ack {
                            version: update.version.clone(),
                        })),
                    })
                    .await
                    .expect("ack");
                return update;
            }
        }
    }
}

async fn renew(zone: &Zone, pinned: &Pinned, identity: &Identity) -> pb::RenewResponse {
    let mut client = connect(zone.grpc, pinned, Some(identity)).await;
    client
        .renew(pb::RenewRequest {
            certificates: vec![pb::CertificateRequest {
                workload: "web-1".to_owned(),
                csr_pem: WorkloadKey::generate().unwrap().bare_csr().unwrap(),
            }],
            agent_csr_pem: String::new(),
        })
        .await
        .expect("renewed")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_waits_for_the_agents_then_signs_and_retires() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let zone = Zone::start(&dir.path().join("zone.db")).await;
    zone.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply the mesh");
    let pinned = pinned(&zone).await;

    // One agent, online, holding the one-CA bundle.
    let secret = zone
        .ctl(
            &[
                "token",
                "issue",
                "--mesh",
                "default",
                "--workload",
                "web-1",
                "-o",
                "secret",
            ],
            "",
        )
        .await
        .expect("token")
        .trim()
        .to_owned();
    let web = workload("web-1", "web", "10.0.0.1", 8080);
    let (request, key) = enroll_request(&secret, "vm-1", "127.0.0.1:15008", vec![web.clone()]);
    let mut client = connect(zone.grpc, &pinned, None).await;
    let enrolled = client.enroll(request).await.expect("enrolled").into_inner();
    let identity = Identity {
        chain_pem: enrolled.agent_chain_pem.clone(),
        key_pem: key.key_pem(),
    };
    assert_eq!(bundle_len(&enrolled.trust_bundle_pem), 1);
    let mut stream = Stream::open(&zone, &pinned, &identity, web).await;
    stream.bundle_of(1).await;

    let before = zone.get_json("/v1/meshes/default/ca").await;
    let roles = cas(&before);
    assert_eq!(roles.len(), 1, "{before:#}");
    let (old, role) = roles[0].clone();
    assert_eq!(role, "signing");
    assert!(old.starts_with("sha256:") && old.len() == 71, "{old}");
    assert_eq!(before["cas"][0]["source"], "builtin");
    assert!(before["rotation"].is_null());
    let old_pem = pem_of(&before, &old);
    let table = zone
        .ctl(&["mesh", "ca", "default"], "")
        .await
        .expect("mesh ca");
    assert!(table.contains(&old) && table.contains("signing"), "{table}");

    // Phase 1: the new CA is pending; vm-1 has not acked it yet.
    let out = zone
        .ctl(&["mesh", "rotate-ca", "default", "-o", "json"], "")
        .await
        .expect("rotate-ca");
    let started: Value = serde_json::from_str(&out).expect("JSON");
    let roles = cas(&started);
    assert_eq!(roles.len(), 2, "{started:#}");
    assert_eq!(roles[0], (old.clone(), "signing".to_owned()));
    let (new, role) = roles[1].clone();
    assert_eq!(role, "pending");
    assert_eq!(started["rotation"]["pending"], new.as_str());
    assert_eq!(
        started["rotation"]["waitingFor"],
        serde_json::json!(["vm-1"])
    );
    let new_pem = pem_of(&started, &new);
    // A second rotation is refused while one is underway.
    let refused = zone
        .ctl(&["mesh", "rotate-ca", "default"], "")
        .await
        .expect_err("a second rotation is refused");
    assert!(
        refused.to_string().contains("already in progress"),
        "{refused}"
    );
    // Unknown meshes are 404.
    let missing = zone.ctl(&["mesh", "ca", "nope"], "").await.unwrap_err();
    assert!(missing.to_string().contains("404"), "{missing}");

    // Until vm-1 trusts the new CA, the old one signs (the bundle already
    // holds both).
    let renewed = renew(&zone, &pinned, &identity).await;
    assert_eq!(bundle_len(&renewed.trust_bundle_pem), 2);
    assert!(signed_by(&renewed.certificates[0].chain_pem, &old_pem));
    tokio::time::sleep(Duration::from_secs(3)).await; // more than a leader pass
    let still = zone.get_json("/v1/meshes/default/ca").await;
    assert_eq!(
        cas(&still)[1],
        (new.clone(), "pending".to_owned()),
        "{still:#}"
    );

    // Phase 2: vm-1 acks the two-CA bundle; the new CA signs.
    stream.bundle_of(2).await;
    let promoted = wait_for("the new CA to sign", common::DEADLINE, || async {
        let view = zone.get_json("/v1/meshes/default/ca").await;
        (cas(&view)
            == vec![
                (old.clone(), "trusted-until".to_owned()),
                (new.clone(), "signing".to_owned()),
            ])
        .then_some(view)
    })
    .await;
    assert!(promoted["rotation"].is_null());
    let until = promoted["cas"][0]["trustedUntilUnix"]
        .as_i64()
        .expect("trustedUntilUnix");
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    assert!((now + 10..=now + 21).contains(&until), "{until} vs {now}");
    let renewed = renew(&zone, &pinned, &identity).await;
    assert!(signed_by(&renewed.certificates[0].chain_pem, &new_pem));
    assert!(!signed_by(&renewed.certificates[0].chain_pem, &old_pem));

    // Once every certificate of the old CA has expired, it leaves the
    // bundle.
    let last = stream.bundle_of(1).await;
    assert!(signed_by(
        &renewed.certificates[0].chain_pem,
        &last.trust_bundle_pem
    ));
    let after = zone.get_json("/v1/meshes/default/ca").await;
    assert_eq!(cas(&after), vec![(new, "signing".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_rotates_a_builtin_ca_near_the_end_of_its_life() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite://{}", dir.path().join("zone.db").display());
    let zone = Zone::start_with(&url, &["--mesh-ca-lifetime", "10s"]).await;
    zone.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply the mesh");
    let first = zone.get_json("/v1/meshes/default/ca").await;
    let (old, _) = cas(&first)[0].clone();
    // 80% of 10 s, then (no agent to wait for) it signs at once.
    let rotated = wait_for("an automatic rotation", LONG, || async {
        let view = zone.get_json("/v1/meshes/default/ca").await;
        let roles = cas(&view);
        roles
            .iter()
            .any(|(f, r)| *f != old && r == "signing")
            .then_some(roles)
    })
    .await;
    assert!(
        rotated
            .iter()
            .any(|(f, r)| *f == old && r == "trusted-until"),
        "{rotated:?}"
    );
    // Its trust ends with the CA itself (before the 20 s of certificates).
    wait_for("the old CA to leave", LONG, || async {
        let view = zone.get_json("/v1/meshes/default/ca").await;
        (!cas(&view).iter().any(|(f, _)| *f == old)).then_some(())
    })
    .await;
}
