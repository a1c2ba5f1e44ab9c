//! `HealthCheck`: active checks of each endpoint of a destination.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::policy_common::{check_destination, check_to, PolicyTo};
use crate::policy::check::Check;
use crate::policy::conf::HealthCheckConf;
use crate::policy::target::TargetRef;
use crate::resource::{Kind, NoStatus, Object, ObjectMeta, Resource, Spec};
use crate::validation::{ExistingResources, FieldPath, Problems};

/// Active health checks sent by the selected workloads' agents to each
/// endpoint of a destination, through the tunnel like a call: an endpoint
/// that fails them is not picked until it passes again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// The workloads whose outbound calls get the settings (default: the
    /// whole mesh).
    #[serde(default)]
    pub target_ref: TargetRef,
    /// The destinations and their settings (at least one).
    pub to: Vec<PolicyTo<HealthCheckConf>>,
}

impl Spec for HealthCheckSpec {
    const KIND: Kind = Kind::HealthCheck;
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
        Resource::HealthCheck(object)
    }
}
