//! Tunnel connections are pooled and multiplexed per (source identity,
//! destination agent): many concurrent proxied connections share one
//! TLS + HTTP/2 connection up to `max_streams_per_connection`; past that the
//! pool opens more, never beyond `max_connections_per_peer`, where HTTP/2
//! queues the extra streams; and a tunnel connection that carries no stream
//! for `idle_timeout` is closed (but never one that carries a stream).

use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};
use weft_e2e::agent::{Agent, AgentSpec};
use weft_e2e::client::{self, echo_on, open_echo_connections};
use weft_e2e::process::Proc;
use weft_e2e::topology::{Pair, ECHO_LISTENER};
use weft_e2e::{echo_bin, unique_marker, wait};

const T: Duration = Duration::from_secs(20);
const OUT: &[(&str, &str)] = &[("direction", "outbound")];
const IN: &[(&str, &str)] = &[("direction", "inbound")];
const HANDSHAKES: &str = "weft_handshakes_total";
const TUNNELS: &str = "weft_tunnel_connections";
const STREAMS: &str = "weft_open_streams";

/// The server app and both agents, each spec passed through `edit` first.
fn start(edit: impl Fn(&mut AgentSpec)) -> Result<(Pair, Proc, Agent, Agent)> {
    let pair = Pair::new(echo_bin!())?;
    let app = pair.start_server_app(&unique_marker("pooling"))?;
    let mut server_spec = pair.server_spec(&pair.identity("server")?);
    edit(&mut server_spec);
    let server = pair.start_server_agent(&server_spec, None)?;
    let mut client_spec = pair.client_spec(&pair.identity("client")?);
    edit(&mut client_spec);
    let client = pair.start_client_agent(&client_spec, None)?;
    Ok((pair, app, server, client))
}

/// Waits until `agent` shows `want` open streams in `direction` (streams are
/// counted once answered, so they may lag the application by a moment).
fn wait_streams(agent: &Agent, direction: &[(&str, &str)], want: f64) -> Result<()> {
    agent.wait_metric_until(STREAMS, direction, &format!("== {want}"), T, |v| v == want)?;
    Ok(())
}

/// One more round trip on every held connection: all still carry data.
fn echo_on_all(pair: &Pair, held: &mut [TcpStream]) -> Result<()> {
    let marker = unique_marker("again");
    pair.client.enter(|| {
        held.iter_mut().enumerate().try_for_each(|(i, s)| {
            echo_on(s, format!("{marker} {i}\n").as_bytes())
                .map_err(|e| anyhow!("held connection {i}: {e:#}"))
        })
    })
}

#[test]
fn concurrent_connections_share_one_tunnel_connection() -> Result<()> {
    let (pair, _app, server, client) = start(|_| {})?;
    // A cold pool: all 50 arrive at once, before any tunnel exists.
    let mut held = pair
        .client
        .enter(|| open_echo_connections(ECHO_LISTENER, 50, T))?;
    wait_streams(&client, OUT, 50.0)?;
    wait_streams(&server, IN, 50.0)?;

    let (c, s) = (client.metrics()?, server.metrics()?);
    let report = format!(
        "client agent:\n{}server agent:\n{}",
        c.dump("weft_"),
        s.dump("weft_")
    );
    assert_eq!(
        c.sum(HANDSHAKES, OUT),
        1.0,
        "50 concurrent connections (under the default 100 streams per connection) must share one tunnel\n{report}"
    );
    assert_eq!(c.sum(TUNNELS, OUT), 1.0, "{report}");
    assert_eq!(s.sum(HANDSHAKES, IN), 1.0, "{report}");
    assert_eq!(s.sum(TUNNELS, IN), 1.0, "{report}");

    echo_on_all(&pair, &mut held)?;
    drop(held);
    wait_streams(&client, OUT, 0.0)?;
    // Closing the proxied connections does not close the pooled tunnel
    // (the idle timeout is 300 s), and the next connection reuses it.
    let data = client::payload(&unique_marker("reuse"), 10_000);
    pair.client
        .enter(|| client::echo_roundtrip(ECHO_LISTENER, &data, T))?;
    assert_eq!(
        client.metric(HANDSHAKES, OUT)?,
        1.0,
        "the tunnel was not reused"
    );
    assert_eq!(client.metric(TUNNELS, OUT)?, 1.0);
    Ok(())
}

#[test]
fn concurrent_connections_share_the_warm_pooled_connection() -> Result<()> {
    let (pair, _app, server, client) = start(|_| {})?;
    // One connection first, so the tunnel exists before the burst.
    let data = client::payload(&unique_marker("warm"), 10_000);
    pair.client
        .enter(|| client::echo_roundtrip(ECHO_LISTENER, &data, T))?;
    client.wait_metric_until(TUNNELS, OUT, "== 1", T, |v| v == 1.0)?;

    let mut held = pair
        .client
        .enter(|| open_echo_connections(ECHO_LISTENER, 50, T))?;
    wait_streams(&client, OUT, 50.0)?;
    wait_streams(&server, IN, 50.0)?;
    let c = client.metrics()?;
    let report = format!("client agent:\n{}", c.dump("weft_"));
    assert_eq!(c.sum(HANDSHAKES, OUT), 1.0, "{report}");
    assert_eq!(c.sum(TUNNELS, OUT), 1.0, "{report}");
    assert_eq!(server.metric(TUNNELS, IN)?, 1.0);
    echo_on_all(&pair, &mut held)
}

#[test]
fn stream_limit_spreads_streams_over_a_few_tunnel_connections() -> Result<()> {
    let (pair, _app, server, client) = start(|spec| {
        spec.set("tunnel.max_streams_per_connection", 10);
    })?;
    let mut held = pair
        .client
        .enter(|| open_echo_connections(ECHO_LISTENER, 50, T))?;
    wait_streams(&client, OUT, 50.0)?;
    wait_streams(&server, IN, 50.0)?;

    let c = client.metrics()?;
    let (tunnels, handshakes) = (c.sum(TUNNELS, OUT), c.sum(HANDSHAKES, OUT));
    let report = format!("client agent:\n{}", c.dump("weft_"));
    // 50 streams at 10 per connection need at least 5; the pool may open up
    // to max_connections_per_peer (16 by default), never more.
    assert!(
        (5.0..=16.0).contains(&tunnels),
        "50 streams at 10 per connection used {tunnels} tunnel connections\n{report}"
    );
    assert_eq!(
        handshakes, tunnels,
        "every handshake should leave a pooled connection\n{report}"
    );
    // docs/agent.md: a new connection is opened only when all are full.
    assert_eq!(
        tunnels, 5.0,
        "50 streams at 10 per connection should fill exactly 5\n{report}"
    );
    assert_eq!(server.metric(TUNNELS, IN)?, tunnels);

    echo_on_all(&pair, &mut held)?;
    Ok(())
}

#[test]
fn past_the_connection_cap_streams_queue_for_a_free_slot() -> Result<()> {
    let (pair, _app, server, client) = start(|spec| {
        spec.set("tunnel.max_streams_per_connection", 10)
            .set("tunnel.max_connections_per_peer", 1)
            // Queued streams wait in the pool for a slot at most this long.
            .set("tunnel.connect_timeout", "30s");
    })?;
    // Exactly the capacity: one connection, every slot taken.
    let mut held = pair
        .client
        .enter(|| open_echo_connections(ECHO_LISTENER, 10, T))?;
    wait_streams(&client, OUT, 10.0)?;
    assert_eq!(client.metric(TUNNELS, OUT)?, 1.0);

    // Ten more: the pool is at its cap, so these wait inside the agent's
    // pool for a free slot until streams end; none is refused.
    let done = AtomicUsize::new(0);
    let marker = unique_marker("queued");
    pair.client.enter(|| {
        std::thread::scope(|s| {
            let queued: Vec<_> = (0..10)
                .map(|i| {
                    let (done, data) = (&done, client::payload(&format!("{marker}-{i}"), 50_000));
                    s.spawn(move || {
                        let result = client::echo_roundtrip(ECHO_LISTENER, &data, T);
                        done.fetch_add(1, Ordering::SeqCst);
                        result
                    })
                })
                .collect();
            let checked = (|| -> Result<()> {
                wait::until("the client agent to hold all 20 connections", T, || {
                    let in_flight = client.config_dump()?["in_flight"].as_u64();
                    Ok((in_flight == Some(20)).then_some(()))
                })?;
                ensure!(
                    done.load(Ordering::SeqCst) == 0,
                    "a connection past the cap ended while every slot was taken"
                );
                assert_eq!(server.metric(STREAMS, IN)?, 10.0);
                assert_eq!(client.metric(HANDSHAKES, OUT)?, 1.0);
                Ok(())
            })();
            // Free the slots: the queued connections go through.
            held.clear();
            let results: Vec<Result<()>> = queued
                .into_iter()
                .map(|q| q.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect();
            checked?;
            results
                .into_iter()
                .enumerate()
                .try_for_each(|(i, r)| r.map_err(|e| anyhow!("queued connection {i}: {e:#}")))
        })
    })?;
    assert_eq!(
        client.metric(HANDSHAKES, OUT)?,
        1.0,
        "the pool opened connections past max_connections_per_peer"
    );
    Ok(())
}

#[test]
fn a_stream_waiting_past_the_connect_timeout_is_reset() -> Result<()> {
    let (pair, _app, _server, client) = start(|spec| {
        spec.set("tunnel.max_streams_per_connection", 2)
            .set("tunnel.max_connections_per_peer", 1)
            .set("tunnel.connect_timeout", "1s");
    })?;
    let mut held = pair
        .client
        .enter(|| open_echo_connections(ECHO_LISTENER, 2, T))?;
    wait_streams(&client, OUT, 2.0)?;
    // Every slot is taken for longer than the connect timeout: the third
    // connection waits that long in the pool, then is refused.
    let started = Instant::now();
    let data = client::payload(&unique_marker("late"), 1_000);
    let late = pair
        .client
        .enter(|| client::echo_roundtrip(ECHO_LISTENER, &data, T));
    ensure!(
        late.is_err(),
        "a stream past the cap got through while every slot was held"
    );
    let waited = started.elapsed();
    ensure!(
        waited >= Duration::from_millis(900),
        "refused after {waited:?}, before the connect timeout"
    );
    // The agent refused it (well before the client's own deadline).
    ensure!(
        waited < Duration::from_secs(5) && waited < T,
        "not refused by the agent: the client gave up after {waited:?}"
    );
    // A slot frees: the next connection goes through.
    held.pop();
    wait_streams(&client, OUT, 1.0)?;
    pair.client
        .enter(|| client::echo_roundtrip(ECHO_LISTENER, &data, T))?;
    Ok(())
}

#[test]
fn a_cold_burst_past_the_connection_cap_queues_instead_of_failing() -> Result<()> {
    let (pair, _app, _server, client) = start(|spec| {
        spec.set("tunnel.max_streams_per_connection", 10)
            .set("tunnel.max_connections_per_peer", 1)
            .set("tunnel.connect_timeout", "30s");
    })?;
    // Twice the capacity at once, before any tunnel exists: ten are served
    // at once, the other ten wait for them to end. None may fail, though the
    // extra ten meet a brand-new connection whose peer has not yet said (in
    // its HTTP/2 SETTINGS) that it takes only ten streams.
    let marker = unique_marker("cold-burst");
    let start = std::sync::Barrier::new(20);
    let results: Vec<Result<()>> = pair.client.enter(|| {
        Ok(std::thread::scope(|s| {
            let workers: Vec<_> = (0..20)
                .map(|i| {
                    let (start, data) = (&start, client::payload(&format!("{marker}-{i}"), 50_000));
                    s.spawn(move || {
                        start.wait();
                        client::echo_roundtrip(ECHO_LISTENER, &data, T)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        }))
    })?;
    let failed: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("connection {i}: {e:#}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 20 connections failed:\n{}\n{}",
        failed.len(),
        failed.join("\n"),
        client.proc.logs()
    );
    assert_eq!(client.metric(HANDSHAKES, OUT)?, 1.0);
    Ok(())
}

#[test]
fn idle_tunnel_connections_close_after_the_idle_timeout() -> Result<()> {
    let idle = Duration::from_secs(1);
    let (pair, _app, server, client) = start(|spec| {
        spec.set("tunnel.idle_timeout", "1s");
    })?;
    let mut held = pair
        .client
        .enter(|| open_echo_connections(ECHO_LISTENER, 1, T))?;
    wait_streams(&client, OUT, 1.0)?;

    // A tunnel that carries a stream is not idle, however quiet the stream:
    // watch it for three idle timeouts, then use the stream.
    let end = Instant::now() + idle * 3;
    while Instant::now() < end {
        let (c, s) = (client.metric(TUNNELS, OUT)?, server.metric(TUNNELS, IN)?);
        assert_eq!(
            (c, s),
            (1.0, 1.0),
            "a tunnel carrying an open stream was closed as idle\n{}\n{}",
            client.proc.logs(),
            server.proc.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    echo_on_all(&pair, &mut held)?;

    drop(held);
    client.wait_metric_until(TUNNELS, OUT, "== 0", idle * 10, |v| v == 0.0)?;
    server.wait_metric_until(TUNNELS, IN, "== 0", idle * 10, |v| v == 0.0)?;

    // The next connection opens a fresh tunnel.
    let data = client::payload(&unique_marker("after-idle"), 10_000);
    pair.client
        .enter(|| client::echo_roundtrip(ECHO_LISTENER, &data, T))?;
    assert_eq!(client.metric(HANDSHAKES, OUT)?, 2.0);
    Ok(())
}
