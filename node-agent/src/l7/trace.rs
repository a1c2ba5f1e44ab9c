//! The Trace policy: W3C Trace Context on every HTTP request the agent
//! proxies, and spans sent to an OpenTelemetry collector over OTLP/HTTP.
//!
//! Each hop gets a span of its own: the caller's agent a client span, the
//! destination's agent a server span, both in the trace of the incoming
//! `traceparent` (or of a new one, sampled at the policy's percentage).
//! The `traceparent` sent on names the hop's span, so the next hop (and
//! finally the application) links to it.
//!
//! Spans go through a bounded queue to one exporter thread per collector
//! endpoint, which sends them in batches: the data path never waits on the
//! collector, and when the queue is full a span is dropped and counted.
//! Without a Trace policy none of this runs: no header is read or written.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use weft_api::{TraceBackend, TraceConf};

/// The W3C header naming the trace and the parent span.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The W3C header of vendor-specific trace data, forwarded unchanged.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Spans waiting for an exporter at most, per collector: about a second of
/// a busy agent's sampled requests, and a bounded amount of memory.
const QUEUE: usize = 8192;
/// Spans per OTLP request at most.
const BATCH: usize = 512;
/// How long a span waits for its batch to fill before it is sent anyway.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// Connecting to the collector and its answer, each.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Spans sent to a collector that accepted them (for the metrics).
pub static SPANS_EXPORTED: LazyLock<Counter> = LazyLock::new(Counter::default);
/// Spans dropped: the queue was full or the collector refused or failed
/// (for the metrics).
pub static SPANS_DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Why a Trace policy cannot be put in force.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{0:?} is not an http:// URL with a host")]
    Endpoint(String),
    #[error("cannot start the span exporter: {0}")]
    Thread(std::io::Error),
}

/// A parsed `traceparent` (version 00 layout; later versions are read the
/// same way, as the spec asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The caller's span.
    pub span_id: [u8; 8],
    /// Whether the caller sampled the trace.
    pub sampled: bool,
}

impl TraceParent {
    /// Reads a header value; `None` when it is not a valid traceparent
    /// (the hop then starts a new trace).
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
            return None;
        }
        let version = hex_byte(&value[0..2])?;
        if version == 0xff || (version == 0 && value.len() != 55) {
            return None;
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, b) in span_id.iter_mut().enumerate() {
            *b = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The header value: `00-<trace>-<span>-<flags>`.
    pub fn header(&self) -> HeaderValue {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        hex_into(&self.span_id, &mut out[36..52]);
        out[52] = b'-';
        out[53] = b'0';
        out[54] = if self.sampled { b'1' } else { b'0' };
        // Only hex digits and dashes: always a valid header value.
        HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        // Upper case is invalid in version 00.
        _ => None,
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Which side of a call a span stands for (OTLP's `SpanKind` numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// The destination's agent.
    Server = 2,
    /// The caller's agent.
    Client = 3,
}

/// A span begun by [`Tracer::start`], finished by [`Tracer::finish`].
#[derive(Debug)]
pub struct ActiveSpan {
    /// This hop's trace context (its span id is the one sent on).
    pub context: TraceParent,
    parent: Option<[u8; 8]>,
    kind: SpanKind,
    start: SystemTime,
    started: Instant,
}

/// How a traced request ended: what the exported span records.
#[derive(Debug, Default)]
pub struct SpanEnd<'a> {
    /// The HTTP method.
    pub method: &'a str,
    /// The path (without the query: it may hold secrets).
    pub path: &'a str,
    /// The HTTPRoute that took the request, if any.
    pub route: &'a str,
    /// The response status (0: none).
    pub status: u16,
    /// Why the agent answered itself, if it did.
    pub flag: &'a str,
    /// The caller's identity.
    pub source: &'a str,
    /// The callee's identity (the destination service's key outbound).
    pub destination: &'a str,
    /// The destination service (`<namespace>/<name>`), outbound.
    pub service: &'a str,
}

/// The Trace policy of a workload, ready for the data path.
#[derive(Debug)]
pub struct Tracer {
    sampling: u8,
    exporter: Option<Exporter>,
    /// The workload, the exported spans' `service.name`.
    workload: Arc<str>,
}

impl Tracer {
    /// The tracer of a workload's merged Trace; `None` when no Trace
    /// applies. Exporters are shared by endpoint across views, so a new
    /// view reuses the running one.
    pub fn new(conf: &TraceConf, workload: &str) -> Result<Option<Self>, TraceError> {
        if conf.is_empty() {
            return Ok(None);
        }
        let exporter = match &conf.backend {
            None => None,
            Some(TraceBackend::Otlp { endpoint }) => Some(exporter(endpoint)?),
        };
        Ok(Some(Tracer {
            sampling: conf.sampling.unwrap_or(100).min(100),
            exporter,
            workload: workload.into(),
        }))
    }

    /// Begins this hop's span: continues the trace of an incoming
    /// `traceparent` (or starts one, sampled at the policy's rate), and
    /// replaces the header with one naming the new span.
    pub fn start(&self, headers: &mut HeaderMap, kind: SpanKind) -> ActiveSpan {
        let incoming = headers
            .get(TRACEPARENT)
            .and_then(|v| TraceParent::parse(v.as_bytes()));
        let (trace_id, parent, sampled) = match incoming {
            Some(tp) => (tp.trace_id, Some(tp.span_id), tp.sampled),
            None => {
                // `tracestate` without a valid parent is meaningless
                // (W3C Trace Context, 3.3).
                headers.remove(TRACESTATE);
                let sampled = self.sampling >= 100
                    || (self.sampling > 0 && fastrand::u8(0..100) < self.sampling);
                (nonzero_id(), None, sampled)
            }
        };
        let context = TraceParent {
            trace_id,
            span_id: nonzero_id(),
            sampled,
        };
        headers.insert(TRACEPARENT, context.header());
        ActiveSpan {
            context,
            parent,
            kind,
            start: SystemTime::now(),
            started: Instant::now(),
        }
    }

    /// Whether finishing `span` sends anything: the caller copies what
    /// [`SpanEnd`] needs of the request only then.
    pub fn exports(&self, span: &ActiveSpan) -> bool {
        span.context.sampled && self.exporter.is_some()
    }

    /// Ends the span and queues it for export if it is sampled and a
    /// backend is configured; dropped and counted if the queue is full.
    pub fn finish(&self, span: ActiveSpan, end: &SpanEnd<'_>) {
        let Some(exporter) = &self.exporter else {
            return;
        };
        if !span.context.sampled {
            return;
        }
        let start_ns = span
            .start
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let end_ns = start_ns + span.started.elapsed().as_nanos() as u64;
        let name = if end.route.is_empty() {
            format!("{} {}", end.method, end.path)
        } else {
            format!("{} {}", end.method, end.route)
        };
        let record = SpanRecord {
            workload: self.workload.clone(),
            trace_id: span.context.trace_id,
            span_id: span.context.span_id,
            parent: span.parent,
            kind: span.kind,
            name,
            start_ns,
            end_ns,
            method: end.method.to_owned(),
            path: end.path.to_owned(),
            route: end.route.to_owned(),
            status: end.status,
            flag: end.flag.to_owned(),
            source: end.source.to_owned(),
            destination: end.destination.to_owned(),
            service: end.service.to_owned(),
        };
        if exporter.tx.try_send(record).is_err() {
            SPANS_DROPPED.inc();
        }
    }
}

fn nonzero_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        fastrand::fill(&mut id);
        if id != [0u8; N] {
            return id;
        }
    }
}

/// A finished span, owned, on its way to the exporter.
#[derive(Debug)]
struct SpanRecord {
    workload: Arc<str>,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    kind: SpanKind,
    name: String,
    start_ns: u64,
    end_ns: u64,
    method: String,
    path: String,
    route: String,
    status: u16,
    flag: String,
    source: String,
    destination: String,
    service: String,
}

impl SpanRecord {
    /// The span in OTLP JSON (`opentelemetry.proto.trace.v1.Span`, with
    /// ids as hex and 64-bit numbers as strings, as OTLP/HTTP JSON has it).
    fn to_otlp(&self) -> Value {
        let text = |key: &str, value: &str| json!({"key": key, "value": {"stringValue": value}});
        let mut attributes = vec![
            text("http.request.method", &self.method),
            text("url.path", &self.path),
            text("weft.source", &self.source),
            text("weft.destination", &self.destination),
        ];
        if self.status != 0 {
            attributes.push(json!({"key": "http.response.status_code",
                "value": {"intValue": self.status.to_string()}}));
        }
        if !self.route.is_empty() {
            attributes.push(text("http.route", &self.route));
        }
        if !self.service.is_empty() {
            attributes.push(text("weft.destination.service", &self.service));
        }
        if !self.flag.is_empty() {
            attributes.push(text("weft.flag", &self.flag));
        }
        let error = self.status == 0 || self.status >= 500;
        let mut span = json!({
            "traceId": hex(&self.trace_id),
            "spanId": hex(&self.span_id),
            "name": self.name,
            "kind": self.kind as u8,
            "startTimeUnixNano": self.start_ns.to_string(),
            "endTimeUnixNano": self.end_ns.max(self.start_ns).to_string(),
            "attributes": attributes,
            // STATUS_CODE_ERROR (2) or UNSET (0).
            "status": if error {
                json!({"code": 2, "message": if self.flag.is_empty() { "error" } else { &self.flag }})
            } else {
                json!({})
            },
        });
        if let Some(parent) = &self.parent {
            span["parentSpanId"] = Value::String(hex(parent));
        }
        span
    }
}

/// The body of one OTLP request: spans grouped by workload (the resource).
fn export_body(spans: &[SpanRecord]) -> Vec<u8> {
    let mut by_workload: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for s in spans {
        by_workload
            .entry(&s.workload)
            .or_default()
            .push(s.to_otlp());
    }
    let resource_spans: Vec<Value> = by_workload
        .into_iter()
        .map(|(workload, spans)| {
            json!({
                "resource": {"attributes": [
                    {"key": "service.name", "value": {"stringValue": workload}},
                ]},
                "scopeSpans": [{"scope": {"name": "weft-agent"}, "spans": spans}],
            })
        })
        .collect();
    serde_json::to_vec(&json!({ "resourceSpans": resource_spans })).unwrap_or_default()
}

/// A collector's queue.
#[derive(Debug, Clone)]
struct Exporter {
    tx: mpsc::Sender<SpanRecord>,
}

/// The running exporters, by endpoint, shared by every view.
static EXPORTERS: LazyLock<Mutex<HashMap<String, Exporter>>> = LazyLock::new(Default::default);

/// Where an exporter posts: the collector's address and the request path.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
    path: String,
}

fn target(endpoint: &str) -> Result<Target, TraceError> {
    let bad = || TraceError::Endpoint(endpoint.to_owned());
    let uri: Uri = endpoint.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad());
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad)?;
    Ok(Target {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port: uri.port_u16().unwrap_or(80),
        path: format!("{}/v1/traces", uri.path().trim_end_matches('/')),
    })
}

fn exporter(endpoint: &str) -> Result<Exporter, TraceError> {
    let mut running = EXPORTERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = running.get(endpoint) {
        return Ok(e.clone());
    }
    let target = target(endpoint)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    // A thread with its own runtime: the exporter must run even where the
    // policy is compiled outside the agent's runtime, and its JSON encoding
    // stays off the data path's workers.
    std::thread::Builder::new()
        .name("weft-trace-export".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => return warn!(error = %e, "span exporter cannot start"),
            };
            runtime.block_on(export_loop(rx, target));
        })
        .map_err(TraceError::Thread)?;
    let exporter = Exporter { tx };
    running.insert(endpoint.to_owned(), exporter.clone());
    Ok(exporter)
}

async fn export_loop(mut rx: mpsc::Receiver<SpanRecord>, target: Target) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match post(&target, export_body(&batch)).await {
            Ok(()) => {
                SPANS_EXPORTED.inc_by(n);
            }
            Err(e) => {
                SPANS_DROPPED.inc_by(n);
                warn!(collector = %target.host, port = target.port, spans = n, error = %e, "spans not exported");
            }
        }
        batch.clear();
    }
}

/// Why a batch was not accepted.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("collector answered {0}")]
    Status(http::StatusCode),
}

async fn post(target: &Target, body: Vec<u8>) -> Result<(), PostError> {
    let connect = TcpStream::connect((target.host.as_str(), target.port));
    let tcp = tokio::time::timeout(EXPORT_TIMEOUT, connect)
        .await
        .map_err(|_| PostError::Timeout)?
        .map_err(PostError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "collector connection ended with an error");
        }
    });
    let request = Request::builder()
        .method(Method::POST)
        .uri(target.path.as_str())
        .header(http::header::HOST, &target.host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = tokio::time::timeout(EXPORT_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| PostError::Timeout)??;
    if !response.status().is_success() {
        return Err(PostError::Status(response.status()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_bad_values() {
        let v = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(v).unwrap();
        assert!(tp.sampled);
        assert_eq!(tp.header().as_bytes(), v);
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            b"garbage",
        ] {
            assert_eq!(
                TraceParent::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A later version may append fields.
        assert!(
            TraceParent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
    }

    #[test]
    fn start_continues_or_creates_a_trace() {
        let conf = TraceConf {
            sampling: Some(0),
            backend: None,
        };
        let tracer = Tracer::new(&conf, "web-1").unwrap().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(TRACESTATE, HeaderValue::from_static("x=1"));
        let span = tracer.start(&mut headers, SpanKind::Client);
        assert!(!span.context.sampled, "sampling 0");
        assert!(
            headers.get(TRACESTATE).is_none(),
            "orphan tracestate dropped"
        );
        let sent = TraceParent::parse(headers[TRACEPARENT].as_bytes()).unwrap();
        assert_eq!(sent, span.context);

        let mut headers = HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        headers.insert(TRACESTATE, HeaderValue::from_static("x=1"));
        let span = tracer.start(&mut headers, SpanKind::Server);
        assert!(span.context.sampled, "the caller's decision is kept");
        assert_eq!(
            span.parent,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        let sent = TraceParent::parse(headers[TRACEPARENT].as_bytes()).unwrap();
        assert_eq!(sent.trace_id, span.context.trace_id);
        assert_ne!(
            sent.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(headers[TRACESTATE], "x=1");
    }

    #[test]
    fn otlp_json_has_the_span_fields() {
        let record = SpanRecord {
            workload: "web-1".into(),
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: Some([3; 8]),
            kind: SpanKind::Client,
            name: "GET /x".to_owned(),
            start_ns: 1,
            end_ns: 2,
            method: "GET".to_owned(),
            path: "/x".to_owned(),
            route: String::new(),
            status: 503,
            flag: "no_endpoints".to_owned(),
            source: "a".to_owned(),
            destination: "b".to_owned(),
            service: "default/b".to_owned(),
        };
        let body: Value = serde_json::from_slice(&export_body(&[record])).unwrap();
        let span = &body["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "01".repeat(16));
        assert_eq!(span["parentSpanId"], "03".repeat(8));
        assert_eq!(span["kind"], 3);
        assert_eq!(span["status"]["code"], 2);
        assert_eq!(
            body["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "web-1"
        );
    }
}
