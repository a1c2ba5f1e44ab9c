//! Prometheus metrics of the data path. Counters for a peer are looked up
//! once per tunnel connection and then bumped with plain atomics, so the
//! per-byte path never touches the label maps.

use std::fmt::{self, Write};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::tls::HandshakeFailure;

/// Which side of the agent a connection came in on.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        })
    }
}

/// How a connection reached the workload.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Transport {
    /// In an mTLS tunnel.
    Mtls,
    /// In the clear: permissive inbound or outbound passthrough.
    Plaintext,
}

impl EncodeLabelValue for Transport {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(match self {
            Transport::Mtls => "mtls",
            Transport::Plaintext => "plaintext",
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    direction: Direction,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    direction: Direction,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeniedLabels {
    source_identity: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    direction: Direction,
    source_identity: String,
    destination_identity: String,
    tls: Transport,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetectionLabels {
    direction: Direction,
    protocol: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// A label value shared rather than copied: the per-request metrics build
/// their label sets from these without allocating.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Label(pub std::sync::Arc<str>);

impl Label {
    /// The empty value (no route, no policy).
    pub fn empty() -> Label {
        static EMPTY: std::sync::LazyLock<Label> =
            std::sync::LazyLock::new(|| Label(std::sync::Arc::from("")));
        EMPTY.clone()
    }

    /// The value as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Label(std::sync::Arc::from(s))
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    direction: Direction,
    source_identity: Label,
    destination: Label,
    route: Label,
    status: u16,
    grpc_status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpDurationLabels {
    direction: Direction,
    destination: Label,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLocalLabels {
    direction: Direction,
    flag: &'static str,
    policy: String,
}

/// The `grpc-status` of response headers, as a label value (empty when
/// absent or not a gRPC status code).
pub fn grpc_status(headers: &http::HeaderMap) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .and_then(|code| CODES.get(code).copied())
        .unwrap_or("")
}

/// One HTTP request as the RED metrics count it.
pub struct HttpRequest<'a> {
    /// Calls in or out.
    pub direction: Direction,
    /// The caller's identity.
    pub source: &'a Label,
    /// The service (outbound) or local workload (inbound).
    pub destination: &'a Label,
    /// The HTTPRoute that took it, or empty.
    pub route: &'a Label,
    /// The response status; 0 when no response came.
    pub status: u16,
    /// The gRPC status when the response headers carry one (a
    /// trailers-only answer: how gRPC servers return most errors), else
    /// empty. A status sent in trailers after a body is not seen here.
    pub grpc_status: &'static str,
    /// Start to response headers, in seconds.
    pub seconds: f64,
}

/// Every metric the agent exports, registered once at start.
pub struct Metrics {
    registry: Registry,
    handshakes: Family<DirectionLabels, Counter>,
    handshake_failures: Family<FailureLabels, Counter>,
    denied_streams: Family<DeniedLabels, Counter>,
    connections_refused: Family<RefusedLabels, Counter>,
    connections_opened: Family<PeerLabels, Counter>,
    connections_closed: Family<PeerLabels, Counter>,
    bytes_sent: Family<PeerLabels, Counter>,
    bytes_received: Family<PeerLabels, Counter>,
    open_streams: Family<DirectionLabels, Gauge>,
    tunnel_connections: Family<DirectionLabels, Gauge>,
    plaintext_connections: Family<ResultLabels, Counter>,
    identity_reloads: Family<ResultLabels, Counter>,
    certificate_expiry: Gauge,
    config_updates: Family<ResultLabels, Counter>,
    controller_connected: Gauge,
    certificate_renewals: Family<ResultLabels, Counter>,
    node_workloads: Gauge,
    node_enrolments: Family<ResultLabels, Counter>,
    dns_queries: Family<ResultLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<HttpDurationLabels, Histogram>,
    http_local: Family<HttpLocalLabels, Counter>,
    protocol_detections: Family<DetectionLabels, Counter>,
}

/// The counters of one (direction, source, destination, transport), cloned
/// out of the families so that a connection updates them without lookups.
#[derive(Clone, Debug)]
pub struct PeerCounters {
    pub opened: Counter,
    pub closed: Counter,
    /// Bytes from the source towards the destination.
    pub sent: Counter,
    /// Bytes from the destination back to the source.
    pub received: Counter,
    pub open_streams: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers all metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft");
        let m = Metrics {
            handshakes: Family::default(),
            handshake_failures: Family::default(),
            denied_streams: Family::default(),
            connections_refused: Family::default(),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            open_streams: Family::default(),
            tunnel_connections: Family::default(),
            plaintext_connections: Family::default(),
            identity_reloads: Family::default(),
            certificate_expiry: Gauge::default(),
            config_updates: Family::default(),
            controller_connected: Gauge::default(),
            certificate_renewals: Family::default(),
            node_workloads: Gauge::default(),
            node_enrolments: Family::default(),
            dns_queries: Family::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(|| {
                // 0.5 ms to about 16 s: mesh-local calls are sub-millisecond.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.0005, 2.0, 16,
                ))
            }),
            http_local: Family::default(),
            protocol_detections: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "handshakes",
            "Completed TLS handshakes",
            m.handshakes.clone(),
        );
        registry.register(
            "handshake_failures",
            "Failed TLS handshakes, by reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "denied_streams",
            "Tunnel streams refused by authorization or destination checks",
            m.denied_streams.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections turned away before any stream: at a connection limit, or not speaking HTTP/2 after TLS",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_opened",
            "Proxied connections opened",
            m.connections_opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Proxied connections closed",
            m.connections_closed.clone(),
        );
        registry.register(
            "bytes_sent",
            "Bytes proxied from source to destination",
            m.bytes_sent.clone(),
        );
        registry.register(
            "bytes_received",
            "Bytes proxied from destination back to source",
            m.bytes_received.clone(),
        );
        registry.register(
            "open_streams",
            "Proxied connections open now",
            m.open_streams.clone(),
        );
        registry.register(
            "tunnel_connections",
            "HBONE (TLS + HTTP/2) connections open now",
            m.tunnel_connections.clone(),
        );
        registry.register(
            "plaintext_connections",
            "Plaintext inbound connections, accepted (permissive) or refused (strict)",
            m.plaintext_connections.clone(),
        );
        registry.register(
            "identity_reloads",
            "Reloads of the identity files (SIGHUP), by result",
            m.identity_reloads.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the workload certificate in force expires (Unix time)",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "config_updates",
            "Config updates from the zone, by result: ack (applied) or nack (refused, the last good view stays)",
            m.config_updates.clone(),
        );
        registry.register(
            "controller_connected",
            "1 while the config stream to the zone controller is up",
            m.controller_connected.clone(),
        );
        registry.register(
            "certificate_renewals",
            "Certificate renewals with the zone controller, by result",
            m.certificate_renewals.clone(),
        );
        registry.register(
            "node_workloads",
            "Node mode: workloads enrolled and captured",
            m.node_workloads.clone(),
        );
        registry.register(
            "node_enrolments",
            "Node mode: enrolments by result: ok, refused (bad request or refused by the zone), failed (zone unreachable, listeners, rules), unenrolled",
            m.node_enrolments.clone(),
        );
        registry.register(
            "dns_queries",
            "DNS queries to the proxy, by result: mesh, nxdomain, nodata, forwarded, servfail, formerr, dropped",
            m.dns_queries.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP and gRPC requests, by direction, caller, destination, route, status (0: no response) and the gRPC status of trailers-only answers",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from an HTTP request to its response headers",
            m.http_duration.clone(),
        );
        registry.register(
            "http_local_responses",
            "Requests the agent answered itself, by why (denied, rate_limited, fault_abort, timeout, no_endpoints, upstream_failed, redirect) and policy",
            m.http_local.clone(),
        );
        registry.register(
            "protocol_detections",
            "Connections on ports of no declared protocol, by direction, how they were carried (http, tcp) and why (http1, http2, tls, not_http, timeout, closed, hint: the caller's agent said)",
            m.protocol_detections.clone(),
        );
        registry.register(
            "trace_spans_exported",
            "Spans a collector accepted (Trace policy)",
            crate::l7::trace::SPANS_EXPORTED.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans dropped: the export queue was full or the collector failed (Trace policy)",
            crate::l7::trace::SPANS_DROPPED.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts an HTTP request and observes its duration.
    pub fn http_request(&self, r: &HttpRequest<'_>) {
        self.http_requests
            .get_or_create(&HttpLabels {
                direction: r.direction,
                source_identity: r.source.clone(),
                destination: r.destination.clone(),
                route: r.route.clone(),
                status: r.status,
                grpc_status: r.grpc_status,
            })
            .inc();
        self.http_duration
            .get_or_create(&HttpDurationLabels {
                direction: r.direction,
                destination: r.destination.clone(),
            })
            .observe(r.seconds);
    }

    /// Counts a request the agent answered itself.
    pub fn http_local(&self, direction: Direction, flag: &'static str, policy: &str) {
        self.http_local
            .get_or_create(&HttpLocalLabels {
                direction,
                flag,
                policy: policy.to_owned(),
            })
            .inc();
    }

    /// Renders the Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a protocol detection by its result, so that a port whose
    /// clients time out into TCP (a server-first protocol to declare `tcp`)
    /// shows up.
    pub fn protocol_detected(&self, direction: Direction, outcome: crate::detect::Outcome) {
        self.protocol_detections
            .get_or_create(&DetectionLabels {
                direction,
                protocol: outcome.protocol.as_str(),
                reason: outcome.reason,
            })
            .inc();
    }

    /// Counts a completed handshake.
    pub fn handshake_ok(&self, direction: Direction) {
        self.handshakes
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// Counts a failed handshake by reason, so refusals show up in dashboards.
    pub fn handshake_failed(&self, direction: Direction, reason: HandshakeFailure) {
        self.handshake_failures
            .get_or_create(&FailureLabels {
                direction,
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a refused tunnel stream by caller and reason.
    pub fn stream_denied(&self, source: &str, reason: &'static str) {
        self.denied_streams
            .get_or_create(&DeniedLabels {
                source_identity: source.to_owned(),
                reason,
            })
            .inc();
    }

    /// Counts a connection turned away before it carried anything.
    pub fn connection_refused(&self, direction: Direction, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels { direction, reason })
            .inc();
    }

    /// Records a reload of the identity files and the expiry now in force.
    pub fn identity_reloaded(&self, ok: bool, not_after: i64) {
        let result = if ok { "ok" } else { "failed" };
        self.identity_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        self.certificate_expiry.set(not_after);
    }

    /// Records the expiry of the certificate in force.
    pub fn certificate_expires(&self, not_after: i64) {
        self.certificate_expiry.set(not_after);
    }

    /// Counts a config update from the zone, applied or refused.
    pub fn config_update(&self, applied: bool) {
        let result = if applied { "ack" } else { "nack" };
        self.config_updates
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Records whether the config stream is up.
    pub fn controller_connected(&self, up: bool) {
        self.controller_connected.set(i64::from(up));
    }

    /// Counts a certificate renewal attempt.
    pub fn certificate_renewal(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.certificate_renewals
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Node mode: how many workloads are captured now.
    pub fn node_workloads(&self, n: usize) {
        self.node_workloads
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Node mode: counts an enrolment change by its result.
    pub fn node_enrolment(&self, result: &'static str) {
        self.node_enrolments
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Counts a DNS query by how it was answered.
    pub fn dns_query(&self, result: &'static str) {
        self.dns_queries
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Counts a plaintext inbound connection, accepted or refused.
    pub fn plaintext(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.plaintext_connections
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The gauge of open HBONE connections in one direction.
    pub fn tunnel_gauge(&self, direction: Direction) -> Gauge {
        self.tunnel_connections
            .get_or_create_owned(&DirectionLabels { direction })
    }

    /// The counters for traffic between two identities.
    pub fn peer(
        &self,
        direction: Direction,
        source: &str,
        destination: &str,
        tls: Transport,
    ) -> PeerCounters {
        let labels = PeerLabels {
            direction,
            source_identity: source.to_owned(),
            destination_identity: destination.to_owned(),
            tls,
        };
        PeerCounters {
            opened: self.connections_opened.get_or_create_owned(&labels),
            closed: self.connections_closed.get_or_create_owned(&labels),
            sent: self.bytes_sent.get_or_create_owned(&labels),
            received: self.bytes_received.get_or_create_owned(&labels),
            open_streams: self
                .open_streams
                .get_or_create_owned(&DirectionLabels { direction }),
        }
    }
}

/// Counts one proxied connection from open to close, even on early return.
pub struct ConnectionGuard<'a>(&'a PeerCounters);

impl<'a> ConnectionGuard<'a> {
    /// Counts the connection as opened; dropping the guard counts it closed.
    pub fn open(counters: &'a PeerCounters) -> Self {
        counters.opened.inc();
        counters.open_streams.inc();
        ConnectionGuard(counters)
    }
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.closed.inc();
        self.0.open_streams.dec();
    }
}
