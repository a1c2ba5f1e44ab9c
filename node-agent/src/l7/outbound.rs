//! The caller's side of L7: an application's HTTP connection to a mesh
//! service, served request by request. Each request is routed (HTTPRoute),
//! limited (RateLimit), maybe delayed or aborted (FaultInjection), sent to
//! an endpoint picked by the LoadBalancing policy through the HBONE tunnel
//! (or to an ExternalService's host, dialled directly), retried (Retry)
//! within its Timeout, and counted and logged.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::{debug, info};
use weft_api::policy::conf::{PathRewrite, RetryOn};
use weft_api::Endpoint;

use super::access_log::Entry;
use super::policy::{Filter, Outbound as Policy, Retry};
use super::response::{local, rate_limited};
use super::trace::{SpanEnd, SpanKind};
use super::tunnel_io::TunnelIo;
use super::upstream::{is_h2, Key, PooledBody, SendError};
use super::Body;
use crate::external::External;
use crate::metrics::{Direction, HttpRequest, Label};
use crate::outbound::Outbound;
use crate::view::{MeshView, Service};

/// What the agent answers the application with.
pub type ResponseBody = Either<PooledBody, Full<Bytes>>;

/// Request bodies up to this size are kept for retries; larger ones (or
/// ones of unknown size) are streamed and not retried once sent.
const MAX_RETRY_BODY: u64 = 64 * 1024;

/// The service and port an application dialled.
#[derive(Debug, Clone)]
pub struct Dialled {
    /// `<namespace>/<name>`.
    pub key: Label,
    /// The port dialled.
    pub port: u16,
    /// The application's address (for `SourceIp` hashing and logs).
    pub client: SocketAddr,
}

/// Serves one application connection until it closes, or until it has
/// waited longer than the destination's idle timeout for its next request.
pub async fn serve(outbound: Arc<Outbound>, tcp: TcpStream, dialled: Dialled) {
    let idle = {
        let view = outbound.view.load();
        let policy = outbound.policy(&view);
        policy.outbound(dialled.key.as_str()).idle_timeout
    };
    let activity = Arc::new(Activity::new());
    // Held while the connection lasts: counted against the destination's
    // CircuitBreaker maxConnections.
    let slot = {
        let view = outbound.view.load();
        view.service_by_key(dialled.key.as_str())
            .map(|service| crate::resilience::service_connection(outbound.policy(&view), service))
    };
    if let Some(Err(())) = slot {
        return serve_overflow(outbound, tcp, dialled).await;
    }
    let dialled = Arc::new(dialled);
    let drain = outbound.drain.clone();
    let closing = Arc::new(super::DrainClose::default());
    let on_drain = closing.clone();
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let outbound = outbound.clone();
        let dialled = dialled.clone();
        let seen = seen.clone();
        let closing = closing.clone();
        async move {
            let _busy = seen.begin();
            let version = req.version();
            let mut response = handle(&outbound, req, &dialled).await;
            closing.on_response(version, outbound.drain.is_draining(), &mut response);
            Ok::<_, Infallible>(response)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    // A coarse tick rather than a timer per request: re-arming a timer for
    // every request wakes the runtime's driver each time.
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
    tick.tick().await;
    let mut closing = false;
    let mut drain_seen = false;
    let drained = drain.signaled();
    tokio::pin!(drained);
    loop {
        tokio::select! {
            // Draining: the application's next connection goes to whoever
            // serves by then (see `DrainClose`).
            () = &mut drained, if !drain_seen => {
                drain_seen = true;
                if on_drain.shut_down_now() && !closing {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            done = conn.as_mut() => {
                if let Err(e) = done {
                    debug!(error = %e, "outbound HTTP connection ended with an error");
                }
                return;
            }
            _ = tick.tick(), if !closing => {
                if activity.idle_for() >= idle {
                    debug!("closing an idle outbound HTTP connection (Timeout idleTimeout)");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Requests in flight on a connection and when the last one ended, for
/// the idle timeout.
struct Activity {
    opened: Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds after `opened` when the last request ended.
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            in_flight: Default::default(),
            last_ms: Default::default(),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// How long the connection has had no request in flight (zero while
    /// one is), counted from its opening before the first request.
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }
}

/// A request in flight (see [`Activity`]).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self
            .0
            .opened
            .elapsed()
            .as_millis()
            .min(u128::from(u64::MAX)) as u64;
        self.0.last_ms.store(now, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves a connection over the destination's `maxConnections`: every
/// request gets `503 overflow` at once, so the application sees why.
async fn serve_overflow(outbound: Arc<Outbound>, tcp: TcpStream, dialled: Dialled) {
    info!(
        destination = dialled.key.as_str(),
        "HTTP connection over the CircuitBreaker's maxConnections"
    );
    let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
        outbound
            .metrics
            .http_local(Direction::Outbound, "overflow", "");
        let response: Response<ResponseBody> = local(
            StatusCode::SERVICE_UNAVAILABLE,
            "overflow",
            "over the CircuitBreaker's maxConnections",
        );
        async move { Ok::<_, Infallible>(response) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(tcp), service).await {
        debug!(error = %e, "outbound HTTP connection ended with an error");
    }
}

/// How a request ended, for metrics and logs.
struct Outcome {
    status: u16,
    flag: &'static str,
    upstream: Option<SocketAddr>,
}

async fn handle(o: &Arc<Outbound>, req: Request<Incoming>, d: &Dialled) -> Response<ResponseBody> {
    let started = Instant::now();
    let view = o.view.load_full();
    let policy = o.policy(&view);
    let out = policy.outbound(d.key.as_str()).clone();
    let (mut parts, body) = req.into_parts();
    // The client span: the trace header sent on names it.
    let tracer = policy.trace.as_deref();
    let span = tracer.map(|t| t.start(&mut parts.headers, SpanKind::Client));
    let route = out.route(&parts);
    let route_name = route.map_or_else(Label::empty, |r| r.policy.clone());
    // Copied only when a log will be written: the request itself moves on.
    let head = out.access_log.as_ref().map(|_| LogHead::of(&parts));
    // Likewise only for a span that will be exported.
    let trace_head = match (tracer, &span) {
        (Some(t), Some(s)) if t.exports(s) => Some(TraceHead::of(&parts)),
        _ => None,
    };
    let (response, outcome) = routed(o, &view, &out, route, parts, body, d).await;
    if let (Some(tracer), Some(span)) = (tracer, span) {
        let head = trace_head.unwrap_or_default();
        tracer.finish(
            span,
            &SpanEnd {
                method: &head.method,
                path: &head.path,
                route: route_name.as_str(),
                status: outcome.status,
                flag: outcome.flag,
                source: o.local_id.as_str(),
                destination: d.key.as_str(),
                service: d.key.as_str(),
            },
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    o.metrics.http_request(&HttpRequest {
        direction: Direction::Outbound,
        source: &o.local_id,
        destination: &d.key,
        route: &route_name,
        status: outcome.status,
        grpc_status: crate::metrics::grpc_status(response.headers()),
        seconds,
    });
    if !outcome.flag.is_empty() {
        o.metrics
            .http_local(Direction::Outbound, outcome.flag, route_name.as_str());
    }
    if let (Some(log), Some(head)) = (&out.access_log, head) {
        let upstream = outcome.upstream.map(|u| u.to_string()).unwrap_or_default();
        log.record(&Entry {
            direction: "outbound",
            start_time: super::inbound::rfc3339_now(),
            source: o.local_id.as_str(),
            destination: d.key.as_str(),
            route: route_name.as_str(),
            method: head.method.as_str(),
            path: &head.path,
            authority: &head.authority,
            protocol: version_name(head.version),
            status: outcome.status,
            duration_ms: seconds * 1000.0,
            upstream: &upstream,
            flag: outcome.flag,
        });
    }
    response
}

/// What an exported span needs of a request, taken before it moves on.
#[derive(Debug, Default)]
pub struct TraceHead {
    /// The method.
    pub method: String,
    /// The path, without the query (which may carry secrets).
    pub path: String,
}

impl TraceHead {
    /// Copies the parts a span shows.
    pub fn of(parts: &Parts) -> Self {
        TraceHead {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
        }
    }
}

/// What an access log entry needs of a request, taken before the request
/// moves on.
pub struct LogHead {
    /// The method.
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    /// `Host` or the URI's authority.
    pub authority: String,
    /// The HTTP version.
    pub version: Version,
}

impl LogHead {
    /// Copies the parts a log entry shows.
    pub fn of(parts: &Parts) -> Self {
        LogHead {
            method: parts.method.clone(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(String::new, |p| p.as_str().to_owned()),
            authority: parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .or(parts.uri.authority().map(|a| a.as_str()))
                .unwrap_or("")
                .to_owned(),
            version: parts.version,
        }
    }
}

/// Routing, limits, faults and the attempts, in that order.
async fn routed(
    o: &Arc<Outbound>,
    view: &MeshView,
    out: &Policy,
    route: Option<&super::policy::Route>,
    mut request: Parts,
    body: Incoming,
    d: &Dialled,
) -> (Response<ResponseBody>, Outcome) {
    let parts = &mut request;
    let mut key = d.key.as_str();
    let mut port = d.port;
    let mut response_edits = None;
    if let Some(route) = route {
        let prefix = route.matched_prefix(parts).map(str::to_owned);
        for filter in &route.filters {
            match filter {
                Filter::RequestHeaders(edits) => edits.apply(&mut parts.headers),
                Filter::ResponseHeaders(edits) => response_edits = Some(edits),
                Filter::Rewrite { hostname, path } => {
                    rewrite(parts, hostname.as_ref(), path.as_ref(), prefix.as_deref())
                }
                Filter::Redirect {
                    scheme,
                    hostname,
                    port,
                    path,
                    status,
                } => {
                    let location = redirect_location(
                        parts,
                        scheme.as_ref(),
                        hostname.as_deref(),
                        *port,
                        path.as_ref(),
                        prefix.as_deref(),
                    );
                    let mut response = local(*status, "redirect", "redirected by HTTPRoute");
                    if let Ok(value) = HeaderValue::from_str(&location) {
                        response.headers_mut().insert(http::header::LOCATION, value);
                    }
                    return (
                        response,
                        Outcome {
                            status: status.as_u16(),
                            flag: "redirect",
                            upstream: None,
                        },
                    );
                }
                Filter::Mirror {
                    key,
                    port: mirror_port,
                    percentage,
                } => {
                    if body.is_end_stream() && roll(*percentage) {
                        mirror(o, view, key, mirror_port.unwrap_or(d.port), parts, d);
                    }
                }
            }
        }
        if let Some(backend) = route.pick_backend() {
            key = &backend.key;
            port = backend.port.unwrap_or(port);
        }
    }
    if let Some(limit) = &out.rate_limit {
        if let Err(wait) = limit.bucket.take() {
            info!(destination = key, "outbound request over the RateLimit");
            return (
                rate_limited(limit, wait),
                Outcome {
                    status: limit.status.as_u16(),
                    flag: "rate_limited",
                    upstream: None,
                },
            );
        }
    }
    for fault in &out.faults {
        if let Some(delay) = &fault.delay {
            if roll(delay.percentage) {
                tokio::time::sleep(delay.value.as_std()).await;
            }
        }
        if let Some(abort) = &fault.abort {
            if roll(abort.percentage) {
                let status = StatusCode::from_u16(abort.http_status)
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return (
                    local(status, "fault_abort", "aborted by FaultInjection"),
                    Outcome {
                        status: status.as_u16(),
                        flag: "fault_abort",
                        upstream: None,
                    },
                );
            }
        }
    }
    let Some(service) = view.service_by_key(key) else {
        return (
            local(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_endpoints",
                &format!("no service {key} in the mesh"),
            ),
            Outcome {
                status: 503,
                flag: "no_endpoints",
                upstream: None,
            },
        );
    };
    // CircuitBreaker: a slot among maxRequests, maybe after a wait as one
    // of maxPendingRequests (bounded by the request timeout).
    let slot = crate::resilience::request_slot(service.destination(), &out.breaker);
    let slot = match out.request_timeout {
        Some(limit) => tokio::time::timeout(limit, slot).await.ok().flatten(),
        None => slot.await,
    };
    let Some(_slot) = slot else {
        info!(
            destination = key,
            "outbound request over the CircuitBreaker"
        );
        return (
            local(
                StatusCode::SERVICE_UNAVAILABLE,
                "overflow",
                "over the CircuitBreaker's maxRequests",
            ),
            Outcome {
                status: 503,
                flag: "overflow",
                upstream: None,
            },
        );
    };
    let attempts = attempts(o, out, service, port, request, body, d);
    let result = match out.request_timeout {
        Some(limit) => tokio::time::timeout(limit, attempts).await.ok(),
        None => Some(attempts.await),
    };
    let (mut response, outcome) = match result {
        Some(Ok((mut response, upstream))) => {
            strip_hop_by_hop(response.headers_mut());
            let status = response.status().as_u16();
            (
                response.map(Either::Left),
                Outcome {
                    status,
                    flag: "",
                    upstream: Some(upstream),
                },
            )
        }
        Some(Err(failure)) => {
            info!(destination = key, reason = %failure, "outbound request failed");
            let (status, flag) = failure.status();
            (
                local(status, flag, &failure.to_string()),
                Outcome {
                    status: status.as_u16(),
                    flag,
                    upstream: None,
                },
            )
        }
        None => (
            local(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "request timed out (Timeout policy)",
            ),
            Outcome {
                status: 504,
                flag: "timeout",
                upstream: None,
            },
        ),
    };
    if let Some(edits) = response_edits {
        edits.apply(response.headers_mut());
    }
    (response, outcome)
}

/// Why no response came from the destination.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("service has no endpoint")]
    NoEndpoints,
    #[error("{0}")]
    Send(#[from] SendError),
    #[error("attempt timed out")]
    TryTimeout,
    #[error("request body: {0}")]
    Body(hyper::Error),
}

impl Failure {
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            Failure::NoEndpoints => (StatusCode::SERVICE_UNAVAILABLE, "no_endpoints"),
            Failure::TryTimeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Failure::Body(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Failure::Send(SendError::Refused(StatusCode::FORBIDDEN)) => {
                (StatusCode::FORBIDDEN, "denied")
            }
            Failure::Send(_) => (StatusCode::SERVICE_UNAVAILABLE, "upstream_failed"),
        }
    }
}

/// Sends the request, retrying as the Retry policy says while the body can
/// be sent again.
async fn attempts(
    o: &Arc<Outbound>,
    out: &Policy,
    service: &Service,
    port: u16,
    mut parts: Parts,
    body: Incoming,
    d: &Dialled,
) -> Result<(Response<PooledBody>, SocketAddr), Failure> {
    out.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = scopeguard(|| {
        out.in_flight.fetch_sub(1, Ordering::Relaxed);
    });
    prepare(&mut parts);
    let retry = out.retry.as_ref();
    let fits = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= MAX_RETRY_BODY);
    // Retried only when the body can be sent again.
    let Some(retry) = retry.filter(|_| fits) else {
        let (to, at) = pick(service, out, o, &parts, d).ok_or(Failure::NoEndpoints)?;
        let _load = at.and_then(|i| service.track_at(i));
        let req = Request::from_parts(parts, Either::Left(body));
        let result = send_to(
            o,
            to,
            port,
            req,
            retry.and_then(|r| r.per_try_timeout),
            out.connect_timeout,
        )
        .await;
        record(service, out, at, &result);
        return result;
    };
    let body = body.collect().await.map_err(Failure::Body)?.to_bytes();
    let mut attempt = 0;
    loop {
        let (to, at) = pick(service, out, o, &parts, d).ok_or(Failure::NoEndpoints)?;
        let _load = at.and_then(|i| service.track_at(i));
        let req = Request::from_parts(parts.clone(), Either::Right(Full::new(body.clone())));
        let result = send_to(o, to, port, req, retry.per_try_timeout, out.connect_timeout).await;
        record(service, out, at, &result);
        let retryable = match &result {
            Ok((response, _)) => retry_on_response(retry, response),
            Err(Failure::Send(SendError::Connect(_))) => {
                retry.retry_on.contains(&RetryOn::ConnectFailure)
            }
            Err(Failure::Send(SendError::Upstream(_))) | Err(Failure::TryTimeout) => {
                retry.retry_on.contains(&RetryOn::Reset)
            }
            Err(_) => false,
        };
        if !retryable || attempt >= retry.num_retries || !out.retry_allowed(retry) {
            return result;
        }
        attempt += 1;
        debug!(attempt, "retrying request");
        out.retries_in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff(retry, attempt)).await;
        out.retries_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Feeds an attempt's result on the endpoint at index `at` of `service`
/// (none: an ExternalService's host) to its outlier detection, if on.
fn record(
    service: &Service,
    out: &Policy,
    at: Option<usize>,
    result: &Result<(Response<PooledBody>, SocketAddr), Failure>,
) {
    use crate::resilience::Attempt;
    let (Some(outlier), Some(at)) = (&out.breaker.outlier, at) else {
        return;
    };
    let attempt = match result {
        Ok((response, _)) => Attempt::of_status(response.status().as_u16()),
        Err(Failure::Send(SendError::Refused(status))) => Attempt::of_status(status.as_u16()),
        Err(Failure::Send(_)) | Err(Failure::TryTimeout) => Attempt::GatewayError,
        // Not the endpoint's doing.
        Err(Failure::NoEndpoints) | Err(Failure::Body(_)) => return,
    };
    service.record_at(at, attempt, outlier);
}

/// One active HTTP health check: `GET path` to `endpoint` through the
/// tunnel, as a request of the local workload; the status, or why none
/// came.
pub(crate) async fn probe(
    o: &Arc<Outbound>,
    endpoint: &Endpoint,
    port: u16,
    path: &http::uri::PathAndQuery,
) -> Result<u16, String> {
    let mut req = Request::new(Either::Right(Full::new(Bytes::new())));
    *req.uri_mut() = Uri::from(path.clone());
    if let Ok(host) = HeaderValue::from_str(&SocketAddr::new(endpoint.address, port).to_string()) {
        req.headers_mut().insert(http::header::HOST, host);
    }
    req.headers_mut().insert(
        http::header::USER_AGENT,
        HeaderValue::from_static("weft-health-check"),
    );
    let (response, _) = send(
        o,
        endpoint,
        port,
        req,
        None,
        super::policy::DEFAULT_CONNECT_TIMEOUT,
    )
    .await
    .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    // Read to the end so the pooled connection can serve again.
    let _ = response.into_body().collect().await;
    Ok(status)
}

fn retry_on_response(retry: &Retry, response: &Response<PooledBody>) -> bool {
    let status = response.status().as_u16();
    let grpc = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u8>().ok());
    retry.retry_on.iter().any(|on| match on {
        RetryOn::ServerError => status >= 500,
        RetryOn::GatewayError => matches!(status, 502..=504),
        RetryOn::RetriableStatusCodes => retry.codes.contains(&status),
        RetryOn::GrpcCancelled => grpc == Some(1),
        RetryOn::GrpcDeadlineExceeded => grpc == Some(4),
        RetryOn::GrpcResourceExhausted => grpc == Some(8),
        RetryOn::GrpcUnavailable => grpc == Some(14),
        RetryOn::ConnectFailure | RetryOn::Reset => false,
    })
}

/// Full jitter: random in `[0, min(max, base * 2^attempt)]`.
fn backoff(retry: &Retry, attempt: u32) -> Duration {
    let (base, max) = retry.backoff;
    let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(max);
    ceiling.mul_f64(fastrand::f64())
}

/// Where one attempt goes.
#[derive(Clone, Copy)]
enum To<'s> {
    /// A mesh endpoint, through the tunnel to its agent.
    Endpoint(&'s Endpoint),
    /// An ExternalService's host (the service's virtual IP keys its pooled
    /// connections), dialled by this agent.
    External(&'s External, IpAddr),
}

/// Where one attempt goes: an ExternalService's host, or an endpoint by
/// the algorithm, within the nearest locality tier of the caller when the
/// policy is locality-aware; with the endpoint's index in `service`.
fn pick<'s>(
    service: &'s Service,
    out: &Policy,
    o: &Outbound,
    parts: &Parts,
    d: &Dialled,
) -> Option<(To<'s>, Option<usize>)> {
    if let Some(external) = &service.external {
        return Some((To::External(external, service.virtual_ip), None));
    }
    let tiers = out.locality_aware.then(|| service.tiers(&o.locality));
    let at = service.pick_index(&out.algorithm, tiers.as_deref(), parts, d.client.ip())?;
    Some((To::Endpoint(service.endpoint_at(at)?), Some(at)))
}

/// One attempt, wherever it goes.
async fn send_to(
    o: &Arc<Outbound>,
    to: To<'_>,
    port: u16,
    req: Request<Body>,
    per_try: Option<Duration>,
    connect_timeout: Duration,
) -> Result<(Response<PooledBody>, SocketAddr), Failure> {
    match to {
        To::Endpoint(endpoint) => send(o, endpoint, port, req, per_try, connect_timeout).await,
        To::External(external, vip) => {
            let sent = send_external(o, external, vip, req, connect_timeout);
            let response = match per_try {
                Some(limit) => tokio::time::timeout(limit, sent)
                    .await
                    .map_err(|_| Failure::TryTimeout)??,
                None => sent.await?,
            };
            Ok((response, SocketAddr::new(vip, external.port)))
        }
    }
}

/// One request to an ExternalService, on a pooled plaintext connection to
/// its host. The request names the host (`Host`, or the HTTP/2 authority)
/// as its server expects, not the mesh name the application dialled.
async fn send_external(
    o: &Arc<Outbound>,
    external: &External,
    vip: IpAddr,
    mut req: Request<Body>,
    connect_timeout: Duration,
) -> Result<Response<PooledBody>, SendError> {
    let h2 = is_h2(req.version());
    if h2 {
        let mut uri = std::mem::take(req.uri_mut()).into_parts();
        uri.authority = Some(external.uri_authority.clone());
        *req.uri_mut() = Uri::from_parts(uri).unwrap_or_default();
        req.headers_mut().remove(http::header::HOST);
    } else {
        req.headers_mut()
            .insert(http::header::HOST, external.authority.clone());
    }
    let key = Key {
        authority: SocketAddr::new(vip, external.port),
        agent: None,
        h2,
    };
    let connect = || async move {
        o.dial_external(external, connect_timeout)
            .await
            .map_err(|e| SendError::Connect(e.to_string()))
    };
    o.upstreams.send(key, req, connect).await
}

/// One attempt on one endpoint, through the tunnel to its agent.
async fn send(
    o: &Arc<Outbound>,
    endpoint: &Endpoint,
    port: u16,
    req: Request<Body>,
    per_try: Option<Duration>,
    connect_timeout: Duration,
) -> Result<(Response<PooledBody>, SocketAddr), Failure> {
    let authority = SocketAddr::new(endpoint.address, port);
    let key = Key {
        authority,
        agent: Some(endpoint.agent),
        h2: is_h2(req.version()),
    };
    let connect = || async move {
        let opened = tokio::time::timeout(
            connect_timeout,
            o.open_stream_as(authority, endpoint, Some(crate::detect::Detected::Http)),
        )
        .await
        .map_err(|_| SendError::Connect("connect timeout (Timeout policy)".to_owned()))?;
        let (checkout, response, tx) = opened.map_err(|e| SendError::Connect(e.to_string()))?;
        if response.status() != StatusCode::OK {
            return Err(SendError::Refused(response.status()));
        }
        Ok(TunnelIo::new(response.into_body(), tx).holding(checkout))
    };
    let sent = o.upstreams.send(key, req, connect);
    let response = match per_try {
        Some(limit) => tokio::time::timeout(limit, sent)
            .await
            .map_err(|_| Failure::TryTimeout)??,
        None => sent.await?,
    };
    Ok((response, authority))
}

/// Readies a request for the next hop: hop-by-hop headers go, and the URI
/// takes the form the next hop's HTTP version expects (origin-form with a
/// `Host` header for HTTP/1.1, scheme and authority for HTTP/2). Public so
/// that the fuzz targets drive the very code the proxy runs.
pub fn prepare(parts: &mut Parts) {
    strip_hop_by_hop(&mut parts.headers);
    if parts.version == Version::HTTP_2 {
        if parts.uri.authority().is_none() {
            let authority = parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<http::uri::Authority>().ok());
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = authority.or(Some(http::uri::Authority::from_static("mesh")));
            if uri.path_and_query.is_none() {
                uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            parts.uri = Uri::from_parts(uri).unwrap_or_default();
        }
    } else if parts.uri.authority().is_some() {
        if !parts.headers.contains_key(http::header::HOST) {
            if let Some(authority) = parts.uri.authority() {
                if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                    parts.headers.insert(http::header::HOST, host);
                }
            }
        }
        let path = parts.uri.path_and_query().cloned();
        parts.uri = path.map_or_else(|| Uri::from_static("/"), Uri::from);
    }
}

/// Removes the headers that describe one connection only (RFC 9110
/// 7.6.1), including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    if let Some(connection) = headers.remove(http::header::CONNECTION) {
        if let Ok(names) = connection.to_str() {
            for name in names.split(',') {
                headers.remove(name.trim());
            }
        }
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "upgrade",
    ] {
        headers.remove(name);
    }
    headers.remove(http::header::TRANSFER_ENCODING);
    // `te: trailers` is what gRPC needs end to end; other values are
    // hop-by-hop.
    if headers
        .get(http::header::TE)
        .is_some_and(|v| v != "trailers")
    {
        headers.remove(http::header::TE);
    }
}

/// Applies an HTTPRoute `UrlRewrite` filter to a request: the new host
/// (header and URI authority) and path, keeping the query. Public for the
/// fuzz targets.
pub fn rewrite(
    parts: &mut Parts,
    hostname: Option<&http::uri::Authority>,
    path: Option<&PathRewrite>,
    prefix: Option<&str>,
) {
    if let Some(host) = hostname {
        if let Ok(value) = HeaderValue::from_str(host.as_str()) {
            parts.headers.insert(http::header::HOST, value);
        }
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        if uri.authority.is_some() {
            uri.authority = Some(host.clone());
        }
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
    }
    if let Some(path) = path {
        let new_path = rewritten_path(parts.uri.path(), path, prefix);
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = format!("{new_path}{query}").parse().ok();
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
    }
}

/// The path a `PathRewrite` makes of `path`; `prefix` is what the route's
/// `PathPrefix` match matched, which `ReplacePrefixMatch` replaces. Public
/// for the fuzz targets.
pub fn rewritten_path(path: &str, rewrite: &PathRewrite, prefix: Option<&str>) -> String {
    match rewrite {
        PathRewrite::ReplaceFullPath { replace_full_path } => replace_full_path.clone(),
        PathRewrite::ReplacePrefixMatch {
            replace_prefix_match,
        } => {
            let rest = prefix.and_then(|p| path.strip_prefix(p)).unwrap_or(path);
            let joined = format!(
                "{}/{}",
                replace_prefix_match.trim_end_matches('/'),
                rest.trim_start_matches('/')
            );
            if joined.len() > 1 && !rest.is_empty() {
                joined
            } else {
                let trimmed = joined.trim_end_matches('/');
                if trimmed.is_empty() {
                    "/".to_owned()
                } else {
                    trimmed.to_owned()
                }
            }
        }
    }
}

/// The `Location` of an HTTPRoute `RequestRedirect`: the request's URL
/// with the filter's scheme, host, port and path. Public for the fuzz
/// targets.
pub fn redirect_location(
    parts: &Parts,
    scheme: Option<&http::uri::Scheme>,
    hostname: Option<&str>,
    port: Option<u16>,
    path: Option<&PathRewrite>,
    prefix: Option<&str>,
) -> String {
    let host_header = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let (current_host, current_port) = match host_header.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h, Some(p)),
        _ => (host_header, None),
    };
    let scheme = scheme.map_or("http", |s| s.as_str());
    let host = hostname.unwrap_or(current_host);
    let port = port
        .map(|p| p.to_string())
        .or(current_port.map(str::to_owned));
    let new_path = path.map_or_else(
        || parts.uri.path().to_owned(),
        |p| rewritten_path(parts.uri.path(), p, prefix),
    );
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    match port {
        Some(p) => format!("{scheme}://{host}:{p}{new_path}{query}"),
        None => format!("{scheme}://{host}{new_path}{query}"),
    }
}

/// Sends a copy of a bodiless request to another service and drops the
/// answer; never delays or fails the original. The copy's destination is
/// picked as a request to that service would be (its LoadBalancing,
/// locality, or an ExternalService's host).
fn mirror(o: &Arc<Outbound>, view: &MeshView, key: &str, port: u16, parts: &Parts, d: &Dialled) {
    let Some(service) = view.service_by_key(key) else {
        return;
    };
    let out = o.policy(view).outbound(key);
    let to = match pick(service, out, o, parts, d) {
        Some((To::Endpoint(endpoint), _)) => Mirrored::Endpoint(endpoint.clone()),
        Some((To::External(external, vip), _)) => Mirrored::External(external.clone(), vip),
        None => return,
    };
    let mut copy = parts.clone();
    prepare(&mut copy);
    let req = Request::from_parts(copy, Either::Right(Full::new(Bytes::new())));
    let o = o.clone();
    tokio::spawn(async move {
        let to = match &to {
            Mirrored::Endpoint(endpoint) => To::Endpoint(endpoint),
            Mirrored::External(external, vip) => To::External(external, *vip),
        };
        let sent = send_to(
            &o,
            to,
            port,
            req,
            None,
            super::policy::DEFAULT_CONNECT_TIMEOUT,
        );
        match tokio::time::timeout(Duration::from_secs(5), sent).await {
            Ok(Ok((response, _))) => {
                let _ = response.into_body().collect().await;
            }
            Ok(Err(e)) => debug!(error = %e, "mirrored request failed"),
            Err(_) => debug!("mirrored request timed out"),
        }
    });
}

/// Where a mirrored copy goes, owned by its task.
enum Mirrored {
    Endpoint(Endpoint),
    External(External, IpAddr),
}

fn roll(percentage: u8) -> bool {
    percentage >= 100 || (percentage > 0 && fastrand::u8(0..100) < percentage)
}

fn version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// Runs `f` when dropped: undoes a count however the future ends
/// (including cancellation by a timeout).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrite_keeps_the_rest_of_the_path() {
        let r = PathRewrite::ReplacePrefixMatch {
            replace_prefix_match: "/v2".to_owned(),
        };
        assert_eq!(rewritten_path("/api/users", &r, Some("/api")), "/v2/users");
        assert_eq!(rewritten_path("/api", &r, Some("/api")), "/v2");
        let root = PathRewrite::ReplacePrefixMatch {
            replace_prefix_match: "/".to_owned(),
        };
        assert_eq!(rewritten_path("/api/users", &root, Some("/api")), "/users");
        assert_eq!(rewritten_path("/api", &root, Some("/api")), "/");
    }

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("keep-alive", HeaderValue::from_static("5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert!(h.get("x-kept").is_some());
    }
}
