//! Protocol detection on ports that declare no protocol, with agents in
//! static mode: HTTP/1.1 and HTTP/2 (prior knowledge) get L7 policy on both
//! sides, other client-first bytes and a server-first protocol are carried
//! intact as TCP, a port declared `tcp` is never parsed, and the hint a
//! caller's agent sends never buys more than the bytes would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use weft_e2e::agent::Agent;
use weft_e2e::client::{self, payload};
use weft_e2e::hbone::{self, Attempt, Exchange};
use weft_e2e::pki::{spiffe_id, TRUST_DOMAIN};
use weft_e2e::topology::{server, Pair, ECHO_PORT, HBONE_PORT, HTTP_PORT, SERVER_IP};
use weft_e2e::{echo_bin, http, unique_marker};

const T: Duration = Duration::from_secs(20);

/// HTTP/2 (gRPC-like) on the server, undeclared.
const H2_PORT: u16 = 8082;
/// A server-first protocol on the server, undeclared.
const GREET_PORT: u16 = 8083;
/// HTTP on the server on a port declared `tcp`.
const TCP_HTTP_PORT: u16 = 8084;
/// That second app's echo port (not served through the agent).
const SPARE_ECHO_PORT: u16 = 8085;

fn listener(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
/// Client listeners, none declaring a protocol.
const ECHO_VIA: u16 = 9000;
const HTTP_VIA: u16 = 9001;
const H2_VIA: u16 = 9002;
const GREET_VIA: u16 = 9003;
const TCP_HTTP_VIA: u16 = 9004;

fn path_prefix(p: &str) -> Value {
    json!({"path": {"type": "PathPrefix", "value": p}})
}

fn hint(value: &'static str) -> [(&'static str, &'static str); 1] {
    [("x-weft-protocol", value)]
}

fn detections(agent: &Agent, direction: &str, protocol: &str, reason: &str) -> Result<f64> {
    agent.wait_metric(
        "weft_protocol_detections_total",
        &[
            ("direction", direction),
            ("protocol", protocol),
            ("reason", reason),
        ],
        1.0,
    )
}

/// Connects to a server-first service, reads its greeting line within
/// `timeout` without sending anything, then checks one echo round trip.
fn greeted(addr: SocketAddr, timeout: Duration) -> Result<(String, Duration)> {
    let started = Instant::now();
    let mut conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n") {
        if conn.read(&mut byte).context("reading the greeting")? == 0 {
            bail!(
                "closed before the greeting ended: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        got.push(byte[0]);
    }
    let waited = started.elapsed();
    conn.write_all(b"ping\n")?;
    let mut echo = [0u8; 5];
    conn.read_exact(&mut echo).context("reading the echo")?;
    ensure!(&echo == b"ping\n", "{:?}", String::from_utf8_lossy(&echo));
    Ok((String::from_utf8_lossy(&got).into_owned(), waited))
}

#[test]
fn undeclared_ports_are_detected_on_both_sides() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("detect");
    let dir = pair.dir.path();
    let _app = pair.start_server_app(&marker)?;
    let _h2 = weft_e2e::apps::start_h2(
        &pair.server,
        &echo_bin!(),
        dir,
        "server-h2",
        server(H2_PORT),
        &marker,
    )?;
    let _greeter = weft_e2e::apps::start_greeter(
        &pair.server,
        &echo_bin!(),
        dir,
        "server-greeter",
        server(GREET_PORT),
        &marker,
    )?;
    let _tcp_app = weft_e2e::apps::start_app(
        &pair.server,
        &echo_bin!(),
        dir,
        "server-tcp-http",
        weft_e2e::apps::AppAddrs {
            echo: server(SPARE_ECHO_PORT),
            http: server(TCP_HTTP_PORT),
        },
        &marker,
    )?;

    let client_id = spiffe_id("client");
    // A raw HBONE peer (no agent, so no hint unless it sends one), allowed
    // at L4 like the client, and one that only HTTP rules allow.
    let raw = pair.identity("raw")?;
    let l7_only = pair.identity("l7-only")?;
    let l7_only_id = spiffe_id("l7-only");
    let mut s = pair.server_spec(&pair.identity("server")?);
    s.set(
        "workload.ports",
        json!([
            {"port": ECHO_PORT}, {"port": HTTP_PORT}, {"port": H2_PORT}, {"port": GREET_PORT},
            {"port": TCP_HTTP_PORT, "protocol": "tcp"},
        ]),
    )
    .set(
        "policy",
        json!({"workload": "server", "inbound": {"permissions": [
            {"policy": "callers", "from": [client_id, spiffe_id("raw")], "action": "Allow"},
            {"policy": "l7-only", "from": [l7_only_id], "action": "Allow", "http": [path_prefix("/public")]},
            {"policy": "no-secret", "from": [format!("spiffe://{TRUST_DOMAIN}/*")], "action": "Deny",
             "http": [path_prefix("/secret"), path_prefix("/secret.Service")]},
        ]}}),
    );
    let server_agent = pair.start_server_agent(&s, None)?;
    let mut c = pair.client_spec(&pair.identity("client")?);
    c.set(
        "outbound.listeners",
        json!([
            {"listen": listener(ECHO_VIA).to_string(), "target": server(ECHO_PORT).to_string()},
            {"listen": listener(HTTP_VIA).to_string(), "target": server(HTTP_PORT).to_string(), "service": "default/server"},
            {"listen": listener(H2_VIA).to_string(), "target": server(H2_PORT).to_string(), "service": "default/server-h2"},
            {"listen": listener(GREET_VIA).to_string(), "target": server(GREET_PORT).to_string()},
            {"listen": listener(TCP_HTTP_VIA).to_string(), "target": server(TCP_HTTP_PORT).to_string()},
        ]),
    )
    .set("policy", json!({"workload": "client"}));
    let client_agent = pair.start_client_agent(&c, None)?;

    // HTTP/1.1: the client's L7 proxy serves it (its metrics count it) and
    // the server's agent authorizes each request.
    let get = |port: u16, path: &str| {
        pair.client
            .enter(|| http::request_with(listener(port), "GET", path, &[], T))
    };
    let r = get(HTTP_VIA, "/public/hello")?;
    ensure!(r.status == 200, "{} {}", r.status, r.text());
    ensure!(
        r.text()
            .contains(&format!("header x-weft-peer-identity: {client_id}")),
        "the server's agent did not serve it at L7: {}",
        r.text()
    );
    let r = get(HTTP_VIA, "/secret/plans")?;
    ensure!(
        r.status == 403 && r.text().contains("denied by TrafficPermission no-secret"),
        "{} {}",
        r.status,
        r.text()
    );
    detections(&client_agent, "outbound", "http", "http1")?;
    client_agent.wait_metric(
        "weft_http_requests_total",
        &[("direction", "outbound"), ("destination", "default/server")],
        2.0,
    )?;
    // The client's agent said HTTP, so the server's did not wait for bytes.
    detections(&server_agent, "inbound", "http", "hint")?;

    // HTTP/2 with prior knowledge (gRPC without TLS), likewise.
    let h2 = |path: &str| {
        pair.client
            .enter(|| weft_e2e::h2app::call(listener(H2_VIA), path, "ping", T))
    };
    let answer = h2("/weft.Test/Call")?;
    ensure!(
        answer.status == 200 && answer.body == format!("{marker} /weft.Test/Call ping"),
        "{answer:?}"
    );
    let denied = h2("/secret.Service/Call")?;
    ensure!(denied.status == 403, "{denied:?}");
    detections(&client_agent, "outbound", "http", "http2")?;

    // Other client-first bytes: carried as TCP, every byte intact.
    let data = payload(&marker, 256 * 1024);
    pair.client
        .enter(|| client::echo_roundtrip(listener(ECHO_VIA), &data, T))?;
    detections(&client_agent, "outbound", "tcp", "not_http")?;
    detections(&server_agent, "inbound", "tcp", "hint")?;

    // Server-first: nothing comes from the client, so after the detection
    // timeout (100 ms) it is carried as TCP and the greeting arrives; the
    // hint spares the server's agent a second wait.
    let (greeting, waited) = pair.client.enter(|| greeted(listener(GREET_VIA), T))?;
    ensure!(
        greeting == format!("220 server-greeter ready marker={marker}\r\n"),
        "{greeting:?}"
    );
    ensure!(
        waited < Duration::from_secs(5),
        "the greeting took {waited:?}"
    );
    detections(&client_agent, "outbound", "tcp", "timeout")?;

    // A port declared tcp is never parsed, even when it carries HTTP and
    // the caller's agent detected HTTP: no L7 deny, no identity header.
    let r = get(TCP_HTTP_VIA, "/secret/plans")?;
    ensure!(r.status == 200, "{} {}", r.status, r.text());
    ensure!(
        !r.text().contains("x-weft-peer-identity"),
        "a port declared tcp was served at L7: {}",
        r.text()
    );

    // The server's agent detects by itself for a caller that sends no
    // hint (a raw HBONE peer here).
    let agent = SocketAddr::new(SERVER_IP.into(), HBONE_PORT);
    let authority = |port: u16| server(port).to_string();
    let raw_exchange = |identity, port: u16, x: Exchange<'_>| {
        pair.client
            .enter(|| hbone::exchange(identity, agent, &authority(port), x, T))
    };
    const GET_SECRET: &[u8] =
        b"GET /secret/x HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n";
    const GET_PUBLIC: &[u8] =
        b"GET /public/x HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n";
    let got = raw_exchange(
        &raw,
        HTTP_PORT,
        Exchange {
            send: GET_SECRET,
            ..Exchange::default()
        },
    )?;
    let Attempt::Connected(bytes) = got else {
        bail!("{got:?}")
    };
    let text = String::from_utf8_lossy(&bytes);
    ensure!(
        text.starts_with("HTTP/1.1 403") && text.contains("no-secret"),
        "{text}"
    );
    detections(&server_agent, "inbound", "http", "http1")?;

    let small = payload(&marker, 4096);
    let got = raw_exchange(
        &raw,
        ECHO_PORT,
        Exchange {
            send: &small,
            half_close: true,
            ..Exchange::default()
        },
    )?;
    let Attempt::Connected(bytes) = got else {
        bail!("{got:?}")
    };
    client::check_same(&small, &bytes)?;
    detections(&server_agent, "inbound", "tcp", "not_http")?;

    let got = raw_exchange(
        &raw,
        GREET_PORT,
        Exchange {
            until: b"\r\n",
            ..Exchange::default()
        },
    )?;
    ensure!(
        got == Attempt::Connected(format!("220 server-greeter ready marker={marker}\r\n").into()),
        "{got:?}"
    );
    detections(&server_agent, "inbound", "tcp", "timeout")?;

    // The hint never buys more than the bytes would. A caller only HTTP
    // rules allow may send HTTP (detected, each request authorized)...
    let got = raw_exchange(
        &l7_only,
        HTTP_PORT,
        Exchange {
            send: GET_PUBLIC,
            ..Exchange::default()
        },
    )?;
    ensure!(
        matches!(&got, Attempt::Connected(b) if b.starts_with(b"HTTP/1.1 200")),
        "{got:?}"
    );
    // ...but claiming tcp meets L4 authorization, which refuses it...
    let got = raw_exchange(
        &l7_only,
        HTTP_PORT,
        Exchange {
            headers: &hint("tcp"),
            send: GET_PUBLIC,
            ..Exchange::default()
        },
    )?;
    ensure!(got == Attempt::Status(403), "{got:?}");
    // ...and so do bytes detected as TCP, after the stream was answered.
    let got = raw_exchange(
        &l7_only,
        ECHO_PORT,
        Exchange {
            send: &small,
            half_close: true,
            ..Exchange::default()
        },
    )?;
    ensure!(matches!(got, Attempt::Reset(_)), "{got:?}");
    server_agent.wait_metric(
        "weft_denied_streams_total",
        &[("source_identity", &l7_only_id), ("reason", "not_allowed")],
        2.0,
    )?;
    // Claiming http for bytes that are not HTTP only fails to parse: they
    // never reach the workload.
    let got = raw_exchange(
        &raw,
        ECHO_PORT,
        Exchange {
            headers: &hint("http"),
            send: &small,
            half_close: true,
            ..Exchange::default()
        },
    )?;
    if let Attempt::Connected(bytes) = &got {
        let text = String::from_utf8_lossy(bytes);
        ensure!(
            !text.contains(&marker),
            "non-HTTP bytes reached the workload: {text}"
        );
    }
    Ok(())
}

/// Through a zone, DNS and transparent capture: the service's undeclared
/// ports reach the caller's agent as `detect` (PROTOCOL_DETECT), which
/// classifies captured connections to the virtual IP.
#[test]
fn captured_connections_to_undeclared_service_ports_are_detected() -> Result<()> {
    use weft_e2e::vmzone::{self, Running, VmZone};
    const VM_T: Duration = Duration::from_secs(30);
    let zone = VmZone::new(echo_bin!(), &["web", "payments"])?;
    let controller = zone.start_controller("zone", &zone.sqlite_store("zone.db"))?;
    let mut up = Running::with_controller(zone, controller, "24h")?;
    let (web, payments) = (0, 1);
    up.enrol(web)?;
    up.enrol_with(payments, None, |spec| {
        spec.set(
            "workload.ports",
            json!([{"port": vmzone::ECHO_PORT}, {"port": vmzone::HTTP_PORT}, {"port": GREET_PORT}]),
        );
    })?;
    up.wait_converged(&up.controller)?;
    let zone = &up.zone;
    let payments_ip = zone.vms[payments].ip;
    let _greeter = weft_e2e::apps::start_greeter(
        &zone.vms[payments].host,
        &zone.echo_bin(),
        zone.path(),
        "payments-greeter",
        SocketAddr::new(payments_ip.into(), GREET_PORT),
        &up.markers[payments],
    )?;
    let services = up.controller.inspect("services")?;
    let entry = services
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "payments"))
        .cloned()
        .unwrap_or_default();
    ensure!(
        entry["ports"]
            .as_array()
            .is_some_and(|p| p.len() == 3 && p.iter().all(|p| p["protocol"] == "detect")),
        "{services:#}"
    );
    let vip: std::net::IpAddr = vmzone::service_vip(&services, "payments")
        .ok_or_else(|| anyhow::anyhow!("no VIP: {services:#}"))?
        .parse()?;

    // The mesh's allow-all lets web in at L4; one deny on /secret can only
    // act on requests that payments' agent parses.
    up.controller.apply(
        &zone.path().join("no-secret.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata: { name: no-secret, mesh: default }
spec:
  targetRef: { kind: Service, name: payments }
  rules:
  - from: { kind: Mesh }
    default:
      action: Deny
      http: [ { path: { type: PathPrefix, value: /secret } } ]
",
    )?;
    let url = |path: &str| format!("http://payments.mesh:{}{path}", vmzone::HTTP_PORT);
    weft_e2e::wait::until("payments' agent to deny /secret", VM_T, || {
        let (status, body) = zone.curl_status(web, &url("/secret"))?;
        Ok((status == 403 && body.contains("no-secret")).then_some(()))
    })?;
    let (status, body) = zone.curl_status(web, &url("/hello"))?;
    ensure!(
        status == 200
            && body.contains(&up.markers[payments])
            && body.contains("header x-weft-peer-identity: spiffe://"),
        "{status} {body}"
    );
    detections(&up.agents[web], "outbound", "http", "http1")?;
    up.agents[web].wait_metric(
        "weft_http_requests_total",
        &[
            ("direction", "outbound"),
            ("destination", "default/payments"),
        ],
        1.0,
    )?;

    // Raw bytes to the virtual IP's undeclared echo port: TCP, intact.
    let data = payload("detect-zone", 64 * 1024);
    zone.vms[web]
        .host
        .enter(|| client::echo_roundtrip(SocketAddr::new(vip, vmzone::ECHO_PORT), &data, VM_T))?;
    detections(&up.agents[web], "outbound", "tcp", "not_http")?;
    detections(&up.agents[payments], "inbound", "tcp", "hint")?;

    // A server-first protocol answers through capture after the wait.
    let (greeting, waited) = zone.vms[web]
        .host
        .enter(|| greeted(SocketAddr::new(vip, GREET_PORT), VM_T))?;
    ensure!(
        greeting
            == format!(
                "220 payments-greeter ready marker={}\r\n",
                up.markers[payments]
            ),
        "{greeting:?}"
    );
    ensure!(
        waited < Duration::from_secs(5),
        "the greeting took {waited:?}"
    );
    detections(&up.agents[web], "outbound", "tcp", "timeout")?;
    Ok(())
}
