//! L7: HTTP/1.1, HTTP/2 and gRPC parsed by the agent on ports declared
//! `http`, so that policies act per request with no extra proxy hop. On the
//! caller's side ([`outbound`]) the agent routes, retries, times out,
//! limits, injects faults and balances load; on the destination's side
//! ([`inbound`]) it authorizes each request, limits and logs it, then hands
//! it to the workload.

pub mod access_log;
pub mod inbound;
pub mod matcher;
pub mod outbound;
pub mod policy;
pub mod rate_limit;
pub mod response;
pub mod trace;
pub mod tunnel_io;
pub mod upstream;

use bytes::Bytes;
use http_body_util::{Either, Full};

/// A request or response body: streamed from a peer, or made whole by the
/// agent (its own answers, and request bodies buffered for retries).
pub type Body = Either<hyper::body::Incoming, Full<Bytes>>;

/// Keeps a timer due within half a second at all times.
///
/// Every HTTP request arms its request timeout (15 s by default). Tokio
/// wakes its driver through an eventfd write whenever a timer is armed
/// earlier than the driver's next planned wake-up; on an otherwise idle
/// timer wheel that is every request, a system call and a wake-up each.
/// With this tick the next wake-up is never far, so request timeouts are
/// armed without waking anyone: two wake-ups a second instead of one per
/// request.
pub async fn keep_timer_wheel_warm() {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// How an HTTP server connection of the agent ends when the agent drains
/// (SIGTERM, or a handoff to a new process) without cutting a request.
/// HTTP/2 gets GOAWAY at once: its in-flight streams finish and the caller
/// opens new ones elsewhere. HTTP/1.1 is not closed while idle, since a
/// request may be on its way (the keep-alive race); instead the next
/// response says `Connection: close`.
#[derive(Default)]
pub struct DrainClose {
    h2: std::sync::atomic::AtomicBool,
}

impl DrainClose {
    /// Notes the request's version and, while draining, marks an HTTP/1.1
    /// response as the connection's last.
    pub fn on_response<B>(
        &self,
        version: http::Version,
        draining: bool,
        response: &mut http::Response<B>,
    ) {
        use std::sync::atomic::Ordering;
        if version == http::Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        } else if draining {
            response.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
    }

    /// Whether the connection may be shut down gracefully now (HTTP/2).
    pub fn shut_down_now(&self) -> bool {
        self.h2.load(std::sync::atomic::Ordering::Relaxed)
    }
}
