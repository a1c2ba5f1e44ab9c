//! `Zone`: one control-plane zone (a Kubernetes cluster or a group of VMs)
//! under the global controller.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::resource::{Kind, NoStatus, Object, ObjectMeta, Resource, Spec};
use crate::validation::{FieldPath, Problems};

/// A zone: where a zone controller runs and which backend it uses. Its name
/// (`metadata.name`) is the `<zone>` of `<service>.<namespace>.<zone>.mesh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneSpec {
    /// How the zone's inventory is kept: `universal` (VMs and bare metal,
    /// workloads registered by agents) or `kubernetes` (a cluster, resources
    /// as CRDs).
    pub backend: ZoneBackend,
}

/// The kind of zone controller, which decides where its inventory comes
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ZoneBackend {
    /// VMs and bare metal: agents register their workloads.
    Universal,
    /// A Kubernetes cluster: workloads come from pods.
    Kubernetes,
}

impl Spec for ZoneSpec {
    const KIND: Kind = Kind::Zone;
    type Status = NoStatus;

    fn validate(&self, _: &ObjectMeta, _: &FieldPath, _: &mut Problems) {}

    fn into_resource(object: Object<Self>) -> Resource {
        Resource::Zone(object)
    }
}
