//! What systemd shows of the agent: READY=1 once it serves (the moment
//! `/ready` turns 200), then a status line a person reads in `systemctl
//! status`, kept current, and STOPPING=1 when the drain begins.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::AdminState;
use crate::handoff::Predecessor;

/// How often the status line is recomputed (sent only when it changed).
const EVERY: Duration = Duration::from_secs(5);
/// How long a process taking over waits for its config stream before it
/// takes over all the same.
const STREAM_WAIT: Duration = Duration::from_secs(10);

/// The status line: the mode and whom the agent serves, the zone link and
/// view version, and the connections in flight.
pub fn line(state: &AdminState) -> String {
    let serving = match (&state.node, &state.credentials) {
        (Some(node), _) => format!("node agent for {} workload(s)", node.list().len()),
        (None, Some(credentials)) => format!("sidecar for {}", credentials.id()),
        (None, None) => "agent".to_owned(),
    };
    let zone = match &state.controller {
        Some(c) => {
            let s = c.status();
            let link = if s.connected {
                "zone connected"
            } else {
                "zone unreachable, serving the last good view"
            };
            format!(
                "{link}, view {}",
                if s.applied_version.is_empty() {
                    "none yet"
                } else {
                    &s.applied_version
                }
            )
        }
        None => "static config".to_owned(),
    };
    let in_flight = state.drain.active() + state.node.as_ref().map_or(0, |n| n.in_flight());
    format!("{serving}; {zone}; {in_flight} connection(s) in flight")
}

/// Sends READY=1 once the agent is ready, then keeps the status line
/// current until the drain begins. A process that took over from another
/// ([`crate::handoff`]) first tells it that it serves, once its config
/// stream is up too, so the zone hears from the new process before the
/// old one says goodbye.
pub async fn report(state: Arc<AdminState>, predecessor: Option<Predecessor>) {
    while !state.ready.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(predecessor) = predecessor {
        if let Some(controller) = &state.controller {
            let connected = tokio::time::timeout(STREAM_WAIT, async {
                while !controller.status().connected {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            if connected.is_err() {
                tracing::warn!(waited = ?STREAM_WAIT, "taking over without a config stream (the zone is unreachable)");
            }
        }
        predecessor.serving().await;
    }
    let mut last = line(&state);
    weft_service_manager::ready(&last);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = state.drain.signaled() => return,
        }
        let now = line(&state);
        if now != last {
            weft_service_manager::status(&now);
            last = now;
        }
    }
}
