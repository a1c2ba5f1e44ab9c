//! A mesh CA rotation under traffic: while a long-lived echo connection
//! and a new connection every 200 ms cross the VIP between two VMs,
//! `weftctl mesh rotate-ca default` runs. No round trip fails and no
//! connection drops; both agents end with a workload certificate issued by
//! the new CA; the old CA leaves the controller's set and the agents'
//! bundles once every certificate it signed has expired.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use weft_e2e::vmzone::{bring_up, service_vip, wait_curl, ECHO_PORT, HTTP_PORT, MESH};
use weft_e2e::{echo_bin, traffic, wait};

const T: Duration = Duration::from_secs(30);
/// The workload certificate lifetime of the scenario.
const LIFETIME: Duration = Duration::from_secs(30);

/// A new connection every 200 ms, each with a 16 KiB echo.
fn every_200ms(addr: SocketAddr, marker: String) -> traffic::NewConnections {
    traffic::NewConnections {
        addr,
        timeout: T,
        marker,
        len: 16 * 1024,
        every: Duration::from_millis(200),
    }
}

/// `openssl x509 -noout -<what>` of the first certificate in `file`.
fn x509_name(file: &Path, what: &str) -> Result<String> {
    let out = Command::new("openssl")
        .args(["x509", "-noout", what, "-in"])
        .arg(file)
        .output()
        .context("running openssl (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "openssl x509 {what} {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let name = text.trim();
    Ok(name
        .split_once('=')
        .map_or(name, |(_, value)| value)
        .trim()
        .to_owned())
}

/// (fingerprint, role) of each CA in `GET /v1/meshes/default/ca`.
fn roles(view: &Value) -> Vec<(String, String)> {
    view["cas"]
        .as_array()
        .map(|cas| {
            cas.iter()
                .map(|c| {
                    (
                        c["fingerprint"].as_str().unwrap_or_default().to_owned(),
                        c["role"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

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
    let services = up.controller.inspect("services")?;
    let vip: std::net::IpAddr = service_vip(&services, "payments")
        .ok_or_else(|| anyhow!("no VIP for payments: {services:#}"))?
        .parse()
        .context("the VIP is not an IP")?;
    let addr = SocketAddr::new(vip, ECHO_PORT);
    wait_curl(
        &up.zone,
        0,
        &format!("http://payments.mesh:{HTTP_PORT}/"),
        &up.markers[1],
    )?;
    let ca_path = format!("/v1/meshes/{MESH}/ca");
    let before = up.controller.get_json(&ca_path)?;
    let [(old, role)] = roles(&before)
        .try_into()
        .map_err(|r: Vec<_>| anyhow!("expected one CA before the rotation, got {r:?}"))?;
    ensure!(role == "signing", "{before:#}");
    let old_pem = pem_of(&before, &old)?;

    // Traffic all along the rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let host = &up.zone.vms[0].host;
    let steady = {
        let stop = stop.clone();
        host.spawn(move || {
            traffic::long_lived(addr, T, |n| n >= 2000 || stop.load(Ordering::Acquire))
        })?
    };
    let fresh = {
        let (stop, done, marker) = (stop.clone(), done.clone(), up.markers[1].clone());
        host.spawn(move || {
            every_200ms(addr, marker).run(&done, |n| n >= 1000 || stop.load(Ordering::Acquire))
        })?
    };

    let out = up.controller.weftctl_ok(&["mesh", "rotate-ca", MESH])?;
    ensure!(out.contains("pending"), "rotate-ca printed: {out}");
    let promoted = {
        let mut last = Value::Null;
        wait::until("the new CA to sign", T, || {
            last = up.controller.get_json(&ca_path)?;
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
    let new_view = up.controller.get_json(&ca_path)?;
    let new_pem = pem_of(&new_view, &new)?;
    let new_ca_file = up.zone.dir.join("new-ca.pem");
    std::fs::write(&new_ca_file, &new_pem)?;
    let new_subject = x509_name(&new_ca_file, "-subject")?;

    // Each agent renews at 50-80% of its certificate's life: within one
    // lifetime both hold a certificate from the new CA.
    for i in 0..2 {
        let workload = up.zone.state_dir(i).join("workload.pem");
        let mut issuer = String::new();
        wait::until(
            &format!("agent {i} to hold a certificate of the new CA"),
            LIFETIME + T,
            || {
                issuer = x509_name(&workload, "-issuer")?;
                Ok((issuer == new_subject).then_some(()))
            },
        )
        .map_err(|e| {
            anyhow!(
                "{e:#}\nissuer {issuer:?}, new CA {new_subject:?}\n{}",
                up.agents[i].proc.logs()
            )
        })?;
    }

    // The old CA leaves the set once its certificates have expired, and
    // the agents' bundles follow.
    wait::until(
        "the old CA to leave the controller's set",
        LIFETIME + T,
        || {
            let view = up.controller.get_json(&ca_path)?;
            Ok((roles(&view) == vec![(new.clone(), "signing".to_owned())]).then_some(()))
        },
    )?;
    for i in 0..2 {
        let bundle = up.zone.state_dir(i).join("bundle.pem");
        wait::until(&format!("agent {i}'s bundle to drop the old CA"), T, || {
            let text = std::fs::read_to_string(&bundle)
                .with_context(|| format!("reading {}", bundle.display()))?;
            Ok((!text.contains(old_pem.trim()) && text.contains(new_pem.trim())).then_some(()))
        })?;
    }

    // More new connections on the new CA alone, then the verdict.
    let at_drop = done.load(Ordering::Acquire);
    let more = wait::until("10 more connections after the old CA left", T, || {
        Ok((done.load(Ordering::Acquire) >= at_drop + 10).then_some(()))
    });
    stop.store(true, Ordering::Release);
    let round_trips = steady
        .join()
        .map_err(|_| anyhow!("long-lived thread panicked"))?
        .context("the long-lived connection broke during the rotation")?;
    let connections = fresh
        .join()
        .map_err(|_| anyhow!("new-connection thread panicked"))?
        .context("a new connection failed during the rotation")?;
    more?;
    ensure!(
        round_trips > 100 && connections > 50,
        "{round_trips} round trips, {connections} connections"
    );
    for (i, agent) in up.agents.iter().enumerate() {
        ensure!(
            agent.metric("weft_certificate_renewals_total", &[("result", "failed")])? == 0.0,
            "agent {i} had a failed renewal:\n{}",
            agent.proc.logs()
        );
    }
    Ok(())
}
