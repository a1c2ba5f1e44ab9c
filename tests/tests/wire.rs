//! What crosses the veth between the hosts is TLS only: a known plaintext
//! marker carried through the tunnel never appears on the wire, while the
//! same capture does see a control marker sent in plaintext around it.

use std::time::Duration;

use anyhow::Result;
use weft_e2e::capture::Capture;
use weft_e2e::client::{self, payload};
use weft_e2e::topology::{self, Pair, ECHO_LISTENER, ECHO_PORT, HBONE_PORT, HTTP_LISTENER};
use weft_e2e::{echo_bin, http, unique_marker};

const T: Duration = Duration::from_secs(20);

#[test]
fn only_tls_crosses_between_hosts() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let secret = unique_marker("secret");
    let control = unique_marker("control");
    let _app = pair.start_server_app(&secret)?;
    // Capture from before the agents exist, so every tunnel is seen from its SYN.
    let cap = Capture::start(&pair.server, &pair.server_if)?;
    let _server = pair.start_server_agent(&pair.server_spec(&pair.identity("server")?), None)?;
    let _client = pair.start_client_agent(&pair.client_spec(&pair.identity("client")?), None)?;

    // Control: plaintext straight to the app, around the agents.
    pair.client
        .enter(|| client::echo_roundtrip(topology::server(ECHO_PORT), control.as_bytes(), T))?;
    // Through the tunnel: 2 MiB of lines carrying the secret, and an HTTP
    // exchange whose request path and answer carry it.
    let data = payload(&secret, 2 << 20);
    pair.client
        .enter(|| client::echo_roundtrip(ECHO_LISTENER, &data, T))?;
    let resp = pair
        .client
        .enter(|| http::get(HTTP_LISTENER, &format!("/{secret}"), T))?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.text().contains(&secret), "{}", resp.text());
    let seen = cap.finish()?;

    assert_eq!(
        seen.dropped, 0,
        "the capture dropped frames, so it cannot vouch for what crossed"
    );
    assert!(
        seen.contains(control.as_bytes()),
        "the capture missed the plaintext control marker"
    );
    assert!(
        !seen.contains(secret.as_bytes()),
        "the secret marker crossed the wire in plaintext"
    );
    let tls = seen.tls_on_port(HBONE_PORT);
    assert!(
        tls.malformed.is_empty(),
        "non-TLS bytes on port {HBONE_PORT}: {:?}",
        tls.malformed
    );
    assert!(
        tls.records.get(&22).copied().unwrap_or(0) >= 2,
        "no TLS handshake seen: {tls:?}"
    );
    // The echo went both ways through the tunnel: at least 4 MiB of application data.
    assert!(
        tls.app_data_bytes >= 2 * data.len(),
        "too little TLS application data: {tls:?}"
    );
    // Every payload-carrying flow is the tunnel, or the control connection.
    let streams = seen.streams();
    let plaintext_flows: Vec<_> = streams
        .keys()
        .filter(|(a, b)| a.port() != HBONE_PORT && b.port() != HBONE_PORT)
        .filter(|k| !streams[k].data.is_empty())
        .collect();
    assert!(
        plaintext_flows
            .iter()
            .all(|(a, b)| a.port() == ECHO_PORT || b.port() == ECHO_PORT),
        "non-tunnel flows: {plaintext_flows:?}"
    );
    assert!(
        plaintext_flows
            .iter()
            .map(|k| streams[k].data.len())
            .sum::<usize>()
            <= 2 * control.len(),
        "more plaintext crossed than the control exchange"
    );
    Ok(())
}
