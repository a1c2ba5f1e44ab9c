//! Provided mesh CAs against the real binary: a Mesh created with an
//! operator's CA (inline PEM or files) signs enrolments with it; applying
//! the Mesh with another provided CA, or switching between built-in and
//! provided, rotates in two phases (pending in every bundle, signing once
//! the online agent has acknowledged it, the old CA retired); a provided CA
//! the controller could not use is refused at apply, naming the field, and
//! changes nothing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::agent::pinned;
use common::ca::{
    bundle_holds, bundle_len, ca_view, cas, der_of, find, now_secs, signed_by, signing, Agent,
};
use common::{eventually, eventually_within, Zone};
use weft_api::SpiffeId;
use weft_pki::{MeshCa, WorkloadKey, DEFAULT_CA_LIFETIME};
use weftctl::{Error, Problem};

const TRUST_DOMAIN: &str = "weft.test";

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

/// The Mesh of [`mesh_yaml`] with a provided CA read from files.
fn files_yaml(cert: &Path, key: &Path) -> String {
    mesh_yaml(Some(Source::Files { cert, key }))
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

/// Waits until the CA whose certificate is `pem` has `role`; returns its
/// fingerprint.
async fn wait_role(zone: &Zone, pem: &str, role: &str, what: &str) -> String {
    eventually(what, || async {
        find(&ca_view(zone).await, pem)
            .filter(|ca| ca.role == role)
            .map(|ca| ca.fingerprint)
    })
    .await
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provided_ca_signs_and_another_one_or_the_builtin_rotates_in() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let zone = Zone::start(&dir.path().join("zone.db")).await;
    let first = Provided::new();
    let second = Provided::new();

    // Created with an inline provided CA: it is the one CA, and it signs.
    apply(&zone, &mesh_yaml(Some(first.inline()))).await;
    let mut agent = Agent::enrol(&zone, &pinned(&zone).await).await;
    assert!(signed_by(
        &agent.enrolled.certificates[0].chain_pem,
        &first.cert
    ));
    assert_eq!(
        der_of(&agent.enrolled.trust_bundle_pem),
        der_of(&first.cert)
    );
    let view = ca_view(&zone).await;
    assert_eq!(cas(&view).len(), 1, "{view:#}");
    let provided = find(&view, &first.cert).expect("the provided CA");
    assert_eq!(
        (provided.role.as_str(), provided.source.as_str()),
        ("signing", "provided")
    );
    let first_fp = provided.fingerprint;
    agent
        .ack_bundle("holds the first CA", |b| bundle_holds(b, &first.cert))
        .await;

    // A second provided CA, from files: pending until vm-1 trusts it.
    let (cert, key) = second.write(dir.path(), "second");
    apply(&zone, &files_yaml(&cert, &key)).await;
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
        find(&view, &second.cert).map(|c| c.source).as_deref(),
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
        find(&view, &first.cert).map(|c| c.role).as_deref(),
        Some("trusted-until"),
        "{view:#}"
    );
    assert!(view["rotation"].is_null(), "{view:#}");
    agent
        .assert_signs_with(&zone, &second.cert, "the second CA")
        .await;

    // Re-applying the same Mesh starts nothing.
    apply(&zone, &files_yaml(&cert, &key)).await;

    // Back to the built-in CA: a generated one is pending, then signs.
    apply(&zone, &mesh_yaml(None)).await;
    let builtin = eventually("a built-in CA to be pending", || async {
        cas(&ca_view(&zone).await)
            .into_iter()
            .find(|ca| ca.role == "pending")
    })
    .await;
    assert_eq!(builtin.source, "builtin", "{builtin:#?}");
    let builtin_pem = builtin.pem;
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
            bundle_len(b) == 1 && bundle_holds(b, &builtin_pem)
        })
        .await;
    let view = ca_view(&zone).await;
    assert!(
        !cas(&view)
            .iter()
            .any(|ca| ca.fingerprint == first_fp || ca.fingerprint == second_fp),
        "{view:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_to_provided_and_a_pending_ca_the_mesh_no_longer_asks_for_is_cancelled() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let zone = Zone::start(&dir.path().join("zone.db")).await;
    apply(&zone, &mesh_yaml(None)).await;
    let mut agent = Agent::enrol(&zone, &pinned(&zone).await).await;
    let builtin = signing(&ca_view(&zone).await);
    assert_eq!(builtin.source, "builtin");
    let (builtin_fp, builtin_pem) = (builtin.fingerprint, builtin.pem);
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
    eventually("the provided CA to be cancelled", || async {
        let view = ca_view(&zone).await;
        (find(&view, &first.cert).is_none()).then_some(())
    })
    .await;
    let view = ca_view(&zone).await;
    assert_eq!(cas(&view).len(), 1, "{view:#}");
    assert_eq!(signing(&view).fingerprint, builtin_fp);
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
    apply(&zone, &files_yaml(&cert, &key)).await;
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
        find(&view, &builtin_pem).map(|c| c.role).as_deref(),
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
    let good_yaml = files_yaml(&cert, &key);
    apply(&zone, &good_yaml).await;
    let agent = Agent::enrol(&zone, &pinned(&zone).await).await;
    assert!(signed_by(
        &agent.enrolled.certificates[0].chain_pem,
        &good.cert
    ));
    let before = ca_view(&zone).await;
    let good_signing = signing(&before);
    assert_eq!(good_signing.source, "provided");
    let version = mesh_version(&zone).await;

    // An expired CA: one that lived a second.
    let short = MeshCa::generate(TRUST_DOMAIN, Duration::from_secs(1)).expect("a CA");
    let expired = Provided::of(&short);
    eventually_within("the short CA to expire", Duration::from_secs(5), || async {
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
            files_yaml(&leaf_cert, &leaf_key),
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
            files_yaml(&nowhere, &key),
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
    assert_eq!(signing(&after).fingerprint, good_signing.fingerprint);
    assert!(after["rotation"].is_null(), "{after:#}");
    agent
        .assert_signs_with(&zone, &good.cert, "the good CA")
        .await;
}
