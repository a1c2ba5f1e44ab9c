//! Strict vs permissive plaintext inbound: with redirect installed on the
//! server host, a plaintext connection from the client host to the app's
//! port lands on the agent's plaintext port, which refuses it in strict
//! mode and forwards it to the app in permissive mode.

use std::time::Duration;

use anyhow::Result;
use weft_e2e::agent::{self, Agent, AGENT_UID};
use weft_e2e::client::{self, payload, Probe};
use weft_e2e::hbone::{self, Attempt};
use weft_e2e::process::Proc;
use weft_e2e::topology::{self, Pair, ECHO_PORT, HBONE_PORT, SERVER_IP};
use weft_e2e::{echo_bin, unique_marker};

const T: Duration = Duration::from_secs(10);

/// The server app, and the server agent in `mode` (as uid 1337) behind
/// `weft-agent redirect install`.
fn server_with_redirect(pair: &Pair, mode: &str) -> Result<(Proc, Agent)> {
    let app = pair.start_server_app("plaintext")?;
    let mut spec = pair.server_spec(&pair.identity("server")?);
    spec.set("inbound.mtls", mode).set("redirect.inbound", true);
    agent::install_redirect(&pair.server, &spec, &pair.dir.join("server-agent.yaml"))?;
    let agent = pair.start_server_agent(&spec, Some(AGENT_UID))?;
    Ok((app, agent))
}

#[test]
fn strict_mode_refuses_plaintext() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let (_app, server) = server_with_redirect(&pair, "strict")?;
    let ping = unique_marker("strict");
    let got = pair
        .client
        .enter(|| client::probe(topology::server(ECHO_PORT), ping.as_bytes(), T))?;
    assert!(
        matches!(got, Probe::Refused(_)),
        "plaintext reached the app in strict mode: {got:?}"
    );
    server.wait_metric(
        "weft_plaintext_connections_total",
        &[("result", "refused")],
        1.0,
    )?;
    assert_eq!(
        server.metrics()?.sum(
            "weft_plaintext_connections_total",
            &[("result", "accepted")]
        ),
        0.0
    );
    // mTLS still works with the redirect in place.
    let good = pair.identity("client")?;
    let authority = format!("{SERVER_IP}:{ECHO_PORT}");
    let hbone_addr = topology::server(HBONE_PORT);
    let got = pair
        .client
        .enter(|| hbone::attempt(&good, hbone_addr, &authority, ping.as_bytes(), T))?;
    assert_eq!(got, Attempt::Connected(ping.into_bytes()));
    Ok(())
}

#[test]
fn permissive_mode_forwards_plaintext() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let (_app, server) = server_with_redirect(&pair, "permissive")?;
    let ping = unique_marker("permissive");
    let got = pair
        .client
        .enter(|| client::probe(topology::server(ECHO_PORT), ping.as_bytes(), T))?;
    assert_eq!(
        got,
        Probe::Answered(ping.clone().into_bytes()),
        "permissive mode must reach the app"
    );
    let data = payload(&ping, 500_000);
    pair.client
        .enter(|| client::echo_roundtrip(topology::server(ECHO_PORT), &data, T))?;
    // It went through the agent (the redirect is in place), which counted it.
    server.wait_metric(
        "weft_plaintext_connections_total",
        &[("result", "accepted")],
        2.0,
    )?;
    let labels = [("direction", "inbound"), ("tls", "plaintext")];
    server.wait_metric("weft_connections_opened_total", &labels, 2.0)?;
    Ok(())
}
