//! What it takes to enrol a workload into a node agent: the workload's
//! registration plus the network namespace it lives in. It comes from the
//! local command (`weft-agent workload enroll`, through the admin endpoint)
//! or from the zone (a Workload placed on this agent), and is persisted so
//! that a restarted agent captures the same workloads again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Component, PathBuf};

use serde::{Deserialize, Serialize};
use weft_api::proto::agent::v1::{PlacedWorkload, Port, Workload};
use weft_api::validation::{dns1123_label, dns1123_subdomain, unicast_address};
use weft_api::{Protocol, WorkloadPort};

/// A workload to enrol, or one enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeWorkload {
    /// Its name in the zone (a DNS-1123 label), unique on this agent.
    pub name: String,
    #[serde(default = "default_name")]
    pub namespace: String,
    /// The Service it is an instance of.
    pub service: String,
    #[serde(default = "default_name")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its IP, inside its namespace; its HBONE listener is there too.
    pub address: IpAddr,
    /// The ports it serves; none: it only makes calls.
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
    /// Its network namespace: `/run/netns/<name>` or `/proc/<pid>/ns/net`.
    pub netns: PathBuf,
}

fn default_name() -> String {
    "default".to_owned()
}

/// A field of an enrolment request that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

impl NodeWorkload {
    /// Checks every field, naming the first that is wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        dns1123_label(&self.name).map_err(|r| bad("name", r))?;
        dns1123_label(&self.namespace).map_err(|r| bad("namespace", r))?;
        dns1123_label(&self.service).map_err(|r| bad("service", r))?;
        dns1123_subdomain(&self.service_account).map_err(|r| bad("service_account", r))?;
        unicast_address(self.address).map_err(|r| bad("address", r))?;
        let mut seen = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                return Err(bad(&format!("ports[{i}].port"), "0 is not a port"));
            }
            if !seen.insert(p.port) {
                return Err(bad(
                    &format!("ports[{i}].port"),
                    format!("{} is listed twice", p.port),
                ));
            }
        }
        let absolute =
            self.netns.is_absolute() && !self.netns.components().any(|c| c == Component::ParentDir);
        if !absolute {
            return Err(bad(
                "netns",
                format!(
                    "{:?} is not an absolute path without `..` (e.g. /run/netns/web-1)",
                    self.netns
                ),
            ));
        }
        Ok(())
    }

    /// The ports, as the capture rules take them.
    pub fn port_set(&self) -> BTreeSet<u16> {
        self.ports.iter().map(|p| p.port).collect()
    }

    /// The registration the zone stores; peers reach it at `hbone_port` on
    /// its own address.
    pub fn registration(&self, hbone_port: u16) -> Workload {
        Workload {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            service_account: self.service_account.clone(),
            address: self.address.to_string(),
            ports: self
                .ports
                .iter()
                .map(|p| Port {
                    port: u32::from(p.port),
                    protocol: match p.protocol {
                        Protocol::Tcp => 0,
                        Protocol::Http => 1,
                        Protocol::Detect => 2,
                    },
                })
                .collect(),
            labels: self.labels.clone().into_iter().collect(),
            hbone_address: std::net::SocketAddr::new(self.address, hbone_port).to_string(),
        }
    }

    /// A workload the zone placed here, in the form the local command uses.
    pub fn from_placed(placed: &PlacedWorkload) -> Result<Self, SpecError> {
        let w = placed
            .workload
            .as_ref()
            .ok_or_else(|| bad("workload", "missing"))?;
        let address = w
            .address
            .parse()
            .map_err(|_| bad("address", format!("{:?} is not an IP address", w.address)))?;
        let mut ports = Vec::with_capacity(w.ports.len());
        for (i, p) in w.ports.iter().enumerate() {
            let port = u16::try_from(p.port).map_err(|_| {
                bad(
                    &format!("ports[{i}].port"),
                    format!("{} is not 1-65535", p.port),
                )
            })?;
            let protocol = match p.protocol {
                1 => Protocol::Http,
                2 => Protocol::Detect,
                // 0, and values from a newer zone this agent does not
                // know: never parsed.
                _ => Protocol::Tcp,
            };
            ports.push(WorkloadPort { port, protocol });
        }
        let spec = NodeWorkload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service: w.service.clone(),
            service_account: w.service_account.clone(),
            labels: w.labels.clone().into_iter().collect(),
            address,
            ports,
            netns: PathBuf::from(&placed.netns),
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The state file holding its key and certificate chain.
    pub fn identity_file(&self) -> String {
        format!("node-{}.pem", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> NodeWorkload {
        serde_json::from_value(serde_json::json!({
            "name": "web-1", "service": "web", "address": "10.1.0.2",
            "ports": [{"port": 8080, "protocol": "http"}], "netns": "/run/netns/web-1"
        }))
        .unwrap()
    }

    #[test]
    fn a_good_spec_passes_and_registers_its_own_hbone_address() {
        let s = spec();
        s.validate().unwrap();
        let r = s.registration(15008);
        assert_eq!(r.hbone_address, "10.1.0.2:15008");
        assert_eq!(r.ports[0].protocol, 1);
        assert_eq!(s.namespace, "default");
    }

    #[test]
    fn bad_fields_are_named() {
        for (patch, field) in [
            (serde_json::json!({"name": "Web_1"}), "name"),
            (serde_json::json!({"address": "0.0.0.0"}), "address"),
            (serde_json::json!({"netns": "run/netns/x"}), "netns"),
            (
                serde_json::json!({"netns": "/run/netns/../../etc"}),
                "netns",
            ),
            (serde_json::json!({"ports": [{"port": 0}]}), "ports[0].port"),
            (
                serde_json::json!({"ports": [{"port": 80}, {"port": 80}]}),
                "ports[1].port",
            ),
        ] {
            let mut v = serde_json::to_value(spec()).unwrap();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            let s: NodeWorkload = serde_json::from_value(v).unwrap();
            assert_eq!(s.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = serde_json::to_value(spec()).unwrap();
        v["sidecar"] = true.into();
        assert!(serde_json::from_value::<NodeWorkload>(v).is_err());
    }
}
