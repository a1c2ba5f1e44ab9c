//! Weft's daemons and their service manager. Under systemd with
//! `Type=notify` a unit is started only once the daemon says READY=1, shows
//! the daemon's STATUS= line in `systemctl status`, and, with
//! `WatchdogSec=`, restarts it when its pings stop. Outside systemd
//! (`NOTIFY_SOCKET` unset) every call here does nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, info, warn};

/// Set once another process is the service's main one: systemd ignores
/// (and logs) anything this one would still say.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState<'_>]) {
    if HANDED_OVER.load(Ordering::Acquire) {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the service manager");
    }
}

/// The daemon serves: systemd finishes starting the unit. Send it only
/// once every listener is bound and the daemon can answer.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A line a person reads in `systemctl status`: what the daemon is doing.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The daemon is draining before it exits.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Another process of the daemon takes over (a restart without downtime):
/// systemd follows `pid` as the main process from now on, and this one
/// says nothing more, watchdog pings included.
pub fn hand_over(pid: u32, status: &str) {
    send(&[NotifyState::MainPid(pid), NotifyState::Status(status)]);
    HANDED_OVER.store(true, Ordering::Release);
}

/// Keeps the daemon's listening sockets in systemd's file descriptor store
/// (the unit's `FileDescriptorStoreMax=`), each under its name: across a
/// `systemctl restart` the sockets stay open, so connections arriving
/// while the daemon is down wait in their backlog instead of being
/// refused, and the next process gets them back ([`take_listen_fds`]).
/// Without a store systemd refuses them and logs it; nothing else changes.
pub fn store_fds(fds: &[(&str, std::os::fd::BorrowedFd<'_>)]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    for (name, fd) in fds {
        send_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], *fd);
    }
}

fn send_fds(states: &[NotifyState<'_>], fd: std::os::fd::BorrowedFd<'_>) {
    if HANDED_OVER.load(Ordering::Acquire) {
        return;
    }
    if let Err(e) = sd_notify::notify_with_fds(states, &[fd]) {
        warn!(error = %e, "cannot store a socket with the service manager");
    }
}

/// The sockets systemd passed at start (`LISTEN_FDS`, from the descriptor
/// store or socket activation), with their names; the variables are
/// removed so no child inherits them.
///
/// # Safety
/// Changes the environment: call it while the process has one thread.
pub unsafe fn take_listen_fds() -> Vec<(std::os::fd::RawFd, String)> {
    // SAFETY: the caller guarantees a single thread.
    match unsafe { sd_notify::listen_fds_with_names_and_unset_env() } {
        Ok(fds) => fds.collect(),
        Err(_) => Vec::new(),
    }
}

/// Starts the watchdog pings when the unit asks for them (`WatchdogSec=`):
/// WATCHDOG=1 at a third of the interval, from a task on the calling
/// runtime. The task runs on the same event loop as the traffic, so a loop
/// that stalls stops pinging, and systemd restarts the daemon. Returns the
/// interval, if any.
pub fn spawn_watchdog() -> Option<Duration> {
    let interval = sd_notify::watchdog_enabled()?;
    let every = (interval / 3).max(Duration::from_millis(10));
    info!(interval = ?interval, every = ?every, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if HANDED_OVER.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                debug!(error = %e, "watchdog ping failed");
            }
        }
    });
    Some(interval)
}
