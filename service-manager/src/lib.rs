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
