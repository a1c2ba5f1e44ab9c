//! Rotations to provided mesh CAs under traffic: while a long-lived echo
//! connection and a new connection every 200 ms cross the VIP between two
//! VMs, the Mesh is applied with an operator's CA (files), then with
//! another one (inline PEM). No round trip fails and no connection drops;
//! after each apply both agents end with a workload certificate issued by
//! the new CA; the built-in CA and the first provided CA leave the
//! controller's set and the agents' bundles once every certificate they
//! signed has expired.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use serde_json::Value;
use weft_e2e::meshca::{
    ca_view, der_of, der_roles, ders, no_failed_renewals, payments_echo, rotation_traffic,
    the_signing_ca, wait_agents_on, wait_alone, wait_bundles,
};
use weft_e2e::vmzone::{bring_up, Running, MESH, TRUST_DOMAIN};
use weft_e2e::{echo_bin, wait};

const T: Duration = Duration::from_secs(30);
/// The workload certificate lifetime of the scenario.
const LIFETIME: Duration = Duration::from_secs(30);

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
    let wanted = der_of(ca_pem);
    let mut last = Value::Null;
    wait::until(what, T, || {
        last = ca_view(&up.controller)?;
        let r = der_roles(&last);
        let signs = r.iter().any(|(d, role)| *d == wanted && role == "signing");
        let retired = r
            .iter()
            .any(|(d, role)| d == previous && role == "trusted-until");
        Ok((signs && retired).then_some(()))
    })
    .map_err(|e| anyhow!("{e:#}\nlast: {last:#}\n{}", up.controller.proc.logs()))
}

#[test]
fn rotations_to_provided_cas_under_traffic_without_a_failure() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "payments"], "30s")?;
    let addr = payments_echo(&up)?;
    let before = ca_view(&up.controller)?;
    let builtin = the_signing_ca(der_roles(&before), &before).context("before the rotations")?;

    // Traffic all along both rotations.
    let traffic = rotation_traffic(&up, addr, T, 3000, 1500)?;

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
    wait_agents_on(&up, &first_file, LIFETIME + T)?;

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
    wait_agents_on(&up, &second_file, LIFETIME + T)?;

    // The built-in and the first CA leave the set once their certificates
    // have expired, and the agents' bundles follow.
    let second = der_of(&second_cert);
    wait_alone(
        &up,
        "the older CAs to leave the controller's set",
        LIFETIME + T,
        der_roles,
        &second,
    )?;
    wait_bundles(&up, "hold the second CA alone", T, |text| {
        ders(text) == vec![second.clone()]
    })?;

    // More new connections on the second CA alone, then the verdict.
    traffic.finish(10, "the older CAs left", "the rotations")?;
    no_failed_renewals(&up)
}
