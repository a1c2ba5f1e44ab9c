//! `weft-agent check -c FILE`: a good config passes; a bad one exits
//! non-zero and names the offending field on stderr.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Result;
use serde_json::json;
use weft_e2e::agent::{self, AgentSpec};
use weft_e2e::pki::{spiffe_id, Ca};
use weft_e2e::tempdir::TempDir;

struct Fixture {
    dir: TempDir,
    spec: AgentSpec,
}

fn fixture() -> Result<Fixture> {
    let dir = TempDir::new("weft-e2e-config")?;
    let ca = Ca::new("config CA")?;
    let ids = ca
        .leaf(&spiffe_id("app"))?
        .write(dir.path(), "app", &[&ca])?;
    let mut spec = AgentSpec::new(
        &ids,
        IpAddr::V4(Ipv4Addr::new(10, 210, 0, 2)),
        &[(8080, "tcp")],
    );
    spec.endpoint(
        IpAddr::V4(Ipv4Addr::new(10, 210, 0, 3)),
        &spiffe_id("server"),
    )
    .listener("127.0.0.1:9000".parse()?, "10.210.0.3:8080".parse()?)
    .allow("spiffe://weft.test/ns/default/*");
    Ok(Fixture { dir, spec })
}

/// Runs `check` on `yaml`; returns (success, stderr).
fn check(f: &Fixture, name: &str, yaml: &str) -> Result<(bool, String)> {
    let path = f.dir.join(name);
    std::fs::write(&path, yaml)?;
    let out = agent::cli_here(&["check", "-c", &path.to_string_lossy()])?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn assert_refused_naming(f: &Fixture, name: &str, yaml: &str, field: &str) -> Result<()> {
    let (ok, stderr) = check(f, name, yaml)?;
    assert!(!ok, "{name}: check accepted a bad config:\n{yaml}");
    assert!(
        stderr.contains(field),
        "{name}: stderr does not name `{field}`:\n{stderr}"
    );
    Ok(())
}

#[test]
fn a_good_config_passes() -> Result<()> {
    let f = fixture()?;
    let (ok, stderr) = check(&f, "good.yaml", &f.spec.to_yaml())?;
    assert!(
        ok,
        "check refused a good config:\n{stderr}\n{}",
        f.spec.to_yaml()
    );
    Ok(())
}

#[test]
fn an_unknown_field_is_named() -> Result<()> {
    let f = fixture()?;
    let mut spec = f.spec.clone();
    spec.set(
        "inbound.alow",
        json!(["spiffe://weft.test/ns/default/sa/x"]),
    );
    assert_refused_naming(&f, "unknown.yaml", &spec.to_yaml(), "alow")
}

#[test]
fn a_wrong_type_is_named() -> Result<()> {
    let f = fixture()?;
    let mut spec = f.spec.clone();
    spec.set("workload.ports", "8080");
    assert_refused_naming(&f, "ports.yaml", &spec.to_yaml(), "workload.ports")?;
    let mut spec = f.spec.clone();
    spec.set("inbound.mtls", "sometimes");
    assert_refused_naming(&f, "mtls.yaml", &spec.to_yaml(), "inbound.mtls")?;
    let mut spec = f.spec.clone();
    spec.set("drain_timeout", "soon");
    assert_refused_naming(&f, "drain.yaml", &spec.to_yaml(), "drain_timeout")
}

#[test]
fn a_missing_certificate_file_is_named() -> Result<()> {
    let f = fixture()?;
    let mut spec = f.spec.clone();
    spec.set(
        "identity.cert",
        f.dir.join("nope.crt").to_string_lossy().into_owned(),
    );
    assert_refused_naming(&f, "nocert.yaml", &spec.to_yaml(), "identity.cert")
}

#[test]
fn a_bad_value_is_named() -> Result<()> {
    let f = fixture()?;
    let mut spec = f.spec.clone();
    spec.set("outbound.capture_listen", "0.0.0.0:15001");
    assert_refused_naming(
        &f,
        "capture.yaml",
        &spec.to_yaml(),
        "outbound.capture_listen",
    )?;
    let mut spec = f.spec.clone();
    spec.set("inbound.allow", json!(["not-a-spiffe-id"]));
    assert_refused_naming(&f, "allow.yaml", &spec.to_yaml(), "inbound.allow")
}

/// Runs `check` on the fixture with extra environment variables.
fn check_with_env(f: &Fixture, env: &[(&str, &str)]) -> Result<(bool, String)> {
    let path = f.dir.join("env.yaml");
    std::fs::write(&path, f.spec.to_yaml())?;
    let mut cmd = std::process::Command::new(agent::agent_bin()?);
    agent::without_weft_env(&mut cmd);
    cmd.arg("check")
        .arg("-c")
        .arg(&path)
        .envs(env.iter().copied());
    let out = cmd.output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn environment_overrides_are_validated_like_the_file() -> Result<()> {
    let f = fixture()?;
    let (ok, stderr) = check_with_env(&f, &[("WEFT_INBOUND__MTLS", "permissive")])?;
    assert!(ok, "a valid override was refused:\n{stderr}");
    let (ok, stderr) = check_with_env(&f, &[("WEFT_INBOUND__MTLS", "sometimes")])?;
    assert!(!ok, "an invalid override was accepted");
    assert!(stderr.contains("inbound.mtls"), "not named:\n{stderr}");
    let (ok, stderr) = check_with_env(&f, &[("WEFT_TUNNEL__MAX_STREAMS_PER_CONNECTION", "0")])?;
    assert!(!ok, "a zero stream limit was accepted");
    assert!(
        stderr.contains("tunnel.max_streams_per_connection"),
        "not named:\n{stderr}"
    );
    // Other tools share the prefix; their variables are not overrides.
    let (ok, stderr) = check_with_env(&f, &[("WEFT_AGENT_BIN", "/x"), ("WEFT_ZONE", "z")])?;
    assert!(
        ok,
        "an unrelated WEFT_ variable broke the config:\n{stderr}"
    );
    Ok(())
}
