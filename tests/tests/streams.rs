//! What happens to one proxied connection end to end: a half-close crosses
//! the tunnel (the server sees EOF, the answer still comes back), and
//! backpressure holds: while the server application does not read, a client
//! writing as fast as it can is held back after a bounded amount (windows
//! and socket buffers, not the agents' memory), other connections on the
//! same tunnel keep flowing, and once the server reads, every byte arrives
//! intact.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use weft_e2e::agent::Agent;
use weft_e2e::client::{self, payload};
use weft_e2e::topology::{self, Pair, ECHO_LISTENER};
use weft_e2e::{apps, echo_bin, pattern, unique_marker};

const T: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// The server's checking sink (see `weft_e2e::servers::serve_sink`).
const SINK_PORT: u16 = 8082;
/// The client agent's listener that tunnels to the sink.
const SINK_LISTENER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9002);

/// The echo app and both agents with the default windows.
fn echo_pair() -> Result<(Pair, weft_e2e::process::Proc, Agent, Agent)> {
    let pair = Pair::new(echo_bin!())?;
    let app = pair.start_server_app(&unique_marker("streams"))?;
    let server = pair.start_server_agent(&pair.server_spec(&pair.identity("server")?), None)?;
    let client = pair.start_client_agent(&pair.client_spec(&pair.identity("client")?), None)?;
    Ok((pair, app, server, client))
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let conn =
        TcpStream::connect_timeout(&addr, T).with_context(|| format!("connecting to {addr}"))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(T))?;
    conn.set_write_timeout(Some(T))?;
    Ok(conn)
}

#[test]
fn half_close_reaches_the_server_and_the_answer_still_comes_back() -> Result<()> {
    let (pair, _app, _server, _client) = echo_pair()?;
    // 1 MiB fits in the 4 MiB stream window, so the client can write it all
    // before reading a byte; everything it then reads arrives after its FIN.
    let data = payload(&unique_marker("half-close"), MIB as usize);
    let got = pair.client.enter(|| {
        let mut conn = connect(ECHO_LISTENER)?;
        conn.write_all(&data).context("sending")?;
        conn.shutdown(Shutdown::Write).context("half-closing")?;
        let mut got = Vec::new();
        // The echo server closes only once it has read our FIN, so reading
        // to EOF proves the half-close crossed both agents.
        conn.read_to_end(&mut got).with_context(|| {
            format!("reading after the half-close ({} bytes so far)", got.len())
        })?;
        Ok(got)
    })?;
    client::check_same(&data, &got)
}

#[test]
fn half_close_without_data_gives_a_clean_eof() -> Result<()> {
    let (pair, _app, _server, client) = echo_pair()?;
    let got = pair.client.enter(|| {
        let mut conn = connect(ECHO_LISTENER)?;
        conn.shutdown(Shutdown::Write).context("half-closing")?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got)
            .context("an empty half-closed exchange must end in EOF, not a reset")?;
        Ok(got)
    })?;
    assert!(got.is_empty(), "got {} bytes from nowhere", got.len());
    // The stream really opened and closed (it was not refused early).
    client.wait_metric(
        "weft_connections_closed_total",
        &[("direction", "outbound")],
        1.0,
    )?;
    Ok(())
}

/// Writes pattern bytes from `*sent` as fast as the connection takes them,
/// until `max` bytes in all, a write blocks for the socket's write timeout,
/// or `deadline`; samples `rss` every MiB. Returns whether writes blocked.
fn write_until_blocked(
    conn: &mut TcpStream,
    sent: &mut u64,
    max: u64,
    deadline: Instant,
    mut rss: impl FnMut() -> Result<()>,
) -> Result<bool> {
    let mut chunk = vec![0u8; 256 * 1024];
    let mut next_sample = 0;
    while *sent < max && Instant::now() < deadline {
        let len = chunk.len().min((max - *sent) as usize);
        pattern::fill(*sent, &mut chunk[..len]);
        match conn.write(&chunk[..len]) {
            Ok(0) => bail!("the connection took no more bytes after {sent}"),
            Ok(n) => *sent += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("writing after {sent} bytes")),
        }
        if *sent >= next_sample {
            rss()?;
            next_sample = *sent + MIB;
        }
    }
    Ok(false)
}

/// Writes pattern bytes from `*sent` up to `end`, blocking as needed.
fn write_pattern(conn: &mut TcpStream, sent: &mut u64, end: u64) -> Result<()> {
    let mut chunk = vec![0u8; 256 * 1024];
    while *sent < end {
        let len = chunk.len().min((end - *sent) as usize);
        pattern::fill(*sent, &mut chunk[..len]);
        conn.write_all(&chunk[..len])
            .with_context(|| format!("writing after {sent} bytes"))?;
        *sent += len as u64;
    }
    Ok(())
}

#[test]
fn backpressure_bounds_a_fast_writer_while_the_server_stalls() -> Result<()> {
    const MAX_TOTAL: u64 = 256 * MIB;
    const MAX_BUFFERED: u64 = 64 * MIB;
    const MAX_RSS: u64 = 64 * MIB;
    const AFTER_RELEASE: u64 = 16 * MIB;

    let pair = Pair::new(echo_bin!())?;
    let _app = pair.start_server_app(&unique_marker("backpressure"))?;
    let release = pair.dir.join("sink-release");
    let _sink = apps::start_sink(
        &pair.server,
        &echo_bin!(),
        pair.dir.path(),
        "sink",
        topology::server(SINK_PORT),
        Some(&release),
    )?;
    let mut server_spec = pair.server_spec(&pair.identity("server")?);
    server_spec.push(
        "workload.ports",
        json!({"port": SINK_PORT, "protocol": "tcp"}),
    );
    let server = pair.start_server_agent(&server_spec, None)?;
    let mut client_spec = pair.client_spec(&pair.identity("client")?);
    client_spec.listener(SINK_LISTENER, topology::server(SINK_PORT));
    let client = pair.start_client_agent(&client_spec, None)?;

    let agents = [&client, &server];
    let idle_rss: Vec<u64> = agents
        .iter()
        .map(|a| a.proc.rss_bytes())
        .collect::<Result<_>>()?;
    let mut peak_rss = idle_rss.clone();
    let mut sample = || -> Result<()> {
        for (peak, agent) in peak_rss.iter_mut().zip(agents) {
            *peak = (*peak).max(agent.proc.rss_bytes()?);
        }
        Ok(())
    };

    let echo_data = payload(&unique_marker("beside-the-stall"), MIB as usize);
    let (sent, reply) = pair.client.enter(|| {
        let mut conn = connect(SINK_LISTENER)?;
        // "Blocked" means no byte taken for a whole second.
        conn.set_write_timeout(Some(Duration::from_secs(1)))?;
        let mut sent = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        let blocked = write_until_blocked(&mut conn, &mut sent, MAX_TOTAL, deadline, &mut sample)?;
        sample()?;
        ensure!(
            blocked,
            "the writer was never held back: {sent} bytes went in while the server read nothing"
        );
        ensure!(
            sent < MAX_BUFFERED,
            "{sent} bytes went in while the server read nothing (bound {MAX_BUFFERED})"
        );

        // The stalled stream holds its own window only: another connection
        // over the same tunnel still flows.
        client::echo_roundtrip(ECHO_LISTENER, &echo_data, T)
            .context("an echo beside the stalled stream")?;

        // Let the server read; the rest goes through and all of it arrives.
        std::fs::write(&release, b"go").context("releasing the sink")?;
        conn.set_write_timeout(Some(T))?;
        let stalled_at = sent;
        write_pattern(&mut conn, &mut sent, stalled_at + AFTER_RELEASE)?;
        conn.shutdown(Shutdown::Write).context("half-closing")?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)
            .context("reading the sink's verdict")?;
        eprintln!("backpressure: {stalled_at} bytes accepted while the server stalled");
        Ok((sent, reply))
    })?;
    assert_eq!(
        reply.trim(),
        format!("received {sent} bytes, first difference: none"),
        "the sink's verdict"
    );

    for ((agent, idle), peak) in agents.iter().zip(&idle_rss).zip(&peak_rss) {
        eprintln!(
            "backpressure: {} VmRSS {} KiB idle, {} KiB peak",
            agent.proc.name(),
            idle / 1024,
            peak / 1024
        );
        assert!(
            *peak < MAX_RSS,
            "{} reached VmRSS {} KiB while the server stalled (bound {} KiB)",
            agent.proc.name(),
            peak / 1024,
            MAX_RSS / 1024
        );
    }
    // One tunnel carried both the stalled stream and the echo beside it.
    assert_eq!(
        client.metric("weft_handshakes_total", &[("direction", "outbound")])?,
        1.0
    );
    // Bytes are counted by direction on both sides: "sent" from the caller
    // towards the workload (the sink's many MiB), "received" back (the
    // echo's 1 MiB and the verdict).
    for (agent, direction) in [(&client, "outbound"), (&server, "inbound")] {
        let labels = [("direction", direction)];
        let towards = agent.wait_metric("weft_bytes_sent_total", &labels, sent as f64)?;
        let back = agent.metric("weft_bytes_received_total", &labels)?;
        assert!(
            back < (sent as f64) / 2.0,
            "{direction}: {back} bytes counted from the workload back to the caller, {towards} towards it; {sent} were sent"
        );
    }
    Ok(())
}
