//! Bad input on the HBONE port never harms the agent: garbage, a truncated
//! ClientHello, a good TLS session that does not speak HTTP/2, a TLS client
//! without a certificate, and peers that say nothing are each closed (and
//! the handshake failures counted); requests that are not a well-formed
//! CONNECT get an HTTP/2 error status. After all of it the agent still
//! runs and a good peer still gets through.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use http::Method;
use weft_e2e::agent::Agent;
use weft_e2e::hbone::{self, Attempt, Session};
use weft_e2e::process::Proc;
use weft_e2e::topology::{self, Pair, ECHO_PORT, HBONE_PORT, SERVER_IP};
use weft_e2e::{echo_bin, unique_marker};

const T: Duration = Duration::from_secs(15);
const FAILURES: &str = "weft_handshake_failures_total";
const IN: (&str, &str) = ("direction", "inbound");

fn hbone_addr() -> SocketAddr {
    topology::server(HBONE_PORT)
}

/// A pair with the server app and the server agent (allowing `client`) up,
/// the agent's spec passed through `edit` first.
fn server_side(edit: impl Fn(&mut weft_e2e::agent::AgentSpec)) -> Result<(Pair, Proc, Agent)> {
    let pair = Pair::new(echo_bin!())?;
    let app = pair.start_server_app("bad-input")?;
    let mut spec = pair.server_spec(&pair.identity("server")?);
    edit(&mut spec);
    let agent = pair.start_server_agent(&spec, None)?;
    Ok((pair, app, agent))
}

/// Sends `bytes` on a plain TCP connection to the HBONE port, half-closes
/// unless `keep_open`, and reads until the agent closes: what came back,
/// and how it ended. An error if the agent keeps the connection open.
fn raw_tcp(
    pair: &Pair,
    bytes: &[u8],
    keep_open: bool,
    timeout: Duration,
) -> Result<(Vec<u8>, String)> {
    pair.client.enter(|| {
        let mut conn = TcpStream::connect_timeout(&hbone_addr(), T)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.write_all(bytes).context("sending")?;
        if !keep_open {
            conn.shutdown(Shutdown::Write)?;
        }
        let mut got = Vec::new();
        let end = match conn.read_to_end(&mut got) {
            Ok(_) => "eof".to_owned(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                anyhow::bail!(
                    "the agent kept the connection open for {timeout:?} ({} bytes came back)",
                    got.len()
                )
            }
            Err(e) => e.to_string(),
        };
        Ok((got, end))
    })
}

/// Only a TLS alert record (content type 21), or nothing, may come back
/// to a client that never completed a handshake.
fn assert_alert_or_nothing(what: &str, answer: &[u8]) {
    assert!(
        answer.is_empty() || answer[0] == 21,
        "{what}: the agent answered with something other than a TLS alert: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(64)])
    );
}

/// The inbound handshake failures so far, all reasons together.
fn failures(agent: &Agent) -> Result<f64> {
    agent.metric(FAILURES, &[IN])
}

/// Waits until the inbound handshake failures exceed `before`.
fn wait_failure_counted(agent: &Agent, what: &str, before: f64) -> Result<()> {
    agent
        .wait_metric_until(
            FAILURES,
            &[IN],
            &format!("> {before} after {what}"),
            T,
            |v| v > before,
        )
        .map(|_| ())
}

/// A good peer's CONNECT to the echo port is answered and echoed, and the
/// agent process is still the one we started.
fn assert_unharmed(pair: &Pair, agent: &mut Agent) -> Result<()> {
    let good = pair.identity("client")?;
    let data = unique_marker("good").into_bytes();
    let got = pair.client.enter(|| {
        hbone::attempt(
            &good,
            hbone_addr(),
            &format!("{SERVER_IP}:{ECHO_PORT}"),
            &data,
            T,
        )
    })?;
    assert_eq!(
        got,
        Attempt::Connected(data),
        "the allowed client must get through"
    );
    ensure!(
        agent.proc.try_exit()?.is_none(),
        "the agent exited\n{}",
        agent.proc.logs()
    );
    let health = agent.admin("GET", "/healthz")?;
    assert_eq!(health.status, 200, "{}", health.text());
    Ok(())
}

#[test]
fn garbage_and_broken_handshakes_are_closed_and_counted() -> Result<()> {
    let (pair, _app, mut server) = server_side(|_| {})?;
    let good = pair.identity("client")?;

    // (a) Not TLS at all.
    let before = failures(&server)?;
    let garbage = b"GET / HTTP/1.1\r\nHost: weft\r\n\r\n\x00\x01\x02\xff garbage garbage";
    let (answer, end) = raw_tcp(&pair, garbage, false, T)?;
    assert_alert_or_nothing("plaintext garbage", &answer);
    wait_failure_counted(&server, "plaintext garbage", before)?;
    eprintln!("garbage: {} bytes back, then {end}", answer.len());

    // (b) The first 20 bytes of a real ClientHello, then EOF.
    let before = failures(&server)?;
    let hello = hbone::client_hello(hbone::client_config(&good)?, hbone_addr())?;
    ensure!(
        hello.len() > 100,
        "the ClientHello is only {} bytes",
        hello.len()
    );
    let (answer, end) = raw_tcp(&pair, &hello[..20], false, T)?;
    assert_alert_or_nothing("a truncated ClientHello", &answer);
    wait_failure_counted(&server, "a truncated ClientHello", before)?;
    eprintln!("truncated hello: {} bytes back, then {end}", answer.len());

    // (c) A valid mTLS session, then HTTP/1.1 instead of the HTTP/2 preface.
    let handshakes = server.metric("weft_handshakes_total", &[IN])?;
    let session = pair.client.enter(|| {
        hbone::tls_session(
            hbone::client_config(&good)?,
            hbone_addr(),
            b"GET / HTTP/1.1\r\nHost: weft\r\n\r\n",
            true,
            T,
        )
    })?;
    match &session {
        Session::Ended { answer, .. } => assert!(
            !String::from_utf8_lossy(answer).contains("HTTP/1"),
            "the agent answered HTTP/1: {session:?}"
        ),
        Session::HandshakeFailed(e) => panic!("a valid peer failed the TLS handshake: {e}"),
    }
    server.wait_metric("weft_handshakes_total", &[IN], handshakes + 1.0)?;
    assert_eq!(
        server.metric("weft_tunnel_connections", &[IN])?,
        0.0,
        "a session that never spoke HTTP/2 counts as a tunnel"
    );

    // (d) A TLS client that presents no certificate.
    let session = pair.client.enter(|| {
        hbone::tls_session(
            hbone::client_config_without_certificate(&good.trust_bundle)?,
            hbone_addr(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            true,
            T,
        )
    })?;
    if let Session::Ended { answer, .. } = &session {
        assert!(
            answer.is_empty(),
            "a client without a certificate was served: {session:?}"
        );
    }
    server.wait_metric(FAILURES, &[IN, ("reason", "no_certificate")], 1.0)?;

    assert_unharmed(&pair, &mut server)
}

#[test]
fn silent_peers_are_dropped_after_the_connect_timeout() -> Result<()> {
    let (pair, _app, mut server) = server_side(|spec| {
        spec.set("tunnel.connect_timeout", "1s");
    })?;
    let good = pair.identity("client")?;

    // A TCP connection that never starts a handshake.
    let (answer, _) = raw_tcp(&pair, b"", true, T)?;
    assert_alert_or_nothing("a silent TCP peer", &answer);
    server.wait_metric(FAILURES, &[IN, ("reason", "timeout")], 1.0)?;

    // A valid TLS session that never sends the HTTP/2 preface.
    let session = pair
        .client
        .enter(|| hbone::tls_session(hbone::client_config(&good)?, hbone_addr(), b"", true, T))?;
    assert!(
        matches!(&session, Session::Ended { .. }),
        "a valid peer failed the TLS handshake: {session:?}"
    );
    assert_eq!(server.metric("weft_tunnel_connections", &[IN])?, 0.0);

    assert_unharmed(&pair, &mut server)
}

#[test]
fn requests_that_are_not_a_well_formed_connect_get_http_errors() -> Result<()> {
    let (pair, _app, mut server) = server_side(|_| {})?;
    let good = pair.identity("client")?;
    let client_id = weft_e2e::pki::spiffe_id("client");
    let ask = |method: Method, target: &str| {
        pair.client
            .enter(|| hbone::request(&good, hbone_addr(), method, target, b"hello", T))
    };

    for authority in ["not-an-address", &SERVER_IP.to_string()] {
        let got = ask(Method::CONNECT, authority)?;
        assert_eq!(got, Attempt::Status(400), "CONNECT {authority}");
    }
    server.wait_metric(
        "weft_denied_streams_total",
        &[("source_identity", &client_id), ("reason", "bad_authority")],
        2.0,
    )?;

    let got = ask(Method::GET, &format!("http://{SERVER_IP}:{ECHO_PORT}/"))?;
    assert_eq!(got, Attempt::Status(405), "GET instead of CONNECT");
    let got = ask(
        Method::POST,
        &format!("http://{SERVER_IP}:{ECHO_PORT}/upload"),
    )?;
    assert_eq!(got, Attempt::Status(405), "POST instead of CONNECT");
    server.wait_metric(
        "weft_denied_streams_total",
        &[("source_identity", &client_id), ("reason", "not_connect")],
        2.0,
    )?;

    assert_unharmed(&pair, &mut server)
}
