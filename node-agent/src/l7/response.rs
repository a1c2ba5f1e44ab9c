//! The answers the agent gives itself, instead of the destination's: each
//! says which policy decided, in a header and in the body, so that a
//! person reading a `403` knows where to look.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

/// The header naming why the agent answered itself.
pub const FLAG_HEADER: &str = "x-weft-flag";

/// An answer of the agent's own: `flag` goes in [`FLAG_HEADER`], `detail`
/// in the body.
pub fn local<B>(
    status: StatusCode,
    flag: &'static str,
    detail: &str,
) -> Response<Either<B, Full<Bytes>>> {
    let mut body = String::with_capacity(detail.len() + 1);
    body.push_str(detail);
    body.push('\n');
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(FLAG_HEADER, HeaderValue::from_static(flag));
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `403`, naming the policy when one denied (none: nothing allowed it).
pub fn denied<B>(policy: &str) -> Response<Either<B, Full<Bytes>>> {
    let detail = if policy.is_empty() {
        "denied: no TrafficPermission allows this caller".to_owned()
    } else {
        format!("denied by TrafficPermission {policy}")
    };
    local(StatusCode::FORBIDDEN, "denied", &detail)
}

/// Over a rate limit: the configured status and headers, and
/// `retry-after` in whole seconds (at least 1).
pub fn rate_limited<B>(
    limit: &super::policy::HttpLimit,
    wait: Duration,
) -> Response<Either<B, Full<Bytes>>> {
    let mut response = local(
        limit.status,
        "rate_limited",
        "rate limited by RateLimit policy",
    );
    let headers = response.headers_mut();
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    for (name, value) in &limit.headers {
        headers.insert(name.clone(), value.clone());
    }
    response
}
