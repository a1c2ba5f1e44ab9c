//! `AccessLog`: where the agents log the calls of the selected workloads.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::policy_common::{check_destination, check_rules, check_to, PolicyRule, PolicyTo};
use crate::policy::check::Check;
use crate::policy::conf::AccessLogConf;
use crate::policy::target::TargetRef;
use crate::resource::{Kind, NoStatus, Object, ObjectMeta, Resource, Spec};
use crate::validation::{ExistingResources, FieldPath, Problems};

/// Logs the calls the selected workloads make (`to`) or receive (`rules`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogSpec {
    /// The workloads whose agents apply the settings (default: the whole
    /// mesh).
    #[serde(default)]
    pub target_ref: TargetRef,
    /// Outbound: settings for calls the workloads make, per destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<PolicyTo<AccessLogConf>>,
    /// Inbound: settings for calls into the workloads, per caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<PolicyRule<AccessLogConf>>,
}

impl Spec for AccessLogSpec {
    const KIND: Kind = Kind::AccessLog;
    type Status = NoStatus;

    fn validate(&self, _: &ObjectMeta, path: &FieldPath, problems: &mut Problems) {
        self.target_ref.check(&path.field("targetRef"), problems);
        if self.to.is_empty() && self.rules.is_empty() {
            problems.add(path.clone(), "set at least one of to, rules");
        }
        check_to(&self.to, false, &path.field("to"), problems);
        check_rules(&self.rules, false, &path.field("rules"), problems);
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
        Resource::AccessLog(object)
    }
}
