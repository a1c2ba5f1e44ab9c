//! Every store API against a real SQLite file and a real PostgreSQL server:
//! each scenario is one async function run on both backends.

mod common;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::TestDb;
use weft_api::{parse_yaml, Kind, Resource};
use weft_store::{
    AgentEnrollment, CaMaterial, CaRole, CaSource, ChangeEvent, Expect, FeedEntry, FeedPruned,
    FeedRetention, NewMeshCa, ResourceKey, StoreError, TokenError, TokenSpec, VipRange,
    WorkloadScope,
};

/// Runs a scenario on both backends as two tests.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::TestDb::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::TestDb::postgres().await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    put_get_list_delete,
    lists_see_every_write_through_the_decoded_cache,
    listing_marks_and_changed_keys_follow_every_write,
    invalid_resources_are_refused,
    put_many_is_all_or_nothing,
    concurrent_puts_with_expected_versions,
    changes_since_is_ordered,
    watch_crosses_store_handles,
    token_lifecycle,
    token_single_use_race,
    leader_election,
    ca_material,
    virtual_ips,
    data_survives_reopen,
    ca_created_once,
    agent_inventory,
    agent_batches,
    mesh_ca_first_created_once,
    mesh_ca_rotation,
    mesh_ca_rotation_races,
    upgrade_gives_older_meshes_allow_all,
    feed_prune_deletes_only_the_old_beyond_the_newest,
    readers_below_the_floor_are_told_to_read_again,
    readers_racing_prunes_never_miss_an_entry,
    upgrade_makes_older_feed_entries_prunable,
);

fn workload(name: &str, namespace: &str, address: &str) -> Resource {
    let yaml = format!(
        "apiVersion: weft.io/v1alpha1
kind: Workload
metadata:
  name: {name}
  namespace: {namespace}
spec:
  address: {address}
  service: payments
  serviceAccount: payments-api
  ports:
  - port: 8080
    protocol: http
"
    );
    parse_yaml(&yaml).expect("valid workload").remove(0)
}

fn mesh(name: &str) -> Resource {
    let yaml = format!(
        "apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: {name}
spec:
  trustDomain: {name}.example
"
    );
    parse_yaml(&yaml).expect("valid mesh").remove(0)
}

fn workload_key(name: &str, namespace: &str) -> ResourceKey {
    ResourceKey::namespaced(Kind::Workload, "default", namespace, name)
}

/// Lists take unchanged bodies from a cache: a write on this handle or on
/// another one (a replica), a deletion, and a deletion followed by a new
/// resource under the same name (its version starts again at 1) all show.
async fn lists_see_every_write_through_the_decoded_cache(db: TestDb) {
    let store = db.open().await;
    let replica = db.open().await;
    store.put(&mesh("default"), Expect::Absent).await.unwrap();
    let addresses = |v: Vec<weft_store::StoredResource>| -> Vec<String> {
        v.into_iter()
            .map(|s| match s.resource {
                Resource::Workload(w) => format!("{}={}", w.metadata.name, w.spec.address),
                other => other.name().to_owned(),
            })
            .collect()
    };
    store
        .put(&workload("a", "ns", "10.0.0.1"), Expect::Any)
        .await
        .unwrap();
    store
        .put(&workload("b", "ns", "10.0.0.2"), Expect::Any)
        .await
        .unwrap();
    let listed = addresses(store.list(Kind::Workload, None, None).await.unwrap());
    assert_eq!(listed, ["a=10.0.0.1", "b=10.0.0.2"]);
    // Written by the replica: this handle's cache must not hide it.
    replica
        .put(&workload("a", "ns", "10.0.0.9"), Expect::Any)
        .await
        .unwrap();
    let listed = addresses(store.list(Kind::Workload, None, None).await.unwrap());
    assert_eq!(listed, ["a=10.0.0.9", "b=10.0.0.2"]);
    // Deleted, then made again with version 1 and another body.
    let key = workload_key("b", "ns");
    assert!(replica.delete(&key, Expect::Any).await.unwrap());
    let listed = addresses(store.list(Kind::Workload, None, None).await.unwrap());
    assert_eq!(listed, ["a=10.0.0.9"]);
    replica
        .put(&workload("b", "ns", "10.0.0.7"), Expect::Absent)
        .await
        .unwrap();
    let listed = addresses(
        store
            .list(Kind::Workload, Some("default"), None)
            .await
            .unwrap(),
    );
    assert_eq!(listed, ["a=10.0.0.9", "b=10.0.0.7"]);
}

async fn listing_marks_and_changed_keys_follow_every_write(db: TestDb) {
    let store = db.open().await;
    let replica = db.open().await;
    store.put(&mesh("default"), Expect::Absent).await.unwrap();
    let marks = || async { store.listing_marks(Some("default")).await.unwrap() };
    let empty = marks().await;
    assert_eq!(empty.of(Kind::Workload), Default::default());
    let start = store.current_seq().await.unwrap();
    for (name, address) in [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")] {
        store
            .put(&workload(name, "ns", address), Expect::Any)
            .await
            .unwrap();
    }
    let three = marks().await;
    assert_ne!(three.of(Kind::Workload), empty.of(Kind::Workload));
    // Nothing written: the same mark, for this kind and the others.
    assert_eq!(marks().await, three);
    assert_eq!(
        store.listing_marks(None).await.unwrap().of(Kind::Workload),
        three.of(Kind::Workload)
    );
    // A replace (by another replica), a delete, and a delete followed by a
    // put that brings the count back: each gives another mark.
    replica
        .put(&workload("a", "ns", "10.0.0.9"), Expect::Any)
        .await
        .unwrap();
    let replaced = marks().await;
    assert_ne!(replaced.of(Kind::Workload), three.of(Kind::Workload));
    assert!(replica
        .delete(&workload_key("c", "ns"), Expect::Any)
        .await
        .unwrap());
    let deleted = marks().await;
    assert_ne!(deleted.of(Kind::Workload), replaced.of(Kind::Workload));
    assert!(store
        .delete(&workload_key("b", "ns"), Expect::Any)
        .await
        .unwrap());
    store
        .put(&workload("d", "ns", "10.0.0.4"), Expect::Any)
        .await
        .unwrap();
    let swapped = marks().await;
    assert_ne!(swapped.of(Kind::Workload), deleted.of(Kind::Workload));
    // Other kinds kept theirs.
    assert_eq!(swapped.of(Kind::Service), empty.of(Kind::Service));

    // Every key written since `start`, once each, oldest change first.
    let names =
        |keys: Vec<ResourceKey>| -> Vec<String> { keys.into_iter().map(|k| k.name).collect() };
    let changed = store
        .changed_keys_since(start, Kind::Workload, Some("default"), 10)
        .await
        .unwrap()
        .expect("under the limit");
    assert_eq!(names(changed), ["a", "b", "c", "d"]);
    let all_meshes = store
        .changed_keys_since(start, Kind::Workload, None, 10)
        .await
        .unwrap()
        .expect("under the limit");
    assert_eq!(names(all_meshes), ["a", "b", "c", "d"]);
    assert_eq!(
        store
            .changed_keys_since(start, Kind::Workload, Some("default"), 3)
            .await
            .unwrap(),
        None,
        "more changes than the limit"
    );
    assert!(store
        .changed_keys_since(start, Kind::Workload, Some("other"), 10)
        .await
        .unwrap()
        .expect("none")
        .is_empty());
    let now = store.current_seq().await.unwrap();
    assert!(store
        .changed_keys_since(now, Kind::Workload, None, 10)
        .await
        .unwrap()
        .expect("none")
        .is_empty());
}

async fn put_get_list_delete(db: TestDb) {
    let store = db.open().await;
    assert_eq!(
        store.put(&mesh("default"), Expect::Absent).await.unwrap(),
        1
    );
    let w = workload("web-1", "shop", "10.0.0.1");
    assert_eq!(store.put(&w, Expect::Absent).await.unwrap(), 1);
    assert_eq!(
        store
            .put(&workload("web-2", "shop", "10.0.0.2"), Expect::Any)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .put(&workload("db-1", "data", "10.0.0.3"), Expect::Any)
            .await
            .unwrap(),
        1
    );

    let got = store
        .get(&workload_key("web-1", "shop"))
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(got.version, 1);
    // The stored resource has its defaults applied (metadata.mesh).
    let mut expected = w.clone();
    expected.apply_defaults();
    assert_eq!(got.resource, expected);
    assert!(store
        .get(&workload_key("nope", "shop"))
        .await
        .unwrap()
        .is_none());

    // Replace bumps the version; Absent refuses an existing resource.
    assert_eq!(store.put(&w, Expect::Version(1)).await.unwrap(), 2);
    match store.put(&w, Expect::Absent).await {
        Err(StoreError::Conflict { found: Some(2), .. }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }

    let names = |v: Vec<weft_store::StoredResource>| -> Vec<String> {
        v.into_iter()
            .map(|s| s.resource.name().to_owned())
            .collect()
    };
    assert_eq!(
        names(store.list(Kind::Workload, None, None).await.unwrap()),
        ["db-1", "web-1", "web-2"]
    );
    assert_eq!(
        names(
            store
                .list(Kind::Workload, Some("default"), Some("shop"))
                .await
                .unwrap()
        ),
        ["web-1", "web-2"]
    );
    assert!(store
        .list(Kind::Workload, Some("other"), None)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        names(store.list(Kind::Mesh, None, None).await.unwrap()),
        ["default"]
    );

    // Delete with a stale version is refused and deletes nothing.
    let key = workload_key("web-1", "shop");
    assert!(matches!(
        store.delete(&key, Expect::Version(1)).await,
        Err(StoreError::Conflict { found: Some(2), .. })
    ));
    assert!(store.get(&key).await.unwrap().is_some());
    assert!(store.delete(&key, Expect::Version(2)).await.unwrap());
    assert!(!store.delete(&key, Expect::Any).await.unwrap());
    assert!(store.get(&key).await.unwrap().is_none());
    // Re-created after delete: a new resource.
    assert_eq!(store.put(&w, Expect::Absent).await.unwrap(), 1);
}

async fn invalid_resources_are_refused(db: TestDb) {
    let store = db.open().await;
    let mut bad = workload("web-1", "shop", "10.0.0.1");
    if let Resource::Workload(w) = &mut bad {
        w.metadata.name = "Not_A_Label".to_owned();
    }
    match store.put(&bad, Expect::Any).await {
        Err(StoreError::Invalid { errors, .. }) => {
            assert!(errors.to_string().contains("metadata.name"), "{errors}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(store.current_seq().await.unwrap(), 0, "nothing written");
    assert!(store
        .changes_since(0)
        .await
        .unwrap()
        .expect("above the floor")
        .is_empty());
}

async fn put_many_is_all_or_nothing(db: TestDb) {
    let store = db.open().await;
    store.put(&mesh("default"), Expect::Any).await.unwrap();
    store
        .put(&workload("web-1", "shop", "10.0.0.1"), Expect::Any)
        .await
        .unwrap();
    let seq = store.current_seq().await.unwrap();
    // The second write's precondition fails: the first must not land either.
    let batch = [
        (workload("web-2", "shop", "10.0.0.2"), Expect::Absent),
        (workload("web-1", "shop", "10.0.0.9"), Expect::Absent),
    ];
    match store.put_many(&batch).await {
        Err(StoreError::Conflict { key, .. }) => assert_eq!(key, workload_key("web-1", "shop")),
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert!(store
        .get(&workload_key("web-2", "shop"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store.current_seq().await.unwrap(),
        seq,
        "no change recorded"
    );
    // An invalid member refuses the whole batch before anything is written.
    let mut bad = workload("web-3", "shop", "10.0.0.3");
    if let Resource::Workload(w) = &mut bad {
        w.metadata.name = "Not_A_Label".to_owned();
    }
    let batch = [
        (workload("web-2", "shop", "10.0.0.2"), Expect::Absent),
        (bad, Expect::Absent),
    ];
    assert!(matches!(
        store.put_many(&batch).await,
        Err(StoreError::Invalid { .. })
    ));
    assert!(store
        .get(&workload_key("web-2", "shop"))
        .await
        .unwrap()
        .is_none());
    // A good batch lands whole, with consecutive changes.
    let batch = [
        (workload("web-2", "shop", "10.0.0.2"), Expect::Absent),
        (workload("web-1", "shop", "10.0.0.9"), Expect::Version(1)),
    ];
    assert_eq!(store.put_many(&batch).await.unwrap(), [1, 2]);
    assert_eq!(
        store
            .changes_since(seq)
            .await
            .unwrap()
            .expect("above the floor")
            .len(),
        2
    );
}

async fn concurrent_puts_with_expected_versions(db: TestDb) {
    let store = db.open().await;
    let replica = db.open().await;
    let w = workload("web-1", "shop", "10.0.0.1");
    assert_eq!(store.put(&w, Expect::Absent).await.unwrap(), 1);
    for round in 1..=5u64 {
        // Ten writers (on two handles) all read version `round`; one wins.
        let mut tasks = Vec::new();
        for i in 0..10 {
            let s = if i % 2 == 0 {
                store.clone()
            } else {
                replica.clone()
            };
            let w = workload("web-1", "shop", &format!("10.0.{round}.{}", i + 1));
            tasks.push(tokio::spawn(async move {
                s.put(&w, Expect::Version(round)).await
            }));
        }
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(version) => {
                    assert_eq!(version, round + 1);
                    wins += 1;
                }
                Err(StoreError::Conflict {
                    expected, found, ..
                }) => {
                    assert_eq!(expected, Expect::Version(round));
                    assert_eq!(found, Some(round + 1));
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(wins, 1, "round {round}");
    }
    let got = store
        .get(&workload_key("web-1", "shop"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.version, 6);
    assert_eq!(
        store
            .changes_since(0)
            .await
            .unwrap()
            .expect("above the floor")
            .len(),
        6
    );
}

async fn changes_since_is_ordered(db: TestDb) {
    let store = db.open().await;
    let replica = db.open().await;
    assert_eq!(store.current_seq().await.unwrap(), 0);
    store
        .put(&workload("a", "ns", "10.0.0.1"), Expect::Any)
        .await
        .unwrap();
    store
        .put(&workload("b", "ns", "10.0.0.2"), Expect::Any)
        .await
        .unwrap();
    replica
        .put(&workload("a", "ns", "10.0.0.3"), Expect::Any)
        .await
        .unwrap();
    replica
        .delete(&workload_key("b", "ns"), Expect::Any)
        .await
        .unwrap();
    // A delete of nothing is not a change.
    replica
        .delete(&workload_key("zz", "ns"), Expect::Any)
        .await
        .unwrap();

    let all = store
        .changes_since(0)
        .await
        .unwrap()
        .expect("above the floor");
    let seen: Vec<(u64, &str, ChangeEvent)> = all
        .iter()
        .map(|c| (c.seq, c.key.name.as_str(), c.event))
        .collect();
    assert_eq!(
        seen,
        [
            (1, "a", ChangeEvent::Put { version: 1 }),
            (2, "b", ChangeEvent::Put { version: 1 }),
            (3, "a", ChangeEvent::Put { version: 2 }),
            (4, "b", ChangeEvent::Deleted { version: 1 }),
        ]
    );
    assert_eq!(store.current_seq().await.unwrap(), 4);
    let tail = store
        .changes_since(2)
        .await
        .unwrap()
        .expect("above the floor");
    assert_eq!(tail.iter().map(|c| c.seq).collect::<Vec<_>>(), [3, 4]);
    assert!(store
        .changes_since(4)
        .await
        .unwrap()
        .expect("above the floor")
        .is_empty());

    // Many concurrent writers: the feed has no gaps and no duplicates.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let s = if i % 2 == 0 {
            store.clone()
        } else {
            replica.clone()
        };
        tasks.push(tokio::spawn(async move {
            s.put(&workload(&format!("w{i}"), "ns", "10.0.1.1"), Expect::Any)
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let seqs: Vec<u64> = store
        .changes_since(4)
        .await
        .unwrap()
        .expect("above the floor")
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(seqs, (5..=24).collect::<Vec<_>>());
}

async fn watch_crosses_store_handles(db: TestDb) {
    let store = db.open().await;
    let replica = db.open().await;
    let mut watch = store.watch();
    let mut replica_watch = replica.watch();
    let seq = store.current_seq().await.unwrap();

    // A local write wakes the local watcher.
    store
        .put(&workload("a", "ns", "10.0.0.1"), Expect::Any)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .expect("local notification")
        .unwrap();

    if db.is_postgres() {
        // On PostgreSQL the other replica hears it too, through NOTIFY.
        tokio::time::timeout(Duration::from_secs(5), replica_watch.changed())
            .await
            .expect("notification across replicas")
            .unwrap();
        let seen = replica
            .changes_since(seq)
            .await
            .unwrap()
            .expect("above the floor");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].key, workload_key("a", "ns"));

        // And a write on the replica reaches the first store.
        let seq = store.current_seq().await.unwrap();
        replica
            .delete(&workload_key("a", "ns"), Expect::Any)
            .await
            .unwrap();
        loop {
            tokio::time::timeout(Duration::from_secs(5), watch.changed())
                .await
                .expect("notification from the replica")
                .unwrap();
            let seen = store
                .changes_since(seq)
                .await
                .unwrap()
                .expect("above the floor");
            if !seen.is_empty() {
                assert_eq!(seen[0].event, ChangeEvent::Deleted { version: 1 });
                break;
            }
        }
    }
}

fn spec(zone: &str, max_uses: u32, expires_in: i64) -> TokenSpec {
    let now = SystemTime::now();
    TokenSpec {
        mesh: "default".to_owned(),
        zone: zone.to_owned(),
        workloads: WorkloadScope::Prefix("web-".to_owned()),
        expires_at: if expires_in >= 0 {
            now + Duration::from_secs(expires_in.unsigned_abs())
        } else {
            now - Duration::from_secs(expires_in.unsigned_abs())
        },
        max_uses,
    }
}

async fn token_lifecycle(db: TestDb) {
    let store = db.open().await;
    let (id, secret) = store.issue_token(&spec("zone-1", 2, 3600)).await.unwrap();
    assert!(secret.contains(&id));

    // Wrong zone does not use the token up.
    match store.consume_token(&secret, "zone-2").await {
        Err(TokenError::WrongZone {
            token_zone,
            presented,
            ..
        }) => {
            assert_eq!(
                (token_zone.as_str(), presented.as_str()),
                ("zone-1", "zone-2")
            );
        }
        other => panic!("expected WrongZone, got {other:?}"),
    }
    let grant = store.consume_token(&secret, "zone-1").await.unwrap();
    assert_eq!(grant.id, id);
    assert_eq!(grant.mesh, "default");
    assert_eq!(grant.uses_left, 1);
    assert!(grant.workloads.allows("web-7"));
    assert_eq!(
        store
            .consume_token(&secret, "zone-1")
            .await
            .unwrap()
            .uses_left,
        0
    );
    assert!(matches!(
        store.consume_token(&secret, "zone-1").await,
        Err(TokenError::Exhausted { max_uses: 2, .. })
    ));

    // Unknown: malformed, never issued, or a wrong secret for a real id.
    assert!(matches!(
        store.consume_token("garbage", "zone-1").await,
        Err(TokenError::Unknown)
    ));
    let forged = format!("weft-bt1.{id}.{}", "0".repeat(64));
    assert!(matches!(
        store.consume_token(&forged, "zone-1").await,
        Err(TokenError::Unknown)
    ));

    let (expired_id, expired) = store.issue_token(&spec("zone-1", 5, -10)).await.unwrap();
    match store.consume_token(&expired, "zone-1").await {
        Err(TokenError::Expired { id }) => assert_eq!(id, expired_id),
        other => panic!("expected Expired, got {other:?}"),
    }

    let (revoked_id, revoked) = store.issue_token(&spec("zone-1", 5, 3600)).await.unwrap();
    assert!(store.revoke_token(&revoked_id).await.unwrap());
    assert!(!store.revoke_token("no-such-token").await.unwrap());
    assert!(matches!(
        store.consume_token(&revoked, "zone-1").await,
        Err(TokenError::Revoked { .. })
    ));

    let tokens = store.list_tokens().await.unwrap();
    assert_eq!(tokens.len(), 3);
    let first = tokens.iter().find(|t| t.id == id).unwrap();
    assert_eq!(
        (first.uses, first.spec.max_uses, first.revoked),
        (2, 2, false)
    );
    assert_eq!(
        first.spec.workloads,
        WorkloadScope::Prefix("web-".to_owned())
    );
    assert!(tokens.iter().any(|t| t.id == revoked_id && t.revoked));
}

async fn token_single_use_race(db: TestDb) {
    let store = db.open().await;
    let replica = db.open().await;
    let (_, secret) = store.issue_token(&spec("zone-1", 1, 3600)).await.unwrap();
    let secret = Arc::new(secret);
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = if i % 2 == 0 {
            store.clone()
        } else {
            replica.clone()
        };
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            s.consume_token(&secret, "zone-1").await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(TokenError::Exhausted { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(store.list_tokens().await.unwrap()[0].uses, 1);
}

async fn leader_election(db: TestDb) {
    let store = db.open().await;
    let mut guard = store
        .try_lead("ca-signing")
        .await
        .unwrap()
        .expect("first leader");
    guard.check().await.unwrap();
    assert_eq!(guard.name(), "ca-signing");
    // Another leadership name is independent.
    let other = store.try_lead("vip-allocation").await.unwrap();
    assert!(other.is_some());

    if db.is_postgres() {
        let replica = db.open().await;
        assert!(replica.try_lead("ca-signing").await.unwrap().is_none());
        drop(guard);
        // Dropping releases in the background: the replica takes over soon.
        let mut taken = None;
        for _ in 0..100 {
            if let Some(g) = replica.try_lead("ca-signing").await.unwrap() {
                taken = Some(g);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let taken = taken.expect("the replica took over after the guard dropped");
        assert!(store.try_lead("ca-signing").await.unwrap().is_none());
        // release() is immediate.
        taken.release().await;
        assert!(store.try_lead("ca-signing").await.unwrap().is_some());
    } else {
        // One process: the same name is not granted twice at once.
        assert!(store.try_lead("ca-signing").await.unwrap().is_none());
        drop(guard);
        assert!(store.try_lead("ca-signing").await.unwrap().is_some());
    }
}

async fn ca_material(db: TestDb) {
    let store = db.open().await;
    assert!(store.get_ca("default").await.unwrap().is_none());
    let ca = CaMaterial {
        cert_pem: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".to_owned(),
        key_pem: "-----BEGIN PRIVATE KEY-----\nBB==\n-----END PRIVATE KEY-----\n".to_owned(),
    };
    store.put_ca("default", &ca).await.unwrap();
    assert_eq!(store.get_ca("default").await.unwrap(), Some(ca.clone()));
    assert!(!format!("{ca:?}").contains("BB=="), "Debug hides the key");
    let rotated = CaMaterial {
        cert_pem: "new cert".to_owned(),
        ..ca
    };
    db.open().await.put_ca("default", &rotated).await.unwrap();
    assert_eq!(store.get_ca("default").await.unwrap(), Some(rotated));
}

async fn virtual_ips(db: TestDb) {
    let store = db.open().await;
    let replica = db.open().await;
    let range: VipRange = "240.0.0.0/28".parse().unwrap();
    assert_eq!(range.capacity(), 14);
    let svc = |n: usize| ResourceKey::namespaced(Kind::Service, "default", "ns", &format!("s{n}"));

    // Concurrent allocations from two replicas: all distinct, all in range.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = if i % 2 == 0 {
            store.clone()
        } else {
            replica.clone()
        };
        let key = svc(i);
        tasks.push(tokio::spawn(
            async move { s.allocate_vip(&key, &range).await },
        ));
    }
    let mut ips = HashSet::new();
    for t in tasks {
        let ip = t.await.unwrap().unwrap();
        let IpAddr::V4(v4) = ip else {
            panic!("IPv6 from an IPv4 range")
        };
        assert_eq!(v4.octets()[..3], [240, 0, 0]);
        assert!((1..=14).contains(&v4.octets()[3]), "{ip}");
        assert!(ips.insert(ip), "{ip} allocated twice");
    }
    // Stable: asking again gives the same address.
    let s3 = store.allocate_vip(&svc(3), &range).await.unwrap();
    assert_eq!(replica.allocate_vip(&svc(3), &range).await.unwrap(), s3);
    // Exhaustion is a clear error.
    for i in 10..14 {
        store.allocate_vip(&svc(i), &range).await.unwrap();
    }
    assert!(matches!(
        store.allocate_vip(&svc(14), &range).await,
        Err(StoreError::VipsExhausted { .. })
    ));
    // Released on release_vip, and by deleting the Service: then reusable.
    assert!(store.release_vip(&svc(3)).await.unwrap());
    assert_eq!(store.allocate_vip(&svc(14), &range).await.unwrap(), s3);
    assert!(store
        .allocate_vip(&workload_key("w", "ns"), &range)
        .await
        .is_err());
    // An ExternalService named like a Service gets an address of its own,
    // given back when it is deleted.
    store.release_vip(&svc(0)).await.unwrap();
    let external = ResourceKey::namespaced(Kind::ExternalService, "default", "ns", "s1");
    let address = store.allocate_vip(&external, &range).await.unwrap();
    assert_ne!(address, store.allocate_vip(&svc(1), &range).await.unwrap());
    assert!(store.release_vip(&external).await.unwrap());
    assert!(!store.release_vip(&external).await.unwrap());
}

async fn data_survives_reopen(db: TestDb) {
    let store = db.open().await;
    store
        .put(&workload("a", "ns", "10.0.0.1"), Expect::Any)
        .await
        .unwrap();
    store
        .put(&workload("a", "ns", "10.0.0.2"), Expect::Any)
        .await
        .unwrap();
    let (id, secret) = store.issue_token(&spec("zone-1", 3, 3600)).await.unwrap();
    let range: VipRange = "240.0.0.0/24".parse().unwrap();
    let svc = ResourceKey::namespaced(Kind::Service, "default", "ns", "payments");
    let ip = store.allocate_vip(&svc, &range).await.unwrap();
    store.close().await;
    drop(store);

    let store = db.open().await;
    let got = store.get(&workload_key("a", "ns")).await.unwrap().unwrap();
    assert_eq!(got.version, 2);
    assert_eq!(store.current_seq().await.unwrap(), 2);
    assert_eq!(
        store
            .changes_since(0)
            .await
            .unwrap()
            .expect("above the floor")
            .len(),
        2
    );
    assert_eq!(store.consume_token(&secret, "zone-1").await.unwrap().id, id);
    assert_eq!(store.allocate_vip(&svc, &range).await.unwrap(), ip);
    // Migrations are not applied twice, and the next write continues the feed.
    assert_eq!(
        store
            .put(&workload("b", "ns", "10.0.0.3"), Expect::Any)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.current_seq().await.unwrap(), 3);
}

#[tokio::test]
async fn open_errors_name_the_url_without_password() {
    let err = weft_store::Store::open("sqlite:///no/such/dir/store.db")
        .await
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("/no/such/dir") && msg.contains("does not exist"),
        "{msg}"
    );

    let err = weft_store::Store::open("mysql://x/y").await.err().unwrap();
    assert!(err.to_string().contains("unsupported scheme"), "{err}");

    // Nothing listens on port 1: a refused connection, password hidden.
    let err = weft_store::Store::open("postgres://weft:hunter2@127.0.0.1:1/weft")
        .await
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("postgres://weft:***@127.0.0.1:1/weft"),
        "{msg}"
    );
    assert!(!msg.contains("hunter2"), "{msg}");
}

#[tokio::test]
async fn deleting_a_service_releases_its_vip() {
    let db = TestDb::sqlite().await;
    let store = db.open().await;
    let yaml = "apiVersion: weft.io/v1alpha1
kind: Service
metadata:
  name: payments
  namespace: ns
spec:
  ports:
  - port: 8080
    protocol: http
";
    let service = parse_yaml(yaml).expect("valid service").remove(0);
    store.put(&service, Expect::Any).await.unwrap();
    let key = ResourceKey::of(&{
        let mut s = service.clone();
        s.apply_defaults();
        s
    });
    let range: VipRange = "240.0.0.0/30".parse().unwrap();
    let ip = store.allocate_vip(&key, &range).await.unwrap();
    assert!(store.delete(&key, Expect::Any).await.unwrap());
    assert!(
        !store.release_vip(&key).await.unwrap(),
        "already released by delete"
    );
    let other = ResourceKey::namespaced(Kind::Service, "default", "ns", "other");
    assert_eq!(store.allocate_vip(&other, &range).await.unwrap(), ip);
}

async fn ca_created_once(db: TestDb) {
    // Two replicas creating the same CA at once end up with the same one.
    let (a, b) = (db.open().await, db.open().await);
    let material = |n: &str| CaMaterial {
        cert_pem: format!("cert {n}"),
        key_pem: format!("key {n}"),
    };
    let (ma, mb) = (material("a"), material("b"));
    let (first, second) = tokio::join!(
        a.put_ca_if_absent("zone/z1", &ma),
        b.put_ca_if_absent("zone/z1", &mb)
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first, second);
    let again = a.put_ca_if_absent("zone/z1", &material("c")).await.unwrap();
    assert_eq!(again, first);
}

async fn agent_inventory(db: TestDb) {
    let store = db.open().await;
    let other = db.open().await;
    let start = store.current_seq().await.unwrap();
    let enrollment = AgentEnrollment {
        name: "vm-1".to_owned(),
        zone: "z1".to_owned(),
        mesh: "default".to_owned(),
        hbone_address: "10.0.0.1:15008".to_owned(),
        host_facts: serde_json::json!({"hostname": "vm-1"}),
        token_id: "t1".to_owned(),
    };
    assert!(!store
        .agents_changed_since(start, "z1", "default")
        .await
        .unwrap());
    store.enroll_agent(&enrollment).await.unwrap();
    assert!(store
        .agents_changed_since(start, "z1", "default")
        .await
        .unwrap());
    assert!(!store
        .agents_changed_since(start, "z2", "default")
        .await
        .unwrap());
    assert!(!store
        .agents_changed_since(start, "z1", "other")
        .await
        .unwrap());
    let enrolled = store.current_seq().await.unwrap();
    assert!(store
        .connect_agent("z1", "nobody", "r1", "", &serde_json::json!({}))
        .await
        .unwrap()
        .is_none());
    let connected = other
        .connect_agent(
            "z1",
            "vm-1",
            "r1",
            "10.0.0.2:15008",
            &serde_json::json!({"cpus": 2}),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connected.connected_replica.as_deref(), Some("r1"));
    assert_eq!(connected.enrollment.hbone_address, "10.0.0.2:15008");
    // A connection is an inventory change; a heartbeat is not.
    assert!(store
        .agents_changed_since(enrolled, "z1", "default")
        .await
        .unwrap());
    let now = store.current_seq().await.unwrap();
    let lost = store
        .heartbeat_agents("z1", "r1", &["vm-1".to_owned()])
        .await
        .unwrap();
    assert!(lost.is_empty(), "{lost:?}");
    assert!(!store
        .agents_changed_since(now, "z1", "default")
        .await
        .unwrap());
    let presence = store.list_presence("z1", "default").await.unwrap();
    assert_eq!(presence.len(), 1);
    assert_eq!(presence[0].name, "vm-1");
    assert_eq!(presence[0].hbone_address, "10.0.0.2:15008");
    assert!(presence[0].connected && !presence[0].left);
    // Only the replica that holds the stream marks the agent seen.
    let lost = store
        .heartbeat_agents("z1", "r2", &["vm-1".to_owned()])
        .await
        .unwrap();
    assert_eq!(lost, vec!["vm-1".to_owned()]);
    store
        .record_acks(
            "z1",
            &[(
                "vm-1".to_owned(),
                "v1".to_owned(),
                vec!["sha256:aa".to_owned()],
            )],
        )
        .await
        .unwrap();
    store.record_nack("z1", "vm-1", "v2", "bad").await.unwrap();
    let record = store.get_agent("z1", "vm-1").await.unwrap().unwrap();
    assert_eq!(record.applied_version, "v1");
    assert_eq!(record.applied_cas, vec!["sha256:aa".to_owned()]);
    let nack = record.last_nack.unwrap();
    assert_eq!((nack.version.as_str(), nack.reason.as_str()), ("v2", "bad"));
    // Another replica's stale disconnect does not clobber the stream.
    assert!(!store.disconnect_agent("z1", "vm-1", "r2").await.unwrap());
    assert!(store.disconnect_agent("z1", "vm-1", "r1").await.unwrap());
    assert_eq!(
        store
            .list_agents("z1", Some("default"))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store
        .list_agents("z1", Some("other"))
        .await
        .unwrap()
        .is_empty());
    assert!(store.list_agents("z2", None).await.unwrap().is_empty());

    // Enrol, connect and disconnect are in the feed; heartbeats and acks
    // are not; resource readers never see them.
    let feed = store
        .feed_since(start)
        .await
        .unwrap()
        .expect("above the floor");
    assert_eq!(feed.len(), 3, "{feed:?}");
    assert!(feed
        .iter()
        .all(|e| matches!(e, FeedEntry::Agent { zone, mesh, name, .. }
        if zone == "z1" && mesh == "default" && name == "vm-1")));
    assert!(store
        .changes_since(start)
        .await
        .unwrap()
        .expect("above the floor")
        .is_empty());
}

/// What lets 10,000 agents cost a few writes: heartbeats and acks in
/// batches, and an agent's workloads found by label inside the database.
async fn agent_batches(db: TestDb) {
    let store = db.open().await;
    store.put(&mesh("default"), Expect::Any).await.unwrap();
    for (name, agent) in [("w1", "vm-1"), ("w2", "vm-2"), ("w3", "vm-1")] {
        let yaml = format!(
            "apiVersion: weft.io/v1alpha1
kind: Workload
metadata:
  name: {name}
  namespace: default
  labels:
    weft.io/agent: {agent}
spec:
  address: 10.0.0.9
  service: payments
  ports:
  - port: 8080
"
        );
        let resource = parse_yaml(&yaml).expect("valid workload").remove(0);
        store.put(&resource, Expect::Any).await.unwrap();
    }
    let mut keys = store
        .labelled_workloads("weft.io/agent", "vm-1")
        .await
        .unwrap();
    keys.sort_by_key(|k| k.to_string());
    assert_eq!(
        keys,
        [workload_key("w1", "default"), workload_key("w3", "default")]
    );
    assert!(store
        .labelled_workloads("weft.io/agent", "nobody")
        .await
        .unwrap()
        .is_empty());

    for name in ["vm-1", "vm-2", "vm-3"] {
        store
            .enroll_agent(&AgentEnrollment {
                name: name.to_owned(),
                zone: "z1".to_owned(),
                mesh: "default".to_owned(),
                hbone_address: String::new(),
                host_facts: serde_json::json!({}),
                token_id: "t1".to_owned(),
            })
            .await
            .unwrap();
    }
    for (name, replica) in [("vm-1", "r1"), ("vm-2", "r1"), ("vm-3", "r2")] {
        store
            .connect_agent("z1", name, replica, "", &serde_json::json!({}))
            .await
            .unwrap();
    }
    let names: Vec<String> = ["vm-1", "vm-2", "vm-3", "ghost"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // vm-3's stream is on r2: r1's heartbeat leaves it alone, and says
    // so, as it does of an agent it never knew.
    let mut lost = store.heartbeat_agents("z1", "r1", &names).await.unwrap();
    lost.sort();
    assert_eq!(lost, ["ghost", "vm-3"]);
    // Acks go a few hundred per statement: vm-2's is in the third.
    let mut acks: Vec<(String, String, Vec<String>)> =
        vec![("vm-1".into(), "v1".into(), vec!["sha256:aa".into()])];
    acks.extend((0..700).map(|i| (format!("ghost-{i}"), "v0".into(), vec![])));
    acks.push(("vm-2".into(), "v2".into(), vec![]));
    store.record_acks("z1", &acks).await.unwrap();
    let vm1 = store.get_agent("z1", "vm-1").await.unwrap().unwrap();
    assert_eq!(vm1.applied_version, "v1");
    assert_eq!(vm1.applied_cas, ["sha256:aa"]);
    let vm2 = store.get_agent("z1", "vm-2").await.unwrap().unwrap();
    assert_eq!(vm2.applied_version, "v2");
}

fn new_ca(n: &str, not_after: i64) -> NewMeshCa {
    NewMeshCa {
        fingerprint: format!("sha256:{n}"),
        source: CaSource::Builtin,
        cert_pem: format!("cert {n}"),
        key_pem: format!("key {n}"),
        not_before: 0,
        not_after,
    }
}

fn roles(cas: &[weft_store::MeshCaRecord]) -> Vec<(String, CaRole)> {
    cas.iter()
        .map(|c| (c.ca.fingerprint.clone(), c.role))
        .collect()
}

async fn mesh_ca_first_created_once(db: TestDb) {
    // Two replicas creating a mesh's first CA at once end up with the same.
    let (a, b) = (db.open().await, db.open().await);
    let (ca_a, ca_b) = (new_ca("a", 1_000), new_ca("b", 1_000));
    let (first, second) = tokio::join!(
        a.init_mesh_ca("default", &ca_a, 10),
        b.init_mesh_ca("default", &ca_b, 10)
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first, second);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].role, CaRole::Signing);
    assert_eq!(first[0].signing_since, Some(10));
    let again = a
        .init_mesh_ca("default", &new_ca("c", 1_000), 11)
        .await
        .unwrap();
    assert_eq!(again, first);
    assert!(a.mesh_cas("other").await.unwrap().is_empty());
}

async fn mesh_ca_rotation(db: TestDb) {
    let store = db.open().await;
    let replica = db.open().await;
    // SQLite hints stay in the process's handle; PostgreSQL's cross replicas.
    let mut watch = if store.is_shared() {
        replica.watch()
    } else {
        store.watch()
    };
    let start = store.current_seq().await.unwrap();
    store
        .init_mesh_ca("default", &new_ca("old", 10_000), 100)
        .await
        .unwrap();

    // Phase 1: the new CA is pending, in the set but not signing.
    let cas = store
        .add_pending_ca("default", &new_ca("new", 20_000), 200)
        .await
        .unwrap();
    assert_eq!(
        roles(&cas),
        vec![
            ("sha256:old".into(), CaRole::Signing),
            ("sha256:new".into(), CaRole::Pending)
        ]
    );
    assert_eq!(cas[1].generation, 2);
    assert_eq!(cas[1].added_at, 200);
    // Other replicas hear of it through the feed.
    tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("a change hint on the other replica")
        .unwrap();
    let feed = replica
        .feed_since(start)
        .await
        .unwrap()
        .expect("above the floor");
    assert_eq!(feed.len(), 2, "{feed:?}");
    assert!(feed
        .iter()
        .all(|e| matches!(e, FeedEntry::MeshCa { mesh, .. } if mesh == "default")));
    assert!(replica
        .changes_since(start)
        .await
        .unwrap()
        .expect("above the floor")
        .is_empty());

    // Refusals change nothing.
    for refused in [
        store
            .add_pending_ca("default", &new_ca("third", 30_000), 201)
            .await,
        store
            .add_pending_ca("empty", &new_ca("x", 30_000), 201)
            .await,
        store
            .promote_pending_ca("default", "sha256:old", 201, 30)
            .await,
    ] {
        assert!(
            matches!(refused, Err(StoreError::CaTransition { .. })),
            "{refused:?}"
        );
    }
    assert_eq!(store.mesh_cas("default").await.unwrap(), cas);

    // Phase 2: the new CA signs; the old one is trusted for one workload
    // certificate lifetime more.
    let cas = store
        .promote_pending_ca("default", "sha256:new", 300, 50)
        .await
        .unwrap();
    assert_eq!(
        roles(&cas),
        vec![
            ("sha256:old".into(), CaRole::Retired),
            ("sha256:new".into(), CaRole::Signing)
        ]
    );
    assert_eq!(cas[0].trusted_until, Some(350));
    assert_eq!(cas[1].signing_since, Some(300));
    assert!(store
        .drop_expired_cas("default", 349)
        .await
        .unwrap()
        .is_empty());
    let dropped = store.drop_expired_cas("default", 350).await.unwrap();
    assert_eq!(
        roles(&dropped),
        vec![("sha256:old".into(), CaRole::Retired)]
    );
    assert_eq!(
        roles(&store.mesh_cas("default").await.unwrap()),
        vec![("sha256:new".into(), CaRole::Signing)]
    );

    // trusted_until never outlives the CA itself; a pending CA can be
    // cancelled.
    store
        .add_pending_ca("default", &new_ca("next", 90_000), 400)
        .await
        .unwrap();
    let cas = store
        .promote_pending_ca("default", "sha256:next", 19_990, 3_600)
        .await
        .unwrap();
    assert_eq!(cas[0].trusted_until, Some(20_000));
    store
        .add_pending_ca("default", &new_ca("later", 99_000), 500)
        .await
        .unwrap();
    assert!(!store
        .cancel_pending_ca("default", "sha256:nope")
        .await
        .unwrap());
    assert!(store
        .cancel_pending_ca("default", "sha256:later")
        .await
        .unwrap());
    assert!(store
        .mesh_cas("default")
        .await
        .unwrap()
        .iter()
        .all(|c| c.role != CaRole::Pending));

    // Survives a reopen.
    drop(store);
    let reopened = db.open().await;
    assert_eq!(reopened.mesh_cas("default").await.unwrap().len(), 2);
}

async fn mesh_ca_rotation_races(db: TestDb) {
    // Two replicas adding a pending CA at once: exactly one wins; two
    // promoting it at once: exactly one does it.
    let (a, b) = (db.open().await, db.open().await);
    a.init_mesh_ca("default", &new_ca("old", 10_000), 1)
        .await
        .unwrap();
    let (ca_x, ca_y) = (new_ca("x", 10_000), new_ca("y", 10_000));
    let (x, y) = tokio::join!(
        a.add_pending_ca("default", &ca_x, 2),
        b.add_pending_ca("default", &ca_y, 2)
    );
    assert_eq!(
        usize::from(x.is_ok()) + usize::from(y.is_ok()),
        1,
        "{x:?} {y:?}"
    );
    let pending = if x.is_ok() { "sha256:x" } else { "sha256:y" };
    let (x, y) = tokio::join!(
        a.promote_pending_ca("default", pending, 3, 10),
        b.promote_pending_ca("default", pending, 3, 10)
    );
    assert_eq!(
        usize::from(x.is_ok()) + usize::from(y.is_ok()),
        1,
        "{x:?} {y:?}"
    );
    let cas = a.mesh_cas("default").await.unwrap();
    assert_eq!(cas.iter().filter(|c| c.role == CaRole::Signing).count(), 1);
    assert_eq!(cas.iter().filter(|c| c.role == CaRole::Retired).count(), 1);
}

/// Meshes that predate TrafficPermission get, at the upgrade, the
/// `allow-all` that a new mesh gets at apply (agents deny what no
/// TrafficPermission allows); a mesh that has one keeps what it has. The
/// insert is a change in the feed, and later writes get later sequences.
async fn upgrade_gives_older_meshes_allow_all(db: TestDb) {
    let store = db.open().await;
    store.put(&mesh("old"), Expect::Absent).await.unwrap();
    store.put(&mesh("guarded"), Expect::Absent).await.unwrap();
    let own = parse_yaml(
        "apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata: { name: own, mesh: guarded }
spec:
  rules: [ { from: { kind: Mesh }, default: { action: Deny } } ]
",
    )
    .unwrap()
    .remove(0);
    store.put(&own, Expect::Absent).await.unwrap();
    let before = store
        .changes_since(0)
        .await
        .unwrap()
        .expect("above the floor")
        .len();
    drop(store);
    // As if the store predated the migration: forget that it ran.
    let forget = "DELETE FROM _sqlx_migrations WHERE version = 5";
    if db.is_postgres() {
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        sqlx::query(forget).execute(&pool).await.unwrap();
    } else {
        let pool = sqlx::SqlitePool::connect(db.url()).await.unwrap();
        sqlx::query(forget).execute(&pool).await.unwrap();
    }
    let upgraded = db.open().await;
    let policies: Vec<String> = upgraded
        .list(Kind::TrafficPermission, None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| {
            format!(
                "{}/{}",
                s.resource.mesh().unwrap_or_default(),
                s.resource.name()
            )
        })
        .collect();
    assert_eq!(policies, ["guarded/own", "old/allow-all"]);
    let Resource::TrafficPermission(allow) = upgraded
        .list(Kind::TrafficPermission, Some("old"), None)
        .await
        .unwrap()
        .remove(0)
        .resource
    else {
        panic!("not a TrafficPermission");
    };
    assert_eq!(
        allow.spec,
        weft_api::TrafficPermissionSpec::allow_all(),
        "the same allow-all that apply creates"
    );
    let changes = upgraded
        .changes_since(0)
        .await
        .unwrap()
        .expect("above the floor");
    assert_eq!(
        changes.len(),
        before + 1,
        "one change for the one new policy"
    );
    upgraded.put(&mesh("new"), Expect::Absent).await.unwrap();
    let stored = upgraded.list(Kind::Mesh, None, None).await.unwrap();
    let new_seq = stored
        .iter()
        .find(|s| s.resource.name() == "new")
        .unwrap()
        .seq;
    assert!(
        changes.iter().all(|c| c.seq < new_seq),
        "a write after the upgrade got an earlier sequence"
    );
}

/// A retention that goes by age only down to `keep_newest` entries, in
/// small batches so that several transactions are needed.
fn retention(max_age: Duration, keep_newest: u64) -> FeedRetention {
    FeedRetention {
        max_age,
        keep_newest,
        batch: 2,
    }
}

/// Writes `n` Workloads `w0..` in namespace `ns` and returns the sequence
/// of the last.
async fn write_workloads(store: &weft_store::Store, ns: &str, n: usize) -> u64 {
    for i in 0..n {
        store
            .put(&workload(&format!("w{i}"), ns, "10.0.0.1"), Expect::Any)
            .await
            .unwrap();
    }
    store.current_seq().await.unwrap()
}

/// Pruning deletes the entries older than the retention period, but never
/// one of the newest kept nor a young one, in batches; raises the floor to
/// the last deleted; and does nothing when run again.
async fn feed_prune_deletes_only_the_old_beyond_the_newest(db: TestDb) {
    let store = db.open().await;
    store.put(&mesh("default"), Expect::Absent).await.unwrap();
    let old = write_workloads(&store, "old", 6).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = weft_store::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let young = write_workloads(&store, "young", 3).await;
    assert_eq!(store.feed_floor().await.unwrap(), 0, "nothing pruned yet");
    // An hour's retention keeps everything just written.
    let kept = retention(Duration::from_secs(3600), 1);
    let pruned = store.prune_feed(kept, weft_store::now_ms()).await.unwrap();
    assert_eq!(pruned, FeedPruned { rows: 0, floor: 0 });
    // By age: the mesh and the six old Workloads go, the young stay.
    let by_age = retention(Duration::ZERO, 1);
    let pruned = store.prune_feed(by_age, between).await.unwrap();
    assert_eq!(
        pruned,
        FeedPruned {
            rows: 7,
            floor: old
        }
    );
    let left: Vec<u64> = store
        .changes_since(old)
        .await
        .unwrap()
        .expect("at the floor")
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(left, ((old + 1)..=young).collect::<Vec<_>>());
    // Idempotent.
    let again = store.prune_feed(by_age, between).await.unwrap();
    assert_eq!(
        again,
        FeedPruned {
            rows: 0,
            floor: old
        }
    );
    // Everything is old now, but the newest two are kept.
    let keep_two = retention(Duration::ZERO, 2);
    let later = weft_store::now_ms() + 1;
    let pruned = store.prune_feed(keep_two, later).await.unwrap();
    assert_eq!(
        pruned,
        FeedPruned {
            rows: 1,
            floor: young - 2
        }
    );
    assert_eq!(store.feed_floor().await.unwrap(), young - 2);
    let left = store
        .changes_since(young - 2)
        .await
        .unwrap()
        .expect("at the floor");
    assert_eq!(left.len(), 2);
    // Resources are untouched, and new writes follow on.
    assert_eq!(
        store.list(Kind::Workload, None, None).await.unwrap().len(),
        9
    );
    store.put(&mesh("next"), Expect::Absent).await.unwrap();
    assert_eq!(store.current_seq().await.unwrap(), young + 1);
}

/// A reader whose position is below the floor gets the signal to read
/// everything again from every positional read; one at the floor does not.
async fn readers_below_the_floor_are_told_to_read_again(db: TestDb) {
    let store = db.open().await;
    let replica = db.open().await;
    store.put(&mesh("default"), Expect::Absent).await.unwrap();
    let enrollment = AgentEnrollment {
        name: "vm-1".to_owned(),
        zone: "z1".to_owned(),
        mesh: "default".to_owned(),
        hbone_address: "10.0.0.1:15008".to_owned(),
        host_facts: serde_json::json!({}),
        token_id: "t1".to_owned(),
    };
    store.enroll_agent(&enrollment).await.unwrap();
    let before = store.current_seq().await.unwrap();
    let last = write_workloads(&store, "ns", 3).await;
    let everything = retention(Duration::ZERO, 1);
    let pruned = store
        .prune_feed(everything, weft_store::now_ms() + 1)
        .await
        .unwrap();
    assert_eq!(pruned.floor, last - 1);
    let behind = before;
    // Every replica sees the floor (it is in the database).
    for reader in [&store, &replica] {
        assert!(reader.feed_since(behind).await.unwrap().is_none());
        assert!(reader.changes_since(0).await.unwrap().is_none());
        let keys = reader
            .changed_keys_since(behind, Kind::Workload, None, 100)
            .await
            .unwrap();
        assert!(keys.is_none(), "{keys:?}");
        let changed = reader
            .changed_since(behind, Kind::Workload, Some("default"), 100)
            .await
            .unwrap();
        assert!(changed.is_none());
        // No agent entry after `behind` is left, but some may have been.
        assert!(reader
            .agents_changed_since(behind, "z1", "default")
            .await
            .unwrap());
        // At the floor, reads go on as before.
        let at = pruned.floor;
        assert_eq!(reader.feed_since(at).await.unwrap().unwrap().len(), 1);
        let keys = reader
            .changed_keys_since(at, Kind::Workload, None, 100)
            .await
            .unwrap();
        assert_eq!(keys, Some(vec![workload_key("w2", "ns")]));
        assert!(!reader
            .agents_changed_since(at, "z1", "default")
            .await
            .unwrap());
    }
}

/// Readers following the feed while it is written and pruned either get
/// every entry after their position, without a gap, or are told they fell
/// below the floor: never a silent gap. (The narrower race, a prune
/// between a reader's two reads, is closed by reading the floor after the
/// entries; this test seldom lands in that window.)
async fn readers_racing_prunes_never_miss_an_entry(db: TestDb) {
    let store = db.open().await;
    store.put(&mesh("default"), Expect::Absent).await.unwrap();
    let written = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Handles of one store, as in a zone: on SQLite, the writer and the
    // pruner then take turns at the one writer connection, rather than
    // racing in SQLite's busy handler (where the pruner can lose for long).
    let writer = {
        let store = store.clone();
        let written = written.clone();
        tokio::spawn(async move {
            write_workloads(&store, "ns", 150).await;
            written.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let pruner = {
        let store = store.clone();
        let written = written.clone();
        tokio::spawn(async move {
            let tight = retention(Duration::ZERO, 3);
            while !written.load(std::sync::atomic::Ordering::SeqCst) {
                store.prune_feed(tight, i64::MAX).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let (mut position, mut resynced, mut read) = (0, 0, 0);
    while !(writer.is_finished() && pruner.is_finished()) {
        match store.feed_since(position).await.unwrap() {
            Some(entries) => {
                for entry in &entries {
                    assert_eq!(entry.seq(), position + 1, "a gap after {position}");
                    position = entry.seq();
                    read += 1;
                }
            }
            None => {
                position = store.current_seq().await.unwrap();
                resynced += 1;
            }
        }
        // Slower than the writer at times, so the pruner overtakes; once
        // early on, until it has (so the test never depends on timing).
        if resynced == 0 && read >= 10 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while store.feed_floor().await.unwrap() <= position
                && !writer.is_finished()
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let pause = if (read + resynced) % 2 == 0 { 25 } else { 1 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    writer.await.unwrap();
    pruner.await.unwrap();
    eprintln!("followed the feed: {read} entries read, {resynced} resynchronisations");
    assert!(read > 0 && resynced > 0, "the race was not run");
}

/// Entries written before the feed was bounded have no age: the upgrade
/// makes them prunable at once (beyond the newest kept).
async fn upgrade_makes_older_feed_entries_prunable(db: TestDb) {
    let store = db.open().await;
    store.put(&mesh("default"), Expect::Absent).await.unwrap();
    let last = write_workloads(&store, "ns", 4).await;
    drop(store);
    // As if the store predated the migration.
    let undo = [
        "ALTER TABLE changes DROP COLUMN at_ms",
        "DROP TABLE feed_floor",
        "DELETE FROM _sqlx_migrations WHERE version = 6",
    ];
    if db.is_postgres() {
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        for sql in undo {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
    } else {
        let pool = sqlx::SqlitePool::connect(db.url()).await.unwrap();
        for sql in undo {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
    let upgraded = db.open().await;
    assert_eq!(upgraded.feed_floor().await.unwrap(), 0);
    let hour = retention(Duration::from_secs(3600), 1);
    let pruned = upgraded
        .prune_feed(hour, weft_store::now_ms())
        .await
        .unwrap();
    assert_eq!(
        pruned,
        FeedPruned {
            rows: 4,
            floor: last - 1
        }
    );
}
