//! Waiting on conditions with a deadline, instead of sleeping and hoping.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::netns::Netns;

/// An error that ends a wait at once instead of meaning "not yet".
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// An error for a probe to return when waiting longer cannot help.
pub fn fatal(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Fatal(message.into()))
}

/// Polls `probe` until it returns `Some`, or fails after `timeout` with the
/// last thing the probe reported. `Err` from the probe means "not yet",
/// except a [`fatal`] one, which ends the wait.
pub fn until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    let mut last: String;
    loop {
        match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => last = String::from("condition not met"),
            Err(e) if e.is::<Fatal>() => bail!("gave up waiting for {what}: {e:#}"),
            Err(e) => last = format!("{e:#}"),
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(pause.min(timeout - elapsed));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Waits until something accepts TCP connections on `addr` inside `ns`.
pub fn port_open(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<()> {
    ns.enter(|| {
        until(
            &format!("{addr} to accept connections in {}", ns.name()),
            timeout,
            || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
                Ok(Some(()))
            },
        )
    })
}

/// Waits until `GET /ready` on `addr` (inside `ns`) answers 200; fails
/// early, with its logs, if `proc` exits first.
pub fn ready(
    ns: &Netns,
    proc: &mut crate::process::Proc,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<()> {
    let ready = ns.enter(|| {
        until(&format!("{} to be ready", proc.name()), timeout, || {
            if let Some(status) = proc.try_exit()? {
                return Err(fatal(format!("exited ({status}) before becoming ready")));
            }
            let resp = crate::http::get(addr, "/ready", Duration::from_secs(2))?;
            Ok((resp.status == 200).then_some(()))
        })
    });
    ready.map_err(|e| anyhow::anyhow!("{e:#}\n{}", proc.logs()))
}
