//! The policies of the local workload in the form the data path uses:
//! matchers compiled, token buckets made, routes resolved to service keys.
//! Built once per view (a bad policy is refused with the view, by field),
//! read lock-free by every connection and request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use weft_api::policy::compiled::{CompiledRoute, OutboundConf, WorkloadPolicy};
use weft_api::policy::conf::{
    AccessLogConf, Action, Algorithm, Backoff, HttpFault, HttpRateLimit, RetryOn, RouteFilter,
};
use weft_api::{PeerMatch, SpiffeId};

use super::access_log::AccessLog;
use super::matcher::{any_matches, MatchError, RequestMatch};
use super::rate_limit::Bucket;

/// Why a compiled policy cannot be used: the field and the reason, so the
/// Nack names it.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    /// The path inside the workload's policy, e.g. `inbound.permissions[2].http[0]`.
    pub field: String,
    /// Why.
    pub reason: String,
}

fn bad(field: String, e: impl std::fmt::Display) -> PolicyError {
    PolicyError {
        field,
        reason: e.to_string(),
    }
}

/// The decision on a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Let in, by this policy's rule.
    Allow(&'a str),
    /// Refused by this policy's Deny rule.
    Deny(&'a str),
    /// Refused: no rule allows it (default deny).
    NoMatch,
}

impl<'a> Verdict<'a> {
    /// Whether the call goes on.
    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Allow(_))
    }

    /// The policy behind the decision, for logs and metrics.
    pub fn policy(self) -> &'a str {
        match self {
            Verdict::Allow(p) | Verdict::Deny(p) => p,
            Verdict::NoMatch => "",
        }
    }
}

struct Permission {
    policy: String,
    from: Vec<PeerMatch>,
    action: Action,
    http: Vec<RequestMatch>,
}

impl Permission {
    fn caller_matches(&self, peer: &SpiffeId) -> bool {
        self.from.iter().any(|m| m.matches(peer))
    }
}

/// A server-side rate limit for the callers `from` matches.
pub struct InboundLimit {
    /// The policy it comes from.
    pub policy: String,
    from: Vec<PeerMatch>,
    /// Requests, if limited.
    pub http: Option<Arc<HttpLimit>>,
    /// New connections, if limited.
    pub tcp: Option<Arc<Bucket>>,
}

/// A request rate limit with the answer over it.
pub struct HttpLimit {
    /// The bucket.
    pub bucket: Bucket,
    /// The status of the answer over the limit.
    pub status: http::StatusCode,
    /// Headers of the answer over the limit.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// Inbound policy of the workload.
#[derive(Default)]
pub struct Inbound {
    permissions: Vec<Permission>,
    limits: Vec<InboundLimit>,
    /// Access log of calls in, if configured.
    pub access_log: Option<Arc<AccessLog>>,
}

impl Inbound {
    /// Whether a caller may open a connection (L4). On a TCP port, only
    /// rules without `http` count. On an HTTP port the connection is let
    /// in unless a rule without `http` denies the caller: each request is
    /// then decided by [`Inbound::request`], and one that nothing allows
    /// gets a `403` naming why rather than a reset.
    pub fn connection(&self, peer: &SpiffeId, http_port: bool) -> Verdict<'_> {
        let applicable = |p: &&Permission| p.caller_matches(peer);
        if let Some(p) = self
            .permissions
            .iter()
            .filter(applicable)
            .find(|p| p.action == Action::Deny && p.http.is_empty())
        {
            return Verdict::Deny(&p.policy);
        }
        if http_port {
            return Verdict::Allow("");
        }
        match self
            .permissions
            .iter()
            .filter(applicable)
            .find(|p| p.action == Action::Allow && p.http.is_empty())
        {
            Some(p) => Verdict::Allow(&p.policy),
            None => Verdict::NoMatch,
        }
    }

    /// Whether a caller's HTTP request may go on: deny wins over allow, and
    /// what no rule allows is refused.
    pub fn request(&self, peer: &SpiffeId, req: &http::request::Parts) -> Verdict<'_> {
        let mut allowed = None;
        for p in &self.permissions {
            if !p.caller_matches(peer) || !any_matches(&p.http, req) {
                continue;
            }
            match p.action {
                Action::Deny => return Verdict::Deny(&p.policy),
                Action::Allow => allowed = allowed.or(Some(p.policy.as_str())),
            }
        }
        allowed.map_or(Verdict::NoMatch, Verdict::Allow)
    }

    /// The rate limit for a caller: the first rule whose `from` matches.
    pub fn limit(&self, peer: &SpiffeId) -> Option<&InboundLimit> {
        self.limits
            .iter()
            .find(|l| l.from.iter().any(|m| m.matches(peer)))
    }
}

/// A backend of a route: a service by key, with its weight.
#[derive(Debug, Clone)]
pub struct Backend {
    /// `<namespace>/<name>`.
    pub key: String,
    /// The port; `None`: the one dialled.
    pub port: Option<u16>,
    /// Its share.
    pub weight: u32,
}

/// A compiled HTTPRoute rule.
pub struct Route {
    /// The HTTPRoute's name, the `route` label of metrics.
    pub policy: crate::metrics::Label,
    /// Any of these matches the request (none: every request).
    pub matches: Vec<RequestMatch>,
    /// Filters, in order.
    pub filters: Vec<Filter>,
    /// Where requests go, by weight; empty: the destination dialled.
    pub backends: Vec<Backend>,
    /// In `u64`: the sum of `u32` weights overflows `u32`.
    total_weight: u64,
}

impl Route {
    /// Picks a backend by weight; `None`: the destination dialled.
    pub fn pick_backend(&self) -> Option<&Backend> {
        if self.backends.is_empty() || self.total_weight == 0 {
            return None;
        }
        let mut n = fastrand::u64(0..self.total_weight);
        for b in &self.backends {
            if n < u64::from(b.weight) {
                return Some(b);
            }
            n -= u64::from(b.weight);
        }
        self.backends.last()
    }

    /// The prefix matched by the first `PathPrefix` match that matches,
    /// for `ReplacePrefixMatch`.
    pub fn matched_prefix(&self, req: &http::request::Parts) -> Option<&str> {
        self.matches
            .iter()
            .find(|m| m.matches(req))
            .and_then(RequestMatch::path_prefix)
    }
}

/// Retries of one destination.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Retries after the first attempt.
    pub num_retries: u32,
    /// Each attempt's own limit.
    pub per_try_timeout: Option<Duration>,
    /// The conditions.
    pub retry_on: Vec<RetryOn>,
    /// Status codes for `RetriableStatusCodes`.
    pub codes: Vec<u16>,
    /// Waits between attempts.
    pub backoff: (Duration, Duration),
    /// Retries in flight at most this share of requests in flight...
    pub budget_percent: u32,
    /// ...or this many.
    pub budget_min: u32,
}

/// Outbound policy for one destination.
pub struct Outbound {
    /// HTTPRoute rules, first match wins.
    pub routes: Vec<Route>,
    /// Connecting to an endpoint.
    pub connect_timeout: Duration,
    /// A request, retries included; `None`: no limit.
    pub request_timeout: Option<Duration>,
    /// A connection without traffic.
    pub idle_timeout: Duration,
    /// Retries, if any.
    pub retry: Option<Retry>,
    /// Client-side request limit.
    pub rate_limit: Option<Arc<HttpLimit>>,
    /// Faults to inject.
    pub faults: Vec<HttpFault>,
    /// How endpoints are picked.
    pub algorithm: Algorithm,
    /// Whether picks keep to the nearest locality tier with a usable
    /// endpoint (LoadBalancing `localityAware`).
    pub locality_aware: bool,
    /// Access log of calls out, if configured.
    pub access_log: Option<Arc<AccessLog>>,
    /// Requests in flight, for the retry budget.
    pub in_flight: AtomicU32,
    /// Retries in flight, for the retry budget.
    pub retries_in_flight: AtomicU32,
    /// CircuitBreaker limits and outlier detection.
    pub breaker: crate::resilience::Breaker,
    /// Active health checks of the destination's endpoints, if any.
    pub health_check: Option<crate::resilience::HealthCheck>,
}

impl Outbound {
    /// Whether one more retry fits the budget: retries in flight stay
    /// under `percent` of requests in flight, or under `min`.
    pub fn retry_allowed(&self, retry: &Retry) -> bool {
        let retries = self.retries_in_flight.load(Ordering::Relaxed);
        if retries < retry.budget_min {
            return true;
        }
        let requests = self.in_flight.load(Ordering::Relaxed);
        u64::from(retries) * 100 < u64::from(requests) * u64::from(retry.budget_percent)
    }

    /// The first route whose matches take the request.
    pub fn route(&self, req: &http::request::Parts) -> Option<&Route> {
        self.routes.iter().find(|r| any_matches(&r.matches, req))
    }
}

/// Timeouts when the policies set none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// See [`DEFAULT_CONNECT_TIMEOUT`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// See [`DEFAULT_CONNECT_TIMEOUT`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The local workload's policies, ready for the data path.
pub struct Policy {
    /// Calls in.
    pub inbound: Inbound,
    defaults: Arc<Outbound>,
    outbound: HashMap<String, Arc<Outbound>>,
    /// TCPRoutes by destination service key (L4 connections).
    tcp_routes: HashMap<String, TcpRoute>,
    /// Tracing of HTTP requests in and out; `None`: no Trace applies and
    /// trace headers are left alone.
    pub trace: Option<Arc<super::trace::Tracer>>,
}

/// A TCPRoute in force for one destination service.
pub struct TcpRoute {
    /// The TCPRoute's name, for logs.
    pub policy: String,
    backends: Vec<Backend>,
    total_weight: u32,
}

impl TcpRoute {
    /// Picks a backend service by weight (validation keeps the total above 0;
    /// `None` if it is not).
    pub fn pick_backend(&self) -> Option<&Backend> {
        if self.total_weight == 0 {
            return None;
        }
        let mut n = fastrand::u32(0..self.total_weight);
        for b in &self.backends {
            if n < b.weight {
                return Some(b);
            }
            n -= b.weight;
        }
        self.backends.last()
    }
}

impl Policy {
    /// Compiles the policy the zone (or the static config) gave for the
    /// workload; `logs` shares access log files between views so that a
    /// new view does not reopen them.
    pub fn compile(
        p: &WorkloadPolicy,
        logs: &super::access_log::Files,
    ) -> Result<Self, PolicyError> {
        let inbound = compile_inbound(p, logs)?;
        let defaults = Arc::new(compile_outbound(
            &p.outbound_defaults,
            "outboundDefaults",
            logs,
        )?);
        let mut outbound = HashMap::with_capacity(p.outbound.len());
        for key in p.outbound.keys() {
            let conf = p.outbound_for(key);
            let field = format!("outbound[{key:?}]");
            outbound.insert(
                key.clone(),
                Arc::new(compile_outbound(&conf, &field, logs)?),
            );
        }
        let mut tcp_routes = HashMap::new();
        for (key, conf) in &p.outbound {
            let Some(route) = &conf.tcp_route else {
                continue;
            };
            let backends: Vec<Backend> = route
                .backend_refs
                .iter()
                .map(|b| Backend {
                    key: format!("{}/{}", b.namespace, b.name),
                    port: b.port,
                    weight: b.weight,
                })
                .collect();
            let total_weight = backends.iter().map(|b| b.weight).sum();
            tcp_routes.insert(
                key.clone(),
                TcpRoute {
                    policy: route.policy.clone(),
                    backends,
                    total_weight,
                },
            );
        }
        let trace = super::trace::Tracer::new(&p.trace, &p.workload)
            .map_err(|e| bad("trace".to_owned(), e))?
            .map(Arc::new);
        Ok(Policy {
            inbound,
            defaults,
            outbound,
            tcp_routes,
            trace,
        })
    }

    /// The outbound settings when no policy is known at all (a static
    /// config without `policy`): the defaults of every field.
    pub fn unconfigured() -> Result<Self, PolicyError> {
        // The empty policy has no field to get wrong; a failure here is a
        // bug in the defaults, reported at start rather than per request.
        Policy::compile(
            &WorkloadPolicy::default(),
            &super::access_log::Files::default(),
        )
    }

    /// The TCPRoute for connections to service `<namespace>/<name>`, if any.
    pub fn tcp_route(&self, key: &str) -> Option<&TcpRoute> {
        self.tcp_routes.get(key)
    }

    /// The outbound policy for calls to service `<namespace>/<name>`.
    pub fn outbound(&self, key: &str) -> &Arc<Outbound> {
        self.outbound.get(key).unwrap_or(&self.defaults)
    }
}

fn compile_inbound(
    p: &WorkloadPolicy,
    logs: &super::access_log::Files,
) -> Result<Inbound, PolicyError> {
    let mut permissions = Vec::with_capacity(p.inbound.permissions.len());
    for (i, rule) in p.inbound.permissions.iter().enumerate() {
        let http = compile_matches(&rule.http, &format!("inbound.permissions[{i}].http"))?;
        permissions.push(Permission {
            policy: rule.policy.clone(),
            from: rule.from.clone(),
            action: rule.action,
            http,
        });
    }
    let mut limits = Vec::with_capacity(p.inbound.rate_limits.len());
    for (i, rule) in p.inbound.rate_limits.iter().enumerate() {
        let field = format!("inbound.rateLimits[{i}].default");
        limits.push(InboundLimit {
            policy: rule.policy.clone(),
            from: rule.from.clone(),
            http: rule
                .default
                .http
                .as_ref()
                .map(|h| http_limit(h, &format!("{field}.http")))
                .transpose()?,
            tcp: rule
                .default
                .tcp
                .as_ref()
                .map(|t| Arc::new(Bucket::new(t.connections, t.interval.as_std()))),
        });
    }
    Ok(Inbound {
        permissions,
        limits,
        access_log: access_log(&p.inbound.access_log, "inbound.accessLog", logs)?,
    })
}

fn compile_matches(
    matches: &[weft_api::policy::conf::HttpMatch],
    field: &str,
) -> Result<Vec<RequestMatch>, PolicyError> {
    matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            RequestMatch::compile(m).map_err(|e: MatchError| bad(format!("{field}[{i}]"), e))
        })
        .collect()
}

fn http_limit(h: &HttpRateLimit, field: &str) -> Result<Arc<HttpLimit>, PolicyError> {
    let (status, extra) = match &h.on_rate_limit {
        Some(on) => (on.status, on.headers.as_slice()),
        None => (429, &[][..]),
    };
    let status = http::StatusCode::from_u16(status)
        .map_err(|e| bad(format!("{field}.onRateLimit.status"), e))?;
    let mut headers = Vec::with_capacity(extra.len());
    for (i, h) in extra.iter().enumerate() {
        let f = format!("{field}.onRateLimit.headers[{i}]");
        let name =
            http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| bad(f.clone(), e))?;
        let value = http::HeaderValue::from_str(&h.value).map_err(|e| bad(f, e))?;
        headers.push((name, value));
    }
    Ok(Arc::new(HttpLimit {
        bucket: Bucket::new(h.requests, h.interval.as_std()),
        status,
        headers,
    }))
}

fn access_log(
    conf: &AccessLogConf,
    field: &str,
    logs: &super::access_log::Files,
) -> Result<Option<Arc<AccessLog>>, PolicyError> {
    match conf.backends.as_deref() {
        None | Some([]) => Ok(None),
        Some(backends) => AccessLog::new(backends, logs)
            .map(|l| Some(Arc::new(l)))
            .map_err(|e| bad(format!("{field}.backends"), e)),
    }
}

fn compile_outbound(
    conf: &OutboundConf,
    field: &str,
    logs: &super::access_log::Files,
) -> Result<Outbound, PolicyError> {
    let mut routes = Vec::with_capacity(conf.routes.len());
    for (i, CompiledRoute { policy, rule }) in conf.routes.iter().enumerate() {
        let at = format!("{field}.routes[{i}]");
        let backends: Vec<Backend> = rule
            .default
            .backend_refs
            .iter()
            .map(|b| Backend {
                key: format!("{}/{}", b.namespace, b.name),
                port: b.port,
                weight: b.weight,
            })
            .collect();
        routes.push(Route {
            policy: policy.as_str().into(),
            matches: compile_matches(&rule.matches, &format!("{at}.matches"))?,
            filters: rule
                .default
                .filters
                .iter()
                .enumerate()
                .map(|(j, filter)| compile_filter(filter, &format!("{at}.default.filters[{j}]")))
                .collect::<Result<_, _>>()?,
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
            backends,
        });
    }
    let t = &conf.timeout;
    let request_timeout = match t.request_timeout {
        None => Some(DEFAULT_REQUEST_TIMEOUT),
        Some(d) if d.as_std().is_zero() => None,
        Some(d) => Some(d.as_std()),
    };
    let r = &conf.retry;
    let retry = match r.num_retries {
        None | Some(0) => None,
        Some(n) => {
            let backoff = r.backoff.clone().unwrap_or(Backoff {
                base_interval: std::time::Duration::from_millis(25).into(),
                max_interval: std::time::Duration::from_millis(250).into(),
            });
            Some(Retry {
                num_retries: n.min(10),
                per_try_timeout: r.per_try_timeout.map(|d| d.as_std()),
                retry_on: r.retry_on.clone().unwrap_or_else(|| {
                    vec![
                        RetryOn::ConnectFailure,
                        RetryOn::Reset,
                        RetryOn::GatewayError,
                    ]
                }),
                codes: r.retriable_status_codes.clone().unwrap_or_default(),
                backoff: (
                    backoff.base_interval.as_std(),
                    backoff.max_interval.as_std(),
                ),
                budget_percent: r.budget.as_ref().map_or(20, |b| b.percent),
                budget_min: r.budget.as_ref().map_or(3, |b| b.min_retry_concurrency),
            })
        }
    };
    Ok(Outbound {
        routes,
        connect_timeout: t
            .connect_timeout
            .map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.as_std()),
        request_timeout,
        idle_timeout: t.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.as_std()),
        retry,
        rate_limit: conf
            .rate_limit
            .http
            .as_ref()
            .map(|h| http_limit(h, &format!("{field}.rateLimit.http")))
            .transpose()?,
        faults: conf.fault.http.clone().unwrap_or_default(),
        algorithm: conf
            .load_balancing
            .algorithm
            .clone()
            .unwrap_or(Algorithm::RoundRobin),
        locality_aware: conf.load_balancing.locality_aware(),
        access_log: access_log(&conf.access_log, &format!("{field}.accessLog"), logs)?,
        in_flight: AtomicU32::new(0),
        retries_in_flight: AtomicU32::new(0),
        breaker: crate::resilience::Breaker::from_conf(&conf.circuit_breaker),
        health_check: crate::resilience::HealthCheck::from_conf(&conf.health_check),
    })
}

/// Header changes of a filter, ready to apply.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    /// Set, replacing any value.
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Added beside existing values.
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Removed.
    pub remove: Vec<http::HeaderName>,
}

impl HeaderEdits {
    /// Applies the changes to a header map.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// An HTTPRoute filter, ready to apply.
#[derive(Debug, Clone)]
pub enum Filter {
    /// Request header changes.
    RequestHeaders(HeaderEdits),
    /// Response header changes.
    ResponseHeaders(HeaderEdits),
    /// Host and path rewrite.
    Rewrite {
        /// New authority.
        hostname: Option<http::uri::Authority>,
        /// New path.
        path: Option<weft_api::policy::conf::PathRewrite>,
    },
    /// A redirect answer.
    Redirect {
        /// New scheme.
        scheme: Option<http::uri::Scheme>,
        /// New host.
        hostname: Option<String>,
        /// New port.
        port: Option<u16>,
        /// New path.
        path: Option<weft_api::policy::conf::PathRewrite>,
        /// 301, 302, 303, 307 or 308.
        status: http::StatusCode,
    },
    /// Copies to another service.
    Mirror {
        /// The service's key.
        key: String,
        /// Its port; `None`: the one dialled.
        port: Option<u16>,
        /// The share copied.
        percentage: u8,
    },
}

fn header_pairs(
    values: &[weft_api::policy::conf::HeaderValue],
    field: &str,
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, PolicyError> {
    values
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let f = format!("{field}[{i}]");
            let name = http::HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|e| bad(format!("{f}.name"), e))?;
            let value =
                http::HeaderValue::from_str(&h.value).map_err(|e| bad(format!("{f}.value"), e))?;
            Ok((name, value))
        })
        .collect()
}

fn header_edits(
    set: &[weft_api::policy::conf::HeaderValue],
    add: &[weft_api::policy::conf::HeaderValue],
    remove: &[String],
    field: &str,
) -> Result<HeaderEdits, PolicyError> {
    Ok(HeaderEdits {
        set: header_pairs(set, &format!("{field}.set"))?,
        add: header_pairs(add, &format!("{field}.add"))?,
        remove: remove
            .iter()
            .enumerate()
            .map(|(i, n)| {
                http::HeaderName::from_bytes(n.as_bytes())
                    .map_err(|e| bad(format!("{field}.remove[{i}]"), e))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn compile_filter(f: &RouteFilter, field: &str) -> Result<Filter, PolicyError> {
    Ok(match f {
        RouteFilter::RequestHeaderModifier { set, add, remove } => {
            Filter::RequestHeaders(header_edits(set, add, remove, field)?)
        }
        RouteFilter::ResponseHeaderModifier { set, add, remove } => {
            Filter::ResponseHeaders(header_edits(set, add, remove, field)?)
        }
        RouteFilter::UrlRewrite { hostname, path } => Filter::Rewrite {
            hostname: hostname
                .as_deref()
                .map(|h| h.parse().map_err(|e| bad(format!("{field}.hostname"), e)))
                .transpose()?,
            path: path.clone(),
        },
        RouteFilter::RequestRedirect {
            scheme,
            hostname,
            port,
            path,
            status_code,
        } => Filter::Redirect {
            scheme: scheme
                .as_deref()
                .map(|s| s.parse().map_err(|e| bad(format!("{field}.scheme"), e)))
                .transpose()?,
            hostname: hostname.clone(),
            port: *port,
            path: path.clone(),
            status: match *status_code {
                301 | 302 | 303 | 307 | 308 => http::StatusCode::from_u16(*status_code)
                    .map_err(|e| bad(format!("{field}.statusCode"), e))?,
                other => {
                    return Err(bad(
                        format!("{field}.statusCode"),
                        format!("{other} is not a redirect status (301, 302, 303, 307, 308)"),
                    ))
                }
            },
        },
        RouteFilter::RequestMirror {
            backend_ref,
            percentage,
        } => Filter::Mirror {
            key: format!("{}/{}", backend_ref.namespace, backend_ref.name),
            port: backend_ref.port,
            percentage: *percentage,
        },
    })
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("permissions", &self.inbound.permissions.len())
            .field("destinations", &self.outbound.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        let p: WorkloadPolicy = yaml_serde::from_str(yaml).unwrap();
        Policy::compile(&p, &super::super::access_log::Files::default()).unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn get(path: &str) -> http::request::Parts {
        http::Request::get(path).body(()).unwrap().into_parts().0
    }

    const RULES: &str = "
workload: api
inbound:
  permissions:
  - { policy: web-reads, from: [ 'spiffe://td/ns/default/sa/web' ], action: Allow,
      http: [ { method: GET } ] }
  - { policy: ops, from: [ 'spiffe://td/ns/ops/*' ], action: Allow }
  - { policy: no-admin, from: [ 'spiffe://td/*' ], action: Deny,
      http: [ { path: { type: PathPrefix, value: /admin } } ] }
  - { policy: banned, from: [ 'spiffe://td/ns/default/sa/bad' ], action: Deny }
";

    #[test]
    fn deny_wins_and_nothing_allowed_is_refused() {
        let p = policy(RULES);
        let web = id("spiffe://td/ns/default/sa/web");
        let ops = id("spiffe://td/ns/ops/sa/x");
        assert_eq!(
            p.inbound.request(&web, &get("/x")),
            Verdict::Allow("web-reads")
        );
        assert_eq!(
            p.inbound.request(&web, &get("/admin/x")),
            Verdict::Deny("no-admin")
        );
        assert_eq!(
            p.inbound.request(&ops, &get("/admin")),
            Verdict::Deny("no-admin")
        );
        let post = http::Request::post("/x").body(()).unwrap().into_parts().0;
        assert_eq!(p.inbound.request(&web, &post), Verdict::NoMatch);
        assert_eq!(
            p.inbound
                .request(&id("spiffe://other/ns/a/sa/b"), &get("/")),
            Verdict::NoMatch
        );
    }

    #[test]
    fn connections_count_only_rules_without_http_on_tcp_ports() {
        let p = policy(RULES);
        let web = id("spiffe://td/ns/default/sa/web");
        // web is allowed only for some requests: no TCP, but HTTP is let in.
        assert_eq!(p.inbound.connection(&web, false), Verdict::NoMatch);
        assert!(p.inbound.connection(&web, true).allowed());
        assert_eq!(
            p.inbound.connection(&id("spiffe://td/ns/ops/sa/x"), false),
            Verdict::Allow("ops")
        );
        // A deny without http refuses the connection on every port.
        let bad = id("spiffe://td/ns/default/sa/bad");
        assert_eq!(p.inbound.connection(&bad, true), Verdict::Deny("banned"));
        assert_eq!(p.inbound.connection(&bad, false), Verdict::Deny("banned"));
    }

    #[test]
    fn destination_settings_override_the_defaults_field_by_field() {
        let p = policy(
            "
workload: web
outboundDefaults: { timeout: { requestTimeout: 2s, connectTimeout: 1s }, retry: { numRetries: 1 } }
outbound:
  default/api: { timeout: { requestTimeout: 0s } }
",
        );
        let api = p.outbound("default/api");
        assert_eq!(api.request_timeout, None, "0s turns the limit off");
        assert_eq!(api.connect_timeout, Duration::from_secs(1));
        assert_eq!(api.retry.as_ref().map(|r| r.num_retries), Some(1));
        let other = p.outbound("default/other");
        assert_eq!(other.request_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn a_bad_header_name_is_refused_with_its_field() {
        let p: WorkloadPolicy = yaml_serde::from_str(
            "
workload: web
outbound:
  default/api:
    routes:
    - policy: r
      rule: { default: { filters: [ { type: RequestHeaderModifier, set: [ { name: 'bad header', value: x } ] } ] } }
",
        )
        .unwrap();
        let err = Policy::compile(&p, &super::super::access_log::Files::default()).unwrap_err();
        assert_eq!(
            err.field,
            "outbound[\"default/api\"].routes[0].default.filters[0].set[0].name"
        );
    }

    /// Found by the `policy_compile` fuzz target: backend weights whose sum
    /// overflows `u32` made compiling the policy panic.
    #[test]
    fn weights_summing_past_u32_compile_and_pick() {
        let json = r#"{"workload": "w", "outboundDefaults": {"routes": [{"policy": "p",
            "rule": {"default": {"backendRefs": [
                {"name": "a", "weight": 4294967295}, {"name": "b", "weight": 1}]}}}]}}"#;
        let p: WorkloadPolicy = serde_json::from_str(json).unwrap();
        let compiled = Policy::compile(&p, &super::super::access_log::Files::default()).unwrap();
        let route = &compiled.outbound("default/any").routes[0];
        assert_eq!(route.total_weight, 1 << 32);
        for _ in 0..100 {
            assert!(route.pick_backend().is_some());
        }
    }
}
