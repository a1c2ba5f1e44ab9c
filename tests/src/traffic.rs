//! Steady traffic that runs beside an operation (a CA rotation, a
//! certificate renewal, a controller failure) to prove that it breaks
//! nothing: one long-lived connection exchanging a line every 100 ms, and
//! new connections at a steady pace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::client;

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
