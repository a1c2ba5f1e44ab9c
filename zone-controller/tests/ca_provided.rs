//! Provided mesh CAs against the real binary: a Mesh created with an
//! operator's CA (inline PEM or files) signs enrolments with it; applying
//! the Mesh with another provided CA, or switching between built-in and
//! provided, rotates in two phases (pending in every bundle, signing once
//! the online agent has acknowledged it, the old CA retired); a provided CA
//! the controller could not use is refused at apply, naming the field, and
//! changes nothing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::agent::{connect, enroll_request, pinned, workload, Identity, Pinned};
use common::Zone;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::proto::agent::v1 as pb;
use weft_api::SpiffeId;
use weft_pki::{MeshCa, WorkloadKey, DEFAULT_CA_LIFETIME};
use weftctl::{Error, Problem};

const TRUST_DOMAIN: &str = "weft.test";

/// Longer than [`common::DEADLINE`]: a retired CA stays 20 s.
const LONG: Duration = Duration::from_secs(45);

/// Where a provided CA's certificate and key come from.
enum Source<'a> {
    Inline { cert: &'a str, key: &'a str },
    Files { cert: &'a Path, key: &'a Path },
}

/// The Mesh `default` with certificates living 20 s and `ca` (None: the
/// built-in CA).
fn mesh_yaml(ca: Option<Source<'_>>) -> String {
    let mut yaml = format!(
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: default\nspec:\n  \
         trustDomain: {TRUST_DOMAIN}\n  workloadCertificateLifetime: 20s\n  ca:\n"
    );
    match ca {
        None => yaml.push_str("    builtin: {}\n"),
        Some(Source::Inline { cert, key }) => {
            yaml.push_str("    provided:\n      certificate:\n        inline: |\n");
            yaml.push_str(&indent(cert));
            yaml.push_str("      key:\n        inline: |\n");
            yaml.push_str(&indent(key));
        }
        Some(Source::Files { cert, key }) => {
            yaml.push_str(&format!(
                "    provided:\n      certificate:\n        file: {}\n      key:\n        file: {}\n",
                cert.display(),
                key.display()
            ));
        }
    }
    yaml
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("          {l}\n")).collect()
}

/// A provided CA for the tests' trust domain: its PEM texts.
struct Provided {
    cert: String,
    key: String,
}

impl Provided {
    fn new() -> Provided {
        Provided::of(&MeshCa::generate(TRUST_DOMAIN, DEFAULT_CA_LIFETIME).expect("a CA"))
    }

    fn of(ca: &MeshCa) -> Provided {
        let pem = ca.to_pem();
        Provided {
            cert: pem.cert_pem,
            key: pem.key_pem,
        }
    }

    fn inline(&self) -> Source<'_> {
        Source::Inline {
            cert: &self.cert,
            key: &self.key,
        }
    }

    /// Writes the PEMs to `<dir>/<name>.crt` and `.key`; returns the paths.
    fn write(&self, dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert).expect("write the CA certificate");
        std::fs::write(&key, &self.key).expect("write the CA key");
        (cert, key)
    }
}

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

/// (fingerprint, role, source) of each CA of the mesh, oldest first.
fn cas(view: &Value) -> Vec<(String, String, String)> {
    view["cas"]
        .as_array()
        .expect("a cas array")
        .iter()
        .map(|c| {
            let field = |name: &str| c[name].as_str().unwrap_or_default().to_owned();
            (field("fingerprint"), field("role"), field("source"))
        })
        .collect()
}

/// The CA whose certificate is `pem` in the view, if any: (fingerprint,
/// role, source).
fn find(view: &Value, pem: &str) -> Option<(String, String, String)> {
    let der = der_of(pem);
    view["cas"]
        .as_array()
        .expect("a cas array")
        .iter()
        .find(|c| der_of(c["certificatePem"].as_str().unwrap_or_default()) == der)
        .map(|c| {
            let field = |name: &str| c[name].as_str().unwrap_or_default().to_owned();
            (field("fingerprint"), field("role"), field("source"))
        })
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .unwrap_or_default()
}

fn bundle_holds(bundle_pem: &str, ca_pem: &str) -> bool {
    let wanted = der_of(ca_pem);
    CertificateDer::pem_slice_iter(bundle_pem.as_bytes())
        .filter_map(Result::ok)
        .any(|c| c.as_ref() == wanted.as_slice())
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

/// An enrolled agent `vm-1` (workload `web-1`) with a config stream that
/// acks only when asked to.
struct Agent {
    pinned: Pinned,
    identity: Identity,
    /// The enrolment's answer.
    enrolled: pb::EnrollResponse,
    send: mpsc::Sender<pb::AgentMessage>,
    receive: tonic::Streaming<pb::ZoneMessage>,
}

impl Agent {
    async fn enrol(zone: &Zone) -> Agent {
        let pinned = pinned(zone).await;
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
        let enrolled = connect(zone.grpc, &pinned, None)
            .await
            .enroll(request)
            .await
            .expect("enrolled")
            .into_inner();
        let identity = Identity {
            chain_pem: enrolled.agent_chain_pem.clone(),
            key_pem: key.key_pem(),
        };
        let mut client = connect(zone.grpc, &pinned, Some(&identity)).await;
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
        Agent {
            pinned,
            identity,
            enrolled,
            send,
            receive,
        }
    }

    /// Waits for the next update whose bundle satisfies `wanted`, and acks
    /// it (and only it).
    async fn ack_bundle(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> pb::ConfigUpdate {
        let deadline = Instant::now() + LONG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.receive.message())
                .await
                .unwrap_or_else(|_| panic!("no update with a bundle that {what} in time"))
                .expect("the stream is healthy")
                .expect("the stream is open");
            let Some(pb::zone_message::Message::Config(update)) = message.message else {
                panic!("not a config update");
            };
            if wanted(&update.trust_bundle_pem) {
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

    /// A fresh workload certificate for web-1 (leaf first, then its CA).
    async fn renew(&self, zone: &Zone) -> pb::RenewResponse {
        connect(zone.grpc, &self.pinned, Some(&self.identity))
            .await
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

    /// Asserts that a renewal now signs with `ca_pem`.
    async fn assert_signs_with(&self, zone: &Zone, ca_pem: &str, what: &str) {
        let renewed = self.renew(zone).await;
        assert!(
            signed_by(&renewed.certificates[0].chain_pem, ca_pem),
            "a renewal is not signed by {what}"
        );
    }
}

async fn ca_view(zone: &Zone) -> Value {
    zone.get_json("/v1/meshes/default/ca").await
}

/// Waits until the CA whose certificate is `pem` has `role`; returns its
/// fingerprint.
async fn wait_role(zone: &Zone, pem: &str, role: &str, what: &str) -> String {
    wait_for(what, common::DEADLINE, || async {
        let view = ca_view(zone).await;
        find(&view, pem)
            .filter(|(_, r, _)| r == role)
            .map(|(f, _, _)| f)
    })
    .await
}

/// The signing CA: (fingerprint, source, PEM).
fn signing(view: &Value) -> (String, String, String) {
    let ca = view["cas"]
        .as_array()
        .expect("a cas array")
        .iter()
        .find(|c| c["role"] == "signing")
        .unwrap_or_else(|| panic!("no signing CA in {view:#}"));
    let field = |name: &str| ca[name].as_str().unwrap_or_default().to_owned();
    (
        field("fingerprint"),
        field("source"),
        field("certificatePem"),
    )
}

/// Applies `yaml`, which must succeed.
async fn apply(zone: &Zone, yaml: &str) -> String {
    zone.ctl(&["apply", "-f", "-"], yaml)
        .await
        .unwrap_or_else(|e| panic!("apply failed: {e}\n{yaml}"))
}

/// Applies `yaml`, which must be refused; returns the problems.
async fn refused(zone: &Zone, yaml: &str) -> Vec<Problem> {
    match zone.ctl(&["apply", "-f", "-"], yaml).await {
        Err(Error::Refused { problems }) => problems,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The Mesh's stored version.
async fn mesh_version(zone: &Zone) -> u64 {
    let json = zone
        .ctl(&["get", "mesh", "default", "-o", "json"], "")
        .await
        .expect("the mesh exists");
    let item: weftctl::Item = serde_json::from_str(&json).expect("an item");
    item.version
}

fn now_secs() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(since.as_secs()).expect("a sane clock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provided_ca_signs_and_another_one_or_the_builtin_rotates_in() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let zone = Zone::start(&dir.path().join("zone.db")).await;
    let first = Provided::new();
    let second = Provided::new();

    // Created with an inline provided CA: it is the one CA, and it signs.
    apply(&zone, &mesh_yaml(Some(first.inline()))).await;
    let mut agent = Agent::enrol(&zone).await;
    assert!(signed_by(
        &agent.enrolled.certificates[0].chain_pem,
        &first.cert
    ));
    assert_eq!(
        der_of(&agent.enrolled.trust_bundle_pem),
        der_of(&first.cert)
    );
    let view = ca_view(&zone).await;
    let roles = cas(&view);
    assert_eq!(roles.len(), 1, "{view:#}");
    let (first_fp, role, source) = find(&view, &first.cert).expect("the provided CA");
    assert_eq!((role.as_str(), source.as_str()), ("signing", "provided"));
    agent
        .ack_bundle("holds the first CA", |b| bundle_holds(b, &first.cert))
        .await;

    // A second provided CA, from files: pending until vm-1 trusts it.
    let (cert, key) = second.write(dir.path(), "second");
    apply(
        &zone,
        &mesh_yaml(Some(Source::Files {
            cert: &cert,
            key: &key,
        })),
    )
    .await;
    let second_fp = wait_role(
        &zone,
        &second.cert,
        "pending",
        "the second CA to be pending",
    )
    .await;
    let view = ca_view(&zone).await;
    assert_eq!(view["rotation"]["pending"], second_fp.as_str(), "{view:#}");
    assert_eq!(view["rotation"]["waitingFor"], serde_json::json!(["vm-1"]));
    assert_eq!(
        find(&view, &second.cert).map(|c| c.2).as_deref(),
        Some("provided")
    );
    // `rotate-ca` is for built-in CAs only.
    let refusal = zone
        .ctl(&["mesh", "rotate-ca", "default"], "")
        .await
        .expect_err("rotate-ca is refused for a provided CA");
    assert!(refusal.to_string().contains("provided"), "{refusal}");
    let renewed = agent.renew(&zone).await;
    assert!(bundle_holds(&renewed.trust_bundle_pem, &first.cert));
    assert!(bundle_holds(&renewed.trust_bundle_pem, &second.cert));
    assert!(signed_by(&renewed.certificates[0].chain_pem, &first.cert));

    // vm-1 acks a bundle holding it: it signs, the first is retired.
    agent
        .ack_bundle("holds the second CA", |b| bundle_holds(b, &second.cert))
        .await;
    wait_role(&zone, &second.cert, "signing", "the second CA to sign").await;
    let view = ca_view(&zone).await;
    assert_eq!(
        find(&view, &first.cert).map(|c| c.1).as_deref(),
        Some("trusted-until"),
        "{view:#}"
    );
    assert!(view["rotation"].is_null(), "{view:#}");
    agent
        .assert_signs_with(&zone, &second.cert, "the second CA")
        .await;

    // Re-applying the same Mesh starts nothing.
    apply(
        &zone,
        &mesh_yaml(Some(Source::Files {
            cert: &cert,
            key: &key,
        })),
    )
    .await;

    // Back to the built-in CA: a generated one is pending, then signs.
    apply(&zone, &mesh_yaml(None)).await;
    let builtin = wait_for("a built-in CA to be pending", common::DEADLINE, || async {
        let view = ca_view(&zone).await;
        let pending = view["cas"]
            .as_array()
            .expect("a cas array")
            .iter()
            .find(|c| c["role"] == "pending")
            .cloned()?;
        Some(pending)
    })
    .await;
    assert_eq!(builtin["source"], "builtin", "{builtin:#}");
    let builtin_pem = builtin["certificatePem"]
        .as_str()
        .expect("its PEM")
        .to_owned();
    agent
        .assert_signs_with(
            &zone,
            &second.cert,
            "the second CA while the built-in one is pending",
        )
        .await;
    agent
        .ack_bundle("holds the built-in CA", |b| bundle_holds(b, &builtin_pem))
        .await;
    wait_role(&zone, &builtin_pem, "signing", "the built-in CA to sign").await;
    agent
        .assert_signs_with(&zone, &builtin_pem, "the built-in CA")
        .await;

    // The provided CAs leave the bundle once their certificates expired.
    agent
        .ack_bundle("holds only the built-in CA", |b| {
            CertificateDer::pem_slice_iter(b.as_bytes()).count() == 1
                && bundle_holds(b, &builtin_pem)
        })
        .await;
    let view = ca_view(&zone).await;
    assert!(
        !cas(&view)
            .iter()
            .any(|(f, _, _)| *f == first_fp || *f == second_fp),
        "{view:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_to_provided_and_a_pending_ca_the_mesh_no_longer_asks_for_is_cancelled() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let zone = Zone::start(&dir.path().join("zone.db")).await;
    apply(&zone, &mesh_yaml(None)).await;
    let mut agent = Agent::enrol(&zone).await;
    let view = ca_view(&zone).await;
    let (builtin_fp, source, builtin_pem) = signing(&view);
    assert_eq!(source, "builtin");
    agent
        .ack_bundle("holds the built-in CA", |b| bundle_holds(b, &builtin_pem))
        .await;

    // Switching to a provided CA makes it pending...
    let first = Provided::new();
    apply(&zone, &mesh_yaml(Some(first.inline()))).await;
    wait_role(
        &zone,
        &first.cert,
        "pending",
        "the provided CA to be pending",
    )
    .await;

    // ...and switching back to the built-in CA before it signed cancels
    // it: the built-in CA signs on, nothing else is pending.
    apply(&zone, &mesh_yaml(None)).await;
    wait_for(
        "the provided CA to be cancelled",
        common::DEADLINE,
        || async {
            let view = ca_view(&zone).await;
            (find(&view, &first.cert).is_none()).then_some(())
        },
    )
    .await;
    let view = ca_view(&zone).await;
    assert_eq!(cas(&view).len(), 1, "{view:#}");
    assert_eq!(signing(&view).0, builtin_fp);
    assert!(view["rotation"].is_null(), "{view:#}");

    // A provided CA replaced by another before it signed is cancelled too.
    apply(&zone, &mesh_yaml(Some(first.inline()))).await;
    wait_role(
        &zone,
        &first.cert,
        "pending",
        "the first provided CA to be pending",
    )
    .await;
    let second = Provided::new();
    let (cert, key) = second.write(dir.path(), "second");
    apply(
        &zone,
        &mesh_yaml(Some(Source::Files {
            cert: &cert,
            key: &key,
        })),
    )
    .await;
    wait_role(
        &zone,
        &second.cert,
        "pending",
        "the second provided CA to be pending",
    )
    .await;
    let view = ca_view(&zone).await;
    assert!(find(&view, &first.cert).is_none(), "{view:#}");
    agent
        .assert_signs_with(&zone, &builtin_pem, "the built-in CA while one is pending")
        .await;

    // Once vm-1 trusts it, it signs; the built-in CA is retired.
    agent
        .ack_bundle("holds the second provided CA", |b| {
            bundle_holds(b, &second.cert)
        })
        .await;
    wait_role(&zone, &second.cert, "signing", "the provided CA to sign").await;
    let view = ca_view(&zone).await;
    assert_eq!(
        find(&view, &builtin_pem).map(|c| c.1).as_deref(),
        Some("trusted-until"),
        "{view:#}"
    );
    agent
        .assert_signs_with(&zone, &second.cert, "the provided CA")
        .await;
}

/// A leaf certificate and its key: a certificate that is not a CA.
fn leaf_of(ca: &MeshCa) -> Provided {
    let key = WorkloadKey::generate().expect("a key");
    let id = SpiffeId::new(TRUST_DOMAIN, "default", "web").expect("an identity");
    let issued = ca
        .sign_csr(
            &key.csr(&id).expect("a CSR"),
            &id,
            Duration::from_secs(3600),
        )
        .expect("a leaf");
    // The chain is the leaf, then the CA: keep the leaf alone.
    let end = "-----END CERTIFICATE-----";
    let leaf = issued
        .chain_pem
        .split_inclusive(end)
        .next()
        .expect("a leaf");
    Provided {
        cert: format!("{}\n", leaf.trim()),
        key: key.key_pem(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provided_ca_that_cannot_sign_is_refused_at_apply_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let zone = Zone::start(&dir.path().join("zone.db")).await;
    let good_ca = MeshCa::generate(TRUST_DOMAIN, DEFAULT_CA_LIFETIME).expect("a CA");
    let good = Provided::of(&good_ca);

    // A Mesh created with a CA it could not use is not created.
    let other = Provided::new();
    let mismatched = Provided {
        cert: good.cert.clone(),
        key: other.key.clone(),
    };
    let problems = refused(&zone, &mesh_yaml(Some(mismatched.inline()))).await;
    assert_eq!(problems[0].path, "spec.ca.provided.key", "{problems:#?}");
    let missing = zone.ctl(&["get", "mesh", "default"], "").await;
    assert!(missing.is_err(), "the Mesh was created: {missing:?}");

    // Created with the CA from files, it signs with it.
    let (cert, key) = good.write(dir.path(), "good");
    let good_yaml = mesh_yaml(Some(Source::Files {
        cert: &cert,
        key: &key,
    }));
    apply(&zone, &good_yaml).await;
    let agent = Agent::enrol(&zone).await;
    assert!(signed_by(
        &agent.enrolled.certificates[0].chain_pem,
        &good.cert
    ));
    let before = ca_view(&zone).await;
    let (good_fp, source, _) = signing(&before);
    assert_eq!(source, "provided");
    let version = mesh_version(&zone).await;

    // An expired CA: one that lived a second.
    let short = MeshCa::generate(TRUST_DOMAIN, Duration::from_secs(1)).expect("a CA");
    let expired = Provided::of(&short);
    wait_for("the short CA to expire", Duration::from_secs(5), || async {
        (now_secs() > short.not_after()).then_some(())
    })
    .await;
    let wrong_domain =
        Provided::of(&MeshCa::generate("other.test", DEFAULT_CA_LIFETIME).expect("a CA"));
    let not_a_ca = leaf_of(&good_ca);
    let (leaf_cert, leaf_key) = not_a_ca.write(dir.path(), "leaf");
    let nowhere = dir.path().join("nowhere.crt");

    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "not a CA",
            mesh_yaml(Some(Source::Files {
                cert: &leaf_cert,
                key: &leaf_key,
            })),
            "spec.ca.provided.certificate",
            "not a CA",
        ),
        (
            "a key that is not the certificate's",
            mesh_yaml(Some(mismatched.inline())),
            "spec.ca.provided.key",
            "does not match",
        ),
        (
            "expired",
            mesh_yaml(Some(expired.inline())),
            "spec.ca.provided.certificate",
            "expired",
        ),
        (
            "another trust domain",
            mesh_yaml(Some(wrong_domain.inline())),
            "spec.ca.provided.certificate",
            "other.test",
        ),
        (
            "an unreadable file",
            mesh_yaml(Some(Source::Files {
                cert: &nowhere,
                key: &key,
            })),
            "spec.ca.provided.certificate.file",
            "nowhere.crt",
        ),
    ];
    for (what, yaml, path, reason) in cases {
        let problems = refused(&zone, &yaml).await;
        assert_eq!(problems.len(), 1, "{what}: {problems:#?}");
        assert_eq!(problems[0].path, path, "{what}: {problems:#?}");
        assert!(
            problems[0].reason.contains(reason),
            "{what}: {:?} does not say {reason:?}",
            problems[0].reason
        );
        assert_eq!(
            mesh_version(&zone).await,
            version,
            "{what}: the Mesh changed"
        );
    }

    // Nothing changed: the same one CA signs, nothing is pending.
    let after = ca_view(&zone).await;
    assert_eq!(cas(&after), cas(&before), "{after:#}");
    assert_eq!(signing(&after).0, good_fp);
    assert!(after["rotation"].is_null(), "{after:#}");
    agent
        .assert_signs_with(&zone, &good.cert, "the good CA")
        .await;
}
