//! What the zone controller pushes to an agent: for each of the agent's
//! workloads, the policies that concern it, already selected and merged
//! (the agent never sees a policy that does not apply to it, so its work
//! does not grow with the mesh's policy count). The agent's static config
//! can spell out the same structure by hand.
//!
//! It travels on the config stream as JSON (`ConfigUpdate.policy_json`):
//! the types live once, here, for the controller that writes them and the
//! agent that reads them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::kinds::{CompiledTcpRoute, TraceConf};
use crate::mesh::PeerMatch;
use crate::policy::conf::{
    AccessLogConf, Action, CircuitBreakerConf, FaultConf, HealthCheckConf, HttpMatch,
    LoadBalancingConf, Merge, RateLimitConf, RetryConf, RouteRule, TimeoutConf,
};

/// The policies of one workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadPolicy {
    /// The Workload's name.
    pub workload: String,
    /// What the workload's agent enforces on calls into it.
    #[serde(default)]
    pub inbound: InboundPolicy,
    /// What it applies to calls to any destination, before the
    /// destination's own settings (from `to[]` entries targeting `Mesh`).
    #[serde(default)]
    pub outbound_defaults: OutboundConf,
    /// Per destination, keyed `<namespace>/<name>` for a service and
    /// `external:<namespace>/<name>` for an ExternalService: applied on top
    /// of `outboundDefaults`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outbound: BTreeMap<String, OutboundConf>,
    /// Tracing of the workload's HTTP requests, in and out (Trace); empty:
    /// the agent leaves trace headers alone and sends no span.
    #[serde(default, skip_serializing_if = "TraceConf::is_empty")]
    pub trace: TraceConf,
}

impl WorkloadPolicy {
    /// The settings for calls to `destination` (a key of `outbound`): the
    /// defaults with the destination's own fields on top, and the
    /// destination's routes before the defaults' routes.
    pub fn outbound_for(&self, destination: &str) -> OutboundConf {
        let mut conf = self.outbound_defaults.clone();
        if let Some(own) = self.outbound.get(destination) {
            conf.merge(own);
        }
        conf
    }
}

/// Inbound: who may call, and how calls are limited and logged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPolicy {
    /// Every TrafficPermission rule that selects the workload. A call is
    /// refused if a matching rule denies it, let in if a matching rule
    /// allows it, and refused otherwise (strict mTLS: default deny).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<PermissionRule>,
    /// Server-side rate limits, most specific caller rule first; a call
    /// takes the first whose `from` matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rate_limits: Vec<PeerRule<RateLimitConf>>,
    /// Access logging of calls into the workload.
    #[serde(default)]
    pub access_log: AccessLogConf,
}

/// A TrafficPermission rule, with its callers resolved to identities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PermissionRule {
    /// The policy it comes from (`<name>`), for logs and metrics.
    pub policy: String,
    /// The callers it applies to (exact SPIFFE IDs, or prefixes ending in
    /// `*`); empty matches nobody.
    pub from: Vec<PeerMatch>,
    /// `Allow` or `Deny`.
    pub action: Action,
    /// Only these HTTP requests; empty: every connection and request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpMatch>,
}

/// A `default` block for the callers that `from` matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerRule<C> {
    /// The policy it comes from, for logs and metrics.
    pub policy: String,
    /// The callers it applies to; empty matches nobody.
    pub from: Vec<PeerMatch>,
    /// The settings.
    pub default: C,
}

/// Outbound settings for one destination, each merged from the policies
/// that select the workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundConf {
    /// HTTPRoute rules, the most specific policy's first; the first rule
    /// that matches a request takes it. No rule: requests go to the
    /// destination dialled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<CompiledRoute>,
    /// Timeout.
    #[serde(default)]
    pub timeout: TimeoutConf,
    /// Retry.
    #[serde(default)]
    pub retry: RetryConf,
    /// Client-side RateLimit.
    #[serde(default)]
    pub rate_limit: RateLimitConf,
    /// FaultInjection.
    #[serde(default)]
    pub fault: FaultConf,
    /// LoadBalancing.
    #[serde(default)]
    pub load_balancing: LoadBalancingConf,
    /// AccessLog of outbound calls.
    #[serde(default)]
    pub access_log: AccessLogConf,
    /// TCPRoute: the split of TCP connections between backend services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_route: Option<CompiledTcpRoute>,
    /// CircuitBreaker: limits and outlier detection.
    #[serde(default, skip_serializing_if = "is_default")]
    pub circuit_breaker: CircuitBreakerConf,
    /// HealthCheck: active checks of the destination's endpoints.
    #[serde(default, skip_serializing_if = "is_default")]
    pub health_check: HealthCheckConf,
}

/// Keeps unset new blocks out of the JSON, so that agents that predate
/// them still read what a newer zone sends when no such policy exists.
fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl Merge for OutboundConf {
    fn merge(&mut self, over: &Self) {
        if !over.routes.is_empty() {
            let mut routes = over.routes.clone();
            routes.append(&mut self.routes);
            self.routes = routes;
        }
        self.timeout.merge(&over.timeout);
        self.retry.merge(&over.retry);
        self.rate_limit.merge(&over.rate_limit);
        self.fault.merge(&over.fault);
        self.load_balancing.merge(&over.load_balancing);
        self.access_log.merge(&over.access_log);
        // A whole rule, not merged backend by backend.
        if over.tcp_route.is_some() {
            self.tcp_route.clone_from(&over.tcp_route);
        }
        self.circuit_breaker.merge(&over.circuit_breaker);
        self.health_check.merge(&over.health_check);
    }
}

/// An HTTPRoute rule with the policy it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledRoute {
    /// The HTTPRoute's name, the `route` label of metrics.
    pub policy: String,
    /// The rule.
    pub rule: RouteRule,
}
