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

/// Reports a destination naming an ExternalService that does not exist,
/// when `existing` can tell. Services and Workloads are not checked: they
/// are derived from what agents register and may appear after the policy,
/// which then applies to them from that moment.
pub(crate) fn check_destination(
    mesh: &str,
    destination: &DestinationRef,
    path: FieldPath,
    existing: &dyn ExistingResources,
    problems: &mut Problems,
) {
    if let DestinationRef::ExternalService { name, namespace } = destination {
        if existing.external_service_exists(mesh, namespace, name) == Some(false) {
            problems.add(
                path,
                format!(
                    "ExternalService {namespace}/{name} does not exist in mesh {mesh:?}; create it first"
                ),
            );
        }
    }
}
