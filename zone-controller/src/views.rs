//! What each agent should see, computed from one mesh's state: services with
//! a virtual IP and their endpoints, inbound rules for the agent's own
//! workloads, the trust bundle. The same endpoint computation feeds
//! `GET /v1/inspect/services` and `/workloads`.
//!
//! A change builds the mesh's services once ([`ServiceSet`], shared by every
//! agent of the mesh through an `Arc`); each agent's view adds only its
//! small parts ([`AgentView`]). A view's version is a content hash (see
//! [`AgentView::new`]): the same content gets the same version on every
//! replica and across restarts, so an agent is never re-sent what it
//! already has. Streams send deltas against what they sent last, split
//! into messages of bounded size ([`AgentView::messages`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

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

    /// The agent of a workload if it has not left (goodbye, revoked token,
    /// vanished): only those workloads are in endpoint lists.
    fn live_owner(&self, workload: &Workload) -> Option<&AgentRecord> {
        self.owner(workload).filter(|a| a.left.is_none())
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
                let agent = self.live_owner(w)?;
                Some(ResolvedEndpoint {
                    address: w.spec.address.to_string(),
                    agent: agent.enrollment.name.clone(),
                    spiffe_id: self.spiffe_id(w),
                    ready: online(agent, self.now_ms),
                })
            })
            .collect()
    }

    /// The services of this mesh as every agent of it sees them, built
    /// once per change and shared by all its streams. `previous` is the
    /// set the hub built last, so the set knows its delta from it.
    pub fn service_set(&self, previous: Option<&ServiceSet>) -> ServiceSet {
        // Index once: finding each service's workloads by scanning all of
        // them made a change cost O(services x workloads).
        let mut by_service: HashMap<(&str, &str), Vec<&Workload>> = HashMap::new();
        for w in &self.workloads {
            let namespace = w.metadata.namespace.as_deref().unwrap_or_default();
            by_service
                .entry((namespace, w.spec.service.as_str()))
                .or_default()
                .push(w);
        }
        let mut services: Vec<SharedService> = self
            .services
            .iter()
            .filter_map(|service| {
                let vip = service.status.as_ref()?.virtual_ip?;
                let namespace = service.metadata.namespace.clone().unwrap_or_default();
                let endpoints = by_service
                    .get(&(namespace.as_str(), service.metadata.name.as_str()))
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|w| {
                        let agent = self.live_owner(w)?;
                        Some(pb::Endpoint {
                            address: w.spec.address.to_string(),
                            agent: agent.enrollment.hbone_address.clone(),
                            spiffe_id: self.spiffe_id(w),
                            ready: online(agent, self.now_ms),
                        })
                    })
                    .collect();
                let view = pb::ServiceView {
                    name: service.metadata.name.clone(),
                    namespace,
                    zone: service
                        .status
                        .as_ref()
                        .map(|s| s.zone.clone())
                        .unwrap_or_default(),
                    virtual_ip: vip.to_string(),
                    ports: service.spec.ports.iter().map(port_to_proto).collect(),
                    endpoints,
                };
                Some(SharedService::new(view))
            })
            .collect();
        services.sort_by(|a, b| a.key.cmp(&b.key));
        ServiceSet::new(services, previous)
    }

    /// The callers every workload of the mesh accepts: the whole mesh.
    pub fn allow_all(&self) -> String {
        format!("spiffe://{}/*", self.mesh.spec.trust_domain)
    }

    /// Inbound rules per agent name, for every agent of the mesh at once.
    pub fn inbound_by_agent(&self) -> HashMap<&str, Vec<pb::InboundRule>> {
        // Every workload of the mesh may call (TrafficPermission will narrow
        // this in a later issue).
        let allow_all = self.allow_all();
        let mut rules: HashMap<&str, Vec<pb::InboundRule>> = HashMap::new();
        for w in &self.workloads {
            if let Some(agent) = w.metadata.labels.get(AGENT_LABEL) {
                rules
                    .entry(agent.as_str())
                    .or_default()
                    .push(pb::InboundRule {
                        workload: w.metadata.name.clone(),
                        allow: vec![allow_all.clone()],
                    });
            }
        }
        rules
    }
}

/// The bound on one ConfigUpdate's encoded size: far under the 4 MiB
/// that gRPC peers accept by default, whatever the size of the mesh. Small
/// because each stream's encoder keeps a buffer as large as the largest
/// message it sent: with 10,000 streams, 1 MiB messages would pin
/// gigabytes (see docs/benchmarks.md).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// One service's view, with its key and content hash.
#[derive(Debug)]
pub struct SharedService {
    /// `<namespace>/<name>`.
    pub key: String,
    /// SHA-256 of its encoding: what tells a changed service.
    pub hash: [u8; 32],
    /// The view itself.
    pub view: Arc<pb::ServiceView>,
}

impl SharedService {
    /// Keys and hashes a service view.
    pub fn new(view: pb::ServiceView) -> Self {
        use sha2::{Digest, Sha256};
        SharedService {
            key: service_key(&view),
            hash: Sha256::digest(view.encode_to_vec()).into(),
            view: Arc::new(view),
        }
    }
}

/// The key a delta names a service by: `<namespace>/<name>`.
pub fn service_key(view: &pb::ServiceView) -> String {
    format!("{}/{}", view.namespace, view.name)
}

/// What changed between two service sets.
#[derive(Debug, Default, Clone)]
pub struct ServiceDelta {
    /// Added or changed services.
    pub changed: Vec<Arc<pb::ServiceView>>,
    /// Keys of the services gone.
    pub removed: Vec<String>,
}

/// A mesh's services at one moment, sorted by key, shared by every agent
/// view of the mesh (one copy whatever the number of agents).
#[derive(Debug)]
pub struct ServiceSet {
    /// The services, sorted by key.
    pub services: Vec<SharedService>,
    /// SHA-256 over every key and hash, in order.
    pub digest: [u8; 32],
    /// The delta from the set built before this one (and that set's
    /// digest), computed once for all the streams that had it.
    since_previous: Option<([u8; 32], ServiceDelta)>,
}

impl ServiceSet {
    /// A set from sorted services, with its delta from `previous`.
    pub fn new(services: Vec<SharedService>, previous: Option<&ServiceSet>) -> Self {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for s in &services {
            hasher.update(s.key.as_bytes());
            hasher.update([0]);
            hasher.update(s.hash);
        }
        let mut set = ServiceSet {
            services,
            digest: hasher.finalize().into(),
            since_previous: None,
        };
        if let Some(previous) = previous {
            set.since_previous = Some((previous.digest, set.diff(previous)));
        }
        set
    }

    /// What changed since `base`, by one walk over both sorted lists.
    pub fn diff(&self, base: &ServiceSet) -> ServiceDelta {
        use std::cmp::Ordering;
        let mut delta = ServiceDelta::default();
        let mut old = base.services.iter().peekable();
        let mut new = self.services.iter().peekable();
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(o), Some(n)) => o.key.cmp(&n.key),
            };
            match order {
                Ordering::Less => {
                    if let Some(o) = old.next() {
                        delta.removed.push(o.key.clone());
                    }
                }
                Ordering::Greater => {
                    if let Some(n) = new.next() {
                        delta.changed.push(n.view.clone());
                    }
                }
                Ordering::Equal => {
                    if let (Some(o), Some(n)) = (old.next(), new.next()) {
                        if o.hash != n.hash {
                            delta.changed.push(n.view.clone());
                        }
                    }
                }
            }
        }
        delta
    }

    /// The delta since `base`, reusing the one computed at build time when
    /// `base` is the set built just before.
    fn delta_since(&self, base: &ServiceSet) -> Cow<'_, ServiceDelta> {
        match &self.since_previous {
            Some((digest, delta)) if *digest == base.digest => Cow::Borrowed(delta),
            _ => Cow::Owned(self.diff(base)),
        }
    }

    /// Every service, as a delta from nothing.
    fn whole(&self) -> ServiceDelta {
        ServiceDelta {
            changed: self.services.iter().map(|s| s.view.clone()).collect(),
            removed: Vec::new(),
        }
    }
}

/// One agent's view at one version: the mesh's shared services and its own
/// small parts. What a stream turns into whole or delta messages.
#[derive(Debug)]
pub struct AgentView {
    /// The content hash of the whole view.
    pub version: String,
    /// The mesh's services (shared).
    pub services: Arc<ServiceSet>,
    /// Callers allowed into each of the agent's workloads.
    pub inbound: Vec<pb::InboundRule>,
    /// The mesh's name.
    pub mesh: String,
    /// The zone's name.
    pub zone: String,
    /// Every CA the agent must trust.
    pub trust_bundle_pem: Arc<str>,
}

impl AgentView {
    /// A view, versioned by its content: SHA-256 of the services' digest
    /// and the per-agent parts, so the version is the same whether the
    /// view is sent whole or as a delta.
    pub fn new(
        services: Arc<ServiceSet>,
        inbound: Vec<pb::InboundRule>,
        mesh: String,
        zone: String,
        trust_bundle_pem: Arc<str>,
    ) -> Self {
        use sha2::{Digest, Sha256};
        let mut view = AgentView {
            version: String::new(),
            services,
            inbound,
            mesh,
            zone,
            trust_bundle_pem,
        };
        let mut hasher = Sha256::new();
        hasher.update(b"weft view v2\0");
        hasher.update(view.services.digest);
        hasher.update(view.head("").encode_to_vec());
        view.version = hex(&hasher.finalize());
        view
    }

    /// The per-agent parts as the head of an update (no services).
    fn head(&self, base_version: &str) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            version: self.version.clone(),
            trust_bundle_pem: self.trust_bundle_pem.to_string(),
            services: Vec::new(),
            inbound: self.inbound.clone(),
            mesh: self.mesh.clone(),
            zone: self.zone.clone(),
            base_version: base_version.to_owned(),
            removed_services: Vec::new(),
            more: false,
        }
    }

    /// The messages that bring an agent holding `base` (`None`: nothing
    /// known, so the whole view) to this view, each under
    /// [`MAX_MESSAGE_BYTES`] (a single service larger than that still goes
    /// alone in one message). Built one at a time as they are sent, so a
    /// stream holds one chunk, not a copy of the whole view.
    pub fn messages<'a>(&'a self, base: Option<&'a AgentView>) -> Messages<'a> {
        let (base_version, delta) = match base {
            Some(base) if Arc::ptr_eq(&base.services, &self.services) => {
                (base.version.as_str(), Cow::Owned(ServiceDelta::default()))
            }
            Some(base) => (
                base.version.as_str(),
                self.services.delta_since(&base.services),
            ),
            None => ("", Cow::Owned(self.services.whole())),
        };
        Messages {
            view: self,
            base_version,
            delta,
            removed: 0,
            changed: 0,
            first: true,
        }
    }
}

/// The chunks of one update, built as they are asked for.
pub struct Messages<'a> {
    view: &'a AgentView,
    base_version: &'a str,
    delta: Cow<'a, ServiceDelta>,
    removed: usize,
    changed: usize,
    first: bool,
}

impl Iterator for Messages<'_> {
    type Item = pb::ConfigUpdate;

    fn next(&mut self) -> Option<pb::ConfigUpdate> {
        let (removed, changed) = (&self.delta.removed, &self.delta.changed);
        let left = self.removed < removed.len() || self.changed < changed.len();
        if !self.first && !left {
            return None;
        }
        let mut message = if self.first {
            self.view.head(self.base_version)
        } else {
            pb::ConfigUpdate {
                version: self.view.version.clone(),
                ..Default::default()
            }
        };
        self.first = false;
        let mut size = message.encoded_len();
        let mut items = 0;
        while let Some(key) = removed.get(self.removed) {
            let len = key.len() + 4;
            if size + len > MAX_MESSAGE_BYTES && items > 0 {
                break;
            }
            size += len;
            items += 1;
            message.removed_services.push(key.clone());
            self.removed += 1;
        }
        if self.removed == removed.len() {
            while let Some(service) = changed.get(self.changed) {
                let len = service.encoded_len() + 4;
                if size + len > MAX_MESSAGE_BYTES && items > 0 {
                    break;
                }
                size += len;
                items += 1;
                message.services.push((**service).clone());
                self.changed += 1;
            }
        }
        message.more = self.removed < removed.len() || self.changed < changed.len();
        Some(message)
    }
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

    fn service(name: &str, endpoints: usize) -> SharedService {
        SharedService::new(pb::ServiceView {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            zone: "z".to_owned(),
            virtual_ip: "240.240.0.1".to_owned(),
            ports: vec![pb::Port {
                port: 80,
                protocol: 0,
            }],
            endpoints: (0..endpoints)
                .map(|i| pb::Endpoint {
                    address: format!("10.0.{}.{}", i / 256, i % 256),
                    agent: format!("10.0.{}.{}:15008", i / 256, i % 256),
                    spiffe_id: format!("spiffe://t/ns/default/sa/sa-{i}"),
                    ready: true,
                })
                .collect(),
        })
    }

    fn view(services: Vec<SharedService>, previous: Option<&ServiceSet>) -> AgentView {
        AgentView::new(
            Arc::new(ServiceSet::new(services, previous)),
            Vec::new(),
            "default".into(),
            "z".into(),
            Arc::from("bundle"),
        )
    }

    #[test]
    fn versions_follow_content_not_history() {
        let a = view(vec![service("a", 1), service("b", 1)], None);
        let b = view(vec![service("a", 1), service("b", 1)], Some(&a.services));
        assert_eq!(a.version, b.version);
        assert_eq!(a.version.len(), 64);
        let c = view(vec![service("a", 2), service("b", 1)], None);
        assert_ne!(a.version, c.version);
    }

    #[test]
    fn deltas_carry_changed_and_removed_services_only() {
        let v1 = view(
            vec![service("a", 1), service("b", 1), service("c", 1)],
            None,
        );
        let v2 = view(
            vec![service("a", 1), service("c", 2), service("d", 1)],
            Some(&v1.services),
        );
        let messages: Vec<_> = v2.messages(Some(&v1)).collect();
        assert_eq!(messages.len(), 1);
        let delta = &messages[0];
        assert_eq!(delta.version, v2.version);
        assert_eq!(delta.base_version, v1.version);
        assert_eq!(delta.removed_services, ["default/b"]);
        let changed: Vec<&str> = delta.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(changed, ["c", "d"]);
        assert_eq!(delta.trust_bundle_pem, "bundle");
        assert!(!delta.more);
        // The same delta without the cached one (a base further back).
        let v0 = view(
            vec![service("a", 1), service("b", 1), service("c", 1)],
            None,
        );
        assert_eq!(v2.messages(Some(&v0)).next().unwrap().services.len(), 2);
        // Whole when nothing is known.
        let whole: Vec<_> = v2.messages(None).collect();
        assert!(whole[0].base_version.is_empty());
        assert_eq!(whole[0].services.len(), 3);
    }

    #[test]
    fn large_views_are_chunked_under_the_bound() {
        // 200 services of 100 endpoints: about 2.6 MB in all.
        let services = (0..200)
            .map(|i| service(&format!("s{i:03}"), 100))
            .collect();
        let big = view(services, None);
        let messages: Vec<_> = big.messages(None).collect();
        assert!(messages.len() > 1, "{} message(s)", messages.len());
        for (i, m) in messages.iter().enumerate() {
            assert!(
                m.encoded_len() <= MAX_MESSAGE_BYTES,
                "chunk {i}: {}",
                m.encoded_len()
            );
            assert_eq!(m.version, big.version);
            assert_eq!(m.more, i + 1 < messages.len());
        }
        assert_eq!(messages[0].trust_bundle_pem, "bundle");
        let total: usize = messages.iter().map(|m| m.services.len()).sum();
        assert_eq!(total, 200);
    }
}
