//! Following the store's change feed: where a follower starts, and how it
//! reads on, resynchronising when the entries it had not read yet were
//! pruned (see [`Store::feed_floor`]).

use std::time::Duration;

use tokio::sync::watch;
use weft_store::{FeedEntry, Store, StoreError};

/// The feed's current sequence, where a follower starts reading, retried
/// every second while the store does not answer; `None` once `stop` turns
/// true first.
pub async fn start(store: &Store, stop: &mut watch::Receiver<bool>) -> Option<u64> {
    loop {
        match store.current_seq().await {
            Ok(seq) => return Some(seq),
            Err(error) => {
                tracing::warn!(%error, "cannot read the change sequence; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return None,
                }
            }
        }
    }
}

/// What a follower reads next.
#[derive(Debug)]
pub enum Next {
    /// The entries after its position, oldest first.
    Entries(Vec<FeedEntry>),
    /// Its position fell below the feed's floor: entries it had not read
    /// were pruned. It must redo what it does on start from a full read
    /// (taken after this), then follow on from this sequence.
    Resync(u64),
}

/// The entries after `seq`, or where to resynchronise from when some were
/// pruned before they were read.
pub async fn next(store: &Store, seq: u64) -> Result<Next, StoreError> {
    if let Some(entries) = store.feed_since(seq).await? {
        return Ok(Next::Entries(entries));
    }
    // Taken before the caller's full read, so a write in between is read
    // again from the feed rather than missed.
    let now = store.current_seq().await?;
    tracing::warn!(
        from = seq,
        to = now,
        "fell below the change feed's floor (entries pruned unread): resynchronising"
    );
    Ok(Next::Resync(now))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use weft_api::{parse_yaml, Resource};
    use weft_store::{now_ms, AgentEnrollment, Expect, FeedRetention, Store};

    use super::Next;
    use crate::views::MeshSnapshot;

    /// A store on a SQLite file in `dir`.
    pub(crate) async fn store(dir: &tempfile::TempDir) -> Store {
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        Store::open(&url).await.expect("open the store")
    }

    /// Resource `yaml`, parsed.
    pub(crate) fn resource(yaml: &str) -> Resource {
        parse_yaml(yaml).expect("valid resource").remove(0)
    }

    /// Mesh `name`.
    pub(crate) fn mesh(name: &str) -> Resource {
        resource(&format!(
            "{{apiVersion: weft.io/v1alpha1, kind: Mesh, metadata: {{name: {name}}}, spec: {{trustDomain: {name}.example}}}}"
        ))
    }

    /// Workload `name` of mesh `default` at `address`, in `service`.
    pub(crate) fn workload(name: &str, address: &str, service: &str) -> Resource {
        resource(&format!(
            "apiVersion: weft.io/v1alpha1
kind: Workload
metadata: {{name: {name}, mesh: default, namespace: ns}}
spec:
  address: {address}
  service: {service}
  serviceAccount: sa
  ports: [{{port: 8080, protocol: http}}]
"
        ))
    }

    /// Prunes every feed entry but the newest.
    pub(crate) async fn prune_all_but_newest(store: &Store) {
        let everything = FeedRetention {
            max_age: Duration::ZERO,
            keep_newest: 1,
            batch: 100,
        };
        let pruned = store.prune_feed(everything, now_ms() + 1).await.unwrap();
        assert!(pruned.rows > 0, "nothing pruned");
    }

    /// A follower reads on from its position while the feed has every
    /// entry after it, and is told where to resynchronise from (the
    /// sequence now) once entries it had not read were pruned.
    #[tokio::test]
    async fn a_follower_below_the_floor_resynchronises() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        store.put(&mesh("default"), Expect::Absent).await.unwrap();
        let behind = store.current_seq().await.unwrap();
        store.put(&mesh("a"), Expect::Absent).await.unwrap();
        store.put(&mesh("b"), Expect::Absent).await.unwrap();
        let now = store.current_seq().await.unwrap();
        let Next::Entries(entries) = super::next(&store, behind).await.unwrap() else {
            panic!("nothing was pruned yet");
        };
        assert_eq!(entries.len(), 2);
        prune_all_but_newest(&store).await;
        match super::next(&store, behind).await.unwrap() {
            Next::Resync(from) => assert_eq!(from, now),
            Next::Entries(entries) => panic!("a silent gap: only {entries:?}"),
        }
        let Next::Entries(entries) = super::next(&store, now).await.unwrap() else {
            panic!("at the sequence now, nothing is missing");
        };
        assert!(entries.is_empty());
    }

    fn addresses(snapshot: &MeshSnapshot) -> Vec<String> {
        snapshot
            .workloads
            .iter()
            .map(|w| format!("{}={}", w.metadata.name, w.spec.address))
            .collect()
    }

    /// A snapshot whose position fell below the feed's floor reads its
    /// Workloads and agents again instead of trusting a feed with holes:
    /// the next one has every change made since, though the feed lost them.
    #[tokio::test]
    async fn a_snapshot_behind_the_floor_converges() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        store.put(&mesh("default"), Expect::Absent).await.unwrap();
        let a = workload("a", "10.0.0.1", "payments");
        store.put(&a, Expect::Absent).await.unwrap();
        let first = MeshSnapshot::load(&store, "z1", "default", None)
            .await
            .unwrap()
            .expect("the mesh exists");
        assert_eq!(addresses(&first), ["a=10.0.0.1"]);
        assert!(first.agents.is_empty());
        let moved = workload("a", "10.0.0.9", "payments");
        store.put(&moved, Expect::Any).await.unwrap();
        let b = workload("b", "10.0.0.2", "payments");
        store.put(&b, Expect::Absent).await.unwrap();
        store
            .enroll_agent(&AgentEnrollment {
                name: "vm-1".to_owned(),
                zone: "z1".to_owned(),
                mesh: "default".to_owned(),
                hbone_address: "10.0.0.1:15008".to_owned(),
                host_facts: serde_json::json!({}),
                token_id: "t1".to_owned(),
            })
            .await
            .unwrap();
        // The one entry kept says nothing of the Workloads nor the agent.
        store.put(&mesh("other"), Expect::Absent).await.unwrap();
        prune_all_but_newest(&store).await;
        let next = MeshSnapshot::load(&store, "z1", "default", Some(&first))
            .await
            .unwrap()
            .expect("the mesh exists");
        assert_eq!(addresses(&next), ["a=10.0.0.9", "b=10.0.0.2"]);
        assert!(next.agents.contains_key("vm-1"), "the agent enrolled since");
    }
}
