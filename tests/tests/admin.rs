//! The admin endpoint (127.0.0.1:15000): readiness and liveness, the config
//! in force without secrets, the log filter changed at run time (and a bad
//! one refused), reachable from the agent's own host only while the
//! metrics endpoint is reachable from others, and `/ready` turning 503
//! while the agent drains.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use weft_e2e::agent::Agent;
use weft_e2e::client::{echo_on, open_echo_connections};
use weft_e2e::hbone::{self, Attempt};
use weft_e2e::pki::spiffe_id;
use weft_e2e::process::Proc;
use weft_e2e::topology::{self, Pair, ECHO_LISTENER, ECHO_PORT, HBONE_PORT, SERVER_IP};
use weft_e2e::{echo_bin, http, unique_marker, wait};

const T: Duration = Duration::from_secs(15);

/// A pair with the server app and the server agent up, its log level set
/// to `log_level`.
fn server_side(log_level: &str) -> Result<(Pair, Proc, Agent)> {
    let pair = Pair::new(echo_bin!())?;
    let app = pair.start_server_app("admin")?;
    let mut spec = pair.server_spec(&pair.identity("server")?);
    spec.set("log.level", log_level);
    let agent = pair.start_server_agent(&spec, None)?;
    Ok((pair, app, agent))
}

fn expect(agent: &Agent, method: &str, path: &str, status: u16) -> Result<String> {
    let resp = agent.admin(method, path)?;
    ensure!(
        resp.status == status,
        "{method} {path} answered {} (wanted {status}): {}",
        resp.status,
        resp.text()
    );
    Ok(resp.text())
}

#[test]
fn readiness_health_and_a_config_dump_without_secrets() -> Result<()> {
    let (pair, _app, server) = server_side("info")?;
    expect(&server, "GET", "/ready", 200)?;
    expect(&server, "GET", "/healthz", 200)?;

    let resp = server.admin("GET", "/config_dump")?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let text = resp.text();
    let dump: serde_json::Value =
        serde_json::from_str(&text).context("/config_dump is not JSON")?;
    assert_eq!(
        dump["config"]["workload"]["address"],
        SERVER_IP.to_string(),
        "{text}"
    );
    assert_eq!(dump["identity"]["spiffe_id"], spiffe_id("server"), "{text}");
    assert_eq!(dump["draining"], false, "{text}");

    // The key file's PEM body, line by line and whole, is nowhere in the dump.
    let key_path = pair.dir.join("server.key");
    let key = std::fs::read_to_string(&key_path)?;
    let body: Vec<&str> = key
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
        .collect();
    ensure!(!body.is_empty(), "{} has no PEM body", key_path.display());
    for line in &body {
        assert!(
            !text.contains(line),
            "/config_dump shows private key material: {line}"
        );
    }
    assert!(
        !text.contains(&body.concat()),
        "/config_dump shows the private key"
    );
    assert!(
        !text.contains("PRIVATE KEY"),
        "/config_dump shows a PEM private key"
    );
    Ok(())
}

#[test]
fn the_log_filter_changes_at_run_time_and_a_bad_one_is_refused() -> Result<()> {
    // Quiet at first: the per-connection debug line is not written.
    let (pair, _app, server) = server_side("warn")?;
    let good = pair.identity("client")?;
    let tunnel_line = "inbound tunnel established";
    let connect = || -> Result<()> {
        let data = unique_marker("logging").into_bytes();
        let got = pair.client.enter(|| {
            hbone::attempt(
                &good,
                topology::server(HBONE_PORT),
                &format!("{SERVER_IP}:{ECHO_PORT}"),
                &data,
                T,
            )
        })?;
        ensure!(got == Attempt::Connected(data), "CONNECT failed: {got:?}");
        Ok(())
    };

    assert_eq!(expect(&server, "GET", "/logging", 200)?.trim(), "warn");
    connect()?;
    assert!(
        !server.proc.stderr().contains(tunnel_line),
        "a debug line was written at level warn:\n{}",
        server.proc.stderr()
    );

    expect(&server, "POST", "/logging?level=debug", 200)?;
    assert_eq!(expect(&server, "GET", "/logging", 200)?.trim(), "debug");
    connect()?;
    wait::until("the debug line of the new tunnel", T, || {
        Ok(server.proc.stderr().contains(tunnel_line).then_some(()))
    })
    .map_err(|e| anyhow!("{e:#}\n{}", server.proc.logs()))?;

    // Bad filters are refused and change nothing.
    for bad in [
        "/logging?level=weft_agent=loudest",
        "/logging?level=[unclosed",
        "/logging",
    ] {
        expect(&server, "POST", bad, 400)?;
    }
    assert_eq!(expect(&server, "GET", "/logging", 200)?.trim(), "debug");
    Ok(())
}

#[test]
fn admin_is_loopback_only_while_metrics_serve_other_hosts() -> Result<()> {
    let (pair, _app, server) = server_side("info")?;
    let admin_on_host_ip = SocketAddr::from((SERVER_IP, 15000));
    for (host, from) in [
        (&pair.client, "the client host"),
        (&pair.server, "its own host"),
    ] {
        let got = host.enter(|| Ok(TcpStream::connect_timeout(&admin_on_host_ip, T)))?;
        assert!(
            got.is_err(),
            "the admin endpoint answered on {admin_on_host_ip} from {from}"
        );
    }
    // Loopback on the agent's host works.
    expect(&server, "GET", "/healthz", 200)?;

    let metrics = pair
        .client
        .enter(|| http::get(SocketAddr::from((SERVER_IP, 15020)), "/metrics", T))?;
    assert_eq!(metrics.status, 200, "{}", metrics.text());
    let parsed = weft_e2e::metrics::Metrics::parse(&metrics.text())?;
    assert!(
        parsed.samples().iter().any(|s| s.name.starts_with("weft_")),
        "no weft_ metrics from another host:\n{}",
        metrics.text()
    );
    Ok(())
}

#[test]
fn ready_answers_503_while_draining() -> Result<()> {
    let (pair, _app, mut server) = server_side("info")?;
    let client = pair.start_client_agent(&pair.client_spec(&pair.identity("client")?), None)?;
    let mut held = pair
        .client
        .enter(|| open_echo_connections(ECHO_LISTENER, 1, T))?;
    server.wait_metric("weft_open_streams", &[("direction", "inbound")], 1.0)?;

    server.proc.signal(libc::SIGTERM)?;
    wait::until("/ready to answer 503", T, || {
        Ok((server.admin("GET", "/ready")?.status == 503).then_some(()))
    })
    .map_err(|e| anyhow!("{e:#}\n{}", server.proc.logs()))?;
    expect(&server, "GET", "/healthz", 200)?;
    let dump = server.config_dump()?;
    assert_eq!(dump["draining"], true, "{dump}");
    assert!(
        dump["in_flight"].as_u64() >= Some(1),
        "the held connection is not in flight: {dump}"
    );

    // The connection in flight still carries data; once it ends, the
    // agent finishes draining and exits 0 by itself.
    pair.client
        .enter(|| echo_on(&mut held[0], b"still here\n"))?;
    drop(held);
    let status = server.proc.wait_exit(T)?;
    assert!(
        status.success(),
        "the agent exited with {status}\n{}",
        server.proc.logs()
    );
    drop(client);
    Ok(())
}
