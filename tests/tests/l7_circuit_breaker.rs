//! The CircuitBreaker's HTTP limits in the caller's agent, with a static
//! policy: an application connection over `maxConnections` has its
//! requests answered `503 overflow`; over `maxRequests`, requests wait as
//! one of `maxPendingRequests` and the next one gets `503 overflow` at
//! once. Real agents, real mTLS, real HTTP.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use weft_e2e::agent::Agent;
use weft_e2e::pki::spiffe_id;
use weft_e2e::topology::{server, Pair, ECHO_LISTENER, ECHO_PORT, HTTP_LISTENER, HTTP_PORT};
use weft_e2e::{echo_bin, http, unique_marker};

const T: Duration = Duration::from_secs(20);

fn start(pair: &Pair, breaker: Value) -> Result<(Agent, Agent)> {
    let mut s = pair.server_spec(&pair.identity("server")?);
    s.set(
        "policy",
        json!({
            "workload": "server",
            "inbound": {"permissions": [
                {"policy": "client", "from": [spiffe_id("client")], "action": "Allow"},
            ]},
        }),
    );
    let server_agent = pair.start_server_agent(&s, None)?;
    let mut c = pair.client_spec(&pair.identity("client")?);
    c.set(
        "outbound.listeners",
        json!([
            {"listen": ECHO_LISTENER.to_string(), "target": server(ECHO_PORT).to_string()},
            {"listen": HTTP_LISTENER.to_string(), "target": server(HTTP_PORT).to_string(),
             "protocol": "http", "service": "default/server"},
        ]),
    )
    .set(
        "policy",
        json!({
            "workload": "client",
            "outbound": {"default/server": {"circuitBreaker": breaker}},
        }),
    );
    let client = pair.start_client_agent(&c, None)?;
    Ok((server_agent, client))
}

fn get(pair: &Pair, path: &str) -> Result<http::Response> {
    pair.client
        .enter(|| http::request_with(HTTP_LISTENER, "GET", path, &[], T))
}

#[test]
fn connections_over_max_connections_get_overflow() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("cb");
    let _app = pair.start_server_app(&marker)?;
    let (_server, client) = start(&pair, json!({"maxConnections": 1}))?;

    let r = get(&pair, "/hello")?;
    ensure!(r.status == 200, "{} {}", r.status, r.text());
    // An idle application connection holds the only slot.
    let held = pair
        .client
        .enter(|| Ok(TcpStream::connect(HTTP_LISTENER)?))?;
    let r = weft_e2e::wait::until("the held connection to take the slot", T, || {
        let r = get(&pair, "/hello")?;
        Ok((r.status == 503).then_some(r))
    })?;
    ensure!(
        r.header("x-weft-flag") == Some("overflow"),
        "{:?} {}",
        r.headers,
        r.text()
    );
    drop(held);
    weft_e2e::wait::until("the slot to free", T, || {
        Ok((get(&pair, "/hello")?.status == 200).then_some(()))
    })?;
    client.wait_metric(
        "weft_http_local_responses_total",
        &[("flag", "overflow")],
        1.0,
    )?;
    Ok(())
}

#[test]
fn requests_over_max_requests_wait_then_overflow() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("cb");
    let _app = pair.start_server_app(&marker)?;
    let (_server, _client) = start(&pair, json!({"maxRequests": 1, "maxPendingRequests": 1}))?;
    let r = get(&pair, "/hello")?;
    ensure!(r.status == 200, "{} {}", r.status, r.text());

    let results: Vec<(u16, Option<String>, Duration)> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..3)
            .map(|i| {
                let pair = &pair;
                s.spawn(move || {
                    // Staggered so that the first one holds the slot.
                    std::thread::sleep(Duration::from_millis(200 * i));
                    let started = Instant::now();
                    match get(pair, "/delay/1500") {
                        Ok(r) => (
                            r.status,
                            r.header("x-weft-flag").map(str::to_owned),
                            started.elapsed(),
                        ),
                        Err(_) => (0, None, started.elapsed()),
                    }
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().unwrap_or((0, None, Duration::ZERO)))
            .collect()
    });
    // The first is served, the second waits for its slot and is served
    // after it, the third finds the one pending place taken.
    ensure!(results[0].0 == 200, "{results:?}");
    ensure!(
        results[1].0 == 200 && results[1].2 >= Duration::from_millis(2000),
        "the pending request should wait for the first: {results:?}"
    );
    ensure!(
        results[2].0 == 503
            && results[2].1.as_deref() == Some("overflow")
            && results[2].2 < Duration::from_millis(1000),
        "the third should overflow at once: {results:?}"
    );
    Ok(())
}
