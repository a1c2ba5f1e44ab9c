//! Mesh CA rotation against the real binary: `weftctl mesh ca` and
//! `mesh rotate-ca` (`/v1/meshes/{mesh}/ca[/rotate]`), the pending CA in
//! every bundle while an online agent has not acknowledged it, signing
//! moving to the new CA once it has, the old CA dropped once its
//! certificates have expired, and the leader's automatic rotation of a
//! built-in CA near the end of its life.

mod common;

use std::time::Duration;

use common::agent::ZoneWithMesh;
use common::ca::{bundle_len, by_fingerprint, ca_view, now_secs, roles, signed_by, Agent, LONG};
use common::{eventually, eventually_within, Zone};
use serde_json::Value;

/// [`common::MESH`] with certificates living 20 s: the retired CA leaves
/// the bundle 20 s after the new one starts signing.
fn mesh() -> String {
    format!("{}  workloadCertificateLifetime: 20s\n", common::MESH)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_waits_for_the_agents_then_signs_and_retires() {
    let setup = ZoneWithMesh::start(&mesh()).await;
    let zone = &setup.zone;

    // One agent, online, holding the one-CA bundle.
    let mut agent = Agent::enrol(zone, &setup.pinned).await;
    assert_eq!(bundle_len(&agent.enrolled.trust_bundle_pem), 1);
    agent.ack_bundle("holds 1 CA", |b| bundle_len(b) == 1).await;

    let before = ca_view(zone).await;
    let listed = roles(&before);
    assert_eq!(listed.len(), 1, "{before:#}");
    let (old, role) = listed[0].clone();
    assert_eq!(role, "signing");
    assert!(old.starts_with("sha256:") && old.len() == 71, "{old}");
    assert_eq!(before["cas"][0]["source"], "builtin");
    assert!(before["rotation"].is_null());
    let old_pem = by_fingerprint(&before, &old).pem;
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
    let listed = roles(&started);
    assert_eq!(listed.len(), 2, "{started:#}");
    assert_eq!(listed[0], (old.clone(), "signing".to_owned()));
    let (new, role) = listed[1].clone();
    assert_eq!(role, "pending");
    assert_eq!(started["rotation"]["pending"], new.as_str());
    assert_eq!(
        started["rotation"]["waitingFor"],
        serde_json::json!(["vm-1"])
    );
    let new_pem = by_fingerprint(&started, &new).pem;
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
    let missing = zone
        .ctl(&["mesh", "ca", "nope"], "")
        .await
        .expect_err("an unknown mesh is refused");
    assert!(missing.to_string().contains("404"), "{missing}");

    // Until vm-1 trusts the new CA, the old one signs (the bundle already
    // holds both).
    let renewed = agent.renew(zone).await;
    assert_eq!(bundle_len(&renewed.trust_bundle_pem), 2);
    assert!(signed_by(&renewed.certificates[0].chain_pem, &old_pem));
    // Nothing to wait for: this checks that the CA stays pending for
    // longer than a leader pass.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = ca_view(zone).await;
    assert_eq!(
        roles(&still)[1],
        (new.clone(), "pending".to_owned()),
        "{still:#}"
    );

    // Phase 2: vm-1 acks the two-CA bundle; the new CA signs.
    agent
        .ack_bundle("holds 2 CAs", |b| bundle_len(b) == 2)
        .await;
    let promoted = eventually("the new CA to sign", || async {
        let view = ca_view(zone).await;
        (roles(&view)
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
    let now = now_secs();
    assert!((now + 10..=now + 21).contains(&until), "{until} vs {now}");
    let renewed = agent.renew(zone).await;
    assert!(signed_by(&renewed.certificates[0].chain_pem, &new_pem));
    assert!(!signed_by(&renewed.certificates[0].chain_pem, &old_pem));

    // Once every certificate of the old CA has expired, it leaves the
    // bundle.
    let last = agent
        .ack_bundle("holds 1 CA again", |b| bundle_len(b) == 1)
        .await;
    assert!(signed_by(
        &renewed.certificates[0].chain_pem,
        &last.trust_bundle_pem
    ));
    let after = ca_view(zone).await;
    assert_eq!(roles(&after), vec![(new, "signing".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_rotates_a_builtin_ca_near_the_end_of_its_life() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite://{}", dir.path().join("zone.db").display());
    // Long enough that the old CA's last seconds of trust (from the
    // rotation, at 80% of its life and up to a 2 s leader round later,
    // until it expires) are seen even on a busy machine: with 10 s they
    // were at most 2 s, and a poll could miss them.
    let zone = Zone::start_with(&url, &["--mesh-ca-lifetime", "30s"]).await;
    zone.ctl(&["apply", "-f", "-"], &mesh())
        .await
        .expect("apply the mesh");
    let first = ca_view(&zone).await;
    let (old, _) = roles(&first)[0].clone();
    // 80% of 30 s, then (no agent to wait for) it signs at once.
    let rotated = eventually_within("an automatic rotation", LONG, || async {
        let listed = roles(&ca_view(&zone).await);
        listed
            .iter()
            .any(|(f, r)| *f != old && r == "signing")
            .then_some(listed)
    })
    .await;
    assert!(
        rotated
            .iter()
            .any(|(f, r)| *f == old && r == "trusted-until"),
        "{rotated:?}"
    );
    // Its trust ends with the CA itself (before the 20 s of certificates).
    eventually_within("the old CA to leave", LONG, || async {
        let view = ca_view(&zone).await;
        (!roles(&view).iter().any(|(f, _)| *f == old)).then_some(())
    })
    .await;
}
