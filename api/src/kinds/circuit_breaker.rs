//! `CircuitBreaker`: how many calls may be open to a destination, and when
//! an endpoint that keeps failing is set aside.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::policy_common::{check_destination, check_to, PolicyTo};
use crate::policy::check::Check;
use crate::policy::conf::CircuitBreakerConf;
use crate::policy::target::TargetRef;
use crate::resource::{Kind, NoStatus, Object, ObjectMeta, Resource, Spec};
use crate::validation::{ExistingResources, FieldPath, Problems};

/// Limits and passive outlier detection for the calls the selected workloads
/// make, per destination: over a limit a call is refused at once (503
/// `overflow` at L7, a reset at L4) instead of queueing on an overloaded
/// destination, and an endpoint that keeps failing is ejected for a while.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    /// The workloads whose outbound calls get the settings (default: the
    /// whole mesh).
    #[serde(default)]
    pub target_ref: TargetRef,
    /// The destinations and their settings (at least one).
    pub to: Vec<PolicyTo<CircuitBreakerConf>>,
}

impl Spec for CircuitBreakerSpec {
    const KIND: Kind = Kind::CircuitBreaker;
    type Status = NoStatus;

    fn validate(&self, _: &ObjectMeta, path: &FieldPath, problems: &mut Problems) {
        self.target_ref.check(&path.field("targetRef"), problems);
        check_to(&self.to, true, &path.field("to"), problems);
    }

    fn check_references(
        object: &Object<Self>,
        existing: &dyn ExistingResources,
        problems: &mut Problems,
    ) {
        let mesh = object.mesh().unwrap_or_default();
        for (i, entry) in object.spec.to.iter().enumerate() {
            let at = FieldPath::of(&["spec", "to"]).index(i).field("targetRef");
            check_destination(mesh, &entry.target_ref, at, existing, problems);
        }
    }

    fn into_resource(object: Object<Self>) -> Resource {
        Resource::CircuitBreaker(object)
    }
}
