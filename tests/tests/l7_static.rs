//! The agent's L7 proxy with policies from a static config (the form the
//! zone pushes): authorization per request on the server side (deny wins,
//! default deny, 403 at L7 and a reset at L4), routing, rewrites,
//! redirects, retries, timeouts, faults and rate limits on the client side,
//! metrics and access logs. Real agents, real mTLS, real HTTP.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use weft_e2e::agent::Agent;
use weft_e2e::client::{self, payload};
use weft_e2e::pki::{spiffe_id, TRUST_DOMAIN};
use weft_e2e::topology::{server, Pair, ECHO_LISTENER, HTTP_LISTENER, HTTP_PORT};
use weft_e2e::{echo_bin, http, unique_marker, wait};

const T: Duration = Duration::from_secs(20);

/// The client's HTTP listener served by its L7 proxy, as service
/// `default/server`.
fn http_listeners() -> Value {
    json!([
        {"listen": weft_e2e::topology::ECHO_LISTENER.to_string(), "target": server(weft_e2e::topology::ECHO_PORT).to_string()},
        {"listen": HTTP_LISTENER.to_string(), "target": server(HTTP_PORT).to_string(), "protocol": "http", "service": "default/server"},
    ])
}

fn path_prefix(p: &str) -> Value {
    json!({"path": {"type": "PathPrefix", "value": p}})
}

fn start(pair: &Pair, server_policy: Value, client_policy: Value) -> Result<(Agent, Agent)> {
    let mut s = pair.server_spec(&pair.identity("server")?);
    s.set("policy", server_policy);
    let server = pair.start_server_agent(&s, None)?;
    let mut c = pair.client_spec(&pair.identity("client")?);
    c.set("outbound.listeners", http_listeners())
        .set("policy", client_policy);
    let client = pair.start_client_agent(&c, None)?;
    Ok((server, client))
}

fn get(pair: &Pair, path: &str, headers: &[(&str, &str)]) -> Result<http::Response> {
    pair.client
        .enter(|| http::request_with(HTTP_LISTENER, "GET", path, headers, T))
}

#[test]
fn permissions_routes_and_retries_act_per_request() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("l7");
    let _app = pair.start_server_app(&marker)?;
    let log = pair.dir.join("server-access.log");
    let client_id = spiffe_id("client");
    let server_policy = json!({
        "workload": "server",
        "inbound": {
            "permissions": [
                {"policy": "client-public", "from": [client_id], "action": "Allow",
                 "http": [path_prefix("/public"), path_prefix("/flaky"), path_prefix("/delay")]},
                {"policy": "no-admin", "from": [format!("spiffe://{TRUST_DOMAIN}/*")], "action": "Deny",
                 "http": [path_prefix("/public/admin")]},
            ],
            "accessLog": {"backends": [{"type": "File", "path": log}]},
        },
    });
    let client_policy = json!({
        "workload": "client",
        "outbound": {"default/server": {
            "routes": [
                {"policy": "moved", "rule": {"matches": [path_prefix("/moved")],
                  "default": {"filters": [{"type": "RequestRedirect", "path": {"type": "ReplaceFullPath", "replaceFullPath": "/public/here"}, "statusCode": 301}]}}},
                {"policy": "old-api", "rule": {"matches": [path_prefix("/old")],
                  "default": {"filters": [{"type": "UrlRewrite", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/public/new"}}]}}},
                {"policy": "tag", "rule": {"default": {"filters": [
                    {"type": "RequestHeaderModifier", "set": [{"name": "x-added", "value": "yes"}]},
                    {"type": "ResponseHeaderModifier", "set": [{"name": "x-route", "value": "tag"}]}]}}},
            ],
            "retry": {"numRetries": 2, "retryOn": ["5xx"]},
            "timeout": {"requestTimeout": "700ms"},
        }},
    });
    let (server, client) = start(&pair, server_policy, client_policy)?;

    // Allowed, through the catch-all route that tags requests both ways.
    let r = get(&pair, "/public/hello", &[])?;
    ensure!(r.status == 200, "{} {}", r.status, r.text());
    ensure!(
        r.text().contains(&marker) && r.text().contains("header x-added: yes"),
        "{}",
        r.text()
    );
    ensure!(r.header("x-route") == Some("tag"), "{:?}", r.headers);
    // The server saw the caller's proven identity, set by its agent.
    ensure!(
        r.text()
            .contains(&format!("header x-weft-peer-identity: {client_id}")),
        "{}",
        r.text()
    );

    // Rewritten on the client side before the server's check.
    let r = get(&pair, "/old/thing?q=1", &[])?;
    ensure!(
        r.status == 200 && r.text().contains("for /public/new/thing?q=1"),
        "{} {}",
        r.status,
        r.text()
    );

    // Redirected by the client's agent without reaching the server.
    let r = get(&pair, "/moved", &[])?;
    ensure!(r.status == 301, "{} {}", r.status, r.text());
    let location = r.header("location").unwrap_or_default();
    ensure!(
        location == format!("http://{HTTP_LISTENER}/public/here"),
        "{location}"
    );

    // Every other answer of /flaky is a 503: the retry hides them all.
    for _ in 0..4 {
        let r = get(&pair, "/flaky", &[])?;
        ensure!(
            r.status == 200,
            "a retry should have hidden the 503: {} {}",
            r.status,
            r.text()
        );
    }
    server.wait_metric(
        "weft_http_requests_total",
        &[("direction", "inbound"), ("status", "503")],
        2.0,
    )?;

    // Slower than the request timeout: the client's agent answers 504.
    let r = get(&pair, "/delay/3000", &[])?;
    ensure!(
        r.status == 504 && r.header("x-weft-flag") == Some("timeout"),
        "{} {:?}",
        r.status,
        r.headers
    );

    // Nothing allows /private: default deny, 403 from the server's agent.
    let r = get(&pair, "/private", &[])?;
    ensure!(
        r.status == 403 && r.header("x-weft-flag") == Some("denied"),
        "{} {}",
        r.status,
        r.text()
    );
    ensure!(
        r.text().contains("no TrafficPermission allows"),
        "{}",
        r.text()
    );
    // Allowed by one rule, denied by another: deny wins, and says which.
    let r = get(&pair, "/public/admin/users", &[])?;
    ensure!(
        r.status == 403 && r.text().contains("denied by TrafficPermission no-admin"),
        "{} {}",
        r.status,
        r.text()
    );
    server.wait_metric(
        "weft_http_local_responses_total",
        &[
            ("direction", "inbound"),
            ("flag", "denied"),
            ("policy", "no-admin"),
        ],
        1.0,
    )?;

    // The TCP port: every rule is HTTP-only, so no rule allows a
    // connection there: the stream is refused and the socket reset.
    let data = payload(&marker, 1024);
    let echo = pair
        .client
        .enter(|| client::echo_roundtrip(ECHO_LISTENER, &data, Duration::from_secs(5)));
    ensure!(
        echo.is_err(),
        "a connection no TrafficPermission allows got through"
    );
    server.wait_metric(
        "weft_denied_streams_total",
        &[("source_identity", &client_id), ("reason", "not_allowed")],
        1.0,
    )?;

    // Sequential requests reuse one tunnel stream: the caller's agent keeps
    // its HTTP/1.1 connection to the server's agent alive between them.
    let opened = |agent: &Agent| {
        agent.metric(
            "weft_connections_opened_total",
            &[("direction", "inbound"), ("source_identity", &client_id)],
        )
    };
    let before = opened(&server)?;
    for i in 0..10 {
        let r = get(&pair, &format!("/public/reuse-{i}"), &[])?;
        ensure!(r.status == 200, "{} {}", r.status, r.text());
    }
    let after = opened(&server)?;
    ensure!(
        after - before <= 1.0,
        "10 requests opened {} tunnel streams",
        after - before
    );

    // The access log has one JSON line per request, denials included.
    let line = wait::until("the denial in the access log", T, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text
            .lines()
            .find(|l| l.contains("/public/admin/users"))
            .map(str::to_owned))
    })?;
    let entry: Value = serde_json::from_str(&line)?;
    ensure!(
        entry["status"] == 403
            && entry["flag"] == "denied"
            && entry["source"] == client_id.as_str(),
        "{entry:#}"
    );
    client.wait_metric(
        "weft_http_requests_total",
        &[
            ("direction", "outbound"),
            ("destination", "default/server"),
            ("route", "tag"),
            ("status", "200"),
        ],
        1.0,
    )?;
    Ok(())
}

#[test]
fn rate_limits_and_faults_answer_as_configured() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("limits");
    let _app = pair.start_server_app(&marker)?;
    let client_id = spiffe_id("client");
    let server_policy = json!({
        "workload": "server",
        "inbound": {
            "permissions": [{"policy": "all", "from": [client_id], "action": "Allow"}],
            "rateLimits": [{"policy": "three-per-hour", "from": [client_id],
                "default": {"http": {"requests": 3, "interval": "1h",
                    "onRateLimit": {"status": 429, "headers": [{"name": "x-limited-by", "value": "weft"}]}}}}],
        },
    });
    let client_policy = json!({"workload": "client"});
    let (server, _client) = start(&pair, server_policy, client_policy)?;
    for i in 0..3 {
        let r = get(&pair, &format!("/n/{i}"), &[])?;
        ensure!(r.status == 200, "request {i}: {} {}", r.status, r.text());
    }
    let r = get(&pair, "/n/4", &[])?;
    ensure!(r.status == 429, "{} {}", r.status, r.text());
    ensure!(
        r.header("x-limited-by") == Some("weft") && r.header("retry-after").is_some(),
        "{:?}",
        r.headers
    );
    server.wait_metric(
        "weft_http_local_responses_total",
        &[("flag", "rate_limited"), ("policy", "three-per-hour")],
        1.0,
    )?;
    drop(server);

    // Faults on the client side: every request aborted with 418.
    let pair = Pair::new(echo_bin!())?;
    let _app = pair.start_server_app(&marker)?;
    let server_policy = json!({"workload": "server", "inbound": {"permissions": [
        {"policy": "all", "from": [client_id], "action": "Allow"}]}});
    let client_policy = json!({"workload": "client", "outbound": {"default/server": {
        "fault": {"http": [{"abort": {"percentage": 100, "httpStatus": 418}}]}}}});
    let (server, _client) = start(&pair, server_policy, client_policy)?;
    let r = get(&pair, "/anything", &[])?;
    ensure!(
        r.status == 418 && r.header("x-weft-flag") == Some("fault_abort"),
        "{} {:?}",
        r.status,
        r.headers
    );
    ensure!(
        server.metric("weft_http_requests_total", &[("direction", "inbound")])? == 0.0,
        "an aborted request reached the server"
    );
    Ok(())
}

#[test]
fn http2_and_grpc_trailers_cross_both_agents() -> Result<()> {
    const H2_PORT: u16 = 8082;
    let h2_listener: std::net::SocketAddr = "127.0.0.1:9002".parse()?;
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("h2");
    let _app = weft_e2e::apps::start_h2(
        &pair.server,
        &echo_bin!(),
        pair.dir.path(),
        "server-h2",
        server(H2_PORT),
        &marker,
    )?;
    let client_id = spiffe_id("client");
    let mut s = pair.server_spec(&pair.identity("server")?);
    s.push("workload.ports", json!({"port": H2_PORT, "protocol": "http"}))
        .set(
            "policy",
            json!({"workload": "server", "inbound": {"permissions": [
                {"policy": "grpc-calls", "from": [client_id], "action": "Allow",
                 "http": [{"method": "POST", "path": {"type": "PathPrefix", "value": "/weft.Test"}}]}]}}),
        );
    let server_agent = pair.start_server_agent(&s, None)?;
    let mut c = pair.client_spec(&pair.identity("client")?);
    c.set(
        "outbound.listeners",
        json!([{"listen": h2_listener.to_string(), "target": server(H2_PORT).to_string(),
                "protocol": "http", "service": "default/server"}]),
    )
    .set("policy", json!({"workload": "client"}));
    let _client_agent = pair.start_client_agent(&c, None)?;

    let answer = pair
        .client
        .enter(|| weft_e2e::h2app::call(h2_listener, "/weft.Test/Call", "ping", T))?;
    ensure!(answer.status == 200, "{answer:?}");
    ensure!(
        answer.body == format!("{marker} /weft.Test/Call ping"),
        "{answer:?}"
    );
    let trailers = answer
        .trailers
        .ok_or_else(|| anyhow::anyhow!("no trailers came back"))?;
    ensure!(
        trailers.get("grpc-status").is_some_and(|v| v == "0"),
        "{trailers:?}"
    );
    ensure!(
        trailers
            .get("x-marker")
            .is_some_and(|v| v == marker.as_str()),
        "{trailers:?}"
    );
    // A gRPC error in a trailers-only answer shows in the RED metrics.
    let failed = pair
        .client
        .enter(|| weft_e2e::h2app::call(h2_listener, "/weft.Test/Unavailable", "ping", T))?;
    ensure!(failed.status == 200, "{failed:?}");
    server_agent.wait_metric(
        "weft_http_requests_total",
        &[("direction", "inbound"), ("grpc_status", "14")],
        1.0,
    )?;
    // Another method on the same port is not allowed.
    let denied = pair
        .client
        .enter(|| weft_e2e::h2app::call(h2_listener, "/other.Service/Call", "ping", T))?;
    ensure!(denied.status == 403, "{denied:?}");
    server_agent.wait_metric(
        "weft_http_requests_total",
        &[("direction", "inbound"), ("status", "200")],
        1.0,
    )?;
    Ok(())
}

/// A burst of concurrent requests leaves one pooled connection per request
/// in the caller's agent, and the next burst of the same size reuses them
/// all: no tunnel stream is opened twice for the same concurrency.
#[test]
fn a_burst_of_concurrent_requests_reuses_its_connections() -> Result<()> {
    // Above the 32 the pool once kept: the rest were closed and reopened.
    const BURST: usize = 48;
    let pair = Pair::new(echo_bin!())?;
    let _app = pair.start_server_app(&unique_marker("burst"))?;
    let client_id = spiffe_id("client");
    let server_policy = json!({"workload": "server", "inbound": {"permissions": [
        {"policy": "all", "from": [client_id], "action": "Allow"}]}});
    let (server, _client) = start(&pair, server_policy, json!({"workload": "client"}))?;
    let opened = || {
        server.metric(
            "weft_connections_opened_total",
            &[("direction", "inbound"), ("source_identity", &client_id)],
        )
    };
    // Each request waits 300 ms at the workload, so the burst's requests
    // are in flight together and each needs a connection of its own.
    let burst = || {
        pair.client.enter(|| {
            std::thread::scope(|s| {
                let calls: Vec<_> = (0..BURST)
                    .map(|i| {
                        s.spawn(move || {
                            let r = http::get(HTTP_LISTENER, "/delay/300", T)?;
                            ensure!(r.status == 200, "request {i}: {} {}", r.status, r.text());
                            Ok(())
                        })
                    })
                    .collect();
                calls
                    .into_iter()
                    .try_for_each(|c| c.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            })
        })
    };
    let start = opened()?;
    burst()?;
    let first = opened()? - start;
    burst()?;
    let second = opened()? - start - first;
    ensure!(
        first + second <= BURST as f64,
        "{BURST} concurrent requests twice opened {first} and then {second} more tunnel streams"
    );
    Ok(())
}
