//! Validation of the policy building blocks (selectors and `default`
//! blocks), shared by every policy kind: each problem is reported at the
//! path of the field, so that `apply` can say which line of which rule is
//! wrong instead of letting an agent refuse the config later.

use crate::identity::SpiffeId;
use crate::policy::conf::{
    AccessLogBackend, AccessLogConf, Algorithm, BackendRef, CircuitBreakerConf, FaultConf, HashOn,
    HeaderMatch, HeaderValue, HealthCheckConf, HttpMatch, LoadBalancingConf, LogFormat, PathMatch,
    PathRewrite, PermissionConf, QueryMatch, RateLimitConf, RetryConf, RouteFilter, RouteRule,
    TimeoutConf,
};
use crate::policy::target::{DestinationRef, PeerRef, TargetRef};
use crate::validation::{check_labels, dns1123_label, FieldPath, Problems};

/// The least interval of a rate limit: shorter buckets refill faster than
/// agents' timers can follow.
pub const MIN_RATE_LIMIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// The most retries a Retry may ask for: more only multiplies the load on a
/// failing destination.
pub const MAX_RETRIES: u32 = 10;

/// A part of a policy that can check itself, reporting under `path`.
pub trait Check {
    /// Adds every problem of `self` to `problems`, each under `path`.
    fn check(&self, path: &FieldPath, problems: &mut Problems);
}

impl<T: Check> Check for Vec<T> {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        for (i, item) in self.iter().enumerate() {
            item.check(&path.index(i), problems);
        }
    }
}

fn name_and_namespace(name: &str, namespace: &str, path: &FieldPath, problems: &mut Problems) {
    problems.check(path.field("name"), dns1123_label(name));
    problems.check(path.field("namespace"), dns1123_label(namespace));
}

impl Check for TargetRef {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        match self {
            TargetRef::Mesh => {}
            TargetRef::Labels { labels } => {
                if labels.is_empty() {
                    problems.add(
                        path.field("labels"),
                        "must list at least one label (use kind: Mesh to select every workload)",
                    );
                }
                check_labels(labels, &path.field("labels"), problems);
            }
            TargetRef::Service { name, namespace } | TargetRef::Workload { name, namespace } => {
                name_and_namespace(name, namespace, path, problems)
            }
        }
    }
}

impl Check for DestinationRef {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        match self {
            DestinationRef::Mesh => {}
            DestinationRef::Service { name, namespace }
            | DestinationRef::ExternalService { name, namespace } => {
                name_and_namespace(name, namespace, path, problems)
            }
        }
    }
}

/// Checks a SPIFFE ID prefix: `spiffe://<trust-domain>/` and then anything
/// without `*` (the prefix is matched as written; `*` is added when it is
/// compiled).
pub fn spiffe_prefix(value: &str) -> Result<(), String> {
    let trust_domain = value
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map(|(td, _)| td);
    match trust_domain {
        Some(td) if crate::identity::valid_trust_domain(td) && !value.contains('*') => Ok(()),
        _ => Err(format!(
            "{value:?} must start with spiffe://<trust-domain>/ (e.g. spiffe://prod.example/ns/payments/) and contain no '*'"
        )),
    }
}

impl Check for PeerRef {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        match self {
            PeerRef::Mesh => {}
            PeerRef::SpiffeId { value } => problems.check(
                path.field("value"),
                value
                    .parse::<SpiffeId>()
                    .map(drop)
                    .map_err(|e| e.to_string()),
            ),
            PeerRef::SpiffeIdPrefix { value } => {
                problems.check(path.field("value"), spiffe_prefix(value))
            }
            PeerRef::Service { name, namespace } => {
                name_and_namespace(name, namespace, path, problems)
            }
            PeerRef::Labels { labels } => {
                if labels.is_empty() {
                    problems.add(
                        path.field("labels"),
                        "must list at least one label (use kind: Mesh for every caller)",
                    );
                }
                check_labels(labels, &path.field("labels"), problems);
            }
            PeerRef::Zone { name } => problems.check(path.field("name"), dns1123_label(name)),
        }
    }
}

/// Checks that a regular expression compiles (RE2 syntax, as the agent
/// uses the same `regex` crate).
pub fn regex(value: &str) -> Result<(), String> {
    regex::Regex::new(value).map(drop).map_err(|e| {
        format!(
            "is not a valid regular expression: {}",
            one_line(&e.to_string())
        )
    })
}

/// The regex crate's messages span several lines with a caret diagram;
/// the last line says what is wrong.
fn one_line(message: &str) -> String {
    message
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(message)
        .trim()
        .trim_start_matches("error: ")
        .to_owned()
}

/// Checks an HTTP header name.
pub fn header_name(name: &str) -> Result<(), String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(drop)
        .map_err(|_| format!("{name:?} is not a valid HTTP header name"))
}

fn header_value(value: &str) -> Result<(), String> {
    http::HeaderValue::from_str(value)
        .map(drop)
        .map_err(|_| format!("{value:?} is not a valid HTTP header value"))
}

/// Checks a path: it starts with `/`, as request paths do.
pub fn http_path(path: &str) -> Result<(), String> {
    if path.starts_with('/') {
        Ok(())
    } else {
        Err(format!("{path:?} must start with '/'"))
    }
}

/// Checks an HTTP method: an uppercase token (`GET`, `PURGE`).
pub fn method(method: &str) -> Result<(), String> {
    if !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(format!(
            "{method:?} must be an HTTP method in uppercase letters (GET, POST, ...)"
        ))
    }
}

fn percentage(value: u8) -> Result<(), String> {
    if value <= 100 {
        Ok(())
    } else {
        Err(format!("{value} is not a percentage; must be 0-100"))
    }
}

fn positive(value: crate::duration::Duration) -> Result<(), String> {
    if value.as_std().is_zero() {
        Err("must be longer than 0s".to_owned())
    } else {
        Ok(())
    }
}

fn status_in(status: u16, low: u16, high: u16) -> Result<(), String> {
    if (low..=high).contains(&status) {
        Ok(())
    } else {
        Err(format!("{status} is out of range; must be {low}-{high}"))
    }
}

impl Check for HeaderMatch {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        let name = match self {
            HeaderMatch::Exact { name, value } | HeaderMatch::Prefix { name, value } => {
                problems.check(path.field("value"), header_value(value));
                name
            }
            HeaderMatch::RegularExpression { name, value } => {
                problems.check(path.field("value"), regex(value));
                name
            }
            HeaderMatch::Present { name } | HeaderMatch::Absent { name } => name,
        };
        problems.check(path.field("name"), header_name(name));
    }
}

impl Check for QueryMatch {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        let name = match self {
            QueryMatch::Exact { name, .. } => name,
            QueryMatch::RegularExpression { name, value } => {
                problems.check(path.field("value"), regex(value));
                name
            }
        };
        if name.is_empty() {
            problems.add(path.field("name"), "must not be empty");
        }
    }
}

impl Check for HttpMatch {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        if let Some(path_match) = &self.path {
            let at = path.field("path").field("value");
            match path_match {
                PathMatch::Exact { value } | PathMatch::PathPrefix { value } => {
                    problems.check(at, http_path(value))
                }
                PathMatch::RegularExpression { value } => problems.check(at, regex(value)),
            }
        }
        if let Some(m) = &self.method {
            problems.check(path.field("method"), method(m));
        }
        self.headers.check(&path.field("headers"), problems);
        self.query_params
            .check(&path.field("queryParams"), problems);
    }
}

impl Check for PermissionConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        self.http.check(&path.field("http"), problems);
    }
}

impl Check for HeaderValue {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        problems.check(path.field("name"), header_name(&self.name));
        problems.check(path.field("value"), header_value(&self.value));
    }
}

impl Check for BackendRef {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        name_and_namespace(&self.name, &self.namespace, path, problems);
        if self.port == Some(0) {
            problems.add(
                path.field("port"),
                "must be between 1 and 65535 (0 is not a port)",
            );
        }
    }
}

fn header_names(names: &[String], path: &FieldPath, problems: &mut Problems) {
    for (i, name) in names.iter().enumerate() {
        problems.check(path.index(i), header_name(name));
    }
}

fn check_rewrite(
    rewrite: &PathRewrite,
    prefix_matches: bool,
    path: &FieldPath,
    problems: &mut Problems,
) {
    match rewrite {
        PathRewrite::ReplaceFullPath { replace_full_path } => {
            problems.check(path.field("replaceFullPath"), http_path(replace_full_path))
        }
        PathRewrite::ReplacePrefixMatch {
            replace_prefix_match,
        } => {
            problems.check(
                path.field("replacePrefixMatch"),
                http_path(replace_prefix_match),
            );
            if !prefix_matches {
                problems.add(
                    path.clone(),
                    "ReplacePrefixMatch needs every match of the rule to have a PathPrefix path",
                );
            }
        }
    }
}

fn hostname(host: &str) -> Result<(), String> {
    crate::validation::dns1123_subdomain(host)
}

/// Checks a filter of a rule; `prefix_matches` tells whether every match
/// of the rule has a PathPrefix path (what ReplacePrefixMatch replaces).
fn check_filter(
    filter: &RouteFilter,
    prefix_matches: bool,
    path: &FieldPath,
    problems: &mut Problems,
) {
    match filter {
        RouteFilter::RequestHeaderModifier { set, add, remove }
        | RouteFilter::ResponseHeaderModifier { set, add, remove } => {
            set.check(&path.field("set"), problems);
            add.check(&path.field("add"), problems);
            header_names(remove, &path.field("remove"), problems);
            if set.is_empty() && add.is_empty() && remove.is_empty() {
                problems.add(path.clone(), "set at least one of set, add, remove");
            }
        }
        RouteFilter::UrlRewrite {
            hostname: host,
            path: rewrite,
        } => {
            if let Some(host) = host {
                problems.check(path.field("hostname"), hostname(host));
            }
            if let Some(rewrite) = rewrite {
                check_rewrite(rewrite, prefix_matches, &path.field("path"), problems);
            }
        }
        RouteFilter::RequestRedirect {
            scheme,
            hostname: host,
            port,
            path: rewrite,
            status_code,
        } => {
            if let Some(scheme) = scheme {
                if scheme != "http" && scheme != "https" {
                    problems.add(
                        path.field("scheme"),
                        format!("{scheme:?} must be http or https"),
                    );
                }
            }
            if let Some(host) = host {
                problems.check(path.field("hostname"), hostname(host));
            }
            if *port == Some(0) {
                problems.add(
                    path.field("port"),
                    "must be between 1 and 65535 (0 is not a port)",
                );
            }
            if let Some(rewrite) = rewrite {
                check_rewrite(rewrite, prefix_matches, &path.field("path"), problems);
            }
            if ![301, 302, 303, 307, 308].contains(status_code) {
                problems.add(
                    path.field("statusCode"),
                    format!(
                        "{status_code} is not a redirect status; must be 301, 302, 303, 307 or 308"
                    ),
                );
            }
        }
        RouteFilter::RequestMirror {
            backend_ref,
            percentage: share,
        } => {
            backend_ref.check(&path.field("backendRef"), problems);
            problems.check(path.field("percentage"), percentage(*share));
        }
    }
}

impl Check for RouteRule {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        self.matches.check(&path.field("matches"), problems);
        let prefix_matches = !self.matches.is_empty()
            && self
                .matches
                .iter()
                .all(|m| matches!(m.path, Some(PathMatch::PathPrefix { .. })));
        let default = path.field("default");
        for (i, filter) in self.default.filters.iter().enumerate() {
            check_filter(
                filter,
                prefix_matches,
                &default.field("filters").index(i),
                problems,
            );
        }
        let backends = &self.default.backend_refs;
        backends.check(&default.field("backendRefs"), problems);
        if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
            problems.add(
                default.field("backendRefs"),
                "every weight is 0, so no request could be sent; give one backend a weight",
            );
        }
    }
}

impl Check for TimeoutConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        if let Some(d) = self.connect_timeout {
            problems.check(path.field("connectTimeout"), positive(d));
        }
        if let Some(d) = self.idle_timeout {
            problems.check(path.field("idleTimeout"), positive(d));
        }
        // requestTimeout 0s means no timeout: allowed.
    }
}

impl Check for RetryConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        if let Some(n) = self.num_retries {
            if n > MAX_RETRIES {
                problems.add(
                    path.field("numRetries"),
                    format!("{n} is out of range; must be 0-{MAX_RETRIES}"),
                );
            }
        }
        if let Some(d) = self.per_try_timeout {
            problems.check(path.field("perTryTimeout"), positive(d));
        }
        if let Some(codes) = &self.retriable_status_codes {
            for (i, code) in codes.iter().enumerate() {
                problems.check(
                    path.field("retriableStatusCodes").index(i),
                    status_in(*code, 100, 599),
                );
            }
        }
        if let Some(backoff) = &self.backoff {
            let at = path.field("backoff");
            problems.check(at.field("baseInterval"), positive(backoff.base_interval));
            if backoff.max_interval < backoff.base_interval {
                problems.add(
                    at.field("maxInterval"),
                    format!(
                        "{} is shorter than baseInterval {}",
                        backoff.max_interval, backoff.base_interval
                    ),
                );
            }
        }
        if let Some(budget) = &self.budget {
            if budget.percent > 100 {
                problems.add(
                    path.field("budget").field("percent"),
                    format!("{} is not a percentage; must be 0-100", budget.percent),
                );
            }
        }
    }
}

fn rate_interval(interval: crate::duration::Duration) -> Result<(), String> {
    if interval.as_std() < MIN_RATE_LIMIT_INTERVAL {
        Err(format!("{interval} is too short; must be at least 50ms"))
    } else {
        Ok(())
    }
}

impl Check for RateLimitConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        if let Some(http) = &self.http {
            let at = path.field("http");
            if http.requests == 0 {
                problems.add(at.field("requests"), "must be at least 1");
            }
            problems.check(at.field("interval"), rate_interval(http.interval));
            if let Some(answer) = &http.on_rate_limit {
                let at = at.field("onRateLimit");
                problems.check(at.field("status"), status_in(answer.status, 400, 599));
                answer.headers.check(&at.field("headers"), problems);
            }
        }
        if let Some(tcp) = &self.tcp {
            let at = path.field("tcp");
            if tcp.connections == 0 {
                problems.add(at.field("connections"), "must be at least 1");
            }
            problems.check(at.field("interval"), rate_interval(tcp.interval));
        }
        if self.http.is_none() && self.tcp.is_none() {
            problems.add(path.clone(), "set at least one of http, tcp");
        }
    }
}

impl Check for FaultConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        let Some(faults) = &self.http else {
            return;
        };
        for (i, fault) in faults.iter().enumerate() {
            let at = path.field("http").index(i);
            if let Some(delay) = &fault.delay {
                let at = at.field("delay");
                problems.check(at.field("percentage"), percentage(delay.percentage));
                problems.check(at.field("value"), positive(delay.value));
            }
            if let Some(abort) = &fault.abort {
                let at = at.field("abort");
                problems.check(at.field("percentage"), percentage(abort.percentage));
                problems.check(
                    at.field("httpStatus"),
                    status_in(abort.http_status, 200, 599),
                );
            }
            if fault.delay.is_none() && fault.abort.is_none() {
                problems.add(at, "set at least one of delay, abort");
            }
        }
    }
}

impl Check for LoadBalancingConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        if let Some(Algorithm::ConsistentHash { hash_on }) = &self.algorithm {
            let at = path.field("algorithm").field("hashOn").field("name");
            match hash_on {
                HashOn::Header { name } => problems.check(at, header_name(name)),
                HashOn::Cookie { name } if name.is_empty() => problems.add(at, "must not be empty"),
                HashOn::Cookie { .. } | HashOn::SourceIp => {}
            }
        }
    }
}

fn check_format(format: &LogFormat, path: &FieldPath, problems: &mut Problems) {
    if let LogFormat::Text { template } = format {
        if template.trim().is_empty() {
            problems.add(path.field("template"), "must not be empty");
        }
    }
}

impl Check for AccessLogConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        let Some(backends) = &self.backends else {
            return;
        };
        for (i, backend) in backends.iter().enumerate() {
            let at = path.field("backends").index(i);
            match backend {
                AccessLogBackend::File { path: file, format } => {
                    if !file.starts_with('/') || file.contains('\0') {
                        problems.add(
                            at.field("path"),
                            format!("{file:?} must be an absolute path"),
                        );
                    }
                    check_format(format, &at.field("format"), problems);
                }
                AccessLogBackend::Stdout { format } => {
                    check_format(format, &at.field("format"), problems)
                }
            }
        }
    }
}

/// The least health check interval: shorter ones would load every
/// endpoint with checks from every caller's agent.
pub const MIN_HEALTH_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

fn at_least_one(value: u32) -> Result<(), String> {
    if value == 0 {
        Err("must be at least 1".to_owned())
    } else {
        Ok(())
    }
}

impl Check for CircuitBreakerConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        // maxConnections and maxRequests 0 would refuse every call: a
        // typo more likely than a wish.
        if let Some(n) = self.max_connections {
            problems.check(path.field("maxConnections"), at_least_one(n));
        }
        if let Some(n) = self.max_requests {
            problems.check(path.field("maxRequests"), at_least_one(n));
        }
        let Some(outlier) = &self.outlier_detection else {
            return;
        };
        let at = path.field("outlierDetection");
        problems.check(
            at.field("consecutive5xx"),
            at_least_one(outlier.consecutive_5xx),
        );
        if let Some(n) = outlier.consecutive_gateway_errors {
            problems.check(at.field("consecutiveGatewayErrors"), at_least_one(n));
        }
        problems.check(at.field("interval"), positive(outlier.interval));
        problems.check(
            at.field("baseEjectionTime"),
            positive(outlier.base_ejection_time),
        );
        if outlier.max_ejection_percent > 100 {
            problems.add(
                at.field("maxEjectionPercent"),
                format!(
                    "{} is not a percentage; must be 0-100",
                    outlier.max_ejection_percent
                ),
            );
        }
    }
}

impl Check for HealthCheckConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        if let Some(interval) = self.interval {
            if interval.as_std() < MIN_HEALTH_CHECK_INTERVAL {
                problems.add(
                    path.field("interval"),
                    format!("{interval} is too short; must be at least 100ms"),
                );
            }
        }
        if let Some(d) = self.timeout {
            problems.check(path.field("timeout"), positive(d));
        }
        if let Some(n) = self.unhealthy_threshold {
            problems.check(path.field("unhealthyThreshold"), at_least_one(n));
        }
        if let Some(n) = self.healthy_threshold {
            problems.check(path.field("healthyThreshold"), at_least_one(n));
        }
        if self.tcp.is_some() && self.http.is_some() {
            problems.add(path.clone(), "set one of tcp, http, not both");
        }
        if let Some(http) = &self.http {
            let at = path.field("http");
            if !http.path.starts_with('/') {
                problems.add(
                    at.field("path"),
                    format!("{:?} must start with /", http.path),
                );
            } else if http.path.parse::<http::uri::PathAndQuery>().is_err() {
                problems.add(
                    at.field("path"),
                    format!("{:?} is not a valid path", http.path),
                );
            }
            for (i, code) in http.expected_statuses.iter().enumerate() {
                problems.check(
                    at.field("expectedStatuses").index(i),
                    status_in(*code, 100, 599),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_regexes() {
        assert!(spiffe_prefix("spiffe://prod.example/ns/payments/").is_ok());
        assert!(spiffe_prefix("spiffe://prod.example/").is_ok());
        assert!(spiffe_prefix("spiffe://prod.example").is_err());
        assert!(spiffe_prefix("spiffe:///ns").is_err());
        assert!(spiffe_prefix("spiffe://td/ns/*").is_err());
        assert!(regex("^/api/v[0-9]+$").is_ok());
        let error = regex("/api/(").unwrap_err();
        assert!(!error.contains('\n'), "{error}");
        assert!(method("GET").is_ok());
        assert!(method("get").is_err());
        assert!(header_name("x-user").is_ok());
        assert!(header_name("bad header").is_err());
    }
}
