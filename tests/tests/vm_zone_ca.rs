//! A mesh CA rotation under traffic: while a long-lived echo connection
//! and a new connection every 200 ms cross the VIP between two VMs,
//! `weftctl mesh rotate-ca default` runs. No round trip fails and no
//! connection drops; both agents end with a workload certificate issued by
//! the new CA; the old CA leaves the controller's set and the agents'
//! bundles once every certificate it signed has expired.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;
use weft_e2e::meshca::{
    ca_view, no_failed_renewals, payments_echo, roles, rotation_traffic, the_signing_ca,
    wait_agents_on, wait_alone, wait_bundles,
};
use weft_e2e::vmzone::{bring_up, MESH};
use weft_e2e::{echo_bin, wait};

const T: Duration = Duration::from_secs(30);
/// The workload certificate lifetime of the scenario.
const LIFETIME: Duration = Duration::from_secs(30);

fn pem_of(view: &Value, fingerprint: &str) -> Result<String> {
    view["cas"]
        .as_array()
        .and_then(|cas| cas.iter().find(|c| c["fingerprint"] == fingerprint))
        .and_then(|c| c["certificatePem"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no CA {fingerprint} in {view:#}"))
}

#[test]
fn mesh_ca_rotates_under_traffic_without_a_failure() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "payments"], "30s")?;
    let addr = payments_echo(&up)?;
    let before = ca_view(&up.controller)?;
    let old = the_signing_ca(roles(&before), &before).context("before the rotation")?;
    let old_pem = pem_of(&before, &old)?;

    // Traffic all along the rotation.
    let traffic = rotation_traffic(&up, addr, T, 2000, 1000)?;

    let out = up.controller.weftctl_ok(&["mesh", "rotate-ca", MESH])?;
    ensure!(out.contains("pending"), "rotate-ca printed: {out}");
    let promoted = {
        let mut last = Value::Null;
        wait::until("the new CA to sign", T, || {
            last = ca_view(&up.controller)?;
            let r = roles(&last);
            Ok(
                (r.len() == 2 && r[0] == (old.clone(), "trusted-until".to_owned()))
                    .then(|| r[1].clone()),
            )
        })
        .map_err(|e| anyhow!("{e:#}\nlast: {last:#}\n{}", up.controller.proc.logs()))?
    };
    let (new, role) = promoted;
    ensure!(role == "signing", "the new CA is {role}");
    let new_pem = pem_of(&ca_view(&up.controller)?, &new)?;
    let new_ca_file = up.zone.dir.join("new-ca.pem");
    std::fs::write(&new_ca_file, &new_pem)?;

    // Within one lifetime both agents hold a certificate from the new CA.
    wait_agents_on(&up, &new_ca_file, LIFETIME + T)?;

    // The old CA leaves the set once its certificates have expired, and
    // the agents' bundles follow.
    wait_alone(
        &up,
        "the old CA to leave the controller's set",
        LIFETIME + T,
        roles,
        &new,
    )?;
    wait_bundles(&up, "drop the old CA", T, |text| {
        !text.contains(old_pem.trim()) && text.contains(new_pem.trim())
    })?;

    // More new connections on the new CA alone, then the verdict.
    traffic.finish(10, "the old CA left", "the rotation")?;
    no_failed_renewals(&up)
}
