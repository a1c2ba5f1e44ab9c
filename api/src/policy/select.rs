//! Which policies apply to a workload, and their merge into the
//! [`WorkloadPolicy`] the zone pushes to the workload's agent. Pure
//! functions of the mesh's policies, the workload, and a [`PeerResolver`]
//! that turns `rules[].from` into SPIFFE ID matchers.
//!
//! The order (docs/policies.md, "Which policy applies"): the policies of a
//! kind whose `targetRef` selects the workload, sorted by (specificity of
//! `targetRef`, name) ascending. `default` blocks are merged field by field
//! in that order, so the most specific policy's fields win, and between
//! two equally specific policies the one whose name sorts last wins.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;
use crate::kinds::{
    AccessLogSpec, CircuitBreakerSpec, CompiledTcpRoute, FaultInjectionSpec, HealthCheckSpec,
    HttpRouteSpec, LoadBalancingSpec, PolicyTo, RateLimitSpec, RetrySpec, TcpRouteSpec,
    TimeoutSpec, TraceSpec, TrafficPermissionSpec,
};
use crate::mesh::PeerMatch;
use crate::policy::compiled::{
    CompiledRoute, OutboundConf, PeerRule, PermissionRule, WorkloadPolicy,
};
use crate::policy::conf::Merge;
use crate::policy::target::{DestinationRef, PeerRef, TargetRef};
use crate::resource::{Kind, Object, Resource, Spec, Workload};

/// What selection needs to know of a workload.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadInfo<'a> {
    /// The Workload's name.
    pub name: &'a str,
    /// Its namespace.
    pub namespace: &'a str,
    /// The service it is an instance of.
    pub service: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
}

impl<'a> WorkloadInfo<'a> {
    /// The parts of a Workload resource that policies select on.
    pub fn of(workload: &'a Workload) -> Self {
        WorkloadInfo {
            name: &workload.metadata.name,
            namespace: workload.metadata.namespace.as_deref().unwrap_or_default(),
            service: &workload.spec.service,
            labels: &workload.metadata.labels,
        }
    }
}

/// Whether `target` selects the workload.
pub fn selects(target: &TargetRef, workload: &WorkloadInfo<'_>) -> bool {
    match target {
        TargetRef::Mesh => true,
        TargetRef::Labels { labels } => labels_match(labels, workload.labels),
        TargetRef::Service { name, namespace } => {
            namespace == workload.namespace && name == workload.service
        }
        TargetRef::Workload { name, namespace } => {
            namespace == workload.namespace && name == workload.name
        }
    }
}

/// Whether every label of `wanted` is in `labels` with the same value.
pub fn labels_match(wanted: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Turns `rules[].from` into the matchers the agent compares callers'
/// identities with. `Service`, `Labels` and `Zone` become the SPIFFE IDs
/// of the workloads they select, so they match service accounts: two
/// services sharing one service account cannot be told apart.
pub trait PeerResolver {
    /// The mesh's trust domain, for `from: Mesh`.
    fn trust_domain(&self) -> &str;

    /// The identities of the workloads a `Service`, `Labels` or `Zone`
    /// peer selects (the other kinds are resolved without asking).
    fn identities(&self, peer: &PeerRef) -> Vec<SpiffeId>;

    /// The matchers for `peer`; see [`resolve_peer`].
    fn resolve(&self, peer: &PeerRef) -> Vec<PeerMatch> {
        resolve_peer(peer, self)
    }
}

/// `Mesh`: every identity of the trust domain (`spiffe://<td>/*`);
/// `SpiffeId` and `SpiffeIdPrefix`: as written (validation made sure they
/// parse; an invalid one matches nobody); the others: the identities the
/// resolver finds, sorted and without duplicates (none: the rule matches
/// nobody until such a workload exists).
pub fn resolve_peer<R: PeerResolver + ?Sized>(peer: &PeerRef, resolver: &R) -> Vec<PeerMatch> {
    match peer {
        PeerRef::Mesh => vec![PeerMatch::Prefix(format!(
            "spiffe://{}/",
            resolver.trust_domain()
        ))],
        PeerRef::SpiffeId { value } => value
            .parse::<SpiffeId>()
            .map(PeerMatch::Exact)
            .into_iter()
            .collect(),
        PeerRef::SpiffeIdPrefix { value } => vec![PeerMatch::Prefix(value.clone())],
        PeerRef::Service { .. } | PeerRef::Labels { .. } | PeerRef::Zone { .. } => {
            let mut ids = resolver.identities(peer);
            ids.sort();
            ids.dedup();
            ids.into_iter().map(PeerMatch::Exact).collect()
        }
    }
}

/// One workload as a caller, for [`Directory`].
#[derive(Debug, Clone)]
pub struct Member {
    /// Its namespace.
    pub namespace: String,
    /// Its service.
    pub service: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its zone.
    pub zone: String,
    /// Its identity.
    pub identity: SpiffeId,
}

/// A [`PeerResolver`] over a list of workloads (what the zone has), which
/// remembers each peer it resolved: the same `from` is resolved once per
/// directory, not once per workload it is compiled for.
#[derive(Debug)]
pub struct Directory {
    trust_domain: String,
    members: Vec<Member>,
    resolved: Mutex<HashMap<PeerRef, Vec<PeerMatch>>>,
}

impl Directory {
    /// A directory of `members`, in the mesh of `trust_domain`.
    pub fn new(trust_domain: &str, members: Vec<Member>) -> Self {
        Directory {
            trust_domain: trust_domain.to_owned(),
            members,
            resolved: Mutex::new(HashMap::new()),
        }
    }
}

impl PeerResolver for Directory {
    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn identities(&self, peer: &PeerRef) -> Vec<SpiffeId> {
        self.members
            .iter()
            .filter(|m| match peer {
                PeerRef::Service { name, namespace } => {
                    &m.namespace == namespace && &m.service == name
                }
                PeerRef::Labels { labels } => labels_match(labels, &m.labels),
                PeerRef::Zone { name } => &m.zone == name,
                PeerRef::Mesh | PeerRef::SpiffeId { .. } | PeerRef::SpiffeIdPrefix { .. } => false,
            })
            .map(|m| m.identity.clone())
            .collect()
    }

    fn resolve(&self, peer: &PeerRef) -> Vec<PeerMatch> {
        let mut resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = resolved.get(peer) {
            return found.clone();
        }
        let matchers = resolve_peer(peer, self);
        resolved.insert(peer.clone(), matchers.clone());
        matchers
    }
}

/// The policies of one mesh, by kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshPolicies {
    /// TrafficPermissions.
    pub traffic_permissions: Vec<Object<TrafficPermissionSpec>>,
    /// HTTPRoutes.
    pub http_routes: Vec<Object<HttpRouteSpec>>,
    /// Timeouts.
    pub timeouts: Vec<Object<TimeoutSpec>>,
    /// Retries.
    pub retries: Vec<Object<RetrySpec>>,
    /// RateLimits.
    pub rate_limits: Vec<Object<RateLimitSpec>>,
    /// FaultInjections.
    pub fault_injections: Vec<Object<FaultInjectionSpec>>,
    /// LoadBalancings.
    pub load_balancings: Vec<Object<LoadBalancingSpec>>,
    /// AccessLogs.
    pub access_logs: Vec<Object<AccessLogSpec>>,
    /// TCPRoutes.
    pub tcp_routes: Vec<Object<TcpRouteSpec>>,
    /// Traces.
    pub traces: Vec<Object<TraceSpec>>,
    /// CircuitBreakers.
    pub circuit_breakers: Vec<Object<CircuitBreakerSpec>>,
    /// HealthChecks.
    pub health_checks: Vec<Object<HealthCheckSpec>>,
}

impl MeshPolicies {
    /// Adds a policy; other kinds are ignored (false).
    pub fn add(&mut self, resource: Resource) -> bool {
        match resource {
            Resource::TrafficPermission(o) => self.traffic_permissions.push(o),
            Resource::HttpRoute(o) => self.http_routes.push(o),
            Resource::Timeout(o) => self.timeouts.push(o),
            Resource::Retry(o) => self.retries.push(o),
            Resource::RateLimit(o) => self.rate_limits.push(o),
            Resource::FaultInjection(o) => self.fault_injections.push(o),
            Resource::LoadBalancing(o) => self.load_balancings.push(o),
            Resource::AccessLog(o) => self.access_logs.push(o),
            Resource::TcpRoute(o) => self.tcp_routes.push(o),
            Resource::Trace(o) => self.traces.push(o),
            Resource::CircuitBreaker(o) => self.circuit_breakers.push(o),
            Resource::HealthCheck(o) => self.health_checks.push(o),
            Resource::Mesh(_)
            | Resource::Zone(_)
            | Resource::Workload(_)
            | Resource::Service(_)
            | Resource::ExternalService(_) => return false,
        }
        true
    }

    /// The policies of a list of resources.
    pub fn from_resources(resources: impl IntoIterator<Item = Resource>) -> Self {
        let mut policies = MeshPolicies::default();
        for resource in resources {
            policies.add(resource);
        }
        policies
    }
}

/// A policy kind's spec: what selection reads of it.
pub trait PolicySpec: Spec {
    /// The workloads whose agents enforce it.
    fn target_ref(&self) -> &TargetRef;
}

macro_rules! policy_spec {
    ($($ty:ty),*) => {$(
        impl PolicySpec for $ty {
            fn target_ref(&self) -> &TargetRef {
                &self.target_ref
            }
        }
    )*};
}

policy_spec!(
    TrafficPermissionSpec,
    HttpRouteSpec,
    TimeoutSpec,
    RetrySpec,
    RateLimitSpec,
    FaultInjectionSpec,
    LoadBalancingSpec,
    AccessLogSpec,
    TcpRouteSpec,
    TraceSpec,
    CircuitBreakerSpec,
    HealthCheckSpec
);

/// The policies of `all` that select the workload, in merge order:
/// (specificity, name) ascending.
pub fn applying<'a, S: PolicySpec>(
    all: &'a [Object<S>],
    workload: &WorkloadInfo<'_>,
) -> Vec<&'a Object<S>> {
    let mut found: Vec<&Object<S>> = all
        .iter()
        .filter(|p| selects(p.spec.target_ref(), workload))
        .collect();
    found.sort_by(|a, b| {
        (a.spec.target_ref().specificity(), &a.metadata.name)
            .cmp(&(b.spec.target_ref().specificity(), &b.metadata.name))
    });
    found
}

/// The key of a destination in [`WorkloadPolicy::outbound`]; `None` for
/// `Mesh` (the defaults).
pub fn destination_key(destination: &DestinationRef) -> Option<String> {
    match destination {
        DestinationRef::Mesh => None,
        DestinationRef::Service { name, namespace } => Some(format!("{namespace}/{name}")),
        DestinationRef::ExternalService { name, namespace } => {
            Some(format!("external:{namespace}/{name}"))
        }
    }
}

/// Merges the `to[]` entries of the applying policies (in merge order) into
/// the field of [`OutboundConf`] that `field` picks.
fn merge_to<S: PolicySpec, C: Merge>(
    policy: &mut WorkloadPolicy,
    applying: &[&Object<S>],
    to: impl Fn(&S) -> &[PolicyTo<C>],
    field: impl Fn(&mut OutboundConf) -> &mut C,
) {
    for p in applying {
        for entry in to(&p.spec) {
            let conf = match destination_key(&entry.target_ref) {
                None => &mut policy.outbound_defaults,
                Some(key) => policy.outbound.entry(key).or_default(),
            };
            field(conf).merge(&entry.default);
        }
    }
}

/// The policy of one workload: every kind's applying policies, selected and
/// merged (see the module's documentation for the order).
pub fn compile(
    workload: &WorkloadInfo<'_>,
    policies: &MeshPolicies,
    peers: &dyn PeerResolver,
) -> WorkloadPolicy {
    let mut policy = WorkloadPolicy {
        workload: workload.name.to_owned(),
        ..WorkloadPolicy::default()
    };

    // Every rule applies: deny wins at the agent, so order does not matter;
    // merge order keeps it stable.
    for p in applying(&policies.traffic_permissions, workload) {
        for rule in &p.spec.rules {
            policy.inbound.permissions.push(PermissionRule {
                policy: p.metadata.name.clone(),
                from: peers.resolve(&rule.from),
                action: rule.default.action,
                http: rule.default.http.clone(),
            });
        }
    }

    // The first matching route wins: the most specific policy's rules
    // first, equally specific ones by name, each in written order.
    for p in most_specific_first(applying(&policies.http_routes, workload)) {
        for to in &p.spec.to {
            let rules = to.rules.iter().map(|rule| CompiledRoute {
                policy: p.metadata.name.clone(),
                rule: rule.clone(),
            });
            match destination_key(&to.target_ref) {
                None => policy.outbound_defaults.routes.extend(rules),
                Some(key) => policy.outbound.entry(key).or_default().routes.extend(rules),
            }
        }
    }

    let timeouts = applying(&policies.timeouts, workload);
    merge_to(&mut policy, &timeouts, |s| &s.to, |c| &mut c.timeout);
    let retries = applying(&policies.retries, workload);
    merge_to(&mut policy, &retries, |s| &s.to, |c| &mut c.retry);
    let breakers = applying(&policies.circuit_breakers, workload);
    merge_to(
        &mut policy,
        &breakers,
        |s| &s.to,
        |c| &mut c.circuit_breaker,
    );
    let checks = applying(&policies.health_checks, workload);
    merge_to(&mut policy, &checks, |s| &s.to, |c| &mut c.health_check);
    let faults = applying(&policies.fault_injections, workload);
    merge_to(&mut policy, &faults, |s| &s.to, |c| &mut c.fault);
    let balancing = applying(&policies.load_balancings, workload);
    merge_to(
        &mut policy,
        &balancing,
        |s| &s.to,
        |c| &mut c.load_balancing,
    );

    let limits = applying(&policies.rate_limits, workload);
    merge_to(&mut policy, &limits, |s| &s.to, |c| &mut c.rate_limit);
    // A call takes the first rule whose `from` matches: most specific
    // policy first.
    for p in most_specific_first(limits) {
        for rule in &p.spec.rules {
            policy.inbound.rate_limits.push(PeerRule {
                policy: p.metadata.name.clone(),
                from: peers.resolve(&rule.from),
                default: rule.default.clone(),
            });
        }
    }

    let logs = applying(&policies.access_logs, workload);
    merge_to(&mut policy, &logs, |s| &s.to, |c| &mut c.access_log);
    // Inbound logging is per workload, not per caller: every rule's block
    // is merged whatever its `from` (documented in docs/policies.md).
    for p in &logs {
        for rule in &p.spec.rules {
            policy.inbound.access_log.merge(&rule.default);
        }
    }

    compile_tcp_routes(&mut policy, applying(&policies.tcp_routes, workload));
    for p in applying(&policies.traces, workload) {
        policy.trace.merge(&p.spec.default);
    }
    policy
}

/// A destination's TCPRoute is one policy's whole rule (backends are not
/// merged one by one): in merge order, each later (more specific, or
/// equally specific with a name sorting later) policy replaces it.
fn compile_tcp_routes(policy: &mut WorkloadPolicy, applying: Vec<&Object<TcpRouteSpec>>) {
    for p in applying {
        for to in &p.spec.to {
            let (Some(key), Some(rule)) = (destination_key(&to.target_ref), to.rules.first())
            else {
                continue;
            };
            policy.outbound.entry(key).or_default().tcp_route = Some(CompiledTcpRoute {
                policy: p.metadata.name.clone(),
                backend_refs: rule.default.backend_refs.clone(),
            });
        }
    }
}

/// Policies in the order where the first wins: most specific first,
/// equally specific ones by name.
fn most_specific_first<S: PolicySpec>(mut policies: Vec<&Object<S>>) -> Vec<&Object<S>> {
    policies.sort_by(|a, b| {
        b.spec
            .target_ref()
            .specificity()
            .cmp(&a.spec.target_ref().specificity())
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    policies
}

/// A policy that applies to a workload, as `weftctl inspect policies`
/// lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedPolicy {
    /// The policy's kind (`Timeout`).
    pub kind: String,
    /// Its name.
    pub name: String,
    /// What selected the workload.
    pub target_ref: TargetRef,
    /// Its place in its kind's merge order, from 1: a later one's fields
    /// win over an earlier one's.
    pub order: usize,
}

fn explain_kind<S: PolicySpec>(
    all: &[Object<S>],
    workload: &WorkloadInfo<'_>,
    out: &mut Vec<AppliedPolicy>,
) {
    for (i, p) in applying(all, workload).into_iter().enumerate() {
        out.push(AppliedPolicy {
            kind: S::KIND.as_str().to_owned(),
            name: p.metadata.name.clone(),
            target_ref: p.spec.target_ref().clone(),
            order: i + 1,
        });
    }
}

/// The policies that apply to a workload, kind by kind (in
/// [`Kind::POLICIES`] order), each kind's in merge order.
pub fn explain(workload: &WorkloadInfo<'_>, policies: &MeshPolicies) -> Vec<AppliedPolicy> {
    let mut out = Vec::new();
    for kind in Kind::POLICIES {
        match kind {
            Kind::TrafficPermission => {
                explain_kind(&policies.traffic_permissions, workload, &mut out)
            }
            Kind::HttpRoute => explain_kind(&policies.http_routes, workload, &mut out),
            Kind::Timeout => explain_kind(&policies.timeouts, workload, &mut out),
            Kind::Retry => explain_kind(&policies.retries, workload, &mut out),
            Kind::RateLimit => explain_kind(&policies.rate_limits, workload, &mut out),
            Kind::FaultInjection => explain_kind(&policies.fault_injections, workload, &mut out),
            Kind::LoadBalancing => explain_kind(&policies.load_balancings, workload, &mut out),
            Kind::AccessLog => explain_kind(&policies.access_logs, workload, &mut out),
            Kind::TcpRoute => explain_kind(&policies.tcp_routes, workload, &mut out),
            Kind::Trace => explain_kind(&policies.traces, workload, &mut out),
            Kind::CircuitBreaker => explain_kind(&policies.circuit_breakers, workload, &mut out),
            Kind::HealthCheck => explain_kind(&policies.health_checks, workload, &mut out),
            Kind::Mesh | Kind::Zone | Kind::Workload | Kind::Service | Kind::ExternalService => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::conf::Action;

    fn policies(yaml: &str) -> MeshPolicies {
        MeshPolicies::from_resources(crate::parse::parse_yaml(yaml).unwrap())
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn directory() -> Directory {
        let member = |ns: &str, service: &str, sa: &str, app: &str| Member {
            namespace: ns.to_owned(),
            service: service.to_owned(),
            labels: labels(&[("app", app)]),
            zone: "z1".to_owned(),
            identity: SpiffeId::new("td", ns, sa).unwrap(),
        };
        Directory::new(
            "td",
            vec![
                member("shop", "checkout", "checkout", "checkout"),
                member("shop", "checkout", "checkout", "checkout"),
                member("shop", "cart", "cart", "cart"),
            ],
        )
    }

    const TIMEOUTS: &str = "\
apiVersion: weft.io/v1alpha1
kind: Timeout
metadata: {name: z-mesh}
spec:
  to:
  - targetRef: {kind: Mesh}
    default: {connectTimeout: 5s, idleTimeout: 1h, requestTimeout: 15s}
  - targetRef: {kind: Service, name: payments, namespace: pay}
    default: {requestTimeout: 20s}
---
apiVersion: weft.io/v1alpha1
kind: Timeout
metadata: {name: b-labels}
spec:
  targetRef: {kind: Labels, labels: {app: web}}
  to:
  - targetRef: {kind: Mesh}
    default: {connectTimeout: 2s}
---
apiVersion: weft.io/v1alpha1
kind: Timeout
metadata: {name: a-labels}
spec:
  targetRef: {kind: Labels, labels: {app: web}}
  to:
  - targetRef: {kind: Mesh}
    default: {connectTimeout: 1s, idleTimeout: 10m}
---
apiVersion: weft.io/v1alpha1
kind: Timeout
metadata: {name: one}
spec:
  targetRef: {kind: Workload, name: web-1, namespace: shop}
  to:
  - targetRef: {kind: Service, name: payments, namespace: pay}
    default: {requestTimeout: 3s}
  - targetRef: {kind: ExternalService, name: stripe, namespace: pay}
    default: {connectTimeout: 9s}
---
apiVersion: weft.io/v1alpha1
kind: Timeout
metadata: {name: other}
spec:
  targetRef: {kind: Service, name: api, namespace: shop}
  to:
  - targetRef: {kind: Mesh}
    default: {connectTimeout: 7s}
";

    fn web(name: &'static str, labels: &'static BTreeMap<String, String>) -> WorkloadInfo<'static> {
        WorkloadInfo {
            name,
            namespace: "shop",
            service: "web",
            labels,
        }
    }

    fn web_labels() -> &'static BTreeMap<String, String> {
        Box::leak(Box::new(labels(&[("app", "web"), ("version", "v1")])))
    }

    #[test]
    fn selection_by_every_kind_of_target() {
        let w = web("web-1", web_labels());
        assert!(selects(&TargetRef::Mesh, &w));
        let by_labels = |pairs: &[(&str, &str)]| TargetRef::Labels {
            labels: labels(pairs),
        };
        assert!(selects(&by_labels(&[("app", "web")]), &w));
        assert!(!selects(&by_labels(&[("app", "web"), ("tier", "x")]), &w));
        let service = |ns: &str, name: &str| TargetRef::Service {
            name: name.to_owned(),
            namespace: ns.to_owned(),
        };
        assert!(selects(&service("shop", "web"), &w));
        assert!(!selects(&service("other", "web"), &w));
        let workload = |name: &str| TargetRef::Workload {
            name: name.to_owned(),
            namespace: "shop".to_owned(),
        };
        assert!(selects(&workload("web-1"), &w));
        assert!(!selects(&workload("web-2"), &w));
    }

    #[test]
    fn defaults_merge_field_by_field_most_specific_last() {
        let all = policies(TIMEOUTS);
        let compiled = compile(&web("web-1", web_labels()), &all, &directory());
        let defaults = &compiled.outbound_defaults.timeout;
        // Labels beat Mesh; between the two Labels policies (same number
        // of labels) the later name, b-labels, wins connectTimeout, while
        // a-labels' idleTimeout stays (b-labels does not set it).
        assert_eq!(defaults.connect_timeout.unwrap().to_string(), "2s");
        assert_eq!(defaults.idle_timeout.unwrap().to_string(), "10m");
        assert_eq!(defaults.request_timeout.unwrap().to_string(), "15s");
        // Named destinations: the Workload policy beats the Mesh one.
        let payments = &compiled.outbound["pay/payments"].timeout;
        assert_eq!(payments.request_timeout.unwrap().to_string(), "3s");
        assert_eq!(payments.connect_timeout, None);
        let stripe = &compiled.outbound["external:pay/stripe"].timeout;
        assert_eq!(stripe.connect_timeout.unwrap().to_string(), "9s");
        let merged = compiled.outbound_for("pay/payments");
        assert_eq!(merged.timeout.connect_timeout.unwrap().to_string(), "2s");
        assert_eq!(merged.timeout.request_timeout.unwrap().to_string(), "3s");

        // Another workload of the service gets neither the Workload policy
        // nor the Labels ones when its labels differ.
        let plain = Box::leak(Box::new(BTreeMap::new()));
        let other = compile(&web("web-2", plain), &all, &directory());
        assert_eq!(
            other.outbound["pay/payments"]
                .timeout
                .request_timeout
                .unwrap()
                .to_string(),
            "20s"
        );
        assert_eq!(
            other
                .outbound_defaults
                .timeout
                .connect_timeout
                .unwrap()
                .to_string(),
            "5s"
        );
    }

    #[test]
    fn explain_lists_the_merge_order() {
        let all = policies(TIMEOUTS);
        let applied = explain(&web("web-1", web_labels()), &all);
        let names: Vec<(&str, &str, usize)> = applied
            .iter()
            .map(|a| (a.kind.as_str(), a.name.as_str(), a.order))
            .collect();
        assert_eq!(
            names,
            [
                ("Timeout", "z-mesh", 1),
                ("Timeout", "a-labels", 2),
                ("Timeout", "b-labels", 3),
                ("Timeout", "one", 4)
            ]
        );
    }

    #[test]
    fn more_labels_are_more_specific() {
        let yaml = "\
apiVersion: weft.io/v1alpha1
kind: Retry
metadata: {name: a-two-labels}
spec:
  targetRef: {kind: Labels, labels: {app: web, version: v1}}
  to:
  - targetRef: {kind: Mesh}
    default: {numRetries: 2}
---
apiVersion: weft.io/v1alpha1
kind: Retry
metadata: {name: b-one-label}
spec:
  targetRef: {kind: Labels, labels: {app: web}}
  to:
  - targetRef: {kind: Mesh}
    default: {numRetries: 1}
";
        let compiled = compile(&web("web-1", web_labels()), &policies(yaml), &directory());
        assert_eq!(compiled.outbound_defaults.retry.num_retries, Some(2));
    }

    #[test]
    fn circuit_breakers_and_health_checks_merge_field_by_field() {
        let yaml = "\
apiVersion: weft.io/v1alpha1
kind: CircuitBreaker
metadata: {name: mesh}
spec:
  to:
  - targetRef: {kind: Mesh}
    default: {maxRequests: 100, maxConnections: 50}
---
apiVersion: weft.io/v1alpha1
kind: CircuitBreaker
metadata: {name: web}
spec:
  targetRef: {kind: Labels, labels: {app: web}}
  to:
  - targetRef: {kind: Service, name: payments, namespace: payments}
    default: {maxRequests: 2, outlierDetection: {consecutive5xx: 3}}
---
apiVersion: weft.io/v1alpha1
kind: HealthCheck
metadata: {name: mesh}
spec:
  to:
  - targetRef: {kind: Mesh}
    default: {interval: 5s, http: {path: /healthz}}
---
apiVersion: weft.io/v1alpha1
kind: HealthCheck
metadata: {name: web}
spec:
  targetRef: {kind: Workload, name: web-1, namespace: shop}
  to:
  - targetRef: {kind: Service, name: payments, namespace: payments}
    default: {interval: 1s}
";
        let compiled = compile(&web("web-1", web_labels()), &policies(yaml), &directory());
        let payments = compiled.outbound_for("payments/payments");
        assert_eq!(payments.circuit_breaker.max_requests, Some(2));
        assert_eq!(payments.circuit_breaker.max_connections, Some(50));
        let outlier = payments.circuit_breaker.outlier_detection.unwrap();
        assert_eq!(outlier.consecutive_5xx, 3);
        assert_eq!(outlier.base_ejection_time.to_string(), "30s");
        assert_eq!(payments.health_check.interval.unwrap().to_string(), "1s");
        assert_eq!(payments.health_check.http.unwrap().path, "/healthz");
        // Unset blocks stay out of what the zone sends.
        let json = serde_json::to_value(WorkloadPolicy::default()).unwrap();
        assert!(json["outboundDefaults"].get("circuitBreaker").is_none());
    }

    #[test]
    fn permissions_keep_every_rule_with_resolved_callers() {
        let yaml = "\
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata: {name: allow-all}
spec:
  rules:
  - from: {kind: Mesh}
    default: {action: Allow}
---
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata: {name: web}
spec:
  targetRef: {kind: Service, name: web, namespace: shop}
  rules:
  - from: {kind: Service, name: checkout, namespace: shop}
    default: {action: Allow}
  - from: {kind: SpiffeIdPrefix, value: 'spiffe://td/ns/batch/'}
    default: {action: Deny}
  - from: {kind: Labels, labels: {app: cart}}
    default: {action: Deny}
  - from: {kind: Zone, name: nowhere}
    default: {action: Allow}
  - from: {kind: SpiffeId, value: 'spiffe://td/ns/x/sa/y'}
    default: {action: Allow}
---
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata: {name: elsewhere}
spec:
  targetRef: {kind: Service, name: api, namespace: shop}
  rules:
  - from: {kind: Mesh}
    default: {action: Deny}
";
        let compiled = compile(&web("web-1", web_labels()), &policies(yaml), &directory());
        let rules: Vec<(String, Vec<String>, Action)> = compiled
            .inbound
            .permissions
            .iter()
            .map(|r| {
                (
                    r.policy.clone(),
                    r.from.iter().map(ToString::to_string).collect(),
                    r.action,
                )
            })
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            rules,
            [
                ("allow-all".to_owned(), s(&["spiffe://td/*"]), Action::Allow),
                (
                    "web".to_owned(),
                    s(&["spiffe://td/ns/shop/sa/checkout"]),
                    Action::Allow
                ),
                (
                    "web".to_owned(),
                    s(&["spiffe://td/ns/batch/*"]),
                    Action::Deny
                ),
                (
                    "web".to_owned(),
                    s(&["spiffe://td/ns/shop/sa/cart"]),
                    Action::Deny
                ),
                ("web".to_owned(), s(&[]), Action::Allow),
                (
                    "web".to_owned(),
                    s(&["spiffe://td/ns/x/sa/y"]),
                    Action::Allow
                ),
            ]
        );
        // What the agent reads back is what was compiled.
        let json = serde_json::to_string(&vec![compiled.clone()]).unwrap();
        let back: Vec<WorkloadPolicy> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, [compiled]);
    }

    #[test]
    fn routes_most_specific_policy_first_in_written_order() {
        let route = |name: &str, target: &str, paths: &[&str]| {
            let rules: String = paths
                .iter()
                .map(|p| {
                    format!(
                        "    - matches: [{{path: {{type: PathPrefix, value: {p}}}}}]\n      default: {{}}\n"
                    )
                })
                .collect();
            format!(
                "apiVersion: weft.io/v1alpha1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {target}\n  to:\n  - targetRef: {{kind: Service, name: api, namespace: shop}}\n    rules:\n{rules}---\n"
            )
        };
        let yaml = [
            route("a-mesh", "{kind: Mesh}", &["/m1", "/m2"]),
            route(
                "z-service",
                "{kind: Service, name: web, namespace: shop}",
                &["/s"],
            ),
            route(
                "b-service",
                "{kind: Service, name: web, namespace: shop}",
                &["/b"],
            ),
            route(
                "w",
                "{kind: Workload, name: web-1, namespace: shop}",
                &["/w1", "/w2"],
            ),
        ]
        .concat();
        let compiled = compile(&web("web-1", web_labels()), &policies(&yaml), &directory());
        let order: Vec<String> = compiled.outbound["shop/api"]
            .routes
            .iter()
            .map(|r| match &r.rule.matches[0].path {
                Some(crate::policy::conf::PathMatch::PathPrefix { value }) => {
                    format!("{}{value}", r.policy)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            order,
            [
                "w/w1",
                "w/w2",
                "b-service/b",
                "z-service/s",
                "a-mesh/m1",
                "a-mesh/m2"
            ]
        );
    }

    #[test]
    fn rate_limit_rules_most_specific_first_and_access_logs_merged() {
        let yaml = "\
apiVersion: weft.io/v1alpha1
kind: RateLimit
metadata: {name: mesh}
spec:
  rules:
  - from: {kind: Mesh}
    default: {tcp: {connections: 100, interval: 1s}}
  to:
  - targetRef: {kind: Mesh}
    default: {tcp: {connections: 50, interval: 1s}}
---
apiVersion: weft.io/v1alpha1
kind: RateLimit
metadata: {name: web}
spec:
  targetRef: {kind: Service, name: web, namespace: shop}
  rules:
  - from: {kind: Service, name: cart, namespace: shop}
    default: {tcp: {connections: 1, interval: 1s}}
  - from: {kind: Mesh}
    default: {tcp: {connections: 10, interval: 1s}}
---
apiVersion: weft.io/v1alpha1
kind: AccessLog
metadata: {name: mesh}
spec:
  rules:
  - from: {kind: Mesh}
    default: {backends: [{type: Stdout}]}
---
apiVersion: weft.io/v1alpha1
kind: AccessLog
metadata: {name: web}
spec:
  targetRef: {kind: Service, name: web, namespace: shop}
  rules:
  - from: {kind: Service, name: cart, namespace: shop}
    default: {backends: [{type: File, path: /var/log/web.log}]}
";
        let compiled = compile(&web("web-1", web_labels()), &policies(yaml), &directory());
        let limits: Vec<(&str, u32)> = compiled
            .inbound
            .rate_limits
            .iter()
            .map(|r| {
                (
                    r.policy.as_str(),
                    r.default.tcp.as_ref().unwrap().connections,
                )
            })
            .collect();
        assert_eq!(limits, [("web", 1), ("web", 10), ("mesh", 100)]);
        assert_eq!(
            compiled
                .outbound_defaults
                .rate_limit
                .tcp
                .as_ref()
                .map(|t| t.connections),
            Some(50)
        );
        let backends = compiled.inbound.access_log.backends.unwrap();
        assert!(
            matches!(&backends[..], [crate::policy::conf::AccessLogBackend::File { path, .. }] if path == "/var/log/web.log"),
            "{backends:?}"
        );
    }

    #[test]
    fn peers_are_resolved_once_per_directory() {
        let dir = directory();
        let peer = PeerRef::Service {
            name: "checkout".to_owned(),
            namespace: "shop".to_owned(),
        };
        let first = dir.resolve(&peer);
        assert_eq!(first.len(), 1, "duplicates removed: {first:?}");
        assert_eq!(dir.resolve(&peer), first);
        assert_eq!(dir.resolved.lock().unwrap().len(), 1);
    }

    #[test]
    fn tcp_route_most_specific_wins_whole_and_trace_merges() {
        let yaml = "\
apiVersion: weft.io/v1alpha1
kind: TCPRoute
metadata: {name: z-mesh}
spec:
  to:
  - targetRef: {kind: Service, name: db, namespace: shop}
    rules:
    - default:
        backendRefs: [{name: db, namespace: shop, weight: 1}, {name: db-v2, namespace: shop, weight: 1}]
---
apiVersion: weft.io/v1alpha1
kind: TCPRoute
metadata: {name: a-web}
spec:
  targetRef: {kind: Service, name: web, namespace: shop}
  to:
  - targetRef: {kind: Service, name: db, namespace: shop}
    rules:
    - default:
        backendRefs: [{name: db-v2, namespace: shop, port: 5433}]
---
apiVersion: weft.io/v1alpha1
kind: Trace
metadata: {name: mesh}
spec:
  default: {sampling: 5, backend: {type: Otlp, endpoint: 'http://collector:4318'}}
---
apiVersion: weft.io/v1alpha1
kind: Trace
metadata: {name: web}
spec:
  targetRef: {kind: Service, name: web, namespace: shop}
  default: {sampling: 100}
";
        let compiled = compile(&web("web-1", web_labels()), &policies(yaml), &directory());
        let route = compiled.outbound["shop/db"].tcp_route.clone().unwrap();
        assert_eq!(route.policy, "a-web", "the Service-targeted policy wins");
        assert_eq!(route.backend_refs.len(), 1);
        assert_eq!(route.backend_refs[0].port, Some(5433));
        assert_eq!(compiled.trace.sampling, Some(100));
        assert_eq!(
            compiled.trace.backend,
            Some(crate::kinds::TraceBackend::Otlp {
                endpoint: "http://collector:4318".to_owned()
            })
        );
        // Through JSON, as the zone sends it.
        let json = serde_json::to_string(&compiled).unwrap();
        let back: WorkloadPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(back, compiled);
        assert_eq!(back.outbound_for("shop/db").tcp_route, Some(route));
    }

    #[test]
    fn tcp_route_and_trace_are_refused_with_field_paths() {
        let bad = "\
apiVersion: weft.io/v1alpha1
kind: TCPRoute
metadata: {name: bad}
spec:
  to:
  - targetRef: {kind: Mesh}
    rules:
    - default: {backendRefs: [{name: a, weight: 0}]}
    - default: {backendRefs: []}
---
apiVersion: weft.io/v1alpha1
kind: Trace
metadata: {name: bad}
spec:
  default: {sampling: 101, backend: {type: Otlp, endpoint: 'https://x:4318'}}
";
        let err = crate::parse::parse_yaml(bad).unwrap_err().to_string();
        for expected in [
            "spec.to[0].targetRef.kind",
            "spec.to[0].rules: must list exactly one rule",
            "spec.to[0].rules[0].default.backendRefs: the weights must not all be 0",
            "spec.to[0].rules[1].default.backendRefs: must list at least one backend",
            "spec.default.sampling",
            "spec.default.backend.endpoint",
        ] {
            assert!(err.contains(expected), "{expected:?} not in {err}");
        }
    }
}
