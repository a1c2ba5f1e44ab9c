//! Pushes each locally connected agent its view whenever it may have
//! changed: on every store change hint (local commits, and on PostgreSQL
//! every replica's NOTIFY), read through the feed to find the meshes
//! touched (resources, agents, and CA transitions, which change the trust
//! bundle); on a new stream; and every few seconds, so that liveness
//! changes (an agent silent for 15 s) reach the views too. Each stream gets
//! the latest view through a `watch` channel: one slot, so a slow agent
//! only ever has the newest view waiting.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use weft_api::proto::agent::v1 as pb;
use weft_api::Kind;
use weft_store::{FeedEntry, Store};

use crate::mesh_ca::MeshCas;
use crate::metrics::ZoneMetrics;
use crate::views::{AgentParts, AgentView, MeshSnapshot, ServiceSet, VersionPrefix, HISTORY};

/// How often every view is recomputed even without a store change.
const RECHECK: Duration = Duration::from_secs(5);

/// How much refreshing may run back to back before rounds are paced: an
/// isolated change (and the Service the leader derives from it a moment
/// later) is pushed at once, without waiting.
const BURST: Duration = Duration::from_secs(1);

/// The most one pause lasts.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Paces refresh rounds under churn (agents joining by the hundred, a
/// controller restart): once rounds used up [`BURST`], each is followed by
/// a pause as long as itself, so that changes arriving meanwhile make one
/// round and refreshing takes at most half of this replica's time however
/// large the mesh. Idle time earns the burst back.
struct Pacer {
    credit: Duration,
    last_end: tokio::time::Instant,
}

impl Pacer {
    fn new() -> Self {
        Pacer {
            credit: BURST,
            last_end: tokio::time::Instant::now(),
        }
    }

    /// Called as a round starts: the time since the last one ended is
    /// credit again.
    fn start(&mut self) {
        self.credit = (self.credit + self.last_end.elapsed()).min(BURST);
    }

    /// Called as a round of `took` ends: how long to pause before the next.
    fn end(&mut self, took: Duration) -> Duration {
        self.last_end = tokio::time::Instant::now();
        match self.credit.checked_sub(took) {
            Some(left) if !left.is_zero() => {
                self.credit = left;
                Duration::ZERO
            }
            _ => {
                self.credit = Duration::ZERO;
                took.min(MAX_PAUSE)
            }
        }
    }
}

/// The newest view of one stream (`None` until the first is computed).
pub type ViewReceiver = watch::Receiver<Option<Arc<AgentView>>>;

struct Entry {
    agent: String,
    mesh: String,
    view: watch::Sender<Option<Arc<AgentView>>>,
}

/// One mesh as last built for its agents.
struct Built {
    services: Arc<ServiceSet>,
    /// The sets built before, newest last: what keeps them alive for the
    /// deltas of streams a few versions behind (views::HISTORY).
    history: VecDeque<Arc<ServiceSet>>,
    /// The inbound rule every workload gets (the mesh's trust domain).
    allow: String,
    bundle: Arc<str>,
    /// The snapshot the set was built from: what a new stream's first view
    /// compiles its workloads' policies from (dropped at the next build).
    snapshot: Arc<MeshSnapshot>,
    /// The inputs of the agents' own parts in that snapshot (see
    /// `AgentView::parts_from`).
    parts_from: u64,
}

/// An ack not yet written: the version acked and the CAs its bundle held
/// (shared by every view of that bundle).
type Ack = (String, Arc<[String]>);

/// The streams of this replica and the task that feeds them.
pub struct Hub {
    store: Store,
    zone: String,
    cas: Arc<MeshCas>,
    streams: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    /// The next number for a new set of inputs of agents' own parts (1
    /// on: a view made outside a refresh has 0, matching none).
    next_inputs: AtomicU64,
    /// Meshes to recompute at the next wake-up, beyond what the feed says.
    dirty: Mutex<BTreeSet<String>>,
    wake: Notify,
    /// What was last built per mesh: the base of the next service set's
    /// delta (reused whole when nothing in it changed), and what a new
    /// stream's first view is made of without waiting for a refresh.
    built: Mutex<HashMap<String, Built>>,
    /// Acks not yet written, the newest per agent: written together, so N
    /// agents acking one push cost one commit.
    acks: Mutex<HashMap<String, Ack>>,
    acked: Notify,
    metrics: Arc<ZoneMetrics>,
}

impl Hub {
    /// A hub with no streams.
    pub fn new(store: Store, zone: String, cas: Arc<MeshCas>, metrics: Arc<ZoneMetrics>) -> Self {
        Hub {
            store,
            zone,
            cas,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            next_inputs: AtomicU64::new(1),
            dirty: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
            built: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
            acked: Notify::new(),
            metrics,
        }
    }

    /// Registers a stream of `agent` (in `mesh`) and asks for its view.
    /// `workloads` (namespace, name) are its own, for the inbound rules of
    /// a first view made from what was last built, so that a new agent
    /// need not wait for the refresh (which follows and corrects it).
    pub fn register(
        &self,
        agent: &str,
        mesh: &str,
        workloads: &[(String, String)],
    ) -> (u64, ViewReceiver) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (view, receiver) = watch::channel(None);
        if let Some(first) = self.first_view(agent, mesh, workloads) {
            view.send_replace(Some(Arc::new(first)));
        }
        self.lock_streams().insert(
            id,
            Entry {
                agent: agent.to_owned(),
                mesh: mesh.to_owned(),
                view,
            },
        );
        self.mark(mesh);
        (id, receiver)
    }

    /// A view from what was last built for `mesh`, if anything was.
    fn first_view(
        &self,
        agent: &str,
        mesh: &str,
        workloads: &[(String, String)],
    ) -> Option<AgentView> {
        let built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        let base = built.get(mesh)?;
        let mut own = workloads.to_vec();
        own.sort();
        // Without its policies an agent would refuse every call until the
        // refresh: compiled from the last snapshot, for the workloads it
        // already had (a new one waits for the refresh that follows).
        let snapshot = &base.snapshot;
        let known: Vec<&weft_api::Workload> = own
            .iter()
            .filter_map(|(namespace, name)| {
                snapshot.workloads.iter().find(|w| {
                    w.metadata.namespace.as_deref() == Some(namespace.as_str())
                        && &w.metadata.name == name
                })
            })
            .collect();
        let policy_json = snapshot.policy_json(&known, &snapshot.peers(&self.zone));
        let inbound = own
            .into_iter()
            .map(|(_, name)| pb::InboundRule {
                workload: name,
                allow: vec![base.allow.clone()],
            })
            .collect();
        let placed = snapshot.placed_by_agent().remove(agent);
        Some(AgentView::new(
            base.services.clone(),
            AgentParts {
                inbound,
                policy_json,
                placed: placed.unwrap_or_else(|| Arc::from([])),
                external_services: snapshot.external_services.clone(),
            },
            mesh.into(),
            self.zone.as_str().into(),
            base.bundle.clone(),
        ))
    }

    /// Forgets a stream.
    pub fn unregister(&self, id: u64) {
        self.lock_streams().remove(&id);
    }

    /// Asks for `mesh`'s views to be recomputed soon.
    pub fn mark(&self, mesh: &str) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mesh.to_owned());
        self.wake.notify_one();
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn local_meshes(&self) -> BTreeSet<String> {
        self.lock_streams()
            .values()
            .map(|e| e.mesh.clone())
            .collect()
    }

    /// Marks every agent with a stream here seen, every `period`, in a
    /// few batched writes (not one per agent), until `stop` turns true.
    /// Agents the store no longer gives to this replica (taken over
    /// elsewhere, or removed after the agent grace) go to `lost`, which
    /// ends their streams so that they reconnect and register again.
    pub async fn heartbeats(
        self: Arc<Self>,
        replica: String,
        period: Duration,
        lost: impl Fn(&str),
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let agents: BTreeSet<String> = self
                .lock_streams()
                .values()
                .map(|e| e.agent.clone())
                .collect();
            if agents.is_empty() {
                continue;
            }
            let listed: Vec<String> = agents.into_iter().collect();
            match self
                .store
                .heartbeat_agents(&self.zone, &replica, &listed)
                .await
            {
                Ok(gone) => {
                    tracing::debug!(
                        agents = listed.len(),
                        lost = gone.len(),
                        "heartbeat recorded"
                    );
                    // A stream registered after the list was taken is not
                    // judged by it: only agents listed and not marked.
                    for agent in &gone {
                        tracing::info!(%agent, "this replica no longer holds the agent's stream");
                        lost(agent);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, agents = listed.len(), "cannot record the heartbeat")
                }
            }
        }
    }

    /// Queues the record of an ack (see [`Hub::write_acks`]).
    pub fn record_ack(&self, agent: &str, version: &str, trusted_cas: Arc<[String]>) {
        self.acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent.to_owned(), (version.to_owned(), trusted_cas));
        self.acked.notify_one();
    }

    /// Writes queued acks until `stop` turns true: each batch is what
    /// arrived while the previous one was being written, in one
    /// transaction.
    pub async fn write_acks(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let stopping = tokio::select! {
                () = self.acked.notified() => false,
                _ = stop.changed() => true,
            };
            let batch: Vec<(String, String, Vec<String>)> =
                std::mem::take(&mut *self.acks.lock().unwrap_or_else(|p| p.into_inner()))
                    .into_iter()
                    .map(|(agent, (version, cas))| (agent, version, cas.to_vec()))
                    .collect();
            if batch.is_empty() {
                if stopping {
                    return;
                }
                continue;
            }
            if let Err(error) = self.store.record_acks(&self.zone, &batch).await {
                tracing::warn!(%error, acks = batch.len(), "cannot record acks; they are lost until the next ones");
            } else {
                tracing::debug!(acks = batch.len(), "acks recorded");
            }
            if stopping {
                return;
            }
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut watch = self.store.watch();
        let Some(mut seq) = crate::feed::start(&self.store, &mut stop).await else {
            return;
        };
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pacer = Pacer::new();
        loop {
            let mut all = false;
            tokio::select! {
                changed = watch.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    match crate::feed::next(&self.store, seq).await {
                        // As at a start: every view recomputed from a full read.
                        Ok(crate::feed::Next::Resync(now)) => {
                            seq = now;
                            all = true;
                        }
                        Ok(crate::feed::Next::Entries(entries)) => {
                            let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
                            for entry in entries {
                                seq = seq.max(entry.seq());
                                match entry {
                                    FeedEntry::Agent { zone, mesh, .. } if zone == self.zone => {
                                        dirty.insert(mesh);
                                    }
                                    FeedEntry::Agent { .. } => {}
                                    FeedEntry::MeshCa { mesh, .. } => {
                                        dirty.insert(mesh);
                                    }
                                    FeedEntry::Resource(change) => match (change.key.kind, change.key.mesh) {
                                        (Kind::Mesh, _) => {
                                            dirty.insert(change.key.name);
                                        }
                                        (_, Some(mesh)) => {
                                            dirty.insert(mesh);
                                        }
                                        (_, None) => all = true,
                                    },
                                }
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot read the change feed; recomputing every view");
                            all = true;
                        }
                    }
                }
                () = self.wake.notified() => {}
                _ = recheck.tick() => all = true,
                _ = stop.changed() => return,
            }
            let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
            let local = self.local_meshes();
            let meshes: Vec<String> = if all {
                local.into_iter().collect()
            } else {
                local.intersection(&dirty).cloned().collect()
            };
            let started = tokio::time::Instant::now();
            pacer.start();
            for mesh in meshes {
                let began = tokio::time::Instant::now();
                if let Err(error) = self.refresh(&mesh).await {
                    tracing::warn!(%mesh, %error, "cannot compute agent views");
                }
                self.metrics.refreshed(began.elapsed());
            }
            let pause = pacer.end(started.elapsed());
            tracing::debug!(
                took_ms = started.elapsed().as_millis(),
                pause_ms = pause.as_millis(),
                "views refreshed"
            );
            if pause.is_zero() {
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Recomputes the views of every local stream in `mesh`: one read of
    /// the store and one set of services for all of them.
    async fn refresh(&self, mesh: &str) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let previous = self
            .built
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(mesh)
            .map(|b| (b.snapshot.clone(), b.parts_from));
        let loaded = MeshSnapshot::load(
            &self.store,
            &self.zone,
            mesh,
            previous.as_ref().map(|(p, _)| &**p),
        )
        .await?;
        let Some(snapshot) = loaded else {
            tracing::debug!(%mesh, "mesh gone; agents keep their last view");
            return Ok(());
        };
        // Views whose parts were computed from the same inputs keep them.
        let parts_from = match &previous {
            Some((p, from)) if snapshot.same_agent_inputs(p) => *from,
            _ => self.next_inputs.fetch_add(1, Ordering::Relaxed),
        };
        // Shared listings are freed once the new snapshot replaces it.
        drop(previous);
        let snapshot = Arc::new(snapshot);
        let loaded_in = started.elapsed();
        let bundle: Arc<str> = self.cas.get(&snapshot.mesh).await?.bundle_pem.into();
        let services = self.services_of(mesh, &snapshot, &bundle, parts_from);
        let services_in = started.elapsed() - loaded_in;
        let inbound = snapshot.inbound_by_agent();
        let by_agent = snapshot.workloads_by_agent();
        let placed = snapshot.placed_by_agent();
        let peers = snapshot.peers(&self.zone);
        let prefix = VersionPrefix::new(&services, &bundle);
        let mesh_name: Arc<str> = snapshot.mesh.metadata.name.as_str().into();
        let zone: Arc<str> = self.zone.as_str().into();
        let targets: Vec<(String, watch::Sender<Option<Arc<AgentView>>>)> = self
            .lock_streams()
            .values()
            .filter(|e| e.mesh == mesh)
            .map(|e| (e.agent.clone(), e.view.clone()))
            .collect();
        for (agent, sender) in targets {
            let current = sender.borrow().clone();
            let parts = match current.as_deref() {
                Some(view) if view.parts_from.load(Ordering::Relaxed) == parts_from => view.parts(),
                _ => {
                    let own = by_agent
                        .get(agent.as_str())
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    let parts = AgentParts {
                        inbound: inbound
                            .get(agent.as_str())
                            .cloned()
                            .unwrap_or_else(|| Arc::from([])),
                        policy_json: snapshot.policy_json(own, &peers),
                        // One stream per agent, but a replaced one may linger.
                        placed: placed
                            .get(agent.as_str())
                            .cloned()
                            .unwrap_or_else(|| Arc::from([])),
                        external_services: snapshot.external_services.clone(),
                    };
                    match current.as_deref() {
                        Some(view) => parts.shared_with(view),
                        None => parts,
                    }
                }
            };
            // Most rounds (the periodic recheck, a change in another part of
            // the mesh) leave most views as they were: checked by identity
            // and equality before hashing a new view per agent.
            let unchanged = current.as_ref().is_some_and(|current| {
                Arc::ptr_eq(&current.services, &services)
                    && *current.trust_bundle_pem == *bundle
                    && parts.same_as(current)
            });
            if let Some(current) = current.as_ref().filter(|_| unchanged) {
                // Its parts hold for these inputs too.
                current.parts_from.store(parts_from, Ordering::Relaxed);
                continue;
            }
            let mut view = AgentView::with_prefix(
                &prefix,
                services.clone(),
                parts,
                mesh_name.clone(),
                zone.clone(),
                bundle.clone(),
            );
            view.parts_from = AtomicU64::new(parts_from);
            sender.send_if_modified(|current| match current {
                // The same content: nothing to push, but its parts hold.
                Some(c) if c.version == view.version => {
                    c.parts_from.store(parts_from, Ordering::Relaxed);
                    false
                }
                _ => {
                    *current = Some(Arc::new(view));
                    true
                }
            });
        }
        tracing::debug!(
            %mesh,
            load_ms = loaded_in.as_millis(),
            services_ms = services_in.as_millis(),
            views_ms = (started.elapsed() - loaded_in - services_in).as_millis(),
            "mesh views computed"
        );
        Ok(())
    }

    /// The mesh's services: the previous set if nothing changed (so that
    /// streams see the same `Arc`), else a new one with its delta.
    fn services_of(
        &self,
        mesh: &str,
        snapshot: &Arc<MeshSnapshot>,
        bundle: &Arc<str>,
        parts_from: u64,
    ) -> Arc<ServiceSet> {
        let (previous, mut history) = self
            .built
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(mesh)
            .map(|b| (Some(b.services.clone()), b.history.clone()))
            .unwrap_or_default();
        let set = snapshot.service_set(previous.as_deref());
        let set = match previous {
            Some(previous) if previous.digest == set.digest => previous,
            Some(previous) => {
                if history.len() == HISTORY {
                    history.pop_front();
                }
                history.push_back(previous);
                Arc::new(set)
            }
            None => Arc::new(set),
        };
        self.built.lock().unwrap_or_else(|p| p.into_inner()).insert(
            mesh.to_owned(),
            Built {
                services: set.clone(),
                history,
                allow: snapshot.allow_all(),
                bundle: bundle.clone(),
                snapshot: snapshot.clone(),
                parts_from,
            },
        );
        set
    }
}
