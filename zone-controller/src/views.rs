//! What each agent should see, computed from one mesh's state: services with
//! a virtual IP and their endpoints, inbound rules for the agent's own
//! workloads, the trust bundle. The same endpoint computation feeds
//! `GET /v1/inspect/services` and `/workloads`.
//!
//! An update's version is the SHA-256 of its own encoding (version field
//! cleared): the same content gets the same version on every replica and
//! across restarts, so an agent is never re-sent what it already has.

use std::collections::HashMap;

use prost::Message;
use weft_api::proto::agent::v1 as pb;
use weft_api::{Kind, Mesh, Protocol, Resource, Service, Workload, WorkloadPort};
use weft_store::{now_ms, AgentRecord, ResourceKey, Store, StoreError};

use crate::zone_ca::hex;

/// The label naming the agent that registered a Workload.
pub const AGENT_LABEL: &str = "weft.io/agent";
/// How long after its last heartbeat a connected agent counts as online.
pub const ONLINE_WINDOW_MS: i64 = 15_000;

/// Whether an agent is online: it holds a stream and was seen recently.
pub fn online(agent: &AgentRecord, now_ms: i64) -> bool {
    agent.connected_replica.is_some() && now_ms - agent.last_seen_ms < ONLINE_WINDOW_MS
}

/// One mesh's state, read in one go.
pub struct MeshSnapshot {
    /// The Mesh resource.
    pub mesh: Mesh,
    /// Its Services, by namespace and name.
    pub services: Vec<Service>,
    /// Its Workloads, by namespace and name.
    pub workloads: Vec<Workload>,
    /// The zone's agents in this mesh, by name.
    pub agents: HashMap<String, AgentRecord>,
    /// When it was read (ms since the epoch), for liveness.
    pub now_ms: i64,
}

/// One endpoint of a service, resolved.
#[derive(Debug, Clone)]
pub struct ResolvedEndpoint {
    /// The workload's address.
    pub address: String,
    /// The owning agent's name.
    pub agent: String,
    /// The owning agent's HBONE address.
    pub hbone: String,
    /// The workload's identity.
    pub spiffe_id: String,
    /// Whether the owning agent is online.
    pub ready: bool,
}

impl MeshSnapshot {
    /// Reads mesh `name` of `zone`; `None` if the mesh does not exist.
    pub async fn load(store: &Store, zone: &str, name: &str) -> Result<Option<Self>, StoreError> {
        let Some(stored) = store.get(&ResourceKey::global(Kind::Mesh, name)).await? else {
            return Ok(None);
        };
        let Resource::Mesh(mesh) = stored.resource else {
            return Ok(None);
        };
        let services = store
            .list(Kind::Service, Some(name), None)
            .await?
            .into_iter()
            .filter_map(|s| match s.resource {
                Resource::Service(service) => Some(service),
                _ => None,
            })
            .collect();
        let workloads = store
            .list(Kind::Workload, Some(name), None)
            .await?
            .into_iter()
            .filter_map(|s| match s.resource {
                Resource::Workload(workload) => Some(workload),
                _ => None,
            })
            .collect();
        let agents = store
            .list_agents(zone, Some(name))
            .await?
            .into_iter()
            .map(|a| (a.enrollment.name.clone(), a))
            .collect();
        Ok(Some(MeshSnapshot {
            mesh,
            services,
            workloads,
            agents,
            now_ms: now_ms(),
        }))
    }

    /// The identity of a workload of this mesh, as text ("" if invalid).
    pub fn spiffe_id(&self, workload: &Workload) -> String {
        workload
            .identity(&self.mesh.spec)
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default()
    }

    /// The agent that registered a workload, if it is known.
    pub fn owner(&self, workload: &Workload) -> Option<&AgentRecord> {
        workload
            .metadata
            .labels
            .get(AGENT_LABEL)
            .and_then(|name| self.agents.get(name))
    }

    /// Whether a workload's agent is online.
    pub fn ready(&self, workload: &Workload) -> bool {
        self.owner(workload).is_some_and(|a| online(a, self.now_ms))
    }

    /// The workloads behind a service (same namespace, `spec.service` is
    /// its name) whose agent is known and has not left (goodbye, revoked
    /// token, vanished).
    pub fn endpoints(&self, service: &Service) -> Vec<ResolvedEndpoint> {
        let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
        self.workloads
            .iter()
            .filter(|w| {
                w.metadata.namespace.as_deref() == Some(namespace)
                    && w.spec.service == service.metadata.name
            })
            .filter_map(|w| {
                let agent = self.owner(w).filter(|a| a.left.is_none())?;
                Some(ResolvedEndpoint {
                    address: w.spec.address.to_string(),
                    agent: agent.enrollment.name.clone(),
                    hbone: agent.enrollment.hbone_address.clone(),
                    spiffe_id: self.spiffe_id(w),
                    ready: online(agent, self.now_ms),
                })
            })
            .collect()
    }

    /// The full view of `agent`, versioned.
    pub fn view_for(&self, agent: &str, zone: &str, trust_bundle_pem: &str) -> pb::ConfigUpdate {
        let services = self
            .services
            .iter()
            .filter_map(|service| {
                let vip = service.status.as_ref()?.virtual_ip?;
                Some(pb::ServiceView {
                    name: service.metadata.name.clone(),
                    namespace: service.metadata.namespace.clone().unwrap_or_default(),
                    zone: service
                        .status
                        .as_ref()
                        .map(|s| s.zone.clone())
                        .unwrap_or_default(),
                    virtual_ip: vip.to_string(),
                    ports: service.spec.ports.iter().map(port_to_proto).collect(),
                    endpoints: self
                        .endpoints(service)
                        .into_iter()
                        .map(|e| pb::Endpoint {
                            address: e.address,
                            agent: e.hbone,
                            spiffe_id: e.spiffe_id,
                            ready: e.ready,
                        })
                        .collect(),
                })
            })
            .collect();
        // Every workload of the mesh may call (TrafficPermission will narrow
        // this in a later issue).
        let allow_all = format!("spiffe://{}/*", self.mesh.spec.trust_domain);
        let inbound = self
            .workloads
            .iter()
            .filter(|w| w.metadata.labels.get(AGENT_LABEL).map(String::as_str) == Some(agent))
            .map(|w| pb::InboundRule {
                workload: w.metadata.name.clone(),
                allow: vec![allow_all.clone()],
            })
            .collect();
        let mut update = pb::ConfigUpdate {
            version: String::new(),
            trust_bundle_pem: trust_bundle_pem.to_owned(),
            services,
            inbound,
            mesh: self.mesh.metadata.name.clone(),
            zone: zone.to_owned(),
        };
        update.version = version_of(&update);
        update
    }
}

/// Lowercase hex SHA-256 of the update's encoding with its version cleared.
pub fn version_of(update: &pb::ConfigUpdate) -> String {
    use sha2::{Digest, Sha256};
    let mut unversioned = update.clone();
    unversioned.version.clear();
    hex(&Sha256::digest(unversioned.encode_to_vec()))
}

/// A port as the agent protocol spells it.
pub fn port_to_proto(port: &WorkloadPort) -> pb::Port {
    pb::Port {
        port: u32::from(port.port),
        protocol: match port.protocol {
            Protocol::Tcp => pb::Protocol::Tcp,
            Protocol::Http => pb::Protocol::Http,
        } as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_ignore_the_version_field_and_follow_content() {
        let mut update = pb::ConfigUpdate {
            mesh: "default".into(),
            zone: "z".into(),
            ..Default::default()
        };
        let v1 = version_of(&update);
        update.version = "anything".into();
        assert_eq!(version_of(&update), v1);
        assert_eq!(v1.len(), 64);
        update.zone = "y".into();
        assert_ne!(version_of(&update), v1);
    }
}
