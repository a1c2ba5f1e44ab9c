//! TCP and HTTP traffic flows client host -> agent -> agent -> server host,
//! through explicit listeners and through transparent capture.

use std::time::Duration;

use anyhow::Result;
use weft_e2e::agent::{self, AGENT_UID};
use weft_e2e::client::{self, payload};
use weft_e2e::pki::spiffe_id;
use weft_e2e::topology::{self, Pair, ECHO_LISTENER, ECHO_PORT, HTTP_LISTENER, HTTP_PORT};
use weft_e2e::{echo_bin, http, unique_marker};

const T: Duration = Duration::from_secs(20);

fn tunnel_labels<'a>(
    direction: &'a str,
    client: &'a str,
    server: &'a str,
) -> [(&'a str, &'a str); 3] {
    [
        ("direction", direction),
        ("source_identity", client),
        ("destination_identity", server),
    ]
}

#[test]
fn explicit_listeners_carry_tcp_and_http() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("explicit");
    let _app = pair.start_server_app(&marker)?;
    let server = pair.start_server_agent(&pair.server_spec(&pair.identity("server")?), None)?;
    let client = pair.start_client_agent(&pair.client_spec(&pair.identity("client")?), None)?;

    let data = payload(&marker, 1 << 20);
    pair.client
        .enter(|| client::echo_roundtrip(ECHO_LISTENER, &data, T))?;
    let resp = pair
        .client
        .enter(|| http::get(HTTP_LISTENER, "/through-the-tunnel", T))?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        resp.text().contains(&marker) && resp.text().contains("/through-the-tunnel"),
        "{}",
        resp.text()
    );

    // Several connections at once share the tunnel; each echo stays intact.
    pair.client.enter(|| {
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|i| {
                    let data = payload(&format!("{marker}-{i}"), 100_000 + i * 7919);
                    s.spawn(move || client::echo_roundtrip(ECHO_LISTENER, &data, T))
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("echo thread panicked"))
        })
    })?;

    let (c, s) = (spiffe_id("client"), spiffe_id("server"));
    client.wait_metric("weft_handshakes_total", &[("direction", "outbound")], 1.0)?;
    server.wait_metric("weft_handshakes_total", &[("direction", "inbound")], 1.0)?;
    let mut opened = tunnel_labels("inbound", &c, &s).to_vec();
    opened.push(("tls", "mtls"));
    server.wait_metric("weft_connections_opened_total", &opened, 10.0)?;
    client.wait_metric(
        "weft_connections_opened_total",
        &tunnel_labels("outbound", &c, &s),
        10.0,
    )?;
    // The echo is symmetric, so either reading of "sent" covers the 1 MiB.
    for (agent, dir) in [(&client, "outbound"), (&server, "inbound")] {
        agent.wait_metric(
            "weft_bytes_sent_total",
            &tunnel_labels(dir, &c, &s),
            data.len() as f64,
        )?;
        agent.wait_metric(
            "weft_bytes_received_total",
            &tunnel_labels(dir, &c, &s),
            data.len() as f64,
        )?;
    }
    Ok(())
}

#[test]
fn transparent_capture_carries_tcp_and_http() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("capture");
    let _app = pair.start_server_app(&marker)?;
    let server = pair.start_server_agent(&pair.server_spec(&pair.identity("server")?), None)?;

    let mut spec = pair.client_spec(&pair.identity("client")?);
    spec.set("outbound.listeners", serde_json::json!([]))
        .set("redirect.inbound", false);
    agent::install_redirect(&pair.client, &spec, &pair.dir.join("client-agent.yaml"))?;
    let client = pair.start_client_agent(&spec, Some(AGENT_UID))?;

    // The application (root) dials the server's workload address directly.
    let data = payload(&marker, 1 << 20);
    pair.client
        .enter(|| client::echo_roundtrip(topology::server(ECHO_PORT), &data, T))?;
    let resp = pair
        .client
        .enter(|| http::get(topology::server(HTTP_PORT), "/captured", T))?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        resp.text().contains(&marker) && resp.text().contains("/captured"),
        "{}",
        resp.text()
    );

    // Both connections went through the tunnel, not around it.
    let (c, s) = (spiffe_id("client"), spiffe_id("server"));
    let mut opened = tunnel_labels("inbound", &c, &s).to_vec();
    opened.push(("tls", "mtls"));
    server.wait_metric("weft_connections_opened_total", &opened, 2.0)?;
    client.wait_metric(
        "weft_connections_opened_total",
        &tunnel_labels("outbound", &c, &s),
        2.0,
    )?;
    client.wait_metric(
        "weft_bytes_sent_total",
        &tunnel_labels("outbound", &c, &s),
        data.len() as f64,
    )?;
    Ok(())
}
