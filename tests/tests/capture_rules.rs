//! What transparent capture leaves alone, and what it does with traffic to
//! addresses outside the mesh: excluded ports and loopback are never
//! captured (a host is never locked out); `unknown_destination` decides
//! between passing other destinations through and refusing them.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Result};
use weft_e2e::agent::{self, Agent, AGENT_UID};
use weft_e2e::apps::{self, AppAddrs};
use weft_e2e::client::{self, Probe};
use weft_e2e::process::Proc;
use weft_e2e::topology::{Pair, SERVER_IP};
use weft_e2e::{echo_bin, unique_marker};

const T: Duration = Duration::from_secs(10);
/// An address on the server host that is not a mesh endpoint.
const OUTSIDER_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 4);

/// A plain echo server (no agent in front) named `name` at `echo`.
fn decoy(pair: &Pair, on_client: bool, name: &str, echo: SocketAddr) -> Result<Proc> {
    let host = if on_client {
        &pair.client
    } else {
        &pair.server
    };
    let http = SocketAddr::new(echo.ip(), echo.port() + 1);
    apps::start_app(
        host,
        &echo_bin!(),
        pair.dir.path(),
        name,
        AppAddrs { echo, http },
        name,
    )
}

/// The client agent (uid 1337) behind `redirect install`, with
/// `unknown_destination` set to `unknown`; the server side has no agent.
fn capturing_client(pair: &Pair, unknown: &str) -> Result<Agent> {
    let mut spec = pair.client_spec(&pair.identity("client")?);
    spec.set("outbound.unknown_destination", unknown)
        .set("redirect.inbound", false)
        .set("redirect.exclude_ports", serde_json::json!([22]));
    agent::install_redirect(&pair.client, &spec, &pair.dir.join("client-agent.yaml"))?;
    pair.start_client_agent(&spec, Some(AGENT_UID))
}

/// Gives the server host the outsider's address (not a mesh endpoint).
fn add_outsider(pair: &Pair) -> Result<()> {
    pair.server.run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{OUTSIDER_IP}/24"),
            "dev",
            &pair.server_if,
        ],
    )?;
    Ok(())
}

fn probe(pair: &Pair, to: SocketAddr) -> Result<Probe> {
    let ping = unique_marker("probe");
    pair.client.enter(|| client::probe(to, ping.as_bytes(), T))
}

#[test]
fn excluded_ports_and_loopback_are_not_captured() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let _ssh = decoy(&pair, false, "fake-ssh", SocketAddr::from((SERVER_IP, 22)))?;
    let _local = decoy(
        &pair,
        true,
        "local-service",
        SocketAddr::from(([127, 0, 0, 1], 7000)),
    )?;
    // Deny unknown destinations: anything captured that the mesh cannot
    // carry is refused, so only uncaptured connections get an answer.
    let client = capturing_client(&pair, "deny")?;
    for to in [
        SocketAddr::from((SERVER_IP, 22)),
        SocketAddr::from(([127, 0, 0, 1], 7000)),
    ] {
        let got = probe(&pair, to)?;
        assert!(
            matches!(got, Probe::Answered(_)),
            "{to} was captured (or broken): {got:?}"
        );
    }
    let opened = client.metrics()?.sum(
        "weft_connections_opened_total",
        &[("direction", "outbound")],
    );
    assert_eq!(
        opened, 0.0,
        "the client agent handled connections it should never see"
    );
    Ok(())
}

#[test]
fn unknown_destinations_pass_through_or_are_denied() -> Result<()> {
    for (mode, should_answer) in [("passthrough", true), ("deny", false)] {
        let pair = Pair::new(echo_bin!())?;
        add_outsider(&pair)?;
        let outsider = SocketAddr::new(IpAddr::V4(OUTSIDER_IP), 8080);
        let _outsider = decoy(&pair, false, "outsider", outsider)?;
        let _client = capturing_client(&pair, mode)?;
        let got = probe(&pair, outsider)?;
        assert_eq!(
            matches!(got, Probe::Answered(_)),
            should_answer,
            "unknown_destination: {mode}: a connection to {outsider} (not in the mesh) got {got:?}"
        );
    }
    Ok(())
}

/// Sends `data` on `conn` and reads it back.
fn exchange(conn: &mut TcpStream, data: &[u8]) -> Result<()> {
    conn.write_all(data)?;
    let mut got = vec![0; data.len()];
    conn.read_exact(&mut got)?;
    ensure!(got == data, "echoed {:?}", String::from_utf8_lossy(&got));
    Ok(())
}

/// Connections that were open before capture began keep working once the
/// rules are in: with no nat table before, conntrack picks them up
/// mid-stream, and their next packet out must not be taken for a new
/// outbound connection. (An operator's SSH session whose server speaks
/// next is the case that matters: its packets leave from port 22 to any
/// port.) Here the host's own connection to an outside echo server sends
/// first after the rules came.
#[test]
fn connections_open_before_capture_are_left_alone() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    add_outsider(&pair)?;
    let outside = SocketAddr::from((OUTSIDER_IP, 7000));
    let _echo = decoy(&pair, false, "outside-echo", outside)?;
    let mut session = pair.client.enter(|| {
        let conn = TcpStream::connect_timeout(&outside, T)?;
        conn.set_read_timeout(Some(T))?;
        Ok::<_, anyhow::Error>(conn)
    })?;
    exchange(&mut session, b"before capture")?;
    let _agent = capturing_client(&pair, "deny")?;
    for i in 0..3 {
        exchange(&mut session, format!("after capture {i}").as_bytes())?;
    }
    // A new connection to the same place is captured (and denied).
    ensure!(
        matches!(probe(&pair, outside)?, Probe::Refused(_)),
        "a new connection was not captured"
    );
    Ok(())
}
