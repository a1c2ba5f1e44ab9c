//! `TCPRoute`: how the TCP connections the selected workloads open to a
//! service are split between backend services, by weight (a canary or a
//! migration for protocols the agent does not parse).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::policy_common::check_destinations;
use crate::policy::check::Check;
use crate::policy::conf::BackendRef;
use crate::policy::target::{DestinationRef, TargetRef};
use crate::resource::{Kind, NoStatus, Object, ObjectMeta, Resource, Spec};
use crate::validation::{ExistingResources, FieldPath, Problems};

/// Splits the TCP connections that the selected workloads open to a
/// service between backend services, by weight: each connection picks a
/// backend, then an endpoint of it. The most specific TCPRoute for a
/// service wins (between equally specific ones, the name that sorts last).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRouteSpec {
    /// The workloads whose outbound connections are routed (default: the
    /// whole mesh).
    #[serde(default)]
    pub target_ref: TargetRef,
    /// The services whose connections are routed, each with its rule (at
    /// least one).
    pub to: Vec<TcpRouteTo>,
}

/// The rule for connections to one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRouteTo {
    /// The service (`kind: Service`) whose connections the rule takes.
    pub target_ref: DestinationRef,
    /// Exactly one rule: a TCP connection carries nothing to match on, so
    /// one rule takes every connection (a list, to leave room for matches
    /// on ports later without changing the shape).
    pub rules: Vec<TcpRouteRule>,
}

/// One rule of a TCPRoute.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRouteRule {
    /// Where the connections go.
    pub default: TcpRouteConf,
}

/// Where a TCPRoute rule sends connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRouteConf {
    /// The services that receive the connections, split by weight (at
    /// least one; the weights must not all be 0).
    pub backend_refs: Vec<BackendRef>,
}

impl Check for TcpRouteConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        let at = path.field("backendRefs");
        if self.backend_refs.is_empty() {
            problems.add(at.clone(), "must list at least one backend");
        } else if self.backend_refs.iter().all(|b| b.weight == 0) {
            problems.add(
                at.clone(),
                "the weights must not all be 0: no connection could go anywhere",
            );
        }
        self.backend_refs.check(&at, problems);
    }
}

/// A TCPRoute's rule as compiled for one destination, with the policy it
/// comes from (for logs and metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledTcpRoute {
    /// The TCPRoute's name.
    pub policy: String,
    /// The backends, with their weights.
    pub backend_refs: Vec<BackendRef>,
}

impl Spec for TcpRouteSpec {
    const KIND: Kind = Kind::TcpRoute;
    type Status = NoStatus;

    fn validate(&self, _: &ObjectMeta, path: &FieldPath, problems: &mut Problems) {
        self.target_ref.check(&path.field("targetRef"), problems);
        let to = path.field("to");
        if self.to.is_empty() {
            problems.add(to.clone(), "must list at least one service");
        }
        for (i, entry) in self.to.iter().enumerate() {
            let at = to.index(i);
            if !matches!(entry.target_ref, DestinationRef::Service { .. }) {
                problems.add(
                    at.field("targetRef").field("kind"),
                    "must be Service: a TCPRoute routes the connections to one service",
                );
            }
            entry.target_ref.check(&at.field("targetRef"), problems);
            if entry.rules.len() != 1 {
                problems.add(
                    at.field("rules"),
                    "must list exactly one rule: it takes every connection",
                );
            }
            for (j, rule) in entry.rules.iter().enumerate() {
                rule.default
                    .check(&at.field("rules").index(j).field("default"), problems);
            }
        }
    }

    fn check_references(
        object: &Object<Self>,
        existing: &dyn ExistingResources,
        problems: &mut Problems,
    ) {
        check_destinations(
            object.mesh().unwrap_or_default(),
            object.spec.to.iter().map(|entry| &entry.target_ref),
            existing,
            problems,
        );
    }

    fn into_resource(object: Object<Self>) -> Resource {
        Resource::TcpRoute(object)
    }
}
