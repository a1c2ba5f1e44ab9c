//! Connection limits: with `tunnel.max_outbound_connections: 2` on the
//! client agent, a third connection while two are held is refused without
//! data (and opens no stream), and once one of the two closes a new one is
//! served; with `tunnel.max_inbound_connections: 1` on the server agent, a
//! second peer connection is turned away while the first is up.

use std::time::Duration;

use anyhow::{anyhow, Result};
use weft_e2e::client::{self, echo_on, open_echo_connections, Probe};
use weft_e2e::hbone::{self, Attempt};
use weft_e2e::topology::{self, Pair, ECHO_LISTENER, ECHO_PORT, HBONE_PORT, SERVER_IP};
use weft_e2e::{echo_bin, unique_marker, wait};

const T: Duration = Duration::from_secs(15);
const OPENED: &str = "weft_connections_opened_total";
const OUT: &[(&str, &str)] = &[("direction", "outbound")];

#[test]
fn outbound_connections_past_the_limit_are_refused_until_one_closes() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let _app = pair.start_server_app(&unique_marker("limits"))?;
    let _server = pair.start_server_agent(&pair.server_spec(&pair.identity("server")?), None)?;
    let mut spec = pair.client_spec(&pair.identity("client")?);
    spec.set("tunnel.max_outbound_connections", 2);
    let client = pair.start_client_agent(&spec, None)?;

    let mut held = pair
        .client
        .enter(|| open_echo_connections(ECHO_LISTENER, 2, T))?;
    client.wait_metric(OPENED, OUT, 2.0)?;

    let ping = unique_marker("third");
    let third = pair
        .client
        .enter(|| client::probe(ECHO_LISTENER, ping.as_bytes(), T))?;
    eprintln!("third outbound connection: {third:?}");
    assert!(
        matches!(third, Probe::Refused(_)),
        "a third connection past max_outbound_connections = 2 was served: {third:?}"
    );
    assert_eq!(
        client.metric(OPENED, OUT)?,
        2.0,
        "the refused connection opened a tunnel stream"
    );
    // The two held connections are untouched.
    pair.client.enter(|| {
        held.iter_mut()
            .try_for_each(|s| echo_on(s, b"still served\n"))
    })?;

    // Closing one frees its slot (once the agent has finished with it).
    held.truncate(1);
    let answered = wait::until("a new connection to be served", T, || {
        match pair
            .client
            .enter(|| client::probe(ECHO_LISTENER, ping.as_bytes(), T))?
        {
            Probe::Answered(got) => Ok(Some(got)),
            Probe::Refused(_) => Ok(None),
        }
    })
    .map_err(|e| anyhow!("{e:#}\n{}", client.proc.logs()))?;
    assert_eq!(answered, ping.as_bytes());
    Ok(())
}

#[test]
fn inbound_connections_past_the_limit_are_turned_away() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let _app = pair.start_server_app(&unique_marker("limits"))?;
    let mut spec = pair.server_spec(&pair.identity("server")?);
    spec.set("tunnel.max_inbound_connections", 1);
    let server = pair.start_server_agent(&spec, None)?;
    let mut client_spec = pair.client_spec(&pair.identity("client")?);
    client_spec.set("tunnel.idle_timeout", "1s");
    let client = pair.start_client_agent(&client_spec, None)?;

    // The client agent's pooled tunnel takes the one inbound slot.
    let held = pair
        .client
        .enter(|| open_echo_connections(ECHO_LISTENER, 1, T))?;
    server.wait_metric("weft_tunnel_connections", &[("direction", "inbound")], 1.0)?;

    let good = pair.identity("client")?;
    let data = unique_marker("second-peer").into_bytes();
    let authority = format!("{SERVER_IP}:{ECHO_PORT}");
    let attempt = || {
        pair.client
            .enter(|| hbone::attempt(&good, topology::server(HBONE_PORT), &authority, &data, T))
    };
    let second = attempt()?;
    eprintln!("second inbound connection: {second:?}");
    assert!(
        matches!(second, Attempt::Refused(_)),
        "a second inbound connection past max_inbound_connections = 1 was served: {second:?}"
    );

    // Once the pooled tunnel is gone (idle after its stream ends), the slot
    // is free again.
    drop(held);
    client.wait_metric_until("weft_tunnel_connections", OUT, "== 0", T, |v| v == 0.0)?;
    let served = wait::until("a new peer connection to be served", T, || {
        Ok(match attempt()? {
            Attempt::Connected(got) => Some(got),
            _ => None,
        })
    })
    .map_err(|e| anyhow!("{e:#}\n{}", server.proc.logs()))?;
    assert_eq!(served, data);
    Ok(())
}
