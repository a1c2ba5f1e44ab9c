//! Graceful shutdown: one signal tells every listener to stop accepting and
//! every tunnel to send GOAWAY, and in-flight work is counted so the agent
//! exits as soon as it is done, or at the drain deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// The shared drain state; cheap to clone.
#[derive(Clone)]
pub struct Drain {
    signal: watch::Sender<bool>,
    inner: Arc<Inner>,
}

struct Inner {
    active: AtomicUsize,
    idle: Notify,
}

/// Held by each in-flight connection; the drain waits for all to drop.
pub struct Tracked(Arc<Inner>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain that has not begun, with nothing in flight.
    pub fn new() -> Self {
        Drain {
            signal: watch::channel(false).0,
            inner: Arc::new(Inner {
                active: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// Counts one piece of in-flight work until the guard drops.
    pub fn track(&self) -> Tracked {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        Tracked(self.inner.clone())
    }

    /// In-flight work right now.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once draining begins.
    pub async fn signaled(&self) {
        let mut rx = self.signal.subscribe();
        // An error means the sender is gone, which cannot happen while
        // `self` holds it; either way, treat it as the signal.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Signals the drain without waiting: listeners stop accepting.
    pub fn begin(&self) {
        self.signal.send_replace(true);
    }

    /// Starts draining and waits for in-flight work, at most `deadline`.
    /// Returns how much work was still running when it gave up.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.begin();
        let wait = async {
            loop {
                let idle = self.inner.idle.notified();
                if self.active() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.active()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_tracked_work() {
        let drain = Drain::new();
        let guard = drain.track();
        let d = drain.clone();
        let waiter = tokio::spawn(async move { d.drain(Duration::from_secs(5)).await });
        drain.signaled().await;
        drop(guard);
        assert_eq!(waiter.await.unwrap(), 0);
    }

    #[tokio::test]
    async fn gives_up_at_deadline() {
        let drain = Drain::new();
        let _guard = drain.track();
        assert_eq!(drain.drain(Duration::from_millis(20)).await, 1);
    }
}
