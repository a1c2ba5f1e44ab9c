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
//! into messages of bounded size ([`AgentView::messages`]). A changed
//! service goes as the difference of its endpoints ([`pb::ServicePatch`])
//! when that is smaller than the service whole: when agents join, each
//! stream then receives the new endpoints only, not every service's whole
//! list again (which made a ramp-up of N agents cost O(N^2) bytes).

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use prost::Message;
use weft_api::policy::compiled::WorkloadPolicy;
use weft_api::policy::select::{self, MeshPolicies, PeerResolver, WorkloadInfo};
use weft_api::policy::target::PeerRef;
use weft_api::proto::agent::endpoint_order;
use weft_api::proto::agent::v1 as pb;
use weft_api::{
    ExternalService, Kind, Mesh, PeerMatch, Protocol, Resource, Service, SpiffeId, Workload,
    WorkloadPort,
};
use weft_store::{
    now_ms, AgentPresence, AgentRecord, ListingMarks, ResourceKey, Store, StoreError,
};

use crate::zone_ca::hex;

/// The label naming the agent that registered a Workload.
pub const AGENT_LABEL: &str = "weft.io/agent";
/// How long after its last heartbeat a connected agent counts as online.
pub const ONLINE_WINDOW_MS: i64 = 15_000;

/// Whether an agent is online: it holds a stream and was seen recently.
pub fn online(agent: &AgentRecord, now_ms: i64) -> bool {
    seen_online(
        agent.connected_replica.is_some(),
        agent.last_seen_ms,
        now_ms,
    )
}

/// [`online`] from the few columns a snapshot reads.
fn seen_online(connected: bool, last_seen_ms: i64, now_ms: i64) -> bool {
    connected && now_ms - last_seen_ms < ONLINE_WINDOW_MS
}

/// One mesh's state, read in one go.
pub struct MeshSnapshot {
    /// The Mesh resource.
    pub mesh: Mesh,
    /// Its Services, by namespace and name.
    pub services: Arc<Vec<Service>>,
    /// Its Workloads, by namespace and name.
    pub workloads: Arc<Vec<Workload>>,
    /// Its policies, by kind.
    pub policies: Arc<MeshPolicies>,
    /// Its ExternalServices that have a virtual IP, as every agent of the
    /// mesh gets them (sorted by namespace and name).
    pub external_services: Arc<[pb::ExternalServiceView]>,
    /// The zone's agents in this mesh, by name.
    pub agents: Arc<HashMap<String, AgentPresence>>,
    /// When `agents` was read.
    agents_read: Instant,
    /// The marks of the listings above: a later load with equal marks
    /// shares them instead of reading them again.
    marks: ListingMarks,
    /// The change feed's position before the listings were read: a later
    /// load re-reads only the Workloads changed after it.
    feed_seq: u64,
    /// When it was read (ms since the epoch), for liveness.
    pub now_ms: i64,
}

/// The resources of `kind` in `mesh` that `pick` keeps, in listing order.
async fn list_of<T>(
    store: &Store,
    kind: Kind,
    mesh: &str,
    pick: impl Fn(Resource) -> Option<T>,
) -> Result<Vec<T>, StoreError> {
    Ok(store
        .list(kind, Some(mesh), None)
        .await?
        .into_iter()
        .filter_map(|stored| pick(stored.resource))
        .collect())
}

/// How long a load may keep the agents' presence it read: far inside the
/// online window even with a heartbeat just missed (every 5 s at most),
/// so that no agent looks offline for want of a re-read; short enough
/// that a refresh after a change (and the Service the leader derives from
/// it a moment later) reads the agents once, not twice.
const PRESENCE_KEPT: Duration = Duration::from_secs(1);

/// How many changed Workloads a reader of a kept listing (a snapshot, the
/// leader's) re-reads one by one; past that it lists them all again.
pub const REREAD_MOST: usize = 64;

/// Workloads in snapshot order: by namespace, then name.
fn workload_order(w: &Workload) -> (&str, &str) {
    (
        w.metadata.namespace.as_deref().unwrap_or_default(),
        &w.metadata.name,
    )
}

/// `previous`'s Workloads with the ones changed since it was read (put or
/// deleted, by the change feed) read again; `None` when more than
/// [`REREAD_MOST`] changed. A change to one Workload of 10,000 then costs
/// a few reads instead of a listing of them all.
async fn updated_workloads(
    store: &Store,
    mesh: &str,
    previous: &MeshSnapshot,
) -> Result<Option<Vec<Workload>>, StoreError> {
    let Some(changed) = store
        .changed_since(previous.feed_seq, Kind::Workload, Some(mesh), REREAD_MOST)
        .await?
    else {
        return Ok(None);
    };
    let mut workloads = (*previous.workloads).clone();
    for (key, now) in changed {
        let wanted = (
            key.namespace.as_deref().unwrap_or_default(),
            key.name.as_str(),
        );
        let at = workloads.binary_search_by(|w| workload_order(w).cmp(&wanted));
        match (now, at) {
            (Some(Resource::Workload(w)), Ok(i)) => workloads[i] = w,
            (Some(Resource::Workload(w)), Err(i)) => workloads.insert(i, w),
            (_, Ok(i)) => {
                workloads.remove(i);
            }
            (_, Err(_)) => {}
        }
    }
    Ok(Some(workloads))
}

/// An ExternalService as agents get it; `None` until it has a virtual IP.
fn external_view(external: &ExternalService) -> Option<pb::ExternalServiceView> {
    let vip = external.status.as_ref()?.virtual_ip?;
    Some(pb::ExternalServiceView {
        name: external.metadata.name.clone(),
        namespace: external.metadata.namespace.clone().unwrap_or_default(),
        virtual_ip: vip.to_string(),
        host: external.spec.host.clone(),
        port: Some(port_to_proto(&WorkloadPort {
            port: external.spec.port,
            protocol: external.spec.protocol,
        })),
    })
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
    /// Where the workload runs, from its labels.
    pub locality: weft_api::Locality,
}

impl MeshSnapshot {
    /// Reads mesh `name` of `zone`; `None` if the mesh does not exist.
    /// The listings that did not change since `previous` (the same mesh's
    /// last snapshot) are shared with it, not read again: a change to one
    /// Service of a mesh of 10,000 Workloads no longer reads them all.
    pub async fn load(
        store: &Store,
        zone: &str,
        name: &str,
        previous: Option<&MeshSnapshot>,
    ) -> Result<Option<Self>, StoreError> {
        // Before the listings they guard: a write in between is then seen
        // again, never missed (see Store::listing_marks).
        let feed_seq = store.current_seq().await?;
        let marks = store.listing_marks(Some(name)).await?;
        let Some(stored) = store.get(&ResourceKey::global(Kind::Mesh, name)).await? else {
            return Ok(None);
        };
        let Resource::Mesh(mesh) = stored.resource else {
            return Ok(None);
        };
        let previous = previous.filter(|p| p.mesh.metadata.name == mesh.metadata.name);
        let kept = |kinds: &[Kind]| {
            previous.filter(|p| kinds.iter().all(|k| p.marks.of(*k) == marks.of(*k)))
        };
        let services = match kept(&[Kind::Service]) {
            Some(p) => p.services.clone(),
            None => Arc::new(
                list_of(store, Kind::Service, name, |r| match r {
                    Resource::Service(service) => Some(service),
                    _ => None,
                })
                .await?,
            ),
        };
        let workloads = match kept(&[Kind::Workload]) {
            Some(p) => p.workloads.clone(),
            None => {
                let updated = match previous {
                    Some(p) => updated_workloads(store, name, p).await?,
                    None => None,
                };
                let mut workloads = match updated {
                    Some(workloads) => workloads,
                    None => {
                        list_of(store, Kind::Workload, name, |r| match r {
                            Resource::Workload(workload) => Some(workload),
                            _ => None,
                        })
                        .await?
                    }
                };
                // In this process's order, whatever the database's
                // collation, so that both ways give the same snapshot.
                workloads.sort_by(|a, b| workload_order(a).cmp(&workload_order(b)));
                Arc::new(workloads)
            }
        };
        let policies = match kept(&Kind::POLICIES) {
            Some(p) => p.policies.clone(),
            None => {
                let mut policies = MeshPolicies::default();
                for kind in Kind::POLICIES {
                    for stored in store.list(kind, Some(name), None).await? {
                        policies.add(stored.resource);
                    }
                }
                Arc::new(policies)
            }
        };
        let external_services = match kept(&[Kind::ExternalService]) {
            Some(p) => p.external_services.clone(),
            None => list_of(store, Kind::ExternalService, name, |r| match r {
                Resource::ExternalService(external) => external_view(&external),
                _ => None,
            })
            .await?
            .into(),
        };
        // Heartbeats are not in the feed: a presence is kept only while it
        // is fresh (PRESENCE_KEPT) and no agent came, went or left since.
        let fresh = previous.filter(|p| p.agents_read.elapsed() < PRESENCE_KEPT);
        let kept_agents = match fresh {
            Some(p) if !store.agents_changed_since(p.feed_seq, zone, name).await? => {
                Some(p.agents.clone())
            }
            _ => None,
        };
        let (agents, agents_read) = match kept_agents {
            Some(agents) => (agents, fresh.map_or_else(Instant::now, |p| p.agents_read)),
            None => {
                let read = Instant::now();
                let agents = store
                    .list_presence(zone, name)
                    .await?
                    .into_iter()
                    .map(|a| (a.name.clone(), a))
                    .collect();
                (Arc::new(agents), read)
            }
        };
        Ok(Some(MeshSnapshot {
            mesh,
            services,
            workloads,
            policies,
            external_services,
            agents,
            agents_read,
            marks,
            feed_seq,
            now_ms: now_ms(),
        }))
    }

    /// Whether agents' own parts made from `other` hold for this snapshot:
    /// they are made from the Mesh, its Workloads, policies and
    /// ExternalServices, and those listings are shared when unchanged.
    pub fn same_agent_inputs(&self, other: &MeshSnapshot) -> bool {
        Arc::ptr_eq(&self.workloads, &other.workloads)
            && Arc::ptr_eq(&self.policies, &other.policies)
            && Arc::ptr_eq(&self.external_services, &other.external_services)
            && self.mesh == other.mesh
    }

    /// The identity of a workload of this mesh, as text ("" if invalid).
    pub fn spiffe_id(&self, workload: &Workload) -> String {
        workload
            .identity(&self.mesh.spec)
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default()
    }

    /// The agent that registered a workload, if it is known.
    pub fn owner(&self, workload: &Workload) -> Option<&AgentPresence> {
        workload
            .metadata
            .labels
            .get(AGENT_LABEL)
            .and_then(|name| self.agents.get(name))
    }

    /// The agent of a workload if it has not left (goodbye, revoked token,
    /// vanished): only those workloads are in endpoint lists.
    fn live_owner(&self, workload: &Workload) -> Option<&AgentPresence> {
        self.owner(workload).filter(|a| !a.left)
    }

    /// Whether an agent of this snapshot is online.
    fn is_online(&self, agent: &AgentPresence) -> bool {
        seen_online(agent.connected, agent.last_seen_ms, self.now_ms)
    }

    /// Whether a workload's agent is online.
    pub fn ready(&self, workload: &Workload) -> bool {
        self.owner(workload).is_some_and(|a| self.is_online(a))
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
                    agent: agent.name.clone(),
                    spiffe_id: self.spiffe_id(w),
                    ready: self.is_online(agent),
                    locality: weft_api::Locality::from_labels(&w.metadata.labels),
                })
            })
            .collect()
    }

    /// The services of this mesh as every agent of it sees them, built
    /// once per change and shared by all its streams. `previous` is the
    /// set the hub built last, so the set knows its delta from it. Each
    /// service's endpoints end up sorted ([`SharedService::new`]), which
    /// the endpoint diff of [`ServiceSet::diff`] relies on.
    pub fn service_set(&self, previous: Option<&ServiceSet>) -> ServiceSet {
        // Index once: finding each service's workloads by scanning all of
        // them made a change cost O(services x workloads).
        let mut by_service: HashMap<(&str, &str), Vec<&Workload>> = HashMap::new();
        for w in self.workloads.iter() {
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
                        let locality = weft_api::Locality::from_labels(&w.metadata.labels);
                        Some(pb::Endpoint {
                            address: w.spec.address.to_string(),
                            // Node mode: the workload's own listener.
                            agent: w
                                .spec
                                .hbone_address
                                .map_or_else(|| agent.hbone_address.clone(), |a| a.to_string()),
                            spiffe_id: self.spiffe_id(w),
                            ready: self.is_online(agent),
                            // Empty: this zone, the zone of every view it
                            // sends (a remote zone's endpoints will name
                            // theirs once zones exchange inventories).
                            zone: String::new(),
                            locality_region: locality.region,
                            locality_zone: locality.zone,
                            locality_subzone: locality.subzone,
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

    /// The workloads of each agent (by the label naming it), each agent's
    /// sorted by namespace and name.
    pub fn workloads_by_agent(&self) -> HashMap<&str, Vec<&Workload>> {
        let mut by_agent: HashMap<&str, Vec<&Workload>> = HashMap::new();
        for w in self.workloads.iter() {
            if let Some(agent) = w.metadata.labels.get(AGENT_LABEL) {
                by_agent.entry(agent.as_str()).or_default().push(w);
            }
        }
        for list in by_agent.values_mut() {
            list.sort_by(|a, b| {
                (&a.metadata.namespace, &a.metadata.name)
                    .cmp(&(&b.metadata.namespace, &b.metadata.name))
            });
        }
        by_agent
    }

    /// The resolver of `rules[].from` over this mesh's workloads (all in
    /// `zone`, the only one a zone controller knows of), to be shared by
    /// every workload compiled from this snapshot.
    pub fn peers<'a>(&'a self, zone: &'a str) -> SnapshotPeers<'a> {
        SnapshotPeers {
            snapshot: self,
            zone,
            resolved: Mutex::new(HashMap::new()),
        }
    }

    /// The policy of one workload of this mesh.
    pub fn workload_policy(&self, workload: &Workload, peers: &dyn PeerResolver) -> WorkloadPolicy {
        select::compile(&WorkloadInfo::of(workload), &self.policies, peers)
    }

    /// What `ConfigUpdate.policy_json` carries for an agent with these
    /// workloads: the JSON array of their policies.
    pub fn policy_json(&self, workloads: &[&Workload], peers: &dyn PeerResolver) -> Arc<str> {
        let policies: Vec<WorkloadPolicy> = workloads
            .iter()
            .map(|w| self.workload_policy(w, peers))
            .collect();
        match serde_json::to_string(&policies) {
            Ok(json) => json.into(),
            // Plain data (strings, numbers, maps with string keys) always
            // serializes; should it not, no policy is safer than a wrong one.
            Err(error) => {
                tracing::error!(%error, "cannot serialize workload policies");
                Arc::from("")
            }
        }
    }

    /// The callers every workload of the mesh accepts: the whole mesh.
    pub fn allow_all(&self) -> String {
        format!("spiffe://{}/*", self.mesh.spec.trust_domain)
    }

    /// What `ConfigUpdate.placed` carries for each node agent: the
    /// workloads the operator placed on it, sorted by namespace and name.
    /// Whether the agent registered them yet does not change what it is
    /// sent, so its registration does not cause a push.
    pub fn placed_by_agent(&self) -> HashMap<&str, Arc<[pb::PlacedWorkload]>> {
        let mut placed: HashMap<&str, Vec<(&Workload, &str)>> = HashMap::new();
        for w in self.workloads.iter() {
            if let Some(node) = &w.spec.node {
                placed
                    .entry(node.agent.as_str())
                    .or_default()
                    .push((w, node.netns.as_str()));
            }
        }
        placed
            .into_iter()
            .map(|(agent, mut list)| {
                list.sort_by(|(a, _), (b, _)| {
                    (&a.metadata.namespace, &a.metadata.name)
                        .cmp(&(&b.metadata.namespace, &b.metadata.name))
                });
                let list = list
                    .into_iter()
                    .map(|(w, netns)| pb::PlacedWorkload {
                        workload: Some(placed_to_proto(w)),
                        netns: netns.to_owned(),
                    })
                    .collect::<Arc<[_]>>();
                (agent, list)
            })
            .collect()
    }

    /// Inbound rules per agent name, for every agent of the mesh at once
    /// (each agent's views then share its list).
    pub fn inbound_by_agent(&self) -> HashMap<&str, Arc<[pb::InboundRule]>> {
        // Every workload of the mesh may call (TrafficPermission will narrow
        // this in a later issue).
        let allow_all = self.allow_all();
        let mut rules: HashMap<&str, Vec<pb::InboundRule>> = HashMap::new();
        for w in self.workloads.iter() {
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
            .into_iter()
            .map(|(agent, list)| (agent, list.into()))
            .collect()
    }
}

/// A placed workload as its node agent is asked to register it: as the
/// operator wrote it, without the label naming the agent that registered it.
fn placed_to_proto(w: &Workload) -> pb::Workload {
    pb::Workload {
        name: w.metadata.name.clone(),
        namespace: w.metadata.namespace.clone().unwrap_or_default(),
        service: w.spec.service.clone(),
        service_account: w.spec.service_account.clone(),
        address: w.spec.address.to_string(),
        ports: w.spec.ports.iter().map(port_to_proto).collect(),
        labels: w
            .metadata
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() != AGENT_LABEL)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        hbone_address: String::new(),
    }
}

/// Resolves `rules[].from` against a snapshot's workloads, each peer once
/// per snapshot (the same `from` recurs in every workload's compilation).
pub struct SnapshotPeers<'a> {
    snapshot: &'a MeshSnapshot,
    zone: &'a str,
    resolved: Mutex<HashMap<PeerRef, Vec<PeerMatch>>>,
}

impl PeerResolver for SnapshotPeers<'_> {
    fn trust_domain(&self) -> &str {
        &self.snapshot.mesh.spec.trust_domain
    }

    fn identities(&self, peer: &PeerRef) -> Vec<SpiffeId> {
        self.snapshot
            .workloads
            .iter()
            .filter(|w| match peer {
                PeerRef::Service { name, namespace } => {
                    w.metadata.namespace.as_deref() == Some(namespace.as_str())
                        && &w.spec.service == name
                }
                PeerRef::Labels { labels } => select::labels_match(labels, &w.metadata.labels),
                PeerRef::Zone { name } => name == self.zone,
                PeerRef::Mesh | PeerRef::SpiffeId { .. } | PeerRef::SpiffeIdPrefix { .. } => false,
            })
            .filter_map(|w| w.identity(&self.snapshot.mesh.spec).ok())
            .collect()
    }

    fn resolve(&self, peer: &PeerRef) -> Vec<PeerMatch> {
        let mut resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = resolved.get(peer) {
            return found.clone();
        }
        let matchers = select::resolve_peer(peer, self);
        resolved.insert(peer.clone(), matchers.clone());
        matchers
    }
}

/// The bound on one ConfigUpdate's encoded size: far under the 4 MiB
/// that gRPC peers accept by default, whatever the size of the mesh. Small
/// because each stream's encoder keeps a buffer as large as the largest
/// message it sent: with 10,000 streams, 1 MiB messages would pin
/// gigabytes, and 16 KiB ones 25 KiB per stream (see docs/benchmarks.md).
/// A whole view of 10,000 endpoints is then about 500 messages. A service
/// larger than the bound goes in parts to agents that join them
/// ([`weft_api::proto::agent::SERVICE_PARTS`]), alone to older ones. The
/// codec's encode buffer holds the largest message
/// (`weft_api::codec::ENCODE_BUFFER_BYTES`), so that it never grows.
pub const MAX_MESSAGE_BYTES: usize = 2 * 1024;

// The largest chunk, in its ZoneMessage (a tag and a length) and gRPC's
// 5-byte prefix, fits the encode buffer as it starts.
const _: () = assert!(weft_api::codec::ENCODE_BUFFER_BYTES >= MAX_MESSAGE_BYTES + 16);

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
    /// Keys and hashes a service view, its endpoints sorted first (by
    /// [`endpoint_order`]): the hash then follows the endpoints' content,
    /// not the store's order, and two versions of a service can be
    /// diffed endpoint by endpoint in one walk.
    pub fn new(mut view: pb::ServiceView) -> Self {
        use sha2::{Digest, Sha256};
        view.endpoints.sort_by(endpoint_order);
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
    /// Added services, and changed ones whose patch would not be smaller.
    pub changed: Vec<Arc<pb::ServiceView>>,
    /// Changed services as the difference of their endpoints, shared by
    /// every stream that sends this delta.
    pub patched: Vec<Arc<pb::ServicePatch>>,
    /// Keys of the services gone.
    pub removed: Vec<String>,
}

/// How `new` differs from `old` (the same service, both with sorted
/// endpoints): `new`'s fields with only the endpoints it added, and the
/// endpoints it lost. One walk over both lists; equal endpoints pair off
/// one for one, so duplicates are counted.
pub fn endpoint_patch(old: &pb::ServiceView, new: &pb::ServiceView) -> pb::ServicePatch {
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut before = old.endpoints.iter().peekable();
    let mut after = new.endpoints.iter().peekable();
    loop {
        let order = match (before.peek(), after.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(b), Some(a)) => endpoint_order(b, a),
        };
        match order {
            Ordering::Less => removed.extend(before.next().cloned()),
            Ordering::Greater => added.extend(after.next().cloned()),
            Ordering::Equal => {
                before.next();
                after.next();
            }
        }
    }
    pb::ServicePatch {
        service: Some(pb::ServiceView {
            name: new.name.clone(),
            namespace: new.namespace.clone(),
            zone: new.zone.clone(),
            virtual_ip: new.virtual_ip.clone(),
            ports: new.ports.clone(),
            endpoints: added,
        }),
        removed_endpoints: removed,
    }
}

impl ServiceDelta {
    /// The same delta with patched services sent whole, from `set`, for
    /// agents that do not apply patches.
    fn without_patches(&self, set: &ServiceSet) -> ServiceDelta {
        let mut changed = self.changed.clone();
        for patch in &self.patched {
            let Some(service) = &patch.service else {
                continue;
            };
            let key = service_key(service);
            if let Ok(i) = set.services.binary_search_by(|s| s.key.cmp(&key)) {
                changed.push(set.services[i].view.clone());
            }
        }
        ServiceDelta {
            changed,
            patched: Vec::new(),
            removed: self.removed.clone(),
        }
    }
}

/// A mesh's services at one moment, sorted by key, shared by every agent
/// view of the mesh (one copy whatever the number of agents).
#[derive(Debug)]
pub struct ServiceSet {
    /// The services, sorted by key.
    pub services: Vec<SharedService>,
    /// SHA-256 over every key and hash, in order.
    pub digest: [u8; 32],
    /// Deltas from recent sets (by their digest), each computed once for
    /// all the streams that had that set: the set built before this one
    /// from the start, others as lagging streams ask for them.
    since: Mutex<VecDeque<([u8; 32], Arc<ServiceDelta>)>>,
}

/// Deltas a set keeps, from as many earlier sets: the hub keeps as many
/// sets alive ([`HISTORY`]).
const SINCE_KEPT: usize = HISTORY;

/// Sets of a mesh the hub keeps alive after newer ones were built, so that
/// a stream a few versions behind still gets a delta; a stream further
/// behind gets the whole view. Bounds the sets in memory whatever the
/// number of streams (each stream only keeps a weak reference, see
/// [`Sent`]).
pub const HISTORY: usize = 8;

impl ServiceSet {
    /// A set from sorted services, with its delta from `previous`.
    pub fn new(mut services: Vec<SharedService>, previous: Option<&ServiceSet>) -> Self {
        use sha2::{Digest, Sha256};
        if let Some(previous) = previous {
            share_unchanged(&mut services, previous);
        }
        let mut hasher = Sha256::new();
        for s in &services {
            hasher.update(s.key.as_bytes());
            hasher.update([0]);
            hasher.update(s.hash);
        }
        let set = ServiceSet {
            services,
            digest: hasher.finalize().into(),
            since: Mutex::new(VecDeque::with_capacity(SINCE_KEPT)),
        };
        if let Some(previous) = previous {
            let delta = Arc::new(set.diff(previous));
            set.lock_since().push_back((previous.digest, delta));
        }
        set
    }

    fn lock_since(&self) -> std::sync::MutexGuard<'_, VecDeque<([u8; 32], Arc<ServiceDelta>)>> {
        self.since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What changed since `base`, by one walk over both sorted lists. A
    /// service in both with another hash goes as a patch when its encoding
    /// is smaller than the service whole, else whole.
    pub fn diff(&self, base: &ServiceSet) -> ServiceDelta {
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
                            let patch = endpoint_patch(&o.view, &n.view);
                            if patch.encoded_len() < n.view.encoded_len() {
                                delta.patched.push(Arc::new(patch));
                            } else {
                                delta.changed.push(n.view.clone());
                            }
                        }
                    }
                }
            }
        }
        delta
    }

    /// The delta since `base`, computed once per base for every stream
    /// (held under the lock, so that streams asking at once wait for one
    /// computation instead of each making its own).
    fn delta_since(&self, base: &ServiceSet) -> Arc<ServiceDelta> {
        let mut since = self.lock_since();
        if let Some((_, delta)) = since.iter().find(|(digest, _)| *digest == base.digest) {
            return delta.clone();
        }
        let delta = Arc::new(self.diff(base));
        if since.len() == SINCE_KEPT {
            since.pop_front();
        }
        since.push_back((base.digest, delta.clone()));
        delta
    }

    /// Every service, as a delta from nothing.
    fn whole(&self) -> ServiceDelta {
        ServiceDelta {
            changed: self.services.iter().map(|s| s.view.clone()).collect(),
            patched: Vec::new(),
            removed: Vec::new(),
        }
    }
}

/// Makes services unchanged since `previous` (same key and hash) share
/// its copy, so that the sets the hub and the streams keep differ only by
/// what changed.
fn share_unchanged(services: &mut [SharedService], previous: &ServiceSet) {
    let mut old = previous.services.iter().peekable();
    for service in services.iter_mut() {
        while old.next_if(|o| o.key < service.key).is_some() {}
        if let Some(o) = old.peek() {
            if o.key == service.key && o.hash == service.hash {
                service.view = o.view.clone();
            }
        }
    }
}

/// The start of the version of every view of one service set and trust
/// bundle: the SHA-256 state after the label, the services' digest and
/// the head's first field (the bundle: the version field is empty while
/// hashing), so each of a mesh's agents hashes only its own small parts,
/// not the bundle again. Fields are encoded in tag order, so the result is
/// the hash of the whole head. It also carries the bundle's CAs, found once
/// for all the views that share it.
#[derive(Clone)]
pub struct VersionPrefix {
    hasher: sha2::Sha256,
    trusted_cas: Arc<[String]>,
}

impl VersionPrefix {
    /// The prefix of views of `services` with `trust_bundle_pem`.
    pub fn new(services: &ServiceSet, trust_bundle_pem: &str) -> Self {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"weft view v2\0");
        hasher.update(services.digest);
        let bundle = pb::ConfigUpdate {
            trust_bundle_pem: trust_bundle_pem.to_owned(),
            ..Default::default()
        };
        hasher.update(bundle.encode_to_vec());
        VersionPrefix {
            hasher,
            trusted_cas: bundle_cas(trust_bundle_pem),
        }
    }
}

/// The fingerprints of the CAs in a PEM bundle: what an agent that acked a
/// view with this bundle trusts (unparsable blocks are skipped: the agent
/// would skip them too).
fn bundle_cas(pem: &str) -> Arc<[String]> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|der| crate::mesh_ca::fingerprint(&der))
        .collect()
}

/// What a stream keeps of the view it last sent: enough to build the next
/// delta, without keeping that view's services alive.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The version the agent is taken to hold.
    pub version: String,
    bundle: Arc<str>,
    /// Gone once the hub no longer keeps the set (see [`HISTORY`]): the
    /// next push is then whole.
    services: Weak<ServiceSet>,
}

/// The parts of a view computed for one agent alone, from its workloads
/// (registered or placed on it). Shared, not copied, from one view of the
/// agent to the next: a change to the mesh's services makes a new view for
/// every agent, and each would otherwise carry a copy of parts that did
/// not change while its stream still holds the old view.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentParts {
    /// Callers allowed into each of the agent's workloads.
    pub inbound: Arc<[pb::InboundRule]>,
    /// The policies of the agent's workloads.
    pub policy_json: Arc<str>,
    /// The workloads placed on the agent.
    pub placed: Arc<[pb::PlacedWorkload]>,
    /// The mesh's ExternalServices (shared by its agents).
    pub external_services: Arc<[pb::ExternalServiceView]>,
}

impl AgentParts {
    /// Whether `view` already carries these parts.
    pub fn same_as(&self, view: &AgentView) -> bool {
        view.inbound == self.inbound
            && view.policy_json == self.policy_json
            && view.placed == self.placed
            && view.external_services == self.external_services
    }

    /// These parts, holding `view`'s copy of each part equal to it: parts
    /// computed again from new inputs often come out the same.
    pub fn shared_with(self, view: &AgentView) -> Self {
        fn keep<T: ?Sized + PartialEq>(new: Arc<T>, old: &Arc<T>) -> Arc<T> {
            if *new == **old {
                old.clone()
            } else {
                new
            }
        }
        AgentParts {
            inbound: keep(self.inbound, &view.inbound),
            policy_json: keep(self.policy_json, &view.policy_json),
            placed: keep(self.placed, &view.placed),
            external_services: keep(self.external_services, &view.external_services),
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
    /// Callers allowed into each of the agent's workloads (for agents that
    /// predate policies).
    pub inbound: Arc<[pb::InboundRule]>,
    /// The policies of the agent's workloads, as `ConfigUpdate.policy_json`.
    pub policy_json: Arc<str>,
    /// Node mode: the workloads placed on the agent, as
    /// `ConfigUpdate.placed`.
    pub placed: Arc<[pb::PlacedWorkload]>,
    /// The mesh's ExternalServices, as `ConfigUpdate.external_services`.
    pub external_services: Arc<[pb::ExternalServiceView]>,
    /// The mesh's name (shared by the mesh's views).
    pub mesh: Arc<str>,
    /// The zone's name (shared by the zone's views).
    pub zone: Arc<str>,
    /// Every CA the agent must trust.
    pub trust_bundle_pem: Arc<str>,
    /// The fingerprints of the CAs in `trust_bundle_pem` (shared by the
    /// views of one bundle): what the agent trusts once it acks.
    pub trusted_cas: Arc<[String]>,
    /// Which inputs (Workloads, policies, ExternalServices, the Mesh) the
    /// own parts were computed from, numbered by the hub (0: none known):
    /// a refresh on the same inputs reuses the parts instead of compiling
    /// each agent's policies again. Updated in place when a refresh finds
    /// the parts equal, so the next one reuses them too.
    pub parts_from: AtomicU64,
}

impl AgentView {
    /// A view, versioned by its content: SHA-256 of the services' digest
    /// and the per-agent parts, so the version is the same whether the
    /// view is sent whole or as a delta.
    pub fn new(
        services: Arc<ServiceSet>,
        own: AgentParts,
        mesh: Arc<str>,
        zone: Arc<str>,
        trust_bundle_pem: Arc<str>,
    ) -> Self {
        let prefix = VersionPrefix::new(&services, &trust_bundle_pem);
        Self::with_prefix(&prefix, services, own, mesh, zone, trust_bundle_pem)
    }

    /// [`AgentView::new`] with the part of the hash every view of the same
    /// services and bundle shares already done (`prefix` must be of them).
    pub fn with_prefix(
        prefix: &VersionPrefix,
        services: Arc<ServiceSet>,
        own: AgentParts,
        mesh: Arc<str>,
        zone: Arc<str>,
        trust_bundle_pem: Arc<str>,
    ) -> Self {
        use sha2::Digest;
        let mut view = AgentView {
            version: String::new(),
            services,
            inbound: own.inbound,
            policy_json: own.policy_json,
            placed: own.placed,
            external_services: own.external_services,
            mesh,
            zone,
            trust_bundle_pem,
            trusted_cas: prefix.trusted_cas.clone(),
            parts_from: AtomicU64::new(0),
        };
        let mut hasher = prefix.hasher.clone();
        // The head's fields after the bundle (see VersionPrefix).
        hasher.update(view.head("", false).encode_to_vec());
        view.version = hex(&hasher.finalize());
        view
    }

    /// Its own parts, to make a view of other services from.
    pub fn parts(&self) -> AgentParts {
        AgentParts {
            inbound: self.inbound.clone(),
            policy_json: self.policy_json.clone(),
            placed: self.placed.clone(),
            external_services: self.external_services.clone(),
        }
    }

    /// What a stream keeps once it sent this view.
    pub fn sent(&self) -> Sent {
        Sent {
            version: self.version.clone(),
            bundle: self.trust_bundle_pem.clone(),
            services: Arc::downgrade(&self.services),
        }
    }

    /// The per-agent parts as the head of an update (no services); the
    /// bundle left empty unless `with_bundle` (a delta on a base with the
    /// same bundle: the agent keeps the one it has).
    fn head(&self, base_version: &str, with_bundle: bool) -> pb::ConfigUpdate {
        pb::ConfigUpdate {
            version: self.version.clone(),
            trust_bundle_pem: if with_bundle {
                self.trust_bundle_pem.to_string()
            } else {
                String::new()
            },
            services: Vec::new(),
            inbound: self.inbound.to_vec(),
            mesh: self.mesh.to_string(),
            zone: self.zone.to_string(),
            base_version: base_version.to_owned(),
            removed_services: Vec::new(),
            more: false,
            patched_services: Vec::new(),
            policy_json: self.policy_json.to_string(),
            placed: self.placed.to_vec(),
            external_services: self.external_services.to_vec(),
        }
    }

    /// The messages that bring an agent holding `base` (`None`: nothing
    /// known, so the whole view) to this view, each under
    /// [`MAX_MESSAGE_BYTES`] (a single service or patch larger than that
    /// still goes alone in one message). Built one at a time as they are
    /// sent, so a stream holds one chunk, not a copy of the whole view. A
    /// delta leaves the trust bundle out when the base had the same one.
    pub fn messages<'a>(&'a self, base: Option<&'a Sent>, patches: bool) -> Messages<'a> {
        let base = base.and_then(|b| Some((b, b.services.upgrade()?)));
        // Compared by content: the hub builds a new Arc per view. An agent
        // without patches reads an empty bundle as no bundle.
        let with_bundle = !patches
            || base
                .as_ref()
                .is_none_or(|(b, _)| *b.bundle != *self.trust_bundle_pem);
        let (base_version, delta) = match base {
            Some((base, set)) if Arc::ptr_eq(&set, &self.services) => {
                (base.version.as_str(), Arc::new(ServiceDelta::default()))
            }
            Some((base, set)) => (base.version.as_str(), self.services.delta_since(&set)),
            None => ("", Arc::new(self.services.whole())),
        };
        let delta = if patches || delta.patched.is_empty() {
            delta
        } else {
            Arc::new(delta.without_patches(&self.services))
        };
        Messages {
            view: self,
            base_version,
            with_bundle,
            delta,
            removed: 0,
            changed: 0,
            endpoints_sent: 0,
            patched: 0,
            first: true,
            parts: false,
        }
    }
}

/// The chunks of one update, built as they are asked for.
pub struct Messages<'a> {
    view: &'a AgentView,
    base_version: &'a str,
    with_bundle: bool,
    delta: Arc<ServiceDelta>,
    removed: usize,
    changed: usize,
    /// The endpoints of `delta.changed[changed]` already sent in parts.
    endpoints_sent: usize,
    patched: usize,
    first: bool,
    /// Whether the agent joins a service sent in parts.
    parts: bool,
}

impl Messages<'_> {
    /// Sends a service larger than [`MAX_MESSAGE_BYTES`] in parts, for an
    /// agent that joins them (`SERVICE_PARTS` in its Hello).
    pub fn in_parts(mut self, parts: bool) -> Self {
        self.parts = parts;
        self
    }

    /// Pushes the changed services from `self.changed` on, like [`fill`],
    /// except that with `parts` a service that does not fit alone goes as
    /// consecutive parts of one message each: the service's other fields
    /// with as many of its endpoints as fit (at least one). True when every
    /// service is in.
    fn fill_services(
        &mut self,
        message: &mut pb::ConfigUpdate,
        size: &mut usize,
        count: &mut usize,
    ) -> bool {
        let delta = Arc::clone(&self.delta);
        while let Some(service) = delta.changed.get(self.changed) {
            if self.endpoints_sent == 0 {
                let entry = entry_len(service.encoded_len());
                let fits = *size + entry <= MAX_MESSAGE_BYTES;
                if fits || (*count == 0 && !self.parts) {
                    *size += entry;
                    *count += 1;
                    message.services.push((**service).clone());
                    self.changed += 1;
                    continue;
                }
                if *count > 0 {
                    return false;
                }
            }
            let from = self.endpoints_sent;
            let mut part = without_endpoints(service);
            let mut part_len = part.encoded_len();
            let mut to = from;
            while let Some(endpoint) = service.endpoints.get(to) {
                let more = entry_len(endpoint.encoded_len());
                if to > from && *size + entry_len(part_len + more) > MAX_MESSAGE_BYTES {
                    break;
                }
                part_len += more;
                to += 1;
            }
            part.endpoints
                .extend_from_slice(&service.endpoints[from..to]);
            *size += entry_len(part_len);
            *count += 1;
            message.services.push(part);
            if to < service.endpoints.len() {
                self.endpoints_sent = to;
                return false;
            }
            self.endpoints_sent = 0;
            self.changed += 1;
        }
        true
    }

    /// Whether items of the delta are still to be sent.
    fn left(&self) -> bool {
        self.removed < self.delta.removed.len()
            || self.changed < self.delta.changed.len()
            || self.patched < self.delta.patched.len()
    }
}

/// The size of a repeated field's entry of `len` bytes: tag, length, then
/// the item itself.
fn entry_len(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

/// A service's fields but its endpoints: the head of each of its parts.
/// Spelled out, so that a field added to `ServiceView` must be added here.
fn without_endpoints(service: &pb::ServiceView) -> pb::ServiceView {
    let pb::ServiceView {
        name,
        namespace,
        zone,
        virtual_ip,
        ports,
        endpoints: _,
    } = service;
    pb::ServiceView {
        name: name.clone(),
        namespace: namespace.clone(),
        zone: zone.clone(),
        virtual_ip: virtual_ip.clone(),
        ports: ports.clone(),
        endpoints: Vec::new(),
    }
}

/// Pushes the items of `items` from `*next` on into a message while it
/// stays under the bound (an item alone in a message goes however large);
/// `size` and `count` are the message's so far. True when every item is
/// in, so the next kind of item may start.
fn fill<T>(
    items: &[T],
    next: &mut usize,
    size: &mut usize,
    count: &mut usize,
    len: impl Fn(&T) -> usize,
    mut push: impl FnMut(&T),
) -> bool {
    while let Some(item) = items.get(*next) {
        let entry = entry_len(len(item));
        if *size + entry > MAX_MESSAGE_BYTES && *count > 0 {
            return false;
        }
        *size += entry;
        *count += 1;
        push(item);
        *next += 1;
    }
    true
}

impl Iterator for Messages<'_> {
    type Item = pb::ConfigUpdate;

    fn next(&mut self) -> Option<pb::ConfigUpdate> {
        if !self.first && !self.left() {
            return None;
        }
        let mut message = if self.first {
            self.view.head(self.base_version, self.with_bundle)
        } else {
            pb::ConfigUpdate {
                version: self.view.version.clone(),
                ..Default::default()
            }
        };
        self.first = false;
        // Room for `more` (tag and value), set once the chunk is full.
        let mut size = message.encoded_len() + 2;
        let mut count = 0;
        let delta = Arc::clone(&self.delta);
        // Removed keys, then services, then patches: each kind starts only
        // once the one before is all in.
        let done = fill(
            &delta.removed,
            &mut self.removed,
            &mut size,
            &mut count,
            String::len,
            |key| message.removed_services.push(key.clone()),
        ) && self.fill_services(&mut message, &mut size, &mut count)
            && fill(
                &delta.patched,
                &mut self.patched,
                &mut size,
                &mut count,
                |patch| patch.encoded_len(),
                |patch| message.patched_services.push((**patch).clone()),
            );
        message.more = !done;
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
            Protocol::Detect => pb::Protocol::Detect,
        } as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(i: usize, ready: bool) -> pb::Endpoint {
        pb::Endpoint {
            address: format!("10.0.{}.{}", i / 256, i % 256),
            agent: format!("10.0.{}.{}:15008", i / 256, i % 256),
            spiffe_id: format!("spiffe://t/ns/default/sa/sa-{i}"),
            ready,
            ..Default::default()
        }
    }

    fn port(port: u32) -> pb::Port {
        pb::Port { port, protocol: 0 }
    }

    fn service_with(
        name: &str,
        ports: Vec<pb::Port>,
        endpoints: Vec<pb::Endpoint>,
    ) -> SharedService {
        SharedService::new(pb::ServiceView {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            zone: "z".to_owned(),
            virtual_ip: "240.240.0.1".to_owned(),
            ports,
            endpoints,
        })
    }

    fn service(name: &str, endpoints: usize) -> SharedService {
        service_with(
            name,
            vec![port(80)],
            (0..endpoints).map(|i| endpoint(i, true)).collect(),
        )
    }

    fn view_with_bundle(
        services: Vec<SharedService>,
        previous: Option<&ServiceSet>,
        bundle: &str,
    ) -> AgentView {
        AgentView::new(
            Arc::new(ServiceSet::new(services, previous)),
            parts("", Vec::new()),
            "default".into(),
            "z".into(),
            Arc::from(bundle),
        )
    }

    fn view(services: Vec<SharedService>, previous: Option<&ServiceSet>) -> AgentView {
        view_with_bundle(services, previous, "bundle")
    }

    /// The one update `view` sends to an agent holding `base`.
    fn single(view: &AgentView, base: &AgentView) -> pb::ConfigUpdate {
        let mut messages: Vec<_> = view.messages(Some(&base.sent()), true).collect();
        assert_eq!(messages.len(), 1);
        messages.remove(0)
    }

    #[test]
    fn policies_are_part_of_the_version_and_of_every_first_chunk() {
        let set = Arc::new(ServiceSet::new(
            (0..200).map(|i| service(&format!("s{i:03}"), 20)).collect(),
            None,
        ));
        let with = |json: &str| {
            AgentView::new(
                set.clone(),
                parts(json, Vec::new()),
                "default".into(),
                "z".into(),
                Arc::from("bundle"),
            )
        };
        let none = with("[]");
        let some = with(r#"[{"workload":"web-1"}]"#);
        assert_ne!(none.version, some.version);
        assert_eq!(with("[]").version, none.version);
        let messages: Vec<_> = some.messages(None, true).collect();
        assert!(messages.len() > 1);
        assert_eq!(messages[0].policy_json, r#"[{"workload":"web-1"}]"#);
        // Later chunks of the version do not repeat it.
        assert!(messages[1..].iter().all(|m| m.policy_json.is_empty()));
        // A delta carries it whole too: it is per agent, not diffed.
        let delta = some.messages(Some(&none.sent()), true).next().unwrap();
        assert_eq!(delta.base_version, none.version);
        assert_eq!(delta.policy_json, r#"[{"workload":"web-1"}]"#);
    }

    fn parts(policy_json: &str, placed: Vec<pb::PlacedWorkload>) -> AgentParts {
        AgentParts {
            inbound: Arc::from([]),
            policy_json: Arc::from(policy_json),
            placed: placed.into(),
            external_services: Arc::from([]),
        }
    }

    #[test]
    fn external_services_are_part_of_the_version_and_of_every_first_chunk() {
        let set = Arc::new(ServiceSet::new(
            (0..200).map(|i| service(&format!("s{i:03}"), 20)).collect(),
            None,
        ));
        let with = |host: Option<&str>| {
            let external_services: Arc<[pb::ExternalServiceView]> = host
                .map(|host| pb::ExternalServiceView {
                    name: "stripe".into(),
                    namespace: "pay".into(),
                    virtual_ip: "240.240.0.9".into(),
                    host: host.into(),
                    port: Some(port(443)),
                })
                .into_iter()
                .collect();
            AgentView::new(
                set.clone(),
                AgentParts {
                    external_services,
                    ..parts("", Vec::new())
                },
                "default".into(),
                "z".into(),
                Arc::from("bundle"),
            )
        };
        let none = with(None);
        let stripe = with(Some("api.stripe.com"));
        let moved = with(Some("api2.stripe.com"));
        assert_ne!(none.version, stripe.version);
        assert_ne!(stripe.version, moved.version);
        let messages: Vec<_> = stripe.messages(None, true).collect();
        assert!(messages.len() > 1);
        assert_eq!(messages[0].external_services.len(), 1);
        assert!(messages[1..].iter().all(|m| m.external_services.is_empty()));
        let delta = moved.messages(Some(&stripe.sent()), true).next().unwrap();
        assert_eq!(delta.external_services[0].host, "api2.stripe.com");
    }

    #[test]
    fn placements_are_part_of_the_version_and_of_every_first_chunk() {
        let set = Arc::new(ServiceSet::new(
            (0..200).map(|i| service(&format!("s{i:03}"), 20)).collect(),
            None,
        ));
        let with = |netns: Option<&str>| {
            let placed = netns
                .map(|netns| pb::PlacedWorkload {
                    workload: Some(pb::Workload {
                        name: "web-1".into(),
                        ..Default::default()
                    }),
                    netns: netns.into(),
                })
                .into_iter()
                .collect();
            AgentView::new(
                set.clone(),
                parts("", placed),
                "default".into(),
                "z".into(),
                Arc::from("bundle"),
            )
        };
        let none = with(None);
        let placed = with(Some("/run/netns/web-1"));
        let moved = with(Some("/run/netns/web-2"));
        assert_ne!(none.version, placed.version);
        assert_ne!(placed.version, moved.version);
        assert_eq!(with(Some("/run/netns/web-1")).version, placed.version);
        let messages: Vec<_> = placed.messages(None, true).collect();
        assert!(messages.len() > 1);
        assert_eq!(messages[0].placed.len(), 1);
        assert!(messages[1..].iter().all(|m| m.placed.is_empty()));
        // A delta carries it whole, and a removal as an empty list.
        let delta = moved.messages(Some(&placed.sent()), true).next().unwrap();
        assert_eq!(delta.placed[0].netns, "/run/netns/web-2");
        let delta = none.messages(Some(&placed.sent()), true).next().unwrap();
        assert_eq!(delta.base_version, placed.version);
        assert!(delta.placed.is_empty());
    }

    #[test]
    fn a_version_is_the_hash_of_the_whole_head_whatever_is_shared() {
        use sha2::{Digest, Sha256};
        let view = view_with_bundle(vec![service("a", 3)], None, "BUNDLE PEM");
        let mut whole = Sha256::new();
        whole.update(b"weft view v2\0");
        whole.update(view.services.digest);
        // As the version was hashed before: over the whole head, its own
        // (version) field still empty.
        let mut head = view.head("", true);
        head.version.clear();
        whole.update(head.encode_to_vec());
        assert_eq!(view.version, hex(&whole.finalize()));
        // Views sharing one prefix differ by their own parts only.
        let prefix = VersionPrefix::new(&view.services, &view.trust_bundle_pem);
        let again = AgentView::with_prefix(
            &prefix,
            view.services.clone(),
            parts("[]", Vec::new()),
            view.mesh.clone(),
            view.zone.clone(),
            view.trust_bundle_pem.clone(),
        );
        let direct = AgentView::new(
            view.services.clone(),
            parts("[]", Vec::new()),
            view.mesh.clone(),
            view.zone.clone(),
            view.trust_bundle_pem.clone(),
        );
        assert_eq!(again.version, direct.version);
    }

    #[test]
    fn parts_computed_again_share_what_did_not_change() {
        let set = Arc::new(ServiceSet::new(vec![service("a", 2)], None));
        let view = AgentView::new(
            set,
            parts(r#"[{"workload":"web-1"}]"#, Vec::new()),
            "default".into(),
            "z".into(),
            Arc::from("bundle"),
        );
        let again = parts(r#"[{"workload":"web-1"}]"#, Vec::new()).shared_with(&view);
        assert!(Arc::ptr_eq(&again.policy_json, &view.policy_json));
        assert!(Arc::ptr_eq(&again.inbound, &view.inbound));
        let changed = parts(r#"[{"workload":"web-2"}]"#, Vec::new()).shared_with(&view);
        assert_eq!(&*changed.policy_json, r#"[{"workload":"web-2"}]"#);
        assert!(Arc::ptr_eq(&changed.inbound, &view.inbound));
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
        let messages: Vec<_> = v2.messages(Some(&v1.sent()), true).collect();
        assert_eq!(messages.len(), 1);
        let delta = &messages[0];
        assert_eq!(delta.version, v2.version);
        assert_eq!(delta.base_version, v1.version);
        assert_eq!(delta.removed_services, ["default/b"]);
        let whole: Vec<&str> = delta.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(whole, ["d"]);
        // `c` gained one endpoint: cheaper as a patch than whole.
        let patched: Vec<&str> = delta
            .patched_services
            .iter()
            .filter_map(|p| p.service.as_ref())
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(patched, ["c"]);
        // The same bundle as the base's: left out.
        assert_eq!(delta.trust_bundle_pem, "");
        assert!(!delta.more);
        // The same delta without the cached one (a base further back).
        let v0 = view(
            vec![service("a", 1), service("b", 1), service("c", 1)],
            None,
        );
        let again = v2.messages(Some(&v0.sent()), true).next().unwrap();
        assert_eq!((again.services.len(), again.patched_services.len()), (1, 1));
        // Whole when nothing is known.
        let whole: Vec<_> = v2.messages(None, true).collect();
        assert!(whole[0].base_version.is_empty());
        assert_eq!(whole[0].services.len(), 3);
        assert!(whole[0].patched_services.is_empty());
        assert_eq!(whole[0].trust_bundle_pem, "bundle");
    }

    #[test]
    fn endpoints_are_sorted_whatever_the_input_order() {
        let forward = service_with("a", vec![], (0..20).map(|i| endpoint(i, true)).collect());
        let backward = service_with(
            "a",
            vec![],
            (0..20).rev().map(|i| endpoint(i, true)).collect(),
        );
        assert_eq!(forward.hash, backward.hash);
        assert_eq!(forward.view, backward.view);
        let addresses: Vec<&str> = forward
            .view
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        let mut sorted = addresses.clone();
        sorted.sort_unstable();
        assert_eq!(addresses, sorted);
    }

    #[test]
    fn a_new_endpoint_in_a_large_service_is_sent_alone() {
        let v1 = view(vec![service("big", 1000)], None);
        let v2 = view(vec![service("big", 1001)], Some(&v1.services));
        let delta = single(&v2, &v1);
        assert!(delta.services.is_empty());
        assert_eq!(delta.patched_services.len(), 1);
        let patch = &delta.patched_services[0];
        assert!(patch.removed_endpoints.is_empty());
        let added = &patch.service.as_ref().expect("the service").endpoints;
        assert_eq!(added, &[endpoint(1000, true)]);
        let whole = v2.services.services[0].view.encoded_len();
        assert!(
            delta.encoded_len() * 100 < whole,
            "delta {} bytes, service whole {whole} bytes",
            delta.encoded_len()
        );
    }

    #[test]
    fn removed_endpoints_and_flipped_readiness_are_removals_and_additions() {
        let before: Vec<_> = (0..50).map(|i| endpoint(i, true)).collect();
        let mut after = before.clone();
        after.remove(7);
        after[20].ready = false;
        let v1 = view(vec![service_with("s", vec![port(80)], before)], None);
        let v2 = view(
            vec![service_with("s", vec![port(80)], after.clone())],
            Some(&v1.services),
        );
        let delta = single(&v2, &v1);
        let patch = &delta.patched_services[0];
        let mut removed = patch.removed_endpoints.clone();
        removed.sort_by(endpoint_order);
        let mut expected = vec![endpoint(7, true), endpoint(21, true)];
        expected.sort_by(endpoint_order);
        assert_eq!(removed, expected);
        let added = &patch.service.as_ref().expect("the service").endpoints;
        assert_eq!(added, &[endpoint(21, false)]);
        // Duplicates count: one of two equal endpoints going is one removal.
        let twice = vec![endpoint(1, true), endpoint(1, true), endpoint(2, true)];
        let once = vec![endpoint(1, true), endpoint(2, true)];
        let patch = endpoint_patch(
            &service_with("s", vec![], twice).view,
            &service_with("s", vec![], once).view,
        );
        assert_eq!(patch.removed_endpoints, [endpoint(1, true)]);
        assert!(patch.service.expect("the service").endpoints.is_empty());
    }

    #[test]
    fn a_patch_carries_the_service_fields_as_they_are_now() {
        let v1 = view(
            vec![service_with(
                "s",
                vec![port(80)],
                (0..30).map(|i| endpoint(i, true)).collect(),
            )],
            None,
        );
        let v2 = view(
            vec![service_with(
                "s",
                vec![port(80), port(9001)],
                (0..31).map(|i| endpoint(i, true)).collect(),
            )],
            Some(&v1.services),
        );
        let delta = single(&v2, &v1);
        assert!(delta.services.is_empty());
        let service = delta.patched_services[0]
            .service
            .as_ref()
            .expect("the service");
        assert_eq!(service.ports, [port(80), port(9001)]);
        assert_eq!(service.endpoints, [endpoint(30, true)]);
    }

    #[test]
    fn a_service_whose_endpoints_all_changed_goes_whole() {
        let v1 = view(vec![service("s", 10)], None);
        let v2 = view(
            vec![service_with(
                "s",
                vec![port(80)],
                (100..110).map(|i| endpoint(i, true)).collect(),
            )],
            Some(&v1.services),
        );
        let delta = single(&v2, &v1);
        assert!(delta.patched_services.is_empty());
        assert_eq!(delta.services.len(), 1);
        assert_eq!(delta.services[0], *v2.services.services[0].view);
    }

    #[test]
    fn many_patches_are_chunked_under_the_bound() {
        // 300 services of 100 endpoints, each gaining 5: about 1,500
        // endpoints of patches, several chunks.
        let v1 = view(
            (0..300)
                .map(|i| service(&format!("s{i:03}"), 100))
                .collect(),
            None,
        );
        let v2 = view(
            (0..300)
                .map(|i| service(&format!("s{i:03}"), 105))
                .collect(),
            Some(&v1.services),
        );
        let messages: Vec<_> = v2.messages(Some(&v1.sent()), true).collect();
        assert_chunked(&messages, &v2.version);
        assert!(messages.iter().all(|m| m.services.is_empty()));
        assert_eq!(messages[0].base_version, v1.version);
        let total: usize = messages.iter().map(|m| m.patched_services.len()).sum();
        assert_eq!(total, 300);
    }

    #[test]
    fn agents_without_patches_get_changed_services_whole_with_the_bundle() {
        let v1 = view(vec![service("a", 30), service("b", 1)], None);
        let v2 = view(vec![service("a", 31), service("b", 1)], Some(&v1.services));
        assert_eq!(single(&v2, &v1).patched_services.len(), 1);
        let old: Vec<_> = v2.messages(Some(&v1.sent()), false).collect();
        assert_eq!(old.len(), 1);
        assert!(old[0].patched_services.is_empty());
        assert_eq!(old[0].services.len(), 1);
        assert_eq!(old[0].services[0].endpoints.len(), 31);
        assert_eq!(old[0].base_version, v1.version);
        assert_eq!(old[0].trust_bundle_pem, "bundle");
    }

    #[test]
    fn the_bundle_is_left_out_of_a_delta_only_when_unchanged() {
        let v1 = view_with_bundle(vec![service("a", 1)], None, "old");
        // Equal content in another Arc: still unchanged.
        let v2 = view_with_bundle(vec![service("a", 2)], Some(&v1.services), "old");
        assert_eq!(single(&v2, &v1).trust_bundle_pem, "");
        let v3 = view_with_bundle(vec![service("a", 2)], Some(&v2.services), "new");
        assert_ne!(v3.version, v2.version);
        assert_eq!(single(&v3, &v2).trust_bundle_pem, "new");
        // A whole view always carries it.
        assert_eq!(
            v2.messages(None, true).next().unwrap().trust_bundle_pem,
            "old"
        );
    }

    /// Several messages of `version`, each under the bound, all but the
    /// last marked `more`.
    fn assert_chunked(messages: &[pb::ConfigUpdate], version: &str) {
        assert!(messages.len() > 1, "{} message(s)", messages.len());
        for (i, m) in messages.iter().enumerate() {
            assert!(
                m.encoded_len() <= MAX_MESSAGE_BYTES,
                "chunk {i}: {}",
                m.encoded_len()
            );
            assert_eq!(m.version, version);
            assert_eq!(m.more, i + 1 < messages.len());
        }
    }

    #[test]
    fn large_views_are_chunked_under_the_bound() {
        // 200 services of 20 endpoints (each under the bound): about
        // 500 KB in all.
        let services = (0..200).map(|i| service(&format!("s{i:03}"), 20)).collect();
        let big = view(services, None);
        let messages: Vec<_> = big.messages(None, true).collect();
        assert_chunked(&messages, &big.version);
        assert_eq!(messages[0].trust_bundle_pem, "bundle");
        let total: usize = messages.iter().map(|m| m.services.len()).sum();
        assert_eq!(total, 200);
    }

    #[test]
    fn a_service_over_the_bound_goes_alone() {
        let big = view(
            vec![service("a", 1), service("b", 200), service("c", 1)],
            None,
        );
        let messages: Vec<_> = big.messages(None, true).collect();
        let alone = messages
            .iter()
            .find(|m| m.services.iter().any(|s| s.name == "b"))
            .unwrap();
        assert_eq!(alone.services.len(), 1);
        assert!(alone.encoded_len() > MAX_MESSAGE_BYTES);
        let total: usize = messages.iter().map(|m| m.services.len()).sum();
        assert_eq!(total, 3);
    }

    /// The services of `messages` as an agent that joins parts holds them.
    fn joined(messages: &[pb::ConfigUpdate]) -> Vec<pb::ServiceView> {
        let mut services: Vec<_> = messages.iter().flat_map(|m| m.services.clone()).collect();
        weft_agent::view::join_service_parts(&mut services);
        services
    }

    #[test]
    fn a_service_over_the_bound_goes_in_parts_to_agents_that_join_them() {
        let big = view(
            vec![service("a", 1), service("b", 200), service("c", 1)],
            None,
        );
        let whole: Vec<_> = big.messages(None, true).collect();
        let parts: Vec<_> = big.messages(None, true).in_parts(true).collect();
        assert_chunked(&parts, &big.version);
        let b_parts = parts
            .iter()
            .flat_map(|m| &m.services)
            .filter(|s| s.name == "b")
            .count();
        assert!(b_parts > 1, "b in {b_parts} part(s)");
        assert_eq!(joined(&parts), joined(&whole));
        assert_eq!(joined(&parts).len(), 3);
    }

    #[test]
    fn a_changed_service_over_the_bound_goes_in_parts_in_a_delta() {
        let v1 = view(vec![service("a", 1), service("b", 150)], None);
        let v2 = view(vec![service("a", 1), service("b", 200)], Some(&v1.services));
        // An agent without patches gets b whole, in parts.
        let parts: Vec<_> = v2
            .messages(Some(&v1.sent()), false)
            .in_parts(true)
            .collect();
        assert_chunked(&parts, &v2.version);
        assert_eq!(parts[0].base_version, v1.version);
        let services = joined(&parts);
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].name, "b");
        assert_eq!(services[0].endpoints.len(), 200);
        assert_eq!(services[0], *v2.services.services[1].view);
    }

    #[test]
    fn a_base_no_longer_kept_gets_the_whole_view() {
        let v1 = view(vec![service("a", 1), service("b", 1)], None);
        let sent = v1.sent();
        let v2 = view(vec![service("a", 2), service("b", 1)], Some(&v1.services));
        assert_eq!(single(&v2, &v1).patched_services.len(), 1);
        drop(v1);
        let update = v2.messages(Some(&sent), true).next().unwrap();
        assert!(update.base_version.is_empty(), "a delta on a dropped base");
        assert_eq!(update.services.len(), 2);
        assert_eq!(update.trust_bundle_pem, "bundle");
    }

    #[test]
    fn unchanged_services_are_shared_with_the_previous_set_and_deltas_cached() {
        let v1 = view(vec![service("a", 1), service("b", 3)], None);
        let v2 = view(vec![service("a", 2), service("b", 3)], Some(&v1.services));
        let (a1, b1) = (&v1.services.services[0], &v1.services.services[1]);
        let (a2, b2) = (&v2.services.services[0], &v2.services.services[1]);
        assert!(Arc::ptr_eq(&b1.view, &b2.view));
        assert!(!Arc::ptr_eq(&a1.view, &a2.view));
        let v0 = view(vec![service("b", 3)], None);
        let first = v2.services.delta_since(&v0.services);
        let again = v2.services.delta_since(&v0.services);
        assert!(Arc::ptr_eq(&first, &again));
    }
}
