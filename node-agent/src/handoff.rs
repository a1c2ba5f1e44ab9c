//! Restarts and upgrades without downtime. On SIGUSR2 (`systemctl reload`)
//! the agent starts the binary on disk again (after a package upgrade, the
//! new one) and hands it its listening sockets. The new process serves from
//! the same sockets, so no connection is refused; once it is ready, systemd
//! is told it is the main process, and the old one drains: its established
//! connections run to their end (up to `drain_timeout`) instead of being
//! cut by a stop.
//!
//! The sockets pass by inheritance: each is placed at a known descriptor
//! in the new process, named by its config field in `WEFT_HANDOFF_FDS`
//! (`inbound.listen=3,admin.listen=4,...`). A socket pair
//! (`WEFT_HANDOFF_CHANNEL`) carries the two steps of the handshake: the new
//! process says `ready` once it serves, the old one answers `main` once
//! systemd has been told.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{info, warn};

/// The sockets handed over, by config field.
pub const FDS_ENV: &str = "WEFT_HANDOFF_FDS";
/// The handshake's end in the new process.
pub const CHANNEL_ENV: &str = "WEFT_HANDOFF_CHANNEL";
/// The key of a UDP socket that shares its field with a TCP one (the DNS
/// proxy listens on both).
pub const UDP_SUFFIX: &str = "#udp";

/// How long the new process may take to serve before the handoff is given
/// up (it is then killed and the old process carries on).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The first descriptor the sockets are placed at in the new process.
const FIRST_FD: RawFd = 3;

/// Sockets inherited from the previous process, not yet taken by a bind.
static INHERITED: Mutex<Option<HashMap<String, OwnedFd>>> = Mutex::new(None);

/// Why a handoff did not happen; the old process carries on serving.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("cannot prepare the sockets for the new process: {0}")]
    Sockets(std::io::Error),
    #[error("cannot start the new agent process {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the new agent process (pid {pid}) did not become ready: {reason}")]
    NotReady { pid: u32, reason: String },
}

/// The process that handed its sockets to this one, waiting to hear that
/// this one serves.
pub struct Predecessor(UnixStream);

/// Reads what the previous process handed over (call it first thing in
/// `main`, before any other descriptor is opened, and once): the sockets
/// are kept for [`take_tcp`] and [`take_udp`], and the variables removed so
/// that they reach no child of this process.
pub fn adopt_from_env() -> Option<Predecessor> {
    let fds = std::env::var(FDS_ENV).ok();
    let channel = std::env::var(CHANNEL_ENV).ok();
    // SAFETY: called before the runtime starts, while the process has one
    // thread: nothing reads the environment concurrently.
    unsafe {
        std::env::remove_var(FDS_ENV);
        std::env::remove_var(CHANNEL_ENV);
    }
    let mut inherited = HashMap::new();
    // From systemd's descriptor store, after a `systemctl restart`.
    // SAFETY: still one thread (see above).
    for (fd, name) in unsafe { weft_service_manager::take_listen_fds() } {
        if let Some(fd) = owned(fd) {
            inherited.insert(name, fd);
        }
    }
    // From the previous process, after a handoff (same names; these win).
    for entry in fds.iter().flat_map(|f| f.split(',')) {
        let Some((field, fd)) = entry.split_once('=') else {
            continue;
        };
        if let Some(fd) = fd.parse().ok().and_then(owned) {
            inherited.insert(field.to_owned(), fd);
        }
    }
    *INHERITED.lock().unwrap_or_else(|p| p.into_inner()) = Some(inherited);
    let channel = channel?.parse().ok().and_then(owned)?;
    Some(Predecessor(UnixStream::from(channel)))
}

/// Takes ownership of an inherited descriptor, if it is open, and makes it
/// close-on-exec like every other descriptor of the agent's (it must not
/// leak into `nft` or a later successor other than by placement).
fn owned(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_SETFD only changes the descriptor's close-on-exec flag,
    // and fails on a descriptor that is not open.
    if fd < FIRST_FD || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open, was placed here by the previous
    // process for this one, and nothing else in this process owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn take(key: &str) -> Option<OwnedFd> {
    INHERITED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()?
        .remove(key)
}

/// The inherited TCP listener for `field`, if one was handed over and is
/// bound to `addr` (a changed address gets a fresh socket).
pub fn take_tcp(field: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
    let listener = std::net::TcpListener::from(take(field)?);
    match listener.local_addr() {
        Ok(bound) if bound == addr => Some(listener),
        bound => {
            warn!(field, %addr, ?bound, "an inherited socket is not bound to the configured address; binding anew");
            None
        }
    }
}

/// The inherited UDP socket for `field`, as [`take_tcp`].
pub fn take_udp(field: &str, addr: SocketAddr) -> Option<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::from(take(&format!("{field}{UDP_SUFFIX}"))?);
    match socket.local_addr() {
        Ok(bound) if bound == addr => Some(socket),
        _ => None,
    }
}

/// Closes the inherited sockets no listener took (their fields left the
/// config), so that their ports are freed once the old process exits.
pub fn release_unused() {
    let left = INHERITED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default();
    for field in left.keys() {
        info!(field, "an inherited socket is no longer configured; closed");
    }
}

impl Predecessor {
    /// Tells the previous process this one serves, and waits until it has
    /// made this one systemd's main process (its answer `main`), so that
    /// READY=1 and the status line that follow are accepted. Without an
    /// answer (the previous process died), this one carries on.
    pub async fn serving(self) {
        let stream = match self
            .0
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(self.0))
        {
            Ok(stream) => stream,
            Err(e) => {
                warn!(error = %e, "handoff channel unusable");
                return;
            }
        };
        let (read, mut write) = stream.into_split();
        if let Err(e) = write.write_all(b"ready\n").await {
            warn!(error = %e, "the previous agent process is gone; serving on");
            return;
        }
        let mut line = String::new();
        let answer =
            tokio::time::timeout(READY_TIMEOUT, BufReader::new(read).read_line(&mut line)).await;
        match answer {
            Ok(Ok(_)) if line.trim() == "main" => {
                info!("handoff complete: this process is the agent now")
            }
            _ => warn!(
                answer = line.trim(),
                "no answer from the previous agent process; serving on"
            ),
        }
    }
}

/// Puts `sockets` in systemd's descriptor store (see
/// [`weft_service_manager::store_fds`]), so that a restart keeps them.
pub fn keep_across_restarts(sockets: &[Socket]) {
    let borrowed: Vec<(&str, std::os::fd::BorrowedFd<'_>)> = sockets
        .iter()
        // SAFETY: the sockets are open for the life of the agent's
        // listeners, which outlive this call.
        .map(|(name, fd)| {
            (name.as_str(), unsafe {
                std::os::fd::BorrowedFd::borrow_raw(*fd)
            })
        })
        .collect();
    weft_service_manager::store_fds(&borrowed);
}

/// A socket to hand over: its config field (with [`UDP_SUFFIX`] for UDP)
/// and its descriptor in this process.
pub type Socket = (String, RawFd);

/// Starts the binary on disk with `sockets`, waits until it serves, and
/// makes it systemd's main process. Returns its pid; on error it is killed
/// and nothing has changed for this process.
pub async fn hand_over(sockets: &[Socket]) -> Result<u32, HandoffError> {
    let (ours, theirs) = UnixStream::pair().map_err(HandoffError::Sockets)?;
    // Copies above every descriptor the new process gets, so that placing
    // one at its number never overwrites another still to be placed. They
    // are close-on-exec: only the placed copies cross.
    let mut copies = Vec::with_capacity(sockets.len() + 1);
    for fd in sockets
        .iter()
        .map(|(_, fd)| *fd)
        .chain([theirs.as_raw_fd()])
    {
        copies.push(high_copy(fd).map_err(HandoffError::Sockets)?);
    }
    let channel_fd = FIRST_FD + sockets.len() as RawFd;
    let fds = sockets
        .iter()
        .enumerate()
        .map(|(i, (field, _))| format!("{field}={}", FIRST_FD + i as RawFd))
        .collect::<Vec<_>>()
        .join(",");
    let path = current_binary();
    let mut command = std::process::Command::new(&path);
    command
        .args(std::env::args_os().skip(1))
        .env(FDS_ENV, fds)
        .env(CHANNEL_ENV, channel_fd.to_string())
        // The watchdog is the new process's once it is the main one.
        .env_remove("WATCHDOG_PID");
    let raw: Vec<RawFd> = copies.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: between fork and exec only dup2 runs, which is
    // async-signal-safe, on descriptors that stay open until after spawn.
    unsafe {
        command.pre_exec(move || {
            for (i, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, FIRST_FD + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| HandoffError::Spawn {
        path: path.clone(),
        source,
    })?;
    drop(copies);
    drop(theirs);
    let pid = child.id();
    info!(pid, path = %path.display(), sockets = sockets.len(), "new agent process started; waiting until it serves");
    match handshake(ours, pid).await {
        // Not waited for: it outlives this process, and systemd (or
        // whoever reaps orphans) reaps it.
        Ok(()) => Ok(pid),
        Err(reason) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(HandoffError::NotReady { pid, reason })
        }
    }
}

/// Waits for the new process's `ready`, makes it systemd's main process,
/// then answers `main`.
async fn handshake(ours: UnixStream, pid: u32) -> Result<(), String> {
    ours.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stream = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    match tokio::time::timeout(READY_TIMEOUT, BufReader::new(read).read_line(&mut line)).await {
        Err(_) => return Err(format!("no word within {READY_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(0)) => return Err("it exited (see its log lines above)".to_owned()),
        Ok(Ok(_)) if line.trim() != "ready" => return Err(format!("it said {line:?}")),
        Ok(Ok(_)) => {}
    }
    weft_service_manager::hand_over(
        pid,
        &format!("handed over to pid {pid} (a new agent process); draining"),
    );
    write
        .write_all(b"main\n")
        .await
        .map_err(|e| format!("it stopped listening after ready: {e}"))
}

/// A close-on-exec copy of `fd` at a descriptor number above any the new
/// process gets.
fn high_copy(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor, owned below.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 1024) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `copy` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// The binary to start: the one at the path this process was started from.
/// After an upgrade replaced it, `/proc/self/exe` reads `<path> (deleted)`,
/// and the path now holds the new build, which is the point.
fn current_binary() -> PathBuf {
    match std::fs::read_link("/proc/self/exe") {
        Ok(path) => {
            let text = path.to_string_lossy();
            match text.strip_suffix(" (deleted)") {
                Some(original) => PathBuf::from(original),
                None => path,
            }
        }
        Err(_) => std::env::args_os()
            .next()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("weft-agent")),
    }
}
