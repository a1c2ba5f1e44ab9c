//! Client traffic for the scenarios: echo round trips (optionally paced),
//! and probes that tell whether a connection can carry data at all.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// `len` bytes made of numbered lines that each contain `marker`.
pub fn payload(marker: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("{marker} line {i:010}\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// How to send a payload: all at once, or in chunks with a pause between.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Bytes per write.
    pub chunk: usize,
    /// Pause after each write.
    pub pause: Duration,
}

impl Pace {
    /// As fast as the connection takes it.
    pub const FULL: Pace = Pace {
        chunk: 64 * 1024,
        pause: Duration::ZERO,
    };
}

/// Connects to an echo service at `addr`, sends `data` (then half-closes)
/// while reading what comes back until EOF, and returns what came back.
/// `progress` counts the bytes received so far, for watchers.
pub fn echo_exchange(
    addr: SocketAddr,
    data: &[u8],
    pace: Pace,
    progress: &AtomicUsize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = stream;
    std::thread::scope(|s| {
        let sender = s.spawn(move || -> Result<()> {
            for chunk in data.chunks(pace.chunk.max(1)) {
                writer.write_all(chunk).context("sending")?;
                if !pace.pause.is_zero() {
                    std::thread::sleep(pace.pause);
                }
            }
            writer.shutdown(Shutdown::Write).context("half-closing")?;
            Ok(())
        });
        let mut got = Vec::with_capacity(data.len());
        let mut buf = vec![0u8; 64 * 1024];
        let read_result = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    progress.store(got.len(), Ordering::Relaxed);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let sent = sender
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        read_result
            .with_context(|| format!("reading the echo from {addr} after {} bytes", got.len()))?;
        sent.with_context(|| format!("writing to {addr}"))?;
        Ok(got)
    })
}

/// Sends `data` to the echo service at `addr` and checks it all came back.
pub fn echo_roundtrip(addr: SocketAddr, data: &[u8], timeout: Duration) -> Result<()> {
    let got = echo_exchange(addr, data, Pace::FULL, &AtomicUsize::new(0), timeout)?;
    check_same(data, &got)
}

/// An error describing where `got` departs from `want`, if it does.
pub fn check_same(want: &[u8], got: &[u8]) -> Result<()> {
    if want == got {
        return Ok(());
    }
    let first_diff = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    bail!(
        "echo differs: sent {} bytes, got {} back, first difference at byte {first_diff}",
        want.len(),
        got.len()
    )
}

/// What happened to a probe connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The connection was refused, reset or closed without carrying data.
    Refused(String),
    /// Bytes came back: the connection works.
    Answered(Vec<u8>),
}

/// Connects, sends `ping`, and reads for up to `timeout`: tells whether a
/// connection to `addr` carries data.
pub fn probe(addr: SocketAddr, ping: &[u8], timeout: Duration) -> Result<Probe> {
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return Ok(Probe::Refused(format!("connect: {e}"))),
    };
    stream.set_read_timeout(Some(timeout))?;
    if let Err(e) = stream.write_all(ping) {
        return Ok(Probe::Refused(format!("write: {e}")));
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) if got.is_empty() => Ok(Probe::Refused("closed without an answer".into())),
        Ok(_) => Ok(Probe::Answered(got)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            if got.is_empty() {
                bail!("no answer and no close from {addr} within {timeout:?}");
            }
            Ok(Probe::Answered(got))
        }
        Err(e) if got.is_empty() => Ok(Probe::Refused(format!("read: {e}"))),
        Err(_) => Ok(Probe::Answered(got)),
    }
}

/// Sends `data` on an open connection to an echo service and reads the
/// same number of bytes back, without closing anything.
pub fn echo_on(stream: &mut TcpStream, data: &[u8]) -> Result<()> {
    stream.write_all(data).context("sending")?;
    let mut got = vec![0u8; data.len()];
    stream
        .read_exact(&mut got)
        .context("reading the echo back")?;
    check_same(data, &got)
}

/// Opens `n` connections to the echo service at `addr` at the same moment,
/// does one round trip of a distinct line on each, and returns them all
/// still open, so that the caller holds `n` live connections.
pub fn open_echo_connections(
    addr: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    let start = std::sync::Barrier::new(n);
    let start = &start;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || -> Result<TcpStream> {
                    // Every thread gets here (nothing before can fail), so this is bounded.
                    start.wait();
                    let mut stream = TcpStream::connect_timeout(&addr, timeout)
                        .with_context(|| format!("connecting to {addr}"))?;
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    echo_on(&mut stream, format!("connection {i} of {n}\n").as_bytes())?;
                    Ok(stream)
                })
            })
            .collect();
        workers
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                w.join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
                    .with_context(|| format!("connection {i} of {n} to {addr}"))
            })
            .collect()
    })
}

/// Asks the echo server behind `addr` which one it is (see
/// [`crate::servers::WHO`]): its marker.
pub fn who(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.write_all(crate::servers::WHO)?;
    conn.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    answer
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("marker="))
        .map(str::to_owned)
        .with_context(|| format!("no marker in the echo's answer {answer:?}"))
}
