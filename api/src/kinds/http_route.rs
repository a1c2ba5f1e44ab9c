//! `HTTPRoute`: how HTTP requests to a service are matched, rewritten,
//! redirected, mirrored and split between backends.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::policy_common::check_destinations;
use crate::policy::check::Check;
use crate::policy::conf::RouteRule;
use crate::policy::target::{DestinationRef, TargetRef};
use crate::resource::{Kind, NoStatus, Object, ObjectMeta, Resource, Spec};
use crate::validation::{ExistingResources, FieldPath, Problems};

/// Routes the HTTP requests that the selected workloads send to a
/// service. The first rule that matches a request takes it; the rules of
/// more specific HTTPRoutes are tried first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// The workloads whose outbound requests are routed (default: the whole
    /// mesh).
    #[serde(default)]
    pub target_ref: TargetRef,
    /// The services whose requests are routed, each with its rules (at
    /// least one).
    pub to: Vec<HttpRouteTo>,
}

/// The rules for requests to one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTo {
    /// The service (`kind: Service`) whose requests the rules take.
    pub target_ref: DestinationRef,
    /// The rules, tried in order (at least one).
    pub rules: Vec<RouteRule>,
}

impl Spec for HttpRouteSpec {
    const KIND: Kind = Kind::HttpRoute;
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
                    "must be Service: an HTTPRoute routes the requests to one service",
                );
            }
            entry.target_ref.check(&at.field("targetRef"), problems);
            if entry.rules.is_empty() {
                problems.add(at.field("rules"), "must list at least one rule");
            }
            entry.rules.check(&at.field("rules"), problems);
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
        Resource::HttpRoute(object)
    }
}
