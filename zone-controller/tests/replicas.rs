//! Two replicas of one zone on a real PostgreSQL server: one CA, one
//! leader, a change applied on one replica reaching an agent streaming from
//! the other, and leadership moving when the leader dies.

mod common;

use common::agent::{connect, enroll_request, pinned, workload, Identity};
use common::{eventually, Zone, DEADLINE};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::proto::agent::v1 as pb;
use weft_e2e::postgres::Postgres;

const MESH: &str = "\
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: default
spec:
  trustDomain: weft.test
";

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
    let secret = a
        .ctl(
            &[
                "token",
                "issue",
                "--mesh",
                "default",
                "--workload",
                "web-1",
                "-o",
                "secret",
            ],
            "",
        )
        .await
        .expect("token issue")
        .trim()
        .to_owned();

    // The agent enrols and streams through B.
    let web1 = workload("web-1", "web", "10.0.0.1", 8080);
    let (request, key) = enroll_request(&secret, "vm-1", "127.0.0.1:15008", vec![web1.clone()]);
    let mut client = connect(b.grpc, &pin_b, None).await;
    let enrolled = client.enroll(request).await.expect("enrolled").into_inner();
    let identity = Identity {
        chain_pem: enrolled.agent_chain_pem,
        key_pem: key.key_pem(),
    };
    let mut client = connect(b.grpc, &pin_b, Some(&identity)).await;
    let (send, outgoing) = mpsc::channel(8);
    send.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(pb::Hello {
            agent_id: "vm-1".to_owned(),
            workloads: vec![web1],
            hbone_address: "127.0.0.1:15008".to_owned(),
            ..Default::default()
        })),
    })
    .await
    .expect("queue the Hello");
    let mut updates = client
        .stream(ReceiverStream::new(outgoing))
        .await
        .expect("stream opened")
        .into_inner();
    let mut until = async |want: &dyn Fn(&pb::ConfigUpdate) -> bool| loop {
        let message = tokio::time::timeout(DEADLINE, updates.message())
            .await
            .expect("an update in time")
            .expect("a healthy stream")
            .expect("an open stream");
        if let Some(pb::zone_message::Message::Config(update)) = message.message {
            if want(&update) {
                return update;
            }
        }
    };
    let has = |service: &'static str| {
        move |u: &pb::ConfigUpdate| {
            u.services
                .iter()
                .any(|s| s.name == service && !s.virtual_ip.is_empty() && !s.endpoints.is_empty())
        }
    };
    until(&has("web")).await;

    // An apply on A reaches the agent on B.
    a.ctl(&["apply", "-f", "-"], DB)
        .await
        .expect("apply the workload");
    let update = until(&has("db")).await;
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
