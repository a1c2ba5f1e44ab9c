//! The leader's singleton work: deriving Service resources from Workloads
//! (one per mesh, namespace and `spec.service`), with ports the union of
//! their workloads' and a stable virtual IP; and moving mesh CA rotations
//! along (promoting pending CAs, dropping expired ones, rotating old ones);
//! and removing agents that vanished (not seen for the agent grace) from
//! every endpoint list; and bounding the change feed (pruning entries older
//! than the feed retention). One replica leads at a time
//! (the store's advisory lock); the others retry every couple of seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use weft_api::{
    ExternalServiceStatus, Kind, ObjectMeta, Resource, Service, ServiceSpec, ServiceStatus,
    Workload, WorkloadPort,
};
use weft_store::{
    now_ms, Expect, FeedRetention, LeaderGuard, ListingMarks, ResourceKey, Store, StoreError,
    VipRange,
};

use crate::ca_rotation;
use crate::mesh_ca::MeshCas;
use crate::metrics::ZoneMetrics;
use crate::views::REREAD_MOST;

/// The label on Services the leader created (and so may delete).
pub const MANAGED_LABEL: &str = "weft.io/managed-by";
const MANAGED_VALUE: &str = "weft-zone";
/// How often a follower tries to lead, and a leader re-checks its lock.
const RETRY: Duration = Duration::from_secs(2);
/// How often the leader prunes the change feed: often enough that a
/// backlog stays small, rarely enough to cost nothing.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// The newest feed entries kept whatever their age, so a quiet zone keeps
/// some history for replicas that were away.
const FEED_KEEP_NEWEST: u64 = 10_000;
/// Feed entries deleted per transaction: a short hold of SQLite's single
/// writer even over a backlog of millions.
const FEED_PRUNE_BATCH: u64 = 1_000;

/// What the leader loop needs.
pub struct Leader {
    /// The store.
    pub store: Store,
    /// This zone.
    pub zone: String,
    /// Where virtual IPs come from.
    pub vips: VipRange,
    /// Whether this replica leads now (shown by `GET /v1/zone`).
    pub leading: Arc<AtomicBool>,
    /// The mesh CAs, which the leader rotates.
    pub cas: Arc<MeshCas>,
    /// How long an agent may go unseen before it is removed.
    pub agent_grace: Duration,
    /// How long the change feed keeps its entries.
    pub feed_retention: Duration,
    /// Where the pruned entries are counted.
    pub metrics: Arc<ZoneMetrics>,
}

impl Leader {
    /// Tries to lead until `stop` turns true; leads while it can.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let name = format!("weft-zone/{}/leader", self.zone);
        loop {
            match self.store.try_lead(&name).await {
                Ok(Some(guard)) => {
                    tracing::info!(zone = %self.zone, "this replica is now the leader");
                    self.leading.store(true, Ordering::SeqCst);
                    let stopped = self.lead(guard, &mut stop).await;
                    self.leading.store(false, Ordering::SeqCst);
                    if stopped {
                        tracing::info!(zone = %self.zone, "leadership given up: stopping");
                        return;
                    }
                    tracing::warn!(zone = %self.zone, "leadership lost; following");
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "cannot try to lead"),
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Leads until the lock is lost (false) or `stop` (true).
    async fn lead(&self, mut guard: LeaderGuard, stop: &mut watch::Receiver<bool>) -> bool {
        let mut watch = self.store.watch();
        let mut recheck = tokio::time::interval(RETRY);
        // A round slower than the period (a busy store) is followed by the
        // next tick, not by a burst of the ticks it missed.
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The listings the Services and addresses were last derived from.
        let mut derived: Option<ListingMarks> = None;
        // The Workloads as last read.
        let mut workloads: Option<Workloads> = None;
        let mut pruned_at: Option<std::time::Instant> = None;
        loop {
            if let Err(error) = guard.check().await {
                tracing::warn!(%error, "leader lock lost");
                return false;
            }
            let started = std::time::Instant::now();
            derived = self.derive(derived.take(), &mut workloads).await;
            self.rotate_cas().await;
            self.remove_vanished().await;
            if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                self.prune_feed().await;
                pruned_at = Some(std::time::Instant::now());
            }
            tracing::debug!(took_ms = started.elapsed().as_millis(), "leader round");
            tokio::select! {
                changed = watch.changed() => if changed.is_err() { return false },
                _ = recheck.tick() => {}
                _ = stop.changed() => {
                    guard.release().await;
                    return true;
                }
            }
        }
    }

    /// Derives Services and gives addresses, unless nothing they are made
    /// from changed since `last` (the marks of the last round that did all
    /// of it): most changes of a zone (agents connecting, policies) touch
    /// neither Workloads, Services nor ExternalServices, and deriving
    /// reads every Workload of the zone. Returns the marks to compare the
    /// next round with.
    async fn derive(
        &self,
        last: Option<ListingMarks>,
        workloads: &mut Option<Workloads>,
    ) -> Option<ListingMarks> {
        const INPUTS: [Kind; 3] = [Kind::Workload, Kind::Service, Kind::ExternalService];
        let marks = match self.store.listing_marks(None).await {
            Ok(marks) => Some(marks),
            Err(error) => {
                tracing::warn!(%error, "cannot read the listing marks; deriving anyway");
                None
            }
        };
        if let (Some(last), Some(marks)) = (&last, &marks) {
            if INPUTS.iter().all(|k| last.of(*k) == marks.of(*k)) {
                return Some(last.clone());
            }
        }
        let mut done = true;
        match self.workloads(workloads.take()).await {
            Ok(read) => {
                if let Err(error) = self.reconcile(&read.desired()).await {
                    tracing::warn!(%error, "cannot derive services; retrying");
                    done = false;
                }
                *workloads = Some(read);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read workloads to derive services; retrying");
                done = false;
            }
        }
        if let Err(error) = self.address_external_services().await {
            tracing::warn!(%error, "cannot give ExternalServices virtual IPs; retrying");
            done = false;
        }
        marks.filter(|_| done)
    }

    /// The Workloads as last read, brought up to date: the few changed
    /// since `last` was read (by the change feed) are read again, else
    /// they are all listed. A change to one Workload of 10,000 then costs
    /// the leader a few reads, not a listing of the zone.
    async fn workloads(&self, last: Option<Workloads>) -> Result<Workloads, StoreError> {
        // Before the reads: a write in between is read again, not missed.
        let feed_seq = self.store.current_seq().await?;
        if let Some(mut last) = last {
            let changed = self
                .store
                .changed_since(last.feed_seq, Kind::Workload, None, REREAD_MOST)
                .await?;
            if let Some(changed) = changed {
                for (key, now) in changed {
                    match now {
                        Some(Resource::Workload(w)) => {
                            last.asked.insert(key, Asked::of(&w));
                        }
                        _ => {
                            last.asked.remove(&key);
                        }
                    }
                }
                last.feed_seq = feed_seq;
                return Ok(last);
            }
        }
        let mut asked = BTreeMap::new();
        for stored in self.store.list(Kind::Workload, None, None).await? {
            if let Resource::Workload(w) = &stored.resource {
                asked.insert(ResourceKey::of(&stored.resource), Asked::of(w));
            }
        }
        Ok(Workloads { feed_seq, asked })
    }

    /// Makes the Services match what the Workloads ask for.
    async fn reconcile(&self, desired: &Desired) -> Result<(), StoreError> {
        let existing = self.store.list(Kind::Service, None, None).await?;
        let mut seen = BTreeSet::new();
        for stored in &existing {
            let Resource::Service(service) = &stored.resource else {
                continue;
            };
            let id = (
                service.mesh().unwrap_or_default().to_owned(),
                service.metadata.namespace.clone().unwrap_or_default(),
                service.metadata.name.clone(),
            );
            seen.insert(id.clone());
            let key = ResourceKey::of(&stored.resource);
            match desired.get(&id) {
                Some(ports) => {
                    let vip = self.store.allocate_vip(&key, &self.vips).await?;
                    let mut next = service.clone();
                    if is_managed(service) {
                        next.spec.ports = ports.values().cloned().collect();
                    }
                    next.status = Some(ServiceStatus {
                        zone: self.zone.clone(),
                        virtual_ip: Some(vip),
                    });
                    if next != *service {
                        self.write(Resource::Service(next), Expect::Version(stored.version))
                            .await?;
                    }
                }
                None if is_managed(service) => {
                    // Deleting it releases its virtual IP too.
                    match self
                        .store
                        .delete(&key, Expect::Version(stored.version))
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(service = %key, "service has no workload left; removed")
                        }
                        Err(StoreError::Conflict { .. }) => {}
                        Err(error) => return Err(error),
                    }
                }
                None => {
                    // Declared by a user: keep it, but give its address back.
                    if service
                        .status
                        .as_ref()
                        .is_some_and(|s| s.virtual_ip.is_some())
                    {
                        self.store.release_vip(&key).await?;
                        let mut next = service.clone();
                        next.status = None;
                        self.write(Resource::Service(next), Expect::Version(stored.version))
                            .await?;
                    }
                }
            }
        }
        for ((mesh, namespace, name), ports) in desired {
            if seen.contains(&(mesh.clone(), namespace.clone(), name.clone())) {
                continue;
            }
            let mut metadata = ObjectMeta::namespaced(mesh, namespace, name);
            metadata
                .labels
                .insert(MANAGED_LABEL.to_owned(), MANAGED_VALUE.to_owned());
            let mut service = Service::new(
                metadata,
                ServiceSpec {
                    ports: ports.values().cloned().collect(),
                },
            );
            let key = ResourceKey::of(&Resource::Service(service.clone()));
            let vip = self.store.allocate_vip(&key, &self.vips).await?;
            service.status = Some(ServiceStatus {
                zone: self.zone.clone(),
                virtual_ip: Some(vip),
            });
            self.write(Resource::Service(service), Expect::Absent)
                .await?;
            tracing::info!(service = %key, %vip, "service derived from its workloads");
        }
        Ok(())
    }

    /// Gives every ExternalService its virtual IP (deleting one releases
    /// the address in the same transaction: [`Store::delete`]).
    async fn address_external_services(&self) -> Result<(), StoreError> {
        for stored in self.store.list(Kind::ExternalService, None, None).await? {
            let Resource::ExternalService(external) = &stored.resource else {
                continue;
            };
            let key = ResourceKey::of(&stored.resource);
            let vip = self.store.allocate_vip(&key, &self.vips).await?;
            if external.status.as_ref().and_then(|s| s.virtual_ip) == Some(vip) {
                continue;
            }
            let mut next = external.clone();
            next.status = Some(ExternalServiceStatus {
                virtual_ip: Some(vip),
            });
            self.write(
                Resource::ExternalService(next),
                Expect::Version(stored.version),
            )
            .await?;
            tracing::info!(external_service = %key, %vip, "ExternalService given a virtual IP");
        }
        Ok(())
    }

    /// Moves every mesh's CA rotation along (see [`crate::ca_rotation`]).
    async fn rotate_cas(&self) {
        let meshes = match self.store.list(Kind::Mesh, None, None).await {
            Ok(meshes) => meshes,
            Err(error) => {
                tracing::warn!(%error, "cannot list meshes for CA rotation; retrying");
                return;
            }
        };
        for stored in meshes {
            let Resource::Mesh(mesh) = stored.resource else {
                continue;
            };
            if let Err(error) = ca_rotation::reconcile(&self.cas, &self.zone, &mesh).await {
                tracing::warn!(mesh = %mesh.metadata.name, %error, "cannot move the CA rotation along; retrying");
            }
        }
    }

    /// Takes the agents not seen for the grace out of every endpoint list
    /// (their Workloads are kept, so that their services keep their virtual
    /// IPs; a Hello brings them back).
    async fn remove_vanished(&self) {
        let grace_ms = i64::try_from(self.agent_grace.as_millis()).unwrap_or(i64::MAX);
        let reason = format!(
            "vanished: not seen for {} s (the agent grace)",
            self.agent_grace.as_secs_f64()
        );
        match self
            .store
            .remove_vanished_agents(&self.zone, now_ms().saturating_sub(grace_ms), &reason)
            .await
        {
            Ok(removed) => {
                for agent in removed {
                    tracing::warn!(
                        agent = %agent.name,
                        mesh = %agent.mesh,
                        unseen_ms = now_ms().saturating_sub(agent.last_seen_ms),
                        grace_ms,
                        "agent vanished: its workloads left the endpoint lists"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "cannot remove vanished agents; retrying"),
        }
    }

    /// Deletes the change feed's entries older than the retention (beyond
    /// the newest kept); readers left below the floor re-read everything
    /// (see [`Store::feed_floor`]).
    async fn prune_feed(&self) {
        let retention = FeedRetention {
            max_age: self.feed_retention,
            keep_newest: FEED_KEEP_NEWEST,
            batch: FEED_PRUNE_BATCH,
        };
        let started = std::time::Instant::now();
        match self.store.prune_feed(retention, now_ms()).await {
            Ok(pruned) => {
                self.metrics.feed_pruned(pruned.rows);
                if pruned.rows > 0 {
                    tracing::info!(
                        rows = pruned.rows,
                        floor = pruned.floor,
                        retention_s = self.feed_retention.as_secs(),
                        took_ms = started.elapsed().as_millis(),
                        "change feed pruned"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "cannot prune the change feed; retrying"),
        }
    }

    /// Writes a Service; a conflict only means the next round redoes it.
    async fn write(&self, resource: Resource, expect: Expect) -> Result<(), StoreError> {
        match self.store.put(&resource, expect).await {
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }
}

/// Per (mesh, namespace, service): its ports, the union of its
/// Workloads' (the first protocol given for a port wins).
type Desired = BTreeMap<(String, String, String), BTreeMap<u16, WorkloadPort>>;

/// What one Workload asks of its Service.
struct Asked {
    /// (mesh, namespace, service).
    service: (String, String, String),
    ports: Vec<WorkloadPort>,
}

impl Asked {
    fn of(w: &Workload) -> Asked {
        Asked {
            service: (
                w.mesh().unwrap_or_default().to_owned(),
                w.metadata.namespace.clone().unwrap_or_default(),
                w.spec.service.clone(),
            ),
            ports: w.spec.ports.clone(),
        }
    }
}

/// Every Workload of the zone as the leader last read them, and the change
/// feed's position before that read.
struct Workloads {
    feed_seq: u64,
    asked: BTreeMap<ResourceKey, Asked>,
}

impl Workloads {
    /// What they ask for together, in key order (so the first protocol
    /// given for a port is that of the first Workload by key).
    fn desired(&self) -> Desired {
        let mut desired = Desired::new();
        for asked in self.asked.values() {
            let ports = desired.entry(asked.service.clone()).or_default();
            for port in &asked.ports {
                ports.entry(port.port).or_insert_with(|| port.clone());
            }
        }
        desired
    }
}

fn is_managed(service: &Service) -> bool {
    service
        .metadata
        .labels
        .get(MANAGED_LABEL)
        .map(String::as_str)
        == Some(MANAGED_VALUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::tests::{mesh, prune_all_but_newest, store, workload};

    fn services(workloads: &Workloads) -> Vec<String> {
        workloads
            .desired()
            .keys()
            .map(|(_, _, s)| s.clone())
            .collect()
    }

    /// The leader's Workloads as last read, once its position fell below
    /// the feed's floor, are listed again: a Workload whose change was
    /// pruned unread still gets its Service.
    #[tokio::test]
    async fn workloads_behind_the_floor_converge() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let leader = Leader {
            store: store.clone(),
            zone: "z1".to_owned(),
            vips: "240.240.0.0/16".parse().unwrap(),
            leading: Arc::default(),
            cas: Arc::new(MeshCas::new(store.clone(), Duration::from_secs(3600))),
            agent_grace: Duration::from_secs(60),
            feed_retention: Duration::from_secs(3600),
            metrics: Arc::new(ZoneMetrics::new(Arc::default())),
        };
        store.put(&mesh("default"), Expect::Absent).await.unwrap();
        let a = workload("a", "10.0.0.1", "payments");
        store.put(&a, Expect::Absent).await.unwrap();
        let first = leader.workloads(None).await.unwrap();
        assert_eq!(services(&first), ["payments"]);
        let b = workload("b", "10.0.0.2", "orders");
        store.put(&b, Expect::Absent).await.unwrap();
        // The one entry kept says nothing of the Workloads.
        store.put(&mesh("other"), Expect::Absent).await.unwrap();
        prune_all_but_newest(&store).await;
        let next = leader.workloads(Some(first)).await.unwrap();
        assert_eq!(services(&next), ["orders", "payments"]);
    }
}
