//! The zone's Prometheus metrics (`GET /metrics` on the HTTP API): how many
//! agents stream from this replica, how config pushes fare (whole or delta,
//! acked or refused, and how long an agent takes to ack one), enrolments,
//! the hub's view computations, and whether this replica leads. What an
//! operator watches to know the control plane keeps up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Whether a push carried the whole view or a delta on the agent's.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    pub delta: bool,
}

/// How an agent answered a push.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabels {
    /// `ack` or `nack`.
    pub answer: &'static str,
}

/// How an enrolment ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `enrolled` or `refused`.
    pub result: &'static str,
}

/// Every metric of one replica, shared by its tasks.
pub struct ZoneMetrics {
    registry: Registry,
    streams: Gauge,
    pushes: Family<PushLabels, Counter>,
    answers: Family<AnswerLabels, Counter>,
    ack_seconds: Histogram,
    enrolments: Family<ResultLabels, Counter>,
    refresh_seconds: Histogram,
    leader: Gauge,
    leading: Arc<AtomicBool>,
    feed_pruned: Counter,
}

impl ZoneMetrics {
    /// The metrics of a replica whose leadership `leading` tells.
    pub fn new(leading: Arc<AtomicBool>) -> Self {
        let mut registry = Registry::with_prefix("weft_zone");
        let m = ZoneMetrics {
            streams: Gauge::default(),
            pushes: Family::default(),
            answers: Family::default(),
            // 1 ms to about 16 s.
            ack_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            enrolments: Family::default(),
            refresh_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            leader: Gauge::default(),
            leading,
            feed_pruned: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "config_streams",
            "Agent config streams open on this replica",
            m.streams.clone(),
        );
        registry.register(
            "config_pushes",
            "Config versions pushed to agents, whole or as deltas",
            m.pushes.clone(),
        );
        registry.register(
            "config_answers",
            "Agents' answers to pushes: acked (applied) or nacked (refused, last good kept)",
            m.answers.clone(),
        );
        registry.register(
            "config_ack_seconds",
            "From a push to the agent's ack of it",
            m.ack_seconds.clone(),
        );
        registry.register(
            "enrolments",
            "Agent enrolments, by result",
            m.enrolments.clone(),
        );
        registry.register(
            "view_refresh_seconds",
            "Time to recompute one mesh's agent views after a change",
            m.refresh_seconds.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica leads (derives services, allocates virtual IPs)",
            m.leader.clone(),
        );
        registry.register(
            "feed_pruned_entries",
            "Change feed entries the leader deleted (older than feed_retention, beyond the newest kept)",
            m.feed_pruned.clone(),
        );
        ZoneMetrics { registry, ..m }
    }

    /// A stream opened; it counts until the guard drops.
    pub fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        self.streams.inc();
        StreamGuard(self.clone())
    }

    /// A push went out.
    pub fn pushed(&self, delta: bool) {
        self.pushes.get_or_create(&PushLabels { delta }).inc();
    }

    /// The agent answered the last push, `after` it went out.
    pub fn answered(&self, acked: bool, after: Option<Duration>) {
        let answer = if acked { "ack" } else { "nack" };
        self.answers.get_or_create(&AnswerLabels { answer }).inc();
        if let (true, Some(after)) = (acked, after) {
            self.ack_seconds.observe(after.as_secs_f64());
        }
    }

    /// An enrolment ended.
    pub fn enrolment(&self, enrolled: bool) {
        let result = if enrolled { "enrolled" } else { "refused" };
        self.enrolments
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// One mesh's views were recomputed in `took`.
    pub fn refreshed(&self, took: Duration) {
        self.refresh_seconds.observe(took.as_secs_f64());
    }

    /// The leader deleted `rows` entries of the change feed.
    pub fn feed_pruned(&self, rows: u64) {
        self.feed_pruned.inc_by(rows);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        self.leader
            .set(i64::from(self.leading.load(Ordering::Relaxed)));
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Counts an open stream until dropped.
pub struct StreamGuard(Arc<ZoneMetrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric() {
        let leading = Arc::new(AtomicBool::new(true));
        let metrics = Arc::new(ZoneMetrics::new(leading));
        let guard = metrics.stream_opened();
        metrics.pushed(true);
        metrics.answered(true, Some(Duration::from_millis(3)));
        metrics.answered(false, None);
        metrics.enrolment(false);
        metrics.refreshed(Duration::from_millis(1));
        metrics.feed_pruned(7);
        let text = metrics.encode();
        for line in [
            "weft_zone_config_streams 1",
            "weft_zone_config_pushes_total{delta=\"true\"} 1",
            "weft_zone_config_answers_total{answer=\"ack\"} 1",
            "weft_zone_config_answers_total{answer=\"nack\"} 1",
            "weft_zone_config_ack_seconds_count 1",
            "weft_zone_enrolments_total{result=\"refused\"} 1",
            "weft_zone_view_refresh_seconds_count 1",
            "weft_zone_leader 1",
            "weft_zone_feed_pruned_entries_total 7",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        drop(guard);
        assert!(metrics.encode().contains("weft_zone_config_streams 0"));
    }
}
