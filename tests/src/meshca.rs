//! What the mesh CA scenarios share: the controller's CA view as plain
//! values, the certificate names `openssl` reads from the agents' files,
//! and waits on what the agents hold after a rotation.

use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::Value;

use crate::traffic::{Beside, NewConnections};
use crate::vmzone::{service_vip, wait_curl, Running, ECHO_PORT, HTTP_PORT, MESH};
use crate::wait;
use crate::zone::Controller;

/// `GET /v1/meshes/default/ca`.
pub fn ca_view(controller: &Controller) -> Result<Value> {
    controller.get_json(&format!("/v1/meshes/{MESH}/ca"))
}

/// (key, role) of each CA of a view, oldest first, with the key that
/// `key` reads from each CA's entry.
fn roles_by<K>(view: &Value, key: impl Fn(&Value) -> K) -> Vec<(K, String)> {
    view["cas"]
        .as_array()
        .map(|cas| {
            cas.iter()
                .map(|c| (key(c), c["role"].as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// (fingerprint, role) of each CA of a view.
pub fn roles(view: &Value) -> Vec<(String, String)> {
    roles_by(view, |c| {
        c["fingerprint"].as_str().unwrap_or_default().to_owned()
    })
}

/// (certificate DER, role) of each CA of a view: for CAs the test made
/// itself, whose fingerprint it does not know.
pub fn der_roles(view: &Value) -> Vec<(Vec<u8>, String)> {
    roles_by(view, |c| {
        der_of(c["certificatePem"].as_str().unwrap_or_default())
    })
}

/// Waits until the controller's set is the one CA `key` (as `listed`
/// reads a view), signing: every older CA has left.
pub fn wait_alone<K: PartialEq>(
    up: &Running,
    what: &str,
    within: Duration,
    listed: fn(&Value) -> Vec<(K, String)>,
    key: &K,
) -> Result<()> {
    wait::until(what, within, || {
        let view = ca_view(&up.controller)?;
        let alone = matches!(&listed(&view)[..], [(k, role)] if k == key && role == "signing");
        Ok(alone.then_some(()))
    })
}

/// The key of the one CA of a view's `listed` roles, which must sign.
pub fn the_signing_ca<K: Debug>(listed: Vec<(K, String)>, view: &Value) -> Result<K> {
    let [(key, role)]: [(K, String); 1] = listed
        .try_into()
        .map_err(|r: Vec<_>| anyhow!("expected one CA, got {r:?}"))?;
    ensure!(role == "signing", "{view:#}");
    Ok(key)
}

/// The DER of the first certificate in `pem` (empty if there is none).
pub fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .unwrap_or_default()
}

/// The DERs of every certificate in `pem`.
pub fn ders(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|d| d.to_vec())
        .collect()
}

/// `openssl x509 -noout -<what>` of the first certificate in `file`: the
/// name alone, without its `subject=`/`issuer=` label.
pub fn x509_name(file: &Path, what: &str) -> Result<String> {
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

/// Waits until the first VM reaches `payments` over the mesh; returns the
/// echo service behind its VIP, where the scenarios send their traffic.
pub fn payments_echo(up: &Running) -> Result<SocketAddr> {
    let services = up.controller.inspect("services")?;
    let vip: IpAddr = service_vip(&services, "payments")
        .ok_or_else(|| anyhow!("no VIP for payments: {services:#}"))?
        .parse()
        .context("the VIP is not an IP")?;
    wait_curl(
        &up.zone,
        0,
        &format!("http://payments.mesh:{HTTP_PORT}/"),
        &up.markers[1],
    )?;
    Ok(SocketAddr::new(vip, ECHO_PORT))
}

/// Starts the traffic the rotation scenarios run from the first VM to
/// `addr`: a new connection every 200 ms, each with a 16 KiB echo, beside
/// a long-lived connection; each loop stops at its bound.
pub fn rotation_traffic(
    up: &Running,
    addr: SocketAddr,
    timeout: Duration,
    round_trips: u64,
    connections: u64,
) -> Result<Beside> {
    let fresh = NewConnections {
        addr,
        timeout,
        marker: up.markers[1].clone(),
        len: 16 * 1024,
        every: Duration::from_millis(200),
    };
    Beside::start(&up.zone.vms[0].host, fresh, round_trips, connections)
}

/// Waits until every agent holds a workload certificate issued by the CA
/// in `ca_file`; each renews at 50-80% of its certificate's life, so
/// `within` is a lifetime and some.
pub fn wait_agents_on(up: &Running, ca_file: &Path, within: Duration) -> Result<()> {
    let subject = x509_name(ca_file, "-subject")?;
    for i in 0..up.agents.len() {
        let workload = up.zone.state_dir(i).join("workload.pem");
        let mut issuer = String::new();
        wait::until(
            &format!("agent {i} to hold a certificate of {subject}"),
            within,
            || {
                issuer = x509_name(&workload, "-issuer")?;
                Ok((issuer == subject).then_some(()))
            },
        )
        .map_err(|e| {
            anyhow!(
                "{e:#}\nissuer {issuer:?}, wanted {subject:?}\n{}",
                up.agents[i].proc.logs()
            )
        })?;
    }
    Ok(())
}

/// Waits until every agent's trust bundle satisfies `holds` (which `what`
/// describes).
pub fn wait_bundles(
    up: &Running,
    what: &str,
    within: Duration,
    holds: impl Fn(&str) -> bool,
) -> Result<()> {
    for i in 0..up.agents.len() {
        let bundle = up.zone.state_dir(i).join("bundle.pem");
        wait::until(&format!("agent {i}'s bundle to {what}"), within, || {
            let text = std::fs::read_to_string(&bundle)
                .with_context(|| format!("reading {}", bundle.display()))?;
            Ok(holds(&text).then_some(()))
        })?;
    }
    Ok(())
}

/// Fails if any agent counted a failed certificate renewal.
pub fn no_failed_renewals(up: &Running) -> Result<()> {
    for (i, agent) in up.agents.iter().enumerate() {
        ensure!(
            agent.metric("weft_certificate_renewals_total", &[("result", "failed")])? == 0.0,
            "agent {i} had a failed renewal:\n{}",
            agent.proc.logs()
        );
    }
    Ok(())
}
