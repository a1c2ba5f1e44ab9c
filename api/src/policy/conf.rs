//! The `default` blocks of the policy kinds: what a policy sets, field by
//! field. Every field is optional so that several policies can be merged
//! ([`Merge`]): the less specific first, each more specific one replacing
//! only the fields it sets.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// Field-by-field merging of `default` blocks: `over`'s set fields replace
/// this block's.
pub trait Merge {
    /// Applies `over` (the more specific block) on top of `self`.
    fn merge(&mut self, over: &Self);
}

macro_rules! merge_fields {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl Merge for $ty {
            fn merge(&mut self, over: &Self) {
                $(
                    if over.$field.is_some() {
                        self.$field.clone_from(&over.$field);
                    }
                )*
            }
        }
    };
}

/// What a TrafficPermission rule does with the callers it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Action {
    /// Let the connection or request in (unless a Deny also matches).
    Allow,
    /// Refuse it: a reset connection at L4, `403` at L7. Deny wins over Allow.
    Deny,
}

/// A TrafficPermission rule's `default` block.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PermissionConf {
    /// `Allow` or `Deny`.
    pub action: Action,
    /// Restricts the rule to these HTTP requests (any of them); empty:
    /// every connection and request. A rule with `http` applies only on
    /// HTTP ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpMatch>,
}

/// Which HTTP requests something applies to: all of the fields set must
/// match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    /// The request path (without the query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The request method, uppercase (`GET`, `POST`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Request headers, all of which must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Query parameters, all of which must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryMatch>,
}

/// How a request path is matched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum PathMatch {
    /// The path equals `value`.
    Exact {
        /// The whole path, starting with `/`.
        value: String,
    },
    /// The path is `value` or starts with `value` followed by `/`
    /// (`/api` matches `/api` and `/api/x`, not `/apix`).
    PathPrefix {
        /// The prefix, starting with `/`.
        value: String,
    },
    /// The whole path matches the regular expression (RE2 syntax).
    RegularExpression {
        /// The expression, anchored at both ends.
        value: String,
    },
}

/// How a request header is matched (names are case-insensitive).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum HeaderMatch {
    /// The header's value equals `value`.
    Exact {
        /// The header name.
        name: String,
        /// The value.
        value: String,
    },
    /// The header's value starts with `value`.
    Prefix {
        /// The header name.
        name: String,
        /// The prefix.
        value: String,
    },
    /// The header's whole value matches the regular expression.
    RegularExpression {
        /// The header name.
        name: String,
        /// The expression, anchored at both ends.
        value: String,
    },
    /// The header is present, whatever its value.
    Present {
        /// The header name.
        name: String,
    },
    /// The header is absent.
    Absent {
        /// The header name.
        name: String,
    },
}

/// How a query parameter is matched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum QueryMatch {
    /// The parameter's value equals `value`.
    Exact {
        /// The parameter name.
        name: String,
        /// The value.
        value: String,
    },
    /// The parameter's value matches the regular expression.
    RegularExpression {
        /// The parameter name.
        name: String,
        /// The expression, anchored at both ends.
        value: String,
    },
}

/// One rule of an HTTPRoute: the requests it matches and what is done
/// with them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// The requests the rule takes (any of these); empty: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// What is done with them.
    pub default: RouteConf,
}

/// What an HTTPRoute rule does with the requests it matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConf {
    /// Changes applied in order: header and path rewrites, a redirect, a
    /// mirror.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
    /// Where the requests go, split by weight; empty: the destination the
    /// caller asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
}

/// A service that receives a share of a route's requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// The service's name.
    pub name: String,
    /// The service's namespace.
    #[serde(default = "crate::policy::target::default_namespace")]
    pub namespace: String,
    /// The share of requests, relative to the other backends' weights;
    /// 0 sends none.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The port on the service; by default the port the caller dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

fn default_weight() -> u32 {
    1
}

/// A change an HTTPRoute makes to the requests it matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum RouteFilter {
    /// Sets, adds or removes request headers.
    RequestHeaderModifier {
        /// Headers set, replacing any value.
        #[serde(default)]
        set: Vec<HeaderValue>,
        /// Headers added beside existing values.
        #[serde(default)]
        add: Vec<HeaderValue>,
        /// Header names removed.
        #[serde(default)]
        remove: Vec<String>,
    },
    /// Sets, adds or removes response headers.
    ResponseHeaderModifier {
        /// Headers set, replacing any value.
        #[serde(default)]
        set: Vec<HeaderValue>,
        /// Headers added beside existing values.
        #[serde(default)]
        add: Vec<HeaderValue>,
        /// Header names removed.
        #[serde(default)]
        remove: Vec<String>,
    },
    /// Rewrites the host and path before the request is sent.
    UrlRewrite {
        /// The new `Host` / `:authority`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        /// The new path.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathRewrite>,
    },
    /// Answers with a redirect instead of sending the request on.
    RequestRedirect {
        /// The scheme of the new location (`http` or `https`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scheme: Option<String>,
        /// The host of the new location.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        /// The port of the new location.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        /// The path of the new location.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathRewrite>,
        /// 301, 302 (the default), 303, 307 or 308.
        #[serde(default = "default_redirect_status")]
        status_code: u16,
    },
    /// Sends a copy of each request to another service and ignores its
    /// answer.
    RequestMirror {
        /// The service that receives the copies.
        backend_ref: BackendRef,
        /// The share of requests copied, 0-100.
        #[serde(default = "default_mirror_percentage")]
        percentage: u8,
    },
}

fn default_redirect_status() -> u16 {
    302
}

fn default_mirror_percentage() -> u8 {
    100
}

/// A header name and value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    /// The header name.
    pub name: String,
    /// The value.
    pub value: String,
}

/// How a path is rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum PathRewrite {
    /// Replaces the whole path.
    ReplaceFullPath {
        /// The new path.
        replace_full_path: String,
    },
    /// Replaces the part the rule's `PathPrefix` match matched.
    ReplacePrefixMatch {
        /// What replaces the matched prefix.
        replace_prefix_match: String,
    },
}

/// A Timeout's `default` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutConf {
    /// How long opening a connection (a tunnel stream) to an endpoint of
    /// the destination may take, on HTTP ports (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// How long an application's HTTP/1.1 connection to the destination
    /// may wait for its next request before the agent closes it (default
    /// 1h). Not applied to TCP ports yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// How long an HTTP request may take, from its start to the end of the
    /// response headers, retries included (default 15s; 0s: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Duration>,
}

merge_fields!(TimeoutConf {
    connect_timeout,
    idle_timeout,
    request_timeout
});

/// A condition under which a request is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RetryOn {
    /// The destination could not be connected to.
    ConnectFailure,
    /// The connection or stream was reset before a response.
    Reset,
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 or 504.
    GatewayError,
    /// One of `retriableStatusCodes`.
    RetriableStatusCodes,
    /// A gRPC response with status `UNAVAILABLE`.
    GrpcUnavailable,
    /// A gRPC response with status `RESOURCE_EXHAUSTED`.
    GrpcResourceExhausted,
    /// A gRPC response with status `CANCELLED`.
    GrpcCancelled,
    /// A gRPC response with status `DEADLINE_EXCEEDED`.
    GrpcDeadlineExceeded,
}

/// A Retry's `default` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConf {
    /// Retries after the first attempt, 0-10 (default 0: no retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<u32>,
    /// How long each attempt may take (default: no limit of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// When to retry (default `ConnectFailure`, `Reset`, `GatewayError`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<RetryOn>>,
    /// The status codes that `RetriableStatusCodes` retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retriable_status_codes: Option<Vec<u16>>,
    /// The wait before retry `n` is random in `[0, min(max, base * 2^n)]`
    /// (full jitter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Caps retries at a share of the requests in flight, so that retries
    /// cannot multiply the load on a failing destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

merge_fields!(RetryConf {
    num_retries,
    per_try_timeout,
    retry_on,
    retriable_status_codes,
    backoff,
    budget
});

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// The first interval (default 25ms).
    #[serde(default = "default_backoff_base")]
    pub base_interval: Duration,
    /// The longest interval (default 250ms).
    #[serde(default = "default_backoff_max")]
    pub max_interval: Duration,
}

fn default_backoff_base() -> Duration {
    Duration::from(std::time::Duration::from_millis(25))
}

fn default_backoff_max() -> Duration {
    Duration::from(std::time::Duration::from_millis(250))
}

/// How many retries may be in flight.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries in flight at most this percentage of requests in flight
    /// (default 20).
    #[serde(default = "default_budget_percent")]
    pub percent: u32,
    /// Retries always allowed, whatever the percentage (default 3).
    #[serde(default = "default_budget_min")]
    pub min_retry_concurrency: u32,
}

fn default_budget_percent() -> u32 {
    20
}

fn default_budget_min() -> u32 {
    3
}

/// A RateLimit's `default` block: local token buckets, one per agent and
/// destination (outbound) or per workload and caller rule (inbound).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConf {
    /// Limits HTTP requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRateLimit>,
    /// Limits new TCP connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpRateLimit>,
}

merge_fields!(RateLimitConf { http, tcp });

/// At most `requests` per `interval`, with bursts up to `requests`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRateLimit {
    /// Requests per interval (at least 1).
    pub requests: u32,
    /// The interval (at least 50ms).
    pub interval: Duration,
    /// The answer to a request over the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_rate_limit: Option<OnRateLimit>,
}

/// The answer to a request over a rate limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OnRateLimit {
    /// The status (default 429).
    #[serde(default = "default_rate_limit_status")]
    pub status: u16,
    /// Headers added to the answer (`retry-after` is always set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderValue>,
}

fn default_rate_limit_status() -> u16 {
    429
}

/// At most `connections` new connections per `interval`; the others are
/// reset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRateLimit {
    /// Connections per interval (at least 1).
    pub connections: u32,
    /// The interval (at least 50ms).
    pub interval: Duration,
}

/// A FaultInjection's `default` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultConf {
    /// Faults for HTTP requests, each drawn independently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpFault>>,
}

merge_fields!(FaultConf { http });

/// Delays and aborts a share of HTTP requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFault {
    /// Waits before sending the request on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answers instead of sending the request on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// A delay for a share of requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// The share of requests delayed, 0-100.
    pub percentage: u8,
    /// How long.
    pub value: Duration,
}

/// An abort for a share of requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// The share of requests aborted, 0-100.
    pub percentage: u8,
    /// The status they get (200-599).
    pub http_status: u16,
}

/// A LoadBalancing's `default` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancingConf {
    /// How an endpoint is picked (default `RoundRobin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    /// Prefer the endpoints nearest the caller while any of them is usable
    /// (ready, not ejected, not failing health checks): same Weft zone,
    /// region, zone and subzone first (labels `topology.kubernetes.io/region`,
    /// `topology.kubernetes.io/zone`, `topology.weft.io/subzone`), then
    /// progressively wider, other Weft zones last. Default true when a
    /// LoadBalancing applies; without any, endpoints are used alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_aware: Option<bool>,
}

merge_fields!(LoadBalancingConf {
    algorithm,
    locality_aware
});

impl LoadBalancingConf {
    /// Whether endpoints are picked by locality tier: as set, else true
    /// when a LoadBalancing applies (it set a field) and false when none
    /// does, so that meshes without the policy keep spreading calls over
    /// every endpoint as they always did (as Kuma and Istio do: local
    /// preference is opt-in there too).
    pub fn locality_aware(&self) -> bool {
        self.locality_aware.unwrap_or(self.algorithm.is_some())
    }
}

/// How a load balancer picks an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all_fields = "camelCase", deny_unknown_fields)]
pub enum Algorithm {
    /// Each endpoint in turn.
    RoundRobin,
    /// Of two endpoints picked at random, the one with less load from this
    /// agent: fewer HTTP requests in flight for a request, fewer TCP
    /// connections open for a TCP connection.
    LeastRequest,
    /// One at random.
    Random,
    /// The same endpoint for the same key while the endpoints stay the same.
    /// A TCP connection has only its source address: on a TCP port a
    /// `Header` or `Cookie` key falls back to round robin, and an HTTP
    /// request without the key to random.
    ConsistentHash {
        /// Where the key comes from.
        hash_on: HashOn,
    },
}

/// The key of consistent hashing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum HashOn {
    /// A request header's value.
    Header {
        /// The header name.
        name: String,
    },
    /// A cookie's value.
    Cookie {
        /// The cookie name.
        name: String,
    },
    /// The caller's IP address.
    SourceIp,
}

/// An AccessLog's `default` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogConf {
    /// Where entries are written; several backends each get every entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<AccessLogBackend>>,
}

merge_fields!(AccessLogConf { backends });

/// Where access log entries go.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum AccessLogBackend {
    /// Appended to a file on the agent's host.
    File {
        /// An absolute path.
        path: String,
        /// How each entry is written (default JSON).
        #[serde(default)]
        format: LogFormat,
    },
    /// Written to the agent's standard output.
    Stdout {
        /// How each entry is written (default JSON).
        #[serde(default)]
        format: LogFormat,
    },
}

/// How an access log entry is written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum LogFormat {
    /// One JSON object per line, with every field.
    #[default]
    Json,
    /// A line from a template: `%NAME%` placeholders (see
    /// docs/policies.md) are replaced, other text is kept.
    Text {
        /// The template, e.g. `%START_TIME% %METHOD% %PATH% %STATUS%`.
        template: String,
    },
}

/// A CircuitBreaker's `default` block: limits on what this agent has open
/// to the destination, and passive outlier detection. A limit left unset
/// does not apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerConf {
    /// Connections open to the destination from this agent: TCP connections
    /// tunnelled to it and application HTTP connections served for it.
    /// One more is reset (TCP) or has each request answered `503`
    /// `overflow` (HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// HTTP requests that may wait for a slot once `maxRequests` are in
    /// flight (default 0: none waits); one more is answered `503`
    /// `overflow` at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// HTTP requests in flight to the destination from this agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Ejects endpoints that keep failing (passive health checking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

merge_fields!(CircuitBreakerConf {
    max_connections,
    max_pending_requests,
    max_requests,
    outlier_detection
});

/// When an endpoint is ejected: it is not picked for `baseEjectionTime`
/// times the number of times it has been ejected, then comes back. When
/// every endpoint is ejected, all are used (panic mode).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (or resets, or failed connections) that
    /// eject an endpoint (default 5).
    #[serde(rename = "consecutive5xx", default = "default_consecutive_5xx")]
    pub consecutive_5xx: u32,
    /// Consecutive 502, 503 or 504 answers (or failed connections) that
    /// eject an endpoint; unset: only `consecutive5xx` counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// An endpoint not ejected for this long has its ejection count reset,
    /// so its next ejection lasts `baseEjectionTime` again (default 10s).
    #[serde(default = "default_outlier_interval")]
    pub interval: Duration,
    /// How long the first ejection lasts; the n-th lasts n times as long,
    /// at most 300s (default 30s).
    #[serde(default = "default_base_ejection_time")]
    pub base_ejection_time: Duration,
    /// The most endpoints of the destination ejected at once, as a
    /// percentage, 0-100; one endpoint can always be ejected (default 10).
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

fn default_consecutive_5xx() -> u32 {
    5
}

fn default_outlier_interval() -> Duration {
    Duration::from(std::time::Duration::from_secs(10))
}

fn default_base_ejection_time() -> Duration {
    Duration::from(std::time::Duration::from_secs(30))
}

fn default_max_ejection_percent() -> u32 {
    10
}

/// A HealthCheck's `default` block. The check goes to the destination's
/// first HTTP port (`http`) or first port (`tcp`), through the tunnel to
/// each endpoint's agent, from the caller's agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckConf {
    /// Time between two checks of an endpoint (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// How long a check may take before it counts as failed (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Consecutive failed checks that mark an endpoint unhealthy (default
    /// 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Consecutive passed checks that mark an unhealthy endpoint healthy
    /// again (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    /// A TCP check: the endpoint's workload must accept a connection on
    /// the destination's first port, dialled by its agent through the
    /// tunnel, whatever the port's protocol (the default when `http` is
    /// not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheck>,
    /// An HTTP check: a `GET` of `path` must be answered with an expected
    /// status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
}

merge_fields!(HealthCheckConf {
    interval,
    timeout,
    unhealthy_threshold,
    healthy_threshold,
    tcp,
    http
});

/// A TCP health check; it has no settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpHealthCheck {}

/// An HTTP health check.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHealthCheck {
    /// The path requested, starting with `/`.
    pub path: String,
    /// The statuses that pass (default: any 2xx).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u16>,
}
