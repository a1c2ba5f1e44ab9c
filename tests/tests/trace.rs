//! The Trace policy between two agents (static policies, the form the zone
//! pushes): W3C Trace Context through both L7 proxies, a client span on the
//! caller's agent and a server span on the destination's, exported over
//! OTLP/HTTP to a fake collector; an application's own trace continued;
//! sampling 0 still propagates but exports nothing.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use weft_e2e::agent::Agent;
use weft_e2e::otlp::{attribute, Collector};
use weft_e2e::pki::spiffe_id;
use weft_e2e::topology::{server, Pair, HTTP_LISTENER, HTTP_PORT, SERVER_IP};
use weft_e2e::{echo_bin, http, unique_marker, wait};

const T: Duration = Duration::from_secs(20);

fn start(pair: &Pair, trace: &Value) -> Result<(Agent, Agent)> {
    let mut s = pair.server_spec(&pair.identity("server")?);
    s.set(
        "policy",
        json!({
            "workload": "server",
            "inbound": {"permissions": [
                {"policy": "client", "from": [spiffe_id("client")], "action": "Allow"},
            ]},
            "trace": trace,
        }),
    );
    let server_agent = pair.start_server_agent(&s, None)?;
    let mut c = pair.client_spec(&pair.identity("client")?);
    c.set(
        "outbound.listeners",
        json!([{"listen": HTTP_LISTENER.to_string(), "target": server(HTTP_PORT).to_string(),
                "protocol": "http", "service": "default/server"}]),
    )
    .set("policy", json!({"workload": "client", "trace": trace}));
    let client_agent = pair.start_client_agent(&c, None)?;
    Ok((server_agent, client_agent))
}

/// The `traceparent` the application received, from the echo of its
/// request headers in the body: (trace id, span id, flags).
fn app_traceparent(body: &str) -> Result<(String, String, String)> {
    let value = body
        .lines()
        .find_map(|l| l.strip_prefix("header traceparent: "))
        .with_context(|| format!("the app got no traceparent: {body}"))?;
    let parts: Vec<&str> = value.trim().split('-').collect();
    ensure!(parts.len() == 4 && parts[0] == "00", "{value}");
    Ok((parts[1].into(), parts[2].into(), parts[3].into()))
}

/// Waits for the client and server spans of `trace_id`.
fn spans_of(collector: &Collector, trace_id: &str) -> Result<(Value, Value)> {
    wait::until("a client and a server span", T, || {
        let spans: Vec<Value> = collector
            .spans()
            .into_iter()
            .filter(|s| s["traceId"] == trace_id)
            .collect();
        let client = spans.iter().find(|s| s["kind"] == 3).cloned();
        let server = spans.iter().find(|s| s["kind"] == 2).cloned();
        Ok(client.zip(server))
    })
}

#[test]
fn trace_context_spans_and_sampling() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("trace");
    let _app = pair.start_server_app(&marker)?;
    let collector = Collector::start(&pair.server, SocketAddr::new(IpAddr::V4(SERVER_IP), 4318))?;
    let backend = json!({"type": "Otlp", "endpoint": collector.endpoint()});
    let (server_agent, client_agent) = start(&pair, &json!({"sampling": 100, "backend": backend}))?;
    let get = |path: &str, headers: &[(&str, &str)]| {
        pair.client
            .enter(|| http::request_with(HTTP_LISTENER, "GET", path, headers, T))
    };

    // A request without trace context: the client's agent starts a
    // sampled trace; the app gets the server span's context.
    let r = wait::until("a request through both agents", T, || {
        let r = get("/traced/a?secret=1", &[])?;
        Ok((r.status == 200).then_some(r))
    })?;
    ensure!(r.text().contains(&marker), "{}", r.text());
    let (trace_id, app_parent, flags) = app_traceparent(&r.text())?;
    ensure!(flags == "01", "sampled at 100%: {flags}");
    let (client_span, server_span) = spans_of(&collector, &trace_id)?;
    ensure!(
        client_span.get("parentSpanId").is_none(),
        "a new trace's client span is a root: {client_span}"
    );
    ensure!(
        server_span["parentSpanId"] == client_span["spanId"],
        "server span's parent is the client span: {server_span} {client_span}"
    );
    ensure!(
        server_span["spanId"] == app_parent.as_str(),
        "the app's parent is the server span: {server_span} vs {app_parent}"
    );
    ensure!(client_span["service"] == "client" && server_span["service"] == "server");
    ensure!(
        client_span["name"] == "GET /traced/a",
        "{}",
        client_span["name"]
    );
    for span in [&client_span, &server_span] {
        ensure!(attribute(span, "http.request.method").as_deref() == Some("GET"));
        ensure!(attribute(span, "http.response.status_code").as_deref() == Some("200"));
        ensure!(
            attribute(span, "url.path").as_deref() == Some("/traced/a"),
            "{span}"
        );
    }
    ensure!(
        attribute(&client_span, "weft.destination.service").as_deref() == Some("default/server")
    );
    ensure!(
        attribute(&server_span, "weft.source") == Some(spiffe_id("client")),
        "{server_span}"
    );

    // The application's own trace is continued: same trace id, the client
    // span a child of the app's span, tracestate forwarded.
    let incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming_span = "00f067aa0ba902b7";
    let r = get(
        "/traced/b",
        &[
            (
                "traceparent",
                &format!("00-{incoming_trace}-{incoming_span}-01"),
            ),
            ("tracestate", "vendor=x"),
        ],
    )?;
    ensure!(r.status == 200, "{} {}", r.status, r.text());
    let (trace_id, _, _) = app_traceparent(&r.text())?;
    ensure!(trace_id == incoming_trace, "{trace_id}");
    ensure!(
        r.text().contains("header tracestate: vendor=x"),
        "{}",
        r.text()
    );
    let (client_span, _) = spans_of(&collector, incoming_trace)?;
    ensure!(
        client_span["parentSpanId"] == incoming_span,
        "{client_span}"
    );
    client_agent.wait_metric("weft_trace_spans_exported_total", &[], 2.0)?;
    server_agent.wait_metric("weft_trace_spans_exported_total", &[], 2.0)?;
    drop((client_agent, server_agent));

    // Sampling 0: new traces are propagated, not sampled, not exported.
    let before = collector.spans().len();
    let (server_agent, client_agent) = start(&pair, &json!({"sampling": 0, "backend": backend}))?;
    let r = wait::until("a request through the new agents", T, || {
        let r = get("/unsampled", &[])?;
        Ok((r.status == 200).then_some(r))
    })?;
    let (_, _, flags) = app_traceparent(&r.text())?;
    ensure!(flags == "00", "not sampled: {flags}");
    // Batches leave within a second: wait past that.
    std::thread::sleep(Duration::from_millis(2500));
    ensure!(
        collector.spans().len() == before,
        "spans exported at sampling 0: {:?}",
        &collector.spans()[before..]
    );
    ensure!(client_agent.metric("weft_trace_spans_exported_total", &[])? == 0.0);
    ensure!(server_agent.metric("weft_trace_spans_exported_total", &[])? == 0.0);
    Ok(())
}
