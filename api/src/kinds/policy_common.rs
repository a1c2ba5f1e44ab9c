//! The parts every policy kind shares: the `to[]` and `rules[]` entries
//! (generic over the kind's `default` block) and their checks, so that each
//! kind's module only says what is particular to it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::check::Check;
use crate::policy::target::{DestinationRef, PeerRef};
use crate::validation::{ExistingResources, FieldPath, Problems};

/// A `to[]` entry: the settings for calls to one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTo<C> {
    /// The destination: `Mesh` (every destination), a `Service` or an
    /// `ExternalService`.
    pub target_ref: DestinationRef,
    /// The settings for calls to it.
    pub default: C,
}

/// A `rules[]` entry: the settings for calls from some callers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule<C> {
    /// The callers, matched on the identity their certificate proves.
    pub from: PeerRef,
    /// The settings for their calls.
    pub default: C,
}

/// Checks `to[]` entries; `required` when the kind has no other list.
pub(crate) fn check_to<C: Check>(
    to: &[PolicyTo<C>],
    required: bool,
    path: &FieldPath,
    problems: &mut Problems,
) {
    if required && to.is_empty() {
        problems.add(path.clone(), "must list at least one destination");
    }
    for (i, entry) in to.iter().enumerate() {
        let at = path.index(i);
        entry.target_ref.check(&at.field("targetRef"), problems);
        entry.default.check(&at.field("default"), problems);
    }
}

/// Checks `rules[]` entries; `required` when the kind has no other list.
pub(crate) fn check_rules<C: Check>(
    rules: &[PolicyRule<C>],
    required: bool,
    path: &FieldPath,
    problems: &mut Problems,
) {
    if required && rules.is_empty() {
        problems.add(path.clone(), "must list at least one rule");
    }
    for (i, rule) in rules.iter().enumerate() {
        let at = path.index(i);
        rule.from.check(&at.field("from"), problems);
        rule.default.check(&at.field("default"), problems);
    }
}

/// Reports each `spec.to[i].targetRef` (given in order) that names an
/// ExternalService that does not exist, when `existing` can tell. Services
/// and Workloads are not checked: they are derived from what agents
/// register and may appear after the policy, which then applies to them
/// from that moment.
pub(crate) fn check_destinations<'a>(
    mesh: &str,
    destinations: impl Iterator<Item = &'a DestinationRef>,
    existing: &dyn ExistingResources,
    problems: &mut Problems,
) {
    for (i, destination) in destinations.enumerate() {
        if let DestinationRef::ExternalService { name, namespace } = destination {
            if existing.external_service_exists(mesh, namespace, name) == Some(false) {
                problems.add(
                    FieldPath::of(&["spec", "to"]).index(i).field("targetRef"),
                    format!(
                        "ExternalService {namespace}/{name} does not exist in mesh {mesh:?}; create it first"
                    ),
                );
            }
        }
    }
}

/// Defines the spec of a policy kind that configures outbound calls only
/// (`targetRef` and `to[]`): such kinds differ in nothing but their
/// `default` block, so each module is one invocation. The doc comment given
/// becomes the kind's summary in the reference.
macro_rules! outbound_policy_spec {
    ($(#[$doc:meta])* $spec:ident, $conf:ty, $kind:ident) => {
        $(#[$doc])*
        #[derive(
            Debug,
            Clone,
            PartialEq,
            Eq,
            serde::Serialize,
            serde::Deserialize,
            schemars::JsonSchema,
        )]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $spec {
            /// The workloads whose outbound calls get the settings (default: the
            /// whole mesh).
            #[serde(default)]
            pub target_ref: $crate::policy::target::TargetRef,
            /// The destinations and their settings (at least one).
            pub to: Vec<$crate::kinds::policy_common::PolicyTo<$conf>>,
        }

        impl $crate::resource::Spec for $spec {
            const KIND: $crate::resource::Kind = $crate::resource::Kind::$kind;
            type Status = $crate::resource::NoStatus;

            fn validate(
                &self,
                _: &$crate::resource::ObjectMeta,
                path: &$crate::validation::FieldPath,
                problems: &mut $crate::validation::Problems,
            ) {
                use $crate::policy::check::Check;
                self.target_ref.check(&path.field("targetRef"), problems);
                $crate::kinds::policy_common::check_to(&self.to, true, &path.field("to"), problems);
            }

            fn check_references(
                object: &$crate::resource::Object<Self>,
                existing: &dyn $crate::validation::ExistingResources,
                problems: &mut $crate::validation::Problems,
            ) {
                $crate::kinds::policy_common::check_destinations(
                    object.mesh().unwrap_or_default(),
                    object.spec.to.iter().map(|entry| &entry.target_ref),
                    existing,
                    problems,
                );
            }

            fn into_resource(object: $crate::resource::Object<Self>) -> $crate::resource::Resource {
                $crate::resource::Resource::$kind(object)
            }
        }
    };
}
pub(crate) use outbound_policy_spec;

/// Defines the spec of a policy kind that configures both calls out
/// (`to[]`, per destination) and calls in (`rules[]`, per caller), at least
/// one of them set: like [`outbound_policy_spec`], one invocation per kind.
macro_rules! two_way_policy_spec {
    ($(#[$doc:meta])* $spec:ident, $conf:ty, $kind:ident) => {
        $(#[$doc])*
        #[derive(
            Debug,
            Clone,
            PartialEq,
            Eq,
            serde::Serialize,
            serde::Deserialize,
            schemars::JsonSchema,
        )]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $spec {
            /// The workloads whose agents apply the settings (default: the whole
            /// mesh).
            #[serde(default)]
            pub target_ref: $crate::policy::target::TargetRef,
            /// Outbound: settings for calls the workloads make, per destination.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub to: Vec<$crate::kinds::policy_common::PolicyTo<$conf>>,
            /// Inbound: settings for calls into the workloads, per caller.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub rules: Vec<$crate::kinds::policy_common::PolicyRule<$conf>>,
        }

        impl $crate::resource::Spec for $spec {
            const KIND: $crate::resource::Kind = $crate::resource::Kind::$kind;
            type Status = $crate::resource::NoStatus;

            fn validate(
                &self,
                _: &$crate::resource::ObjectMeta,
                path: &$crate::validation::FieldPath,
                problems: &mut $crate::validation::Problems,
            ) {
                use $crate::policy::check::Check;
                self.target_ref.check(&path.field("targetRef"), problems);
                if self.to.is_empty() && self.rules.is_empty() {
                    problems.add(path.clone(), "set at least one of to, rules");
                }
                $crate::kinds::policy_common::check_to(&self.to, false, &path.field("to"), problems);
                $crate::kinds::policy_common::check_rules(
                    &self.rules,
                    false,
                    &path.field("rules"),
                    problems,
                );
            }

            fn check_references(
                object: &$crate::resource::Object<Self>,
                existing: &dyn $crate::validation::ExistingResources,
                problems: &mut $crate::validation::Problems,
            ) {
                $crate::kinds::policy_common::check_destinations(
                    object.mesh().unwrap_or_default(),
                    object.spec.to.iter().map(|entry| &entry.target_ref),
                    existing,
                    problems,
                );
            }

            fn into_resource(object: $crate::resource::Object<Self>) -> $crate::resource::Resource {
                $crate::resource::Resource::$kind(object)
            }
        }
    };
}
pub(crate) use two_way_policy_spec;
