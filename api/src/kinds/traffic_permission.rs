//! `TrafficPermission`: who may call the selected workloads (L4, and L7
//! with `http` matches). The agent denies by default, so a mesh without any
//! TrafficPermission refuses every call; a new mesh gets `allow-all`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::kinds::policy_common::{check_rules, PolicyRule};
use crate::policy::check::Check;
use crate::policy::conf::PermissionConf;
use crate::policy::target::TargetRef;
use crate::resource::{Kind, NoStatus, Object, ObjectMeta, Resource, Spec};
use crate::validation::{FieldPath, Problems};

/// Allows or denies callers of the workloads that `targetRef` selects.
/// Every rule of every TrafficPermission selecting a workload applies: a
/// call is refused if any matching rule denies it, let in if one allows
/// it, and refused when none matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPermissionSpec {
    /// The workloads whose agents enforce the policy (default: the whole
    /// mesh).
    #[serde(default)]
    pub target_ref: TargetRef,
    /// The callers and what is done with their calls (at least one).
    pub rules: Vec<PolicyRule<PermissionConf>>,
}

/// The name of the TrafficPermission a new mesh gets.
pub const ALLOW_ALL: &str = "allow-all";

impl TrafficPermissionSpec {
    /// What a new mesh starts with (as Kuma does): every workload of the
    /// mesh may call every other, although agents deny by default. Delete
    /// or narrow it to lock the mesh down.
    pub fn allow_all() -> Self {
        TrafficPermissionSpec {
            target_ref: TargetRef::Mesh,
            rules: vec![PolicyRule {
                from: crate::policy::target::PeerRef::Mesh,
                default: PermissionConf {
                    action: crate::policy::conf::Action::Allow,
                    http: Vec::new(),
                },
            }],
        }
    }

    /// The `allow-all` TrafficPermission of a new mesh.
    pub fn allow_all_in(mesh: &str) -> Object<Self> {
        let metadata = ObjectMeta {
            mesh: Some(mesh.to_owned()),
            ..ObjectMeta::named(ALLOW_ALL)
        };
        Object::new(metadata, Self::allow_all())
    }
}

impl Spec for TrafficPermissionSpec {
    const KIND: Kind = Kind::TrafficPermission;
    type Status = NoStatus;

    fn validate(&self, _: &ObjectMeta, path: &FieldPath, problems: &mut Problems) {
        self.target_ref.check(&path.field("targetRef"), problems);
        check_rules(&self.rules, true, &path.field("rules"), problems);
    }

    fn into_resource(object: Object<Self>) -> Resource {
        Resource::TrafficPermission(object)
    }
}
