//! Cutting agents off at once: when an agent's bootstrap token is revoked
//! (an `Agent` feed entry marked `cut`, written by the revocation itself),
//! or when the operator deletes one of the Workloads it registered, the
//! config stream it holds on this replica ends with PERMISSION_DENIED and
//! the reason. Driven by the change feed, so a revocation or deletion made
//! through any replica reaches the streams of every replica (PostgreSQL
//! NOTIFY), without waiting for the agent's next Hello or Renew. Ordinary
//! inventory entries (enrolment, connection, goodbye) are skipped without
//! a query.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;
use weft_api::Kind;
use weft_store::{ChangeEvent, FeedEntry, ResourceKey, Store, StoreError};

use crate::feed::Next;

/// Why a stream is cut; `None` while it may go on.
pub type CutReceiver = watch::Receiver<Option<Cut>>;

/// Why a stream ends, and whether the agent may come straight back.
#[derive(Debug, Clone)]
pub struct Cut {
    /// Told to the agent in the stream's final status.
    pub reason: String,
    /// The agent may reconnect at once (UNAVAILABLE: its stream moved or
    /// it was taken for vanished), rather than being refused
    /// (PERMISSION_DENIED: revoked or deleted).
    pub retry: bool,
}

impl Cut {
    /// The stream's final status.
    pub fn status(&self) -> tonic::Status {
        if self.retry {
            tonic::Status::unavailable(self.reason.clone())
        } else {
            tonic::Status::permission_denied(self.reason.clone())
        }
    }
}

struct Entry {
    agent: String,
    /// The Workloads the stream registered (`mesh/namespace/name`).
    workloads: BTreeSet<String>,
    cut: watch::Sender<Option<Cut>>,
}

/// The streams of this replica that may have to be cut.
pub struct Cutoff {
    store: Store,
    zone: String,
    streams: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
}

/// A Workload's key as the inventory records withdrawn ones:
/// `mesh/namespace/name`.
pub fn workload_key(key: &ResourceKey) -> String {
    format!(
        "{}/{}/{}",
        key.mesh.as_deref().unwrap_or_default(),
        key.namespace.as_deref().unwrap_or_default(),
        key.name
    )
}

impl Cutoff {
    /// A registry with no streams.
    pub fn new(store: Store, zone: String) -> Self {
        Cutoff {
            store,
            zone,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a stream of `agent` before it is checked, so that a
    /// revocation racing its Hello is not missed.
    pub fn register(&self, agent: &str) -> (u64, CutReceiver) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (cut, receiver) = watch::channel(None);
        self.lock().insert(
            id,
            Entry {
                agent: agent.to_owned(),
                workloads: BTreeSet::new(),
                cut,
            },
        );
        (id, receiver)
    }

    /// Records the Workloads stream `id` registered; call it before they
    /// are written, so that the stream's own removals never look like the
    /// operator's.
    pub fn set_workloads(&self, id: u64, workloads: BTreeSet<String>) {
        if let Some(entry) = self.lock().get_mut(&id) {
            entry.workloads = workloads;
        }
    }

    /// Records the Workloads of every local stream of `agent`, as
    /// [`Cutoff::set_workloads`] does for one: a unary Register changes the
    /// whole set of the agent, which its stream, if any, holds.
    pub fn set_agent_workloads(&self, agent: &str, workloads: BTreeSet<String>) {
        for entry in self.lock().values_mut().filter(|e| e.agent == agent) {
            entry.workloads = workloads.clone();
        }
    }

    /// Whether `agent` has a stream on this replica opened after stream
    /// `id`: the end of `id` then says nothing about the agent.
    pub fn newer_stream(&self, agent: &str, id: u64) -> bool {
        self.lock()
            .iter()
            .any(|(other, e)| *other > id && e.agent == agent)
    }

    /// Forgets a stream.
    pub fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Cuts every local stream of `agent` for `reason`.
    fn cut_agent(&self, agent: &str, reason: &str) {
        for entry in self.lock().values().filter(|e| e.agent == agent) {
            entry.cut.send_replace(Some(Cut {
                reason: reason.to_owned(),
                retry: false,
            }));
        }
    }

    /// Ends the local streams of `agent` that this replica no longer holds
    /// in the inventory (taken over elsewhere, or removed after the agent
    /// grace): the agent reconnects and registers again.
    pub fn lose(&self, agent: &str) {
        for entry in self.lock().values().filter(|e| e.agent == agent) {
            entry.cut.send_replace(Some(Cut {
                reason: "this replica no longer holds the agent's stream (taken over, or removed after the agent grace); reconnect".to_owned(),
                retry: true,
            }));
        }
    }

    /// Cuts the local streams that registered the deleted Workload `key`.
    fn cut_workload(&self, key: &str) -> Vec<String> {
        let mut cut = Vec::new();
        for entry in self.lock().values_mut() {
            if entry.workloads.remove(key) {
                entry.cut.send_replace(Some(Cut {
                    reason: format!(
                        "workload {key} was deleted by the operator; this agent may not serve it any more"
                    ),
                    retry: false,
                }));
                cut.push(entry.agent.clone());
            }
        }
        cut
    }

    fn local_agent(&self, agent: &str) -> bool {
        self.lock().values().any(|e| e.agent == agent)
    }

    /// Why `agent` may not hold a stream any more, if it may not: not
    /// enrolled, or its token revoked or gone.
    pub async fn refusal(
        store: &Store,
        zone: &str,
        agent: &str,
    ) -> Result<Option<String>, StoreError> {
        let Some(record) = store.get_agent(zone, agent).await? else {
            return Ok(Some(format!(
                "agent {agent:?} is not enrolled in zone {zone:?}"
            )));
        };
        let token_id = &record.enrollment.token_id;
        Ok(match store.token_info(token_id).await? {
            None => Some(format!(
                "the bootstrap token {token_id} this agent enrolled with no longer exists"
            )),
            Some(token) if token.revoked => Some(format!(
                "the bootstrap token {token_id} this agent enrolled with was revoked"
            )),
            Some(_) => None,
        })
    }

    /// Follows the change feed until `stop` turns true.
    pub async fn run(self: std::sync::Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut watch = self.store.watch();
        let Some(mut seq) = crate::feed::start(&self.store, &mut stop).await else {
            return;
        };
        loop {
            tokio::select! {
                changed = watch.changed() => if changed.is_err() { return },
                _ = stop.changed() => return,
            }
            match crate::feed::next(&self.store, seq).await {
                Ok(Next::Entries(entries)) => {
                    for entry in entries {
                        seq = seq.max(entry.seq());
                        self.on_entry(entry).await;
                    }
                }
                Ok(Next::Resync(now)) => {
                    seq = now;
                    self.recheck_streams().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the change feed to cut agents off; retrying at the next change")
                }
            }
        }
    }

    /// Checks every local stream as the feed entries that were pruned
    /// unread would have: a revocation or a deletion among them still cuts.
    async fn recheck_streams(&self) {
        let streams: Vec<(String, BTreeSet<String>)> = self
            .lock()
            .values()
            .map(|e| (e.agent.clone(), e.workloads.clone()))
            .collect();
        for (agent, workloads) in streams {
            if let Err(error) = self.recheck(&agent, &workloads).await {
                tracing::warn!(%agent, %error, "cannot check whether the agent is still allowed");
            }
        }
    }

    /// Cuts `agent` if it may not hold a stream any more, or the streams
    /// that registered one of its Workloads the operator deleted (the
    /// inventory records them as withdrawn).
    async fn recheck(&self, agent: &str, workloads: &BTreeSet<String>) -> Result<(), StoreError> {
        if let Some(reason) = Self::refusal(&self.store, &self.zone, agent).await? {
            tracing::warn!(%agent, %reason, "agent cut off: its config stream ends");
            self.cut_agent(agent, &reason);
            return Ok(());
        }
        let Some(record) = self.store.get_agent(&self.zone, agent).await? else {
            return Ok(());
        };
        for key in record.withdrawn.iter().filter(|k| workloads.contains(*k)) {
            for agent in self.cut_workload(key) {
                tracing::warn!(%agent, workload = %key, "workload deleted by the operator: agent cut off");
            }
        }
        Ok(())
    }

    async fn on_entry(&self, entry: FeedEntry) {
        match entry {
            FeedEntry::Agent {
                zone, name, cut, ..
            } if cut && zone == self.zone => {
                if !self.local_agent(&name) {
                    return;
                }
                match Self::refusal(&self.store, &self.zone, &name).await {
                    Ok(Some(reason)) => {
                        tracing::warn!(agent = %name, %reason, "agent cut off: its config stream ends");
                        self.cut_agent(&name, &reason);
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(agent = %name, %error, "cannot check whether the agent is still allowed")
                    }
                }
            }
            FeedEntry::Resource(change)
                if change.key.kind == Kind::Workload
                    && matches!(change.event, ChangeEvent::Deleted { .. }) =>
            {
                let key = workload_key(&change.key);
                for agent in self.cut_workload(&key) {
                    tracing::warn!(%agent, workload = %key, "workload deleted by the operator: agent cut off");
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use weft_store::{AgentEnrollment, TokenSpec, WorkloadScope};

    use super::*;
    use crate::feed::tests::store;

    /// An agent of zone z1 enrolled with a fresh token.
    async fn enrolled(store: &Store, name: &str) {
        let (token_id, _) = store
            .issue_token(&TokenSpec {
                mesh: "default".to_owned(),
                zone: "z1".to_owned(),
                workloads: WorkloadScope::Prefix(String::new()),
                expires_at: SystemTime::now() + Duration::from_secs(3600),
                max_uses: 1,
            })
            .await
            .unwrap();
        store
            .enroll_agent(&AgentEnrollment {
                name: name.to_owned(),
                zone: "z1".to_owned(),
                mesh: "default".to_owned(),
                hbone_address: "10.0.0.1:15008".to_owned(),
                host_facts: serde_json::json!({}),
                token_id,
            })
            .await
            .unwrap();
    }

    /// After falling below the feed's floor, the streams are checked as
    /// the pruned entries would have: an agent no longer allowed, and one
    /// whose Workload the operator deleted, are cut; the others go on.
    #[tokio::test]
    async fn a_resync_cuts_what_the_pruned_entries_would_have() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let cutoff = Cutoff::new(store.clone(), "z1".to_owned());
        enrolled(&store, "kept").await;
        enrolled(&store, "withdrawn").await;
        let (_, kept) = cutoff.register("kept");
        let (_, gone) = cutoff.register("gone");
        let (id, withdrawn) = cutoff.register("withdrawn");
        let key = "default/ns/a".to_owned();
        cutoff.set_workloads(id, [key.clone()].into());
        assert!(store
            .withdraw_workload("z1", "withdrawn", &key)
            .await
            .unwrap());
        cutoff.recheck_streams().await;
        assert!(kept.borrow().is_none());
        let reason = gone.borrow().clone().expect("cut").reason;
        assert!(reason.contains("not enrolled"), "{reason}");
        let reason = withdrawn.borrow().clone().expect("cut").reason;
        assert!(reason.contains("default/ns/a was deleted"), "{reason}");
    }
}
