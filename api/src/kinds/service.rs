//! `Service`: the workloads of one mesh, namespace and service name in a
//! zone, reachable as `<service>.<namespace>.mesh` at a stable virtual IP.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::mesh::WorkloadPort;
use crate::resource::{Kind, Object, ObjectMeta, Resource, Spec};
use crate::validation::{
    check_ports, dns1123_label, unicast_address, ExistingResources, FieldPath, Problems,
};

/// A service in one zone: the Workloads of the same mesh and namespace whose
/// `spec.service` is this resource's name. The zone controller derives it
/// from those workloads (a user may also declare it ahead of them); the
/// `status` block is the controller's alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// The ports the service serves, with their protocols: the union of its
    /// workloads' ports when derived.
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
}

/// What the zone controller sets on a Service; `apply` refuses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceStatus {
    /// The zone whose workloads make up this service.
    pub zone: String,
    /// The stable virtual IP that mesh DNS answers for the service, once the
    /// zone has allocated one; it survives controller restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_ip: Option<IpAddr>,
}

impl Spec for ServiceSpec {
    const KIND: Kind = Kind::Service;
    type Status = ServiceStatus;

    fn validate(&self, _: &ObjectMeta, path: &FieldPath, problems: &mut Problems) {
        check_ports(&self.ports, &path.field("ports"), problems);
    }

    fn validate_status(status: &ServiceStatus, path: &FieldPath, problems: &mut Problems) {
        problems.check(path.field("zone"), dns1123_label(&status.zone));
        if let Some(vip) = status.virtual_ip {
            problems.check(path.field("virtualIp"), unicast_address(vip));
        }
    }

    fn check_references(
        object: &Object<Self>,
        existing: &dyn ExistingResources,
        problems: &mut Problems,
    ) {
        if let Some(status) = &object.status {
            if !existing.zone_exists(&status.zone) {
                problems.add(
                    FieldPath::of(&["status", "zone"]),
                    format!("zone {:?} does not exist", status.zone),
                );
            }
        }
    }

    fn into_resource(object: Object<Self>) -> Resource {
        Resource::Service(object)
    }
}
