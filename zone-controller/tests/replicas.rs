//! Two replicas of one zone on a real PostgreSQL server: one CA, one
//! leader, a change applied on one replica reaching an agent streaming from
//! the other, and leadership moving when the leader dies.

mod common;

use common::agent::{enroll_with_token, hello, pinned, workload, ConfigStream};
use common::{eventually, Zone, DEADLINE, MESH};
use weft_api::proto::agent::v1 as pb;
use weft_e2e::postgres::Postgres;

/// A workload registered by hand, owned by agent vm-1.
const DB: &str = "\
apiVersion: weft.io/v1alpha1
kind: Workload
metadata:
  name: db-1
  namespace: default
  labels:
    weft.io/agent: vm-1
spec:
  address: 10.0.0.5
  service: db
  ports:
    - port: 5432
";

async fn leader(zone: &Zone) -> bool {
    zone.get_json("/v1/zone").await["leader"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_cross_replicas_and_leadership_moves() {
    let pg = Postgres::start_local().expect("start a PostgreSQL server");
    let a = Zone::start_with(&pg.url, &["--zone", "z1", "--replica-id", "replica-a"]).await;
    let b = Zone::start_with(&pg.url, &["--zone", "z1", "--replica-id", "replica-b"]).await;
    let a_leads = eventually("exactly one leader", || async {
        match (leader(&a).await, leader(&b).await) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    })
    .await;
    let (pin_a, pin_b) = (pinned(&a).await, pinned(&b).await);
    assert_eq!(pin_a.pin, pin_b.pin, "one zone CA for both replicas");

    a.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply the mesh");
    let secret = a.issue_token(&["--workload", "web-1"]).await;

    // The agent enrols and streams through B; it never acks.
    let web1 = workload("web-1", "web", "10.0.0.1", 8080);
    let (_, identity) =
        enroll_with_token(b.grpc, &pin_b, &secret, "vm-1", vec![web1.clone()]).await;
    let mut updates =
        ConfigStream::open(b.grpc, &pin_b, &identity, hello("vm-1", vec![web1])).await;
    let has = |service: &'static str| {
        move |u: &pb::ConfigUpdate| {
            u.services
                .iter()
                .any(|s| s.name == service && !s.virtual_ip.is_empty() && !s.endpoints.is_empty())
        }
    };
    updates.first_matching(DEADLINE, has("web")).await;

    // An apply on A reaches the agent on B.
    a.ctl(&["apply", "-f", "-"], DB)
        .await
        .expect("apply the workload");
    let update = updates.first_matching(DEADLINE, has("db")).await;
    let db = update.services.iter().find(|s| s.name == "db").unwrap();
    assert_eq!(db.endpoints[0].address, "10.0.0.5");
    assert_eq!(
        db.endpoints[0].spiffe_id,
        "spiffe://weft.test/ns/default/sa/default"
    );

    // The leader dies; the other replica takes over.
    let survivor = if a_leads {
        a.kill();
        b
    } else {
        b.kill();
        a
    };
    eventually("the survivor leads", || async {
        leader(&survivor).await.then_some(())
    })
    .await;
    let services = survivor.get_json("/v1/inspect/services").await;
    assert_eq!(services.as_array().map(Vec::len), Some(2), "{services}");
    survivor.stop();
}
