//! Peers the server agent must refuse, each counted in its metrics: a
//! certificate from another CA, an expired certificate, a valid identity
//! that is not allowed; and "no open relay": CONNECT to a port the workload
//! does not serve, or to another address, is refused even though something
//! listens there. A raw HBONE client plays the peer (no agent would start
//! with such certificates); each test also shows a good peer gets through.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use weft_e2e::agent::Agent;
use weft_e2e::apps::{self, AppAddrs};
use weft_e2e::hbone::{self, Attempt};
use weft_e2e::pki::{spiffe_id, Ca, IdentityFiles};
use weft_e2e::process::Proc;
use weft_e2e::topology::{self, Pair, CLIENT_IP, ECHO_PORT, HBONE_PORT, SERVER_IP};
use weft_e2e::{echo_bin, unique_marker};

const T: Duration = Duration::from_secs(15);

/// A pair with the server app and the server agent (allowing `client`) up.
fn server_side() -> Result<(Pair, Proc, Agent)> {
    let pair = Pair::new(echo_bin!())?;
    let app = pair.start_server_app("refusals")?;
    let agent = pair.start_server_agent(&pair.server_spec(&pair.identity("server")?), None)?;
    Ok((pair, app, agent))
}

fn hbone_addr() -> SocketAddr {
    topology::server(HBONE_PORT)
}

/// One CONNECT from the client host.
fn attempt(pair: &Pair, ids: &IdentityFiles, authority: &str, data: &[u8]) -> Result<Attempt> {
    pair.client
        .enter(|| hbone::attempt(ids, hbone_addr(), authority, data, T))
}

/// A good peer's CONNECT to the echo port is answered and echoed.
fn assert_good_peer_gets_through(pair: &Pair) -> Result<()> {
    let good = pair.identity("client")?;
    let data = unique_marker("good").into_bytes();
    let got = attempt(pair, &good, &format!("{SERVER_IP}:{ECHO_PORT}"), &data)?;
    assert_eq!(
        got,
        Attempt::Connected(data),
        "the allowed client must get through"
    );
    Ok(())
}

fn assert_refused(what: &str, got: &Attempt) {
    assert!(
        !matches!(got, Attempt::Connected(_)),
        "{what} was let through: {got:?}"
    );
}

#[test]
fn certificate_from_another_ca_is_refused() -> Result<()> {
    let (pair, _app, server) = server_side()?;
    let other = Ca::new("another CA")?;
    // Same identity as the allowed client, but signed by a CA the server does not trust.
    let foreign =
        other
            .leaf(&spiffe_id("client"))?
            .write(pair.dir.path(), "foreign", &[&pair.ca])?;
    let got = attempt(
        &pair,
        &foreign,
        &format!("{SERVER_IP}:{ECHO_PORT}"),
        b"hello",
    )?;
    assert!(
        matches!(got, Attempt::Refused(_)),
        "a foreign-CA peer must fail the handshake: {got:?}"
    );
    server.wait_metric(
        "weft_handshake_failures_total",
        &[("direction", "inbound"), ("reason", "unknown_ca")],
        1.0,
    )?;
    assert_good_peer_gets_through(&pair)
}

#[test]
fn expired_certificate_is_refused() -> Result<()> {
    let (pair, _app, server) = server_side()?;
    let expired = pair.ca.expired_leaf(&spiffe_id("client"))?.write(
        pair.dir.path(),
        "expired",
        &[&pair.ca],
    )?;
    let got = attempt(
        &pair,
        &expired,
        &format!("{SERVER_IP}:{ECHO_PORT}"),
        b"hello",
    )?;
    assert!(
        matches!(got, Attempt::Refused(_)),
        "an expired peer must fail the handshake: {got:?}"
    );
    server.wait_metric(
        "weft_handshake_failures_total",
        &[("direction", "inbound"), ("reason", "expired")],
        1.0,
    )?;
    assert_good_peer_gets_through(&pair)
}

#[test]
fn identity_not_in_allow_list_is_refused() -> Result<()> {
    let (pair, _app, server) = server_side()?;
    let intruder = pair.identity("intruder")?;
    let got = attempt(
        &pair,
        &intruder,
        &format!("{SERVER_IP}:{ECHO_PORT}"),
        b"hello",
    )?;
    assert_eq!(
        got,
        Attempt::Status(403),
        "a valid but not allowed identity must get 403"
    );
    server.wait_metric(
        "weft_denied_streams_total",
        &[
            ("source_identity", &spiffe_id("intruder")),
            ("reason", "not_allowed"),
        ],
        1.0,
    )?;
    assert_good_peer_gets_through(&pair)
}

#[test]
fn no_open_relay() -> Result<()> {
    let (pair, _app, server) = server_side()?;
    // Real listeners behind every forbidden target, so a relay would be caught echoing.
    let decoys: Vec<Proc> = [
        (
            &pair.server,
            "decoy-port",
            SocketAddr::from((SERVER_IP, 9999)),
        ),
        (
            &pair.server,
            "decoy-loopback",
            SocketAddr::from(([127, 0, 0, 1], ECHO_PORT)),
        ),
        (
            &pair.client,
            "decoy-other-host",
            SocketAddr::from((CLIENT_IP, ECHO_PORT)),
        ),
    ]
    .into_iter()
    .map(|(host, name, echo)| {
        let http = SocketAddr::new(echo.ip(), echo.port() + 1);
        apps::start_app(
            host,
            &echo_bin!(),
            pair.dir.path(),
            name,
            AppAddrs { echo, http },
            name,
        )
    })
    .collect::<Result<_>>()?;
    let good = pair.identity("client")?;
    let marker = unique_marker("relay");

    let got = attempt(
        &pair,
        &good,
        &format!("{SERVER_IP}:9999"),
        marker.as_bytes(),
    )?;
    assert_refused("CONNECT to a port the workload does not serve", &got);
    server.wait_metric(
        "weft_denied_streams_total",
        &[("reason", "port_not_served")],
        1.0,
    )?;

    for target in [
        format!("127.0.0.1:{ECHO_PORT}"),
        format!("{CLIENT_IP}:{ECHO_PORT}"),
    ] {
        let got = attempt(&pair, &good, &target, marker.as_bytes())?;
        assert_refused(
            &format!("CONNECT to {target}, not the workload's address"),
            &got,
        );
    }
    server.wait_metric(
        "weft_denied_streams_total",
        &[("reason", "address_not_local")],
        2.0,
    )?;
    drop(decoys);
    assert_good_peer_gets_through(&pair)
}

#[test]
fn agent_refuses_to_start_with_its_own_expired_certificate() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let expired = pair.ca.expired_leaf(&spiffe_id("server"))?.write(
        pair.dir.path(),
        "server",
        &[&pair.ca],
    )?;
    let err = match pair.start_server_agent(&pair.server_spec(&expired), None) {
        Ok(mut agent) => {
            agent.proc.kill();
            panic!(
                "the agent started with an expired certificate\n{}",
                agent.proc.logs()
            );
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("exited"), "the agent did not exit: {err}");
    assert!(
        err.to_lowercase().contains("expired"),
        "the agent did not say why: {err}"
    );
    Ok(())
}
