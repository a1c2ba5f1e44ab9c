//! `GET /v1/inspect/agents|services|workloads`: the zone's inventory as
//! JSON arrays (camelCase), computed the way agents' views are; and
//! `GET /v1/inspect/workloads/{mesh}/{namespace}/{name}/policies`: the
//! policies of one workload, explained and compiled.

use std::collections::BTreeMap;

use serde::Serialize;
use weft_api::policy::compiled::WorkloadPolicy;
use weft_api::policy::select::{self, AppliedPolicy, WorkloadInfo};
use weft_api::{Kind, Protocol, WorkloadPort};
use weft_store::{now_ms, AgentNack, Store, StoreError};

use crate::views::{online, MeshSnapshot, AGENT_LABEL};

/// An agent as `inspect agents` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    name: String,
    mesh: String,
    zone: String,
    hbone_address: String,
    online: bool,
    /// `online`, `offline` (not ready; still in endpoint lists) or `gone`
    /// (left: goodbye, revoked token, vanished).
    state: &'static str,
    /// When and why it left, while it is gone.
    left: Option<LeftView>,
    /// Its workloads the operator deleted (`mesh/namespace/name`).
    withdrawn_workloads: Vec<String>,
    connected_replica: Option<String>,
    last_seen: String,
    applied_version: String,
    last_nack: Option<NackView>,
    host: serde_json::Value,
    workloads: Vec<String>,
}

/// When and why an agent left the endpoint lists.
#[derive(Debug, Serialize)]
pub struct LeftView {
    at: String,
    reason: String,
}

/// A refused version and why.
#[derive(Debug, Serialize)]
pub struct NackView {
    version: String,
    reason: String,
}

impl From<AgentNack> for NackView {
    fn from(nack: AgentNack) -> Self {
        NackView {
            version: nack.version,
            reason: nack.reason,
        }
    }
}

/// A port as JSON: `{"port": 80, "protocol": "http"}`.
#[derive(Debug, Serialize)]
pub struct PortView {
    port: u16,
    protocol: &'static str,
}

fn ports(ports: &[WorkloadPort]) -> Vec<PortView> {
    ports
        .iter()
        .map(|p| PortView {
            port: p.port,
            protocol: match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Http => "http",
                Protocol::Detect => "detect",
            },
        })
        .collect()
}

/// A service as `inspect services` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    mesh: String,
    namespace: String,
    name: String,
    zone: Option<String>,
    virtual_ip: Option<String>,
    ports: Vec<PortView>,
    endpoints: Vec<EndpointView>,
}

/// One endpoint of a service.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    address: String,
    agent: String,
    spiffe_id: String,
    ready: bool,
    /// `region/zone/subzone` from the workload's labels, which
    /// locality-aware load balancing compares; absent without them.
    #[serde(skip_serializing_if = "Option::is_none")]
    locality: Option<String>,
}

/// A workload as `inspect workloads` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadView {
    mesh: String,
    namespace: String,
    name: String,
    service: String,
    address: String,
    ports: Vec<PortView>,
    agent: Option<String>,
    ready: bool,
    spiffe_id: String,
    /// Node mode: the workload's own HBONE listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    hbone_address: Option<String>,
    /// Node mode: the node agent the operator placed it on.
    #[serde(skip_serializing_if = "Option::is_none")]
    placed_on: Option<String>,
    /// As in [`EndpointView`].
    #[serde(skip_serializing_if = "Option::is_none")]
    locality: Option<String>,
}

/// How inspect shows a locality: `region/zone/subzone`, absent when no
/// label is set.
fn locality_text(locality: &weft_api::Locality) -> Option<String> {
    (!locality.is_empty()).then(|| locality.to_string())
}

/// Every mesh's snapshot, by mesh name.
async fn snapshots(store: &Store, zone: &str) -> Result<Vec<MeshSnapshot>, StoreError> {
    let mut all = Vec::new();
    for stored in store.list(Kind::Mesh, None, None).await? {
        if let Some(snapshot) =
            MeshSnapshot::load(store, zone, stored.resource.name(), None).await?
        {
            all.push(snapshot);
        }
    }
    Ok(all)
}

/// `GET /v1/inspect/agents`.
pub async fn agents(store: &Store, zone: &str) -> Result<Vec<AgentView>, StoreError> {
    let now = now_ms();
    let mut workloads: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for stored in store.list(Kind::Workload, None, None).await? {
        if let Some(agent) = stored.resource.metadata().labels.get(AGENT_LABEL) {
            workloads
                .entry(agent.clone())
                .or_default()
                .push(stored.resource.name().to_owned());
        }
    }
    Ok(store
        .list_agents(zone, None)
        .await?
        .into_iter()
        .map(|a| AgentView {
            online: online(&a, now),
            state: match (&a.left, online(&a, now)) {
                (Some(_), _) => "gone",
                (None, true) => "online",
                (None, false) => "offline",
            },
            left: a.left.map(|l| LeftView {
                at: rfc3339_ms(l.at_ms),
                reason: l.reason,
            }),
            withdrawn_workloads: a.withdrawn,
            workloads: workloads.remove(&a.enrollment.name).unwrap_or_default(),
            last_seen: rfc3339_ms(a.last_seen_ms),
            name: a.enrollment.name,
            mesh: a.enrollment.mesh,
            zone: a.enrollment.zone,
            hbone_address: a.enrollment.hbone_address,
            connected_replica: a.connected_replica,
            applied_version: a.applied_version,
            last_nack: a.last_nack.map(NackView::from),
            host: a.enrollment.host_facts,
        })
        .collect())
}

/// `GET /v1/inspect/services`.
pub async fn services(store: &Store, zone: &str) -> Result<Vec<ServiceView>, StoreError> {
    let mut out = Vec::new();
    for snapshot in snapshots(store, zone).await? {
        for service in snapshot.services.iter() {
            out.push(ServiceView {
                mesh: snapshot.mesh.metadata.name.clone(),
                namespace: service.metadata.namespace.clone().unwrap_or_default(),
                name: service.metadata.name.clone(),
                zone: service.status.as_ref().map(|s| s.zone.clone()),
                virtual_ip: service
                    .status
                    .as_ref()
                    .and_then(|s| s.virtual_ip)
                    .map(|ip| ip.to_string()),
                ports: ports(&service.spec.ports),
                endpoints: snapshot
                    .endpoints(service)
                    .into_iter()
                    .map(|e| EndpointView {
                        address: e.address,
                        agent: e.agent,
                        spiffe_id: e.spiffe_id,
                        ready: e.ready,
                        locality: locality_text(&e.locality),
                    })
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// `GET /v1/inspect/workloads`.
pub async fn workloads(store: &Store, zone: &str) -> Result<Vec<WorkloadView>, StoreError> {
    let mut out = Vec::new();
    for snapshot in snapshots(store, zone).await? {
        for w in snapshot.workloads.iter() {
            out.push(WorkloadView {
                mesh: snapshot.mesh.metadata.name.clone(),
                namespace: w.metadata.namespace.clone().unwrap_or_default(),
                name: w.metadata.name.clone(),
                service: w.spec.service.clone(),
                address: w.spec.address.to_string(),
                ports: ports(&w.spec.ports),
                agent: w.metadata.labels.get(AGENT_LABEL).cloned(),
                ready: snapshot.ready(w),
                spiffe_id: snapshot.spiffe_id(w),
                hbone_address: w.spec.hbone_address.map(|a| a.to_string()),
                placed_on: w.spec.node.as_ref().map(|n| n.agent.clone()),
                locality: locality_text(&weft_api::Locality::from_labels(&w.metadata.labels)),
            });
        }
    }
    Ok(out)
}

/// What `inspect policies` shows of one workload.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadPoliciesView {
    mesh: String,
    namespace: String,
    name: String,
    /// The policies that apply, kind by kind, each kind's in merge order.
    policies: Vec<AppliedPolicy>,
    /// What the workload's agent receives for it.
    compiled: WorkloadPolicy,
}

/// `GET /v1/inspect/workloads/{mesh}/{namespace}/{name}/policies`; `None`
/// when the mesh or the workload does not exist.
pub async fn workload_policies(
    store: &Store,
    zone: &str,
    mesh: &str,
    namespace: &str,
    name: &str,
) -> Result<Option<WorkloadPoliciesView>, StoreError> {
    let Some(snapshot) = MeshSnapshot::load(store, zone, mesh, None).await? else {
        return Ok(None);
    };
    let Some(workload) = snapshot
        .workloads
        .iter()
        .find(|w| w.metadata.namespace.as_deref() == Some(namespace) && w.metadata.name == name)
    else {
        return Ok(None);
    };
    let peers = snapshot.peers(zone);
    Ok(Some(WorkloadPoliciesView {
        mesh: mesh.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        policies: select::explain(&WorkloadInfo::of(workload), &snapshot.policies),
        compiled: snapshot.workload_policy(workload, &peers),
    }))
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339_ms(ms: i64) -> String {
    let secs = u64::try_from(ms / 1000).unwrap_or(0);
    crate::tokens::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}
