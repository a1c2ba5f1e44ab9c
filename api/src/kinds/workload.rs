//! `Workload`: what an agent registers for each workload it fronts on a VM,
//! and from which Services, endpoints and identities are derived.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, SpiffeId};
use crate::kinds::MeshSpec;
use crate::mesh::WorkloadPort;
use crate::resource::{Kind, NoStatus, Object, ObjectMeta, Resource, Spec};
use crate::validation::{
    check_ports, dns1123_label, dns1123_subdomain, unicast_address, FieldPath, Problems,
};

/// A workload: one instance of a service at one address. Its labels are
/// `metadata.labels`; its identity is derived, never written:
/// `spiffe://<mesh trustDomain>/ns/<metadata.namespace>/sa/<serviceAccount>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// The workload's IP address, the one other workloads dial.
    pub address: IpAddr,
    /// The service this workload is an instance of (a DNS-1123 label): it is
    /// reachable as `<service>.<namespace>.mesh`.
    pub service: String,
    /// The service account the workload runs as (a DNS-1123 subdomain); the
    /// last part of its SPIFFE identity.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The ports the workload serves. Only these can be reached through its
    /// agent; none means the workload only makes calls.
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
}

fn default_service_account() -> String {
    "default".to_owned()
}

impl Object<WorkloadSpec> {
    /// The workload's SPIFFE identity in its mesh: the one its certificate
    /// carries and that policies match.
    pub fn identity(&self, mesh: &MeshSpec) -> Result<SpiffeId, IdentityError> {
        SpiffeId::new(
            &mesh.trust_domain,
            self.metadata.namespace.as_deref().unwrap_or_default(),
            &self.spec.service_account,
        )
    }
}

impl Spec for WorkloadSpec {
    const KIND: Kind = Kind::Workload;
    type Status = NoStatus;

    fn validate(&self, _: &ObjectMeta, path: &FieldPath, problems: &mut Problems) {
        problems.check(path.field("address"), unicast_address(self.address));
        problems.check(path.field("service"), dns1123_label(&self.service));
        problems.check(
            path.field("serviceAccount"),
            dns1123_subdomain(&self.service_account),
        );
        check_ports(&self.ports, &path.field("ports"), problems);
    }

    fn into_resource(object: Object<Self>) -> Resource {
        Resource::Workload(object)
    }
}
