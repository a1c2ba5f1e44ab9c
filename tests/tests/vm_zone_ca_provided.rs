//! Rotations to provided mesh CAs under traffic: while a long-lived echo
//! connection and a new connection every 200 ms cross the VIP between two
//! VMs, the Mesh is applied with an operator's CA (files), then with
//! another one (inline PEM). No round trip fails and no connection drops;
//! after each apply both agents end with a workload certificate issued by
//! the new CA; the built-in CA and the first provided CA leave the
//! controller's set and the agents' bundles once every certificate they
//! signed has expired.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::Value;
use weft_e2e::vmzone::{
    bring_up, service_vip, wait_curl, Running, ECHO_PORT, HTTP_PORT, MESH, TRUST_DOMAIN,
};
use weft_e2e::{client, echo_bin, wait};

const T: Duration = Duration::from_secs(30);
/// The workload certificate lifetime of the scenario.
const LIFETIME: Duration = Duration::from_secs(30);

/// Exchanges one line per 100 ms on one connection until `stop` (at most
/// 3000 round trips); returns how many it made.
fn long_lived(addr: SocketAddr, stop: &AtomicBool) -> Result<u64> {
    let mut conn = TcpStream::connect_timeout(&addr, T)?;
    conn.set_read_timeout(Some(T))?;
    let mut n = 0u64;
    while n < 3000 && !stop.load(Ordering::Acquire) {
        let line = format!("long-lived round trip {n}\n");
        conn.write_all(line.as_bytes())
            .with_context(|| format!("write {n}"))?;
        let mut back = vec![0u8; line.len()];
        conn.read_exact(&mut back)
            .with_context(|| format!("read {n}"))?;
        ensure!(back == line.as_bytes(), "round trip {n} came back changed");
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(n)
}

/// Opens a new connection every 200 ms until `stop` (at most 1500), each
/// carrying an intact echo, counting them in `done`; returns how many it
/// made.
fn new_connections(
    addr: SocketAddr,
    stop: &AtomicBool,
    done: &AtomicU64,
    marker: &str,
) -> Result<u64> {
    let mut n = 0u64;
    while n < 1500 && !stop.load(Ordering::Acquire) {
        let data = client::payload(&format!("{marker}-{n}"), 16 * 1024);
        client::echo_roundtrip(addr, &data, T).with_context(|| format!("connection {n}"))?;
        n += 1;
        done.store(n, Ordering::Release);
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(n)
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

/// (DER, role) of each CA in `GET /v1/meshes/default/ca`.
fn roles(view: &Value) -> Vec<(Vec<u8>, String)> {
    view["cas"]
        .as_array()
        .map(|cas| {
            cas.iter()
                .map(|c| {
                    (
                        der_of(c["certificatePem"].as_str().unwrap_or_default()),
                        c["role"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The DER of the first certificate in `pem` (empty if there is none).
fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .unwrap_or_default()
}

/// The DERs of every certificate in `pem`.
fn ders(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|d| d.to_vec())
        .collect()
}

/// An operator's CA: a self-signed certificate whose common name is
/// `name`, and its PKCS#8 key, both PEM.
fn operator_ca(name: &str) -> Result<(String, String)> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Weft e2e operator");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = KeyPair::generate().context("generating a CA key")?;
    let cert = params.self_signed(&key).context("self-signing the CA")?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn mesh_yaml(ca: &str) -> String {
    format!(
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: {MESH}\nspec:\n  \
         trustDomain: {TRUST_DOMAIN}\n  workloadCertificateLifetime: 30s\n  ca:\n{ca}"
    )
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("          {l}\n")).collect()
}

/// Waits until the CA `ca_pem` signs, and the CA that signed before is
/// retired (still trusted).
fn wait_signing(up: &Running, ca_pem: &str, previous: &[u8], what: &str) -> Result<()> {
    let path = format!("/v1/meshes/{MESH}/ca");
    let wanted = der_of(ca_pem);
    let mut last = Value::Null;
    wait::until(what, T, || {
        last = up.controller.get_json(&path)?;
        let r = roles(&last);
        let signs = r.iter().any(|(d, role)| *d == wanted && role == "signing");
        let retired = r
            .iter()
            .any(|(d, role)| d == previous && role == "trusted-until");
        Ok((signs && retired).then_some(()))
    })
    .map_err(|e| anyhow!("{e:#}\nlast: {last:#}\n{}", up.controller.proc.logs()))
}

/// Waits until both agents hold a workload certificate issued by the CA
/// in `ca_file`: each renews at 50-80% of its certificate's life.
fn wait_agents_on(up: &Running, ca_file: &Path) -> Result<()> {
    let subject = x509_name(ca_file, "-subject")?;
    for i in 0..2 {
        let workload = up.zone.state_dir(i).join("workload.pem");
        let mut issuer = String::new();
        wait::until(
            &format!("agent {i} to hold a certificate of {subject}"),
            LIFETIME + T,
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

#[test]
fn rotations_to_provided_cas_under_traffic_without_a_failure() -> Result<()> {
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
    let [(builtin, role)] = roles(&before)
        .try_into()
        .map_err(|r: Vec<_>| anyhow!("expected one CA before the rotation, got {r:?}"))?;
    ensure!(role == "signing", "{before:#}");

    // Traffic all along both rotations.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let host = &up.zone.vms[0].host;
    let steady = {
        let stop = stop.clone();
        host.spawn(move || long_lived(addr, &stop))?
    };
    let fresh = {
        let (stop, done, marker) = (stop.clone(), done.clone(), up.markers[1].clone());
        host.spawn(move || new_connections(addr, &stop, &done, &marker))?
    };

    // Built-in -> the operator's first CA, from files on the controller's
    // host.
    let (first_cert, first_key) = operator_ca("operator CA one")?;
    let first_file = up.zone.dir.join("first-ca.pem");
    let first_key_file = up.zone.dir.join("first-ca.key");
    std::fs::write(&first_file, &first_cert)?;
    std::fs::write(&first_key_file, &first_key)?;
    up.controller.apply(
        &up.zone.dir.join("mesh-first.yaml"),
        &mesh_yaml(&format!(
            "    provided:\n      certificate:\n        file: {}\n      key:\n        file: {}\n",
            first_file.display(),
            first_key_file.display()
        )),
    )?;
    wait_signing(&up, &first_cert, &builtin, "the first provided CA to sign")?;
    wait_agents_on(&up, &first_file)?;

    // The first provided CA -> a second one, inline.
    let (second_cert, second_key) = operator_ca("operator CA two")?;
    let second_file = up.zone.dir.join("second-ca.pem");
    std::fs::write(&second_file, &second_cert)?;
    up.controller.apply(
        &up.zone.dir.join("mesh-second.yaml"),
        &mesh_yaml(&format!(
            "    provided:\n      certificate:\n        inline: |\n{}      key:\n        inline: |\n{}",
            indent(&second_cert),
            indent(&second_key)
        )),
    )?;
    wait_signing(
        &up,
        &second_cert,
        &der_of(&first_cert),
        "the second provided CA to sign",
    )?;
    wait_agents_on(&up, &second_file)?;

    // The built-in and the first CA leave the set once their certificates
    // have expired, and the agents' bundles follow.
    let second = der_of(&second_cert);
    wait::until(
        "the older CAs to leave the controller's set",
        LIFETIME + T,
        || {
            let view = up.controller.get_json(&ca_path)?;
            Ok((roles(&view) == vec![(second.clone(), "signing".to_owned())]).then_some(()))
        },
    )?;
    for i in 0..2 {
        let bundle = up.zone.state_dir(i).join("bundle.pem");
        wait::until(
            &format!("agent {i}'s bundle to hold the second CA alone"),
            T,
            || {
                let text = std::fs::read_to_string(&bundle)
                    .with_context(|| format!("reading {}", bundle.display()))?;
                Ok((ders(&text) == vec![second.clone()]).then_some(()))
            },
        )?;
    }

    // More new connections on the second CA alone, then the verdict.
    let at_drop = done.load(Ordering::Acquire);
    let more = wait::until("10 more connections after the older CAs left", T, || {
        Ok((done.load(Ordering::Acquire) >= at_drop + 10).then_some(()))
    });
    stop.store(true, Ordering::Release);
    let round_trips = steady
        .join()
        .map_err(|_| anyhow!("long-lived thread panicked"))?
        .context("the long-lived connection broke during the rotations")?;
    let connections = fresh
        .join()
        .map_err(|_| anyhow!("new-connection thread panicked"))?
        .context("a new connection failed during the rotations")?;
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
