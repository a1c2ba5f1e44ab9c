//! Starting the application servers (the `weft-echo` binary of this
//! package) inside a host, and waiting until they accept connections.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::netns::Netns;
use crate::process::Proc;
use crate::wait;

/// Where an application server listens.
#[derive(Debug, Clone, Copy)]
pub struct AppAddrs {
    /// TCP echo.
    pub echo: SocketAddr,
    /// HTTP/1.1.
    pub http: SocketAddr,
}

/// Runs `weft-echo serve` in `ns` (as root) with both servers, and returns
/// once both accept connections.
pub fn start_app(
    ns: &Netns,
    echo_bin: &Path,
    log_dir: &Path,
    name: &str,
    addrs: AppAddrs,
    marker: &str,
) -> Result<Proc> {
    let mut cmd = ns.command(echo_bin);
    cmd.arg("serve")
        .args(["--echo", &addrs.echo.to_string()])
        .args(["--http", &addrs.http.to_string()])
        .args(["--name", name, "--marker", marker]);
    spawn_listening(ns, name, cmd, log_dir, &[addrs.echo, addrs.http])
}

/// Starts `cmd` and waits until it accepts connections on every address
/// of `addrs` (killed, with its logs in the error, if it does not).
fn spawn_listening(
    ns: &Netns,
    name: &str,
    cmd: std::process::Command,
    log_dir: &Path,
    addrs: &[SocketAddr],
) -> Result<Proc> {
    let mut proc = Proc::spawn(name, cmd, log_dir)?;
    for addr in addrs {
        if let Err(e) = wait::port_open(ns, *addr, Duration::from_secs(10)) {
            proc.kill();
            anyhow::bail!("{name} did not start: {e:#}\n{}", proc.logs());
        }
    }
    Ok(proc)
}

/// Runs `weft-echo serve --sink addr` in `ns` (as root), leaving each
/// connection unread until `stall_until` exists when given (see
/// [`crate::servers::serve_sink`]), and returns once it accepts connections.
pub fn start_sink(
    ns: &Netns,
    echo_bin: &Path,
    log_dir: &Path,
    name: &str,
    addr: SocketAddr,
    stall_until: Option<&Path>,
) -> Result<Proc> {
    let mut cmd = ns.command(echo_bin);
    cmd.arg("serve").args(["--sink", &addr.to_string()]);
    if let Some(path) = stall_until {
        cmd.arg("--stall-until-file").arg(path);
    }
    spawn_listening(ns, name, cmd, log_dir, &[addr])
}

/// Runs `weft-echo serve --h2 addr` in `ns` (as root): an HTTP/2 server
/// answering like gRPC (see [`crate::h2app`]); returns once it accepts
/// connections.
pub fn start_h2(
    ns: &Netns,
    echo_bin: &Path,
    log_dir: &Path,
    name: &str,
    addr: SocketAddr,
    marker: &str,
) -> Result<Proc> {
    let mut cmd = ns.command(echo_bin);
    cmd.arg("serve")
        .args(["--h2", &addr.to_string()])
        .args(["--marker", marker]);
    spawn_listening(ns, name, cmd, log_dir, &[addr])
}

/// Runs `weft-echo serve --greet addr` in `ns` (as root): a server-first
/// protocol whose greeting is `220 <name> ready marker=<marker>\r\n`, then
/// echo; returns once it accepts connections.
pub fn start_greeter(
    ns: &Netns,
    echo_bin: &Path,
    log_dir: &Path,
    name: &str,
    addr: SocketAddr,
    marker: &str,
) -> Result<Proc> {
    let mut cmd = ns.command(echo_bin);
    cmd.arg("serve")
        .args(["--greet", &addr.to_string()])
        .args(["--name", name, "--marker", marker]);
    spawn_listening(ns, name, cmd, log_dir, &[addr])
}
