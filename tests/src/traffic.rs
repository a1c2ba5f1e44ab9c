//! Steady traffic that runs beside an operation (a CA rotation, a
//! certificate renewal, a controller failure) to prove that it breaks
//! nothing: one long-lived connection exchanging a line every 100 ms, and
//! new connections at a steady pace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};

use crate::netns::Netns;
use crate::{client, wait};

/// Exchanges one line per 100 ms on one connection to the echo service at
/// `addr`, checking each echo, until `stop(round trips so far)` says so;
/// returns how many round trips it made. `timeout` bounds the connect and
/// each read.
pub fn long_lived(addr: SocketAddr, timeout: Duration, stop: impl Fn(u64) -> bool) -> Result<u64> {
    let mut conn = TcpStream::connect_timeout(&addr, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut n = 0u64;
    while !stop(n) {
        let line = format!("long-lived round trip {n}\n");
        conn.write_all(line.as_bytes())
            .with_context(|| format!("write {n}"))?;
        let mut back = vec![0u8; line.len()];
        conn.read_exact(&mut back)
            .with_context(|| format!("read {n}"))?;
        ensure!(back == line.as_bytes(), "round trip {n} came back changed");
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(n)
}

/// A new connection to an echo service at a steady pace, each carrying an
/// intact echo of `len` bytes marked with `marker`.
#[derive(Debug, Clone)]
pub struct NewConnections {
    /// The echo service.
    pub addr: SocketAddr,
    /// Bounds each connection's connect and reads.
    pub timeout: Duration,
    /// Marks each payload (with the connection's number appended).
    pub marker: String,
    /// Bytes per echo.
    pub len: usize,
    /// The pause after each connection.
    pub every: Duration,
}

impl NewConnections {
    /// Opens connections until `stop(connections so far)` says so; counts
    /// them in `done` as it goes (for a caller that waits on progress) and
    /// returns how many it made.
    pub fn run(&self, done: &AtomicU64, stop: impl Fn(u64) -> bool) -> Result<u64> {
        let mut n = 0u64;
        while !stop(n) {
            let data = client::payload(&format!("{}-{n}", self.marker), self.len);
            client::echo_roundtrip(self.addr, &data, self.timeout)
                .with_context(|| format!("connection {n}"))?;
            n += 1;
            done.store(n, Ordering::Release);
            std::thread::sleep(self.every);
        }
        Ok(n)
    }
}

/// Both loops at once in a host, beside an operation that must break
/// neither: a long-lived connection and new connections to the same echo
/// service, stopped together by [`Beside::finish`].
pub struct Beside {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    timeout: Duration,
    steady: JoinHandle<Result<u64>>,
    fresh: JoinHandle<Result<u64>>,
}

impl Beside {
    /// Starts both loops in `host` against `connections.addr`. Each also
    /// stops at its bound (`round_trips` and `connections_at_most`), so
    /// that a test that fails before [`Beside::finish`] leaves no loop
    /// behind.
    pub fn start(
        host: &Netns,
        connections: NewConnections,
        round_trips: u64,
        connections_at_most: u64,
    ) -> Result<Beside> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (addr, timeout) = (connections.addr, connections.timeout);
        let steady = {
            let stop = stop.clone();
            host.spawn(move || {
                long_lived(addr, timeout, |n| {
                    n >= round_trips || stop.load(Ordering::Acquire)
                })
            })?
        };
        let fresh = {
            let (stop, done) = (stop.clone(), done.clone());
            host.spawn(move || {
                connections.run(&done, |n| {
                    n >= connections_at_most || stop.load(Ordering::Acquire)
                })
            })?
        };
        Ok(Beside {
            stop,
            done,
            timeout,
            steady,
            fresh,
        })
    }

    /// Waits for `more` new connections (made after what `after` names),
    /// stops both loops, and fails if either broke during `operation` or
    /// did too little to prove anything (100 round trips, 50 connections).
    pub fn finish(self, more: u64, after: &str, operation: &str) -> Result<()> {
        let from = self.done.load(Ordering::Acquire);
        let waited = wait::until(
            &format!("{more} more connections after {after}"),
            self.timeout,
            || Ok((self.done.load(Ordering::Acquire) >= from + more).then_some(())),
        );
        self.stop.store(true, Ordering::Release);
        let round_trips = self
            .steady
            .join()
            .map_err(|_| anyhow!("long-lived thread panicked"))?
            .with_context(|| format!("the long-lived connection broke during {operation}"))?;
        let connections = self
            .fresh
            .join()
            .map_err(|_| anyhow!("new-connection thread panicked"))?
            .with_context(|| format!("a new connection failed during {operation}"))?;
        waited?;
        ensure!(
            round_trips > 100 && connections > 50,
            "{round_trips} round trips, {connections} connections"
        );
        Ok(())
    }
}
