//! The destination's side of L7: a caller's HBONE stream to an HTTP port,
//! served request by request. Each request is authorized against the
//! TrafficPermission rules for the caller's proven identity (deny wins,
//! default deny), rate limited, then handed to the workload on a pooled
//! connection, and counted and logged.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::{debug, info};
use weft_api::SpiffeId;

use super::access_log::Entry;
use super::outbound::{strip_hop_by_hop, LogHead, ResponseBody, TraceHead};
use super::response::{denied, local, rate_limited};
use super::trace::{SpanEnd, SpanKind};
use super::tunnel_io::TunnelIo;
use super::upstream::{is_h2, Key, SendError};
use crate::inbound::Inbound;
use crate::metrics::{Direction, HttpRequest, Label};

/// The caller's identity, as the workload may read it: set by the agent
/// from the caller's certificate (a value sent by the caller is replaced).
pub const PEER_IDENTITY_HEADER: &str = "x-weft-peer-identity";

/// Serves one caller's stream until it ends.
pub async fn serve(inbound: Arc<Inbound>, io: TunnelIo, peer: SpiffeId, target: SocketAddr) {
    let caller = Arc::new(Caller {
        label: peer.as_str().into(),
        header: http::HeaderValue::from_str(peer.as_str()).ok(),
        id: peer,
    });
    let drain = inbound.drain.clone();
    let closing = Arc::new(super::DrainClose::default());
    let on_drain = closing.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let inbound = inbound.clone();
        let caller = caller.clone();
        let closing = closing.clone();
        async move {
            let version = req.version();
            let mut response = handle(&inbound, req, &caller, target).await;
            closing.on_response(version, inbound.drain.is_draining(), &mut response);
            Ok::<_, Infallible>(response)
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let done = tokio::select! {
        done = conn.as_mut() => done,
        // The caller's next request then opens a stream to whoever serves
        // by then, rather than being cut at the drain deadline.
        () = drain.signaled() => {
            if on_drain.shut_down_now() {
                conn.as_mut().graceful_shutdown();
            }
            conn.await
        }
    };
    if let Err(e) = done {
        debug!(error = %e, "inbound HTTP stream ended with an error");
    }
}

/// The caller of a stream, in the forms each request needs.
struct Caller {
    id: SpiffeId,
    label: Label,
    header: Option<http::HeaderValue>,
}

async fn handle(
    i: &Arc<Inbound>,
    req: Request<Incoming>,
    caller: &Caller,
    target: SocketAddr,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let peer = &caller.id;
    let (mut parts, body) = req.into_parts();
    let view = i.view().load_full();
    let policy = view.policy(i.workload_label().as_str());
    // The server span: the application gets a trace header naming it.
    let tracer = policy.and_then(|p| p.trace.as_deref());
    let span = tracer.map(|t| t.start(&mut parts.headers, SpanKind::Server));
    let trace_head = match (tracer, &span) {
        (Some(t), Some(s)) if t.exports(s) => Some(TraceHead::of(&parts)),
        _ => None,
    };
    let head = policy
        .and_then(|p| p.inbound.access_log.as_ref())
        .map(|_| LogHead::of(&parts));
    let mut flag = "";
    let mut policy_name = "";
    let mut refused = None;
    if let Some(policy) = policy {
        let verdict = policy.inbound.request(peer, &parts);
        if !verdict.allowed() {
            info!(peer = %peer, method = %parts.method, path = parts.uri.path(), policy = verdict.policy(), "request denied");
            flag = "denied";
            policy_name = verdict.policy();
            refused = Some(denied(verdict.policy()));
        } else if let Some(limit) = policy.inbound.limit(peer) {
            if let Some(http) = &limit.http {
                if let Err(wait) = http.bucket.take() {
                    info!(peer = %peer, policy = %limit.policy, "request over the RateLimit");
                    flag = "rate_limited";
                    policy_name = &limit.policy;
                    refused = Some(rate_limited(http, wait));
                }
            }
        }
    }
    let response = match refused {
        Some(r) => r,
        None => {
            strip_hop_by_hop(&mut parts.headers);
            match &caller.header {
                Some(value) => parts.headers.insert(PEER_IDENTITY_HEADER, value.clone()),
                None => parts.headers.remove(PEER_IDENTITY_HEADER),
            };
            match forward(i, Request::from_parts(parts, Either::Left(body)), target).await {
                Ok(mut r) => {
                    // The workload's `connection: close` is about its own
                    // connection to this agent, not the caller's stream.
                    strip_hop_by_hop(r.headers_mut());
                    r.map(Either::Left)
                }
                Err(e) => {
                    info!(peer = %peer, %target, error = %e, "workload did not answer");
                    flag = "upstream_failed";
                    local(
                        StatusCode::BAD_GATEWAY,
                        "upstream_failed",
                        "the workload did not answer",
                    )
                }
            }
        }
    };
    let status = response.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    let metrics = i.metrics();
    metrics.http_request(&HttpRequest {
        direction: Direction::Inbound,
        source: &caller.label,
        destination: i.workload_label(),
        route: &Label::empty(),
        status,
        grpc_status: crate::metrics::grpc_status(response.headers()),
        seconds,
    });
    if !flag.is_empty() {
        metrics.http_local(Direction::Inbound, flag, policy_name);
    }
    if let (Some(tracer), Some(span)) = (tracer, span) {
        let head = trace_head.unwrap_or_default();
        tracer.finish(
            span,
            &SpanEnd {
                method: &head.method,
                path: &head.path,
                route: "",
                status,
                flag,
                source: peer.as_str(),
                destination: i.workload_label().as_str(),
                service: "",
            },
        );
    }
    if let (Some(log), Some(head)) = (policy.and_then(|p| p.inbound.access_log.as_ref()), head) {
        log.record(&Entry {
            direction: "inbound",
            start_time: rfc3339_now(),
            source: peer.as_str(),
            destination: i.workload_label().as_str(),
            route: "",
            method: head.method.as_str(),
            path: &head.path,
            authority: &head.authority,
            protocol: if head.version == http::Version::HTTP_2 {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            status,
            duration_ms: seconds * 1000.0,
            upstream: "",
            flag,
        });
    }
    response
}

/// Hands a request to the local workload on a pooled connection.
async fn forward(
    i: &Arc<Inbound>,
    req: Request<super::Body>,
    target: SocketAddr,
) -> Result<Response<super::upstream::PooledBody>, SendError> {
    let key = Key {
        authority: target,
        agent: None,
        h2: is_h2(req.version()),
    };
    let timeout = i.connect_timeout();
    let connect = || async move {
        let tcp = i
            .local()
            .connect(target, timeout)
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    };
    i.upstreams().send(key, req, connect).await
}

/// The time now as RFC 3339 in UTC with milliseconds, for access logs.
pub fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}
