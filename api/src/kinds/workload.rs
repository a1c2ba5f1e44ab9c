//! `Workload`: what an agent registers for each workload it fronts on a VM,
//! and from which Services, endpoints and identities are derived. In node
//! mode the operator may also apply one with a placement (`spec.node`), which
//! asks a node agent to enrol it.

use std::net::{IpAddr, SocketAddr};

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
    /// Node mode: the workload's own HBONE listener (`ip:port`, inside its
    /// network namespace), which peers dial instead of its agent's. Unset
    /// for a sidecar, whose agent's listener serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hbone_address: Option<SocketAddr>,
    /// Node mode: the host (node agent) the operator placed this workload
    /// on. The zone asks that agent to enrol it, and refuses it from any
    /// other agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodePlacement>,
}

/// Where the operator placed a workload in node mode: which node agent
/// serves it, and the network namespace it lives in on that host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodePlacement {
    /// The node agent's name (a DNS-1123 label), as it enrolled.
    pub agent: String,
    /// The absolute path of the workload's network namespace on that host,
    /// such as `/run/netns/web-1` or `/proc/1234/ns/net` (no `..`).
    pub netns: String,
}

impl NodePlacement {
    fn validate(&self, path: &FieldPath, problems: &mut Problems) {
        problems.check(path.field("agent"), dns1123_label(&self.agent));
        problems.check(path.field("netns"), netns_path(&self.netns));
    }
}

/// Checks a network namespace path: absolute, without `..` (the agent opens
/// it as root, so it must name the file meant, not climb out of it), and
/// without control characters.
fn netns_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        Err(format!(
            "{path:?} is not an absolute path (e.g. /run/netns/web-1 or /proc/1234/ns/net)"
        ))
    } else if path.split('/').any(|part| part == "..") {
        Err(format!("{path:?} must not contain `..`"))
    } else if path.chars().any(char::is_control) {
        Err(format!("{path:?} must not contain control characters"))
    } else if path.split('/').all(str::is_empty) {
        Err(format!("{path:?} names no file"))
    } else {
        Ok(())
    }
}

/// Checks an HBONE listener address: one host's address, a real port.
fn hbone_address(address: SocketAddr) -> Result<(), String> {
    unicast_address(address.ip())?;
    if address.port() == 0 {
        return Err(format!("{address}: port 0 cannot be dialled; give 1-65535"));
    }
    Ok(())
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
        if let Some(address) = self.hbone_address {
            problems.check(path.field("hboneAddress"), hbone_address(address));
        }
        if let Some(node) = &self.node {
            node.validate(&path.field("node"), problems);
        }
    }

    fn into_resource(object: Object<Self>) -> Resource {
        Resource::Workload(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::ValidationErrors;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            address: IpAddr::from([10, 0, 0, 1]),
            service: "web".to_owned(),
            service_account: "default".to_owned(),
            ports: Vec::new(),
            hbone_address: None,
            node: None,
        }
    }

    fn paths(spec: WorkloadSpec) -> Vec<String> {
        let workload = Object::new(ObjectMeta::namespaced("default", "default", "web-1"), spec);
        match workload.validate() {
            Ok(()) => Vec::new(),
            Err(errors) => errors_paths(&errors),
        }
    }

    fn errors_paths(errors: &ValidationErrors) -> Vec<String> {
        errors.errors().iter().map(|e| e.path.to_string()).collect()
    }

    fn placed(agent: &str, netns: &str) -> WorkloadSpec {
        WorkloadSpec {
            node: Some(NodePlacement {
                agent: agent.to_owned(),
                netns: netns.to_owned(),
            }),
            ..spec()
        }
    }

    #[test]
    fn placements_name_their_bad_field() {
        assert!(paths(placed("node-1", "/run/netns/web-1")).is_empty());
        assert!(paths(placed("node-1", "/proc/1234/ns/net")).is_empty());
        for bad in [
            "run/netns/web-1",
            "/run/netns/../../etc/passwd",
            "/",
            "",
            "/run/netns/a\nb",
        ] {
            assert_eq!(paths(placed("node-1", bad)), ["spec.node.netns"], "{bad:?}");
        }
        for bad in ["Node_1", "node.example", "", "-node"] {
            assert_eq!(
                paths(placed(bad, "/run/netns/web-1")),
                ["spec.node.agent"],
                "{bad:?}"
            );
        }
    }

    #[test]
    fn hbone_addresses_must_be_dialable() {
        let with = |address: &str| WorkloadSpec {
            hbone_address: Some(address.parse().expect("a socket address")),
            ..spec()
        };
        assert!(paths(with("10.0.0.1:15008")).is_empty());
        assert!(paths(with("[fd00::1]:15008")).is_empty());
        for bad in ["10.0.0.1:0", "0.0.0.0:15008", "224.0.0.1:15008"] {
            assert_eq!(paths(with(bad)), ["spec.hboneAddress"], "{bad}");
        }
    }

    #[test]
    fn placement_and_hbone_address_are_camel_case_and_optional() {
        let yaml = "address: 10.0.0.1\nservice: web\nhboneAddress: 10.0.0.1:15008\nnode:\n  agent: node-1\n  netns: /run/netns/web-1\n";
        let parsed: WorkloadSpec = yaml_serde::from_str(yaml).expect("a spec");
        assert_eq!(
            parsed.node.as_ref().map(|n| n.agent.as_str()),
            Some("node-1")
        );
        let plain = serde_json::to_value(spec()).expect("JSON");
        assert!(plain.get("node").is_none() && plain.get("hboneAddress").is_none());
    }
}
