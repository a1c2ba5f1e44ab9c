//! Node mode against the real binary: Register (the agent's whole set and
//! certificates in one call, and every refusal leaving the store as it
//! was), per-workload HBONE addresses in endpoints, and workloads the
//! operator places on a node agent (`spec.node`): pushed in `placed` to that
//! agent only, refused from any other, kept when their agent lets go of
//! them.

mod common;

use common::agent::{
    certificate_request, connect, enroll_with_token, hello, workload, ConfigStream, Identity,
    ZoneWithMesh,
};
use common::{eventually, MESH};
use tonic::Code;
use weft_api::proto::agent::v1 as pb;

/// Enrols `agent` with a `web-` prefix token and opens its config stream
/// with the same workloads.
async fn node(
    setup: &ZoneWithMesh,
    agent: &str,
    workloads: Vec<pb::Workload>,
) -> (Identity, ConfigStream) {
    let secret = setup.zone.issue_token(&["--workload-prefix", "web-"]).await;
    let (_, identity) = enroll_with_token(
        setup.zone.grpc,
        &setup.pinned,
        &secret,
        agent,
        workloads.clone(),
    )
    .await;
    let stream = ConfigStream::open(
        setup.zone.grpc,
        &setup.pinned,
        &identity,
        hello(agent, workloads),
    )
    .await;
    (identity, stream)
}

/// A node-mode registration: the workload's own listener at `address:15008`.
fn own_listener(name: &str, address: &str) -> pb::Workload {
    pb::Workload {
        hbone_address: format!("{address}:15008"),
        ..workload(name, "web", address, 8080)
    }
}

async fn register(
    setup: &ZoneWithMesh,
    identity: &Identity,
    workloads: Vec<pb::Workload>,
    certificates: Vec<pb::CertificateRequest>,
) -> Result<pb::RenewResponse, tonic::Status> {
    let mut client = connect(setup.zone.grpc, &setup.pinned, Some(identity)).await;
    client
        .register(pb::RegisterRequest {
            workloads,
            certificates,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The stored Workload `name` of namespace `default`, if any.
async fn stored(setup: &ZoneWithMesh, name: &str) -> Option<serde_json::Value> {
    let all = setup
        .zone
        .get_json("/v1/resources/workloads?mesh=default")
        .await;
    all["items"]
        .as_array()
        .expect("a list of workloads")
        .iter()
        .map(|item| item["resource"].clone())
        .find(|w| w["metadata"]["name"] == name)
}

/// The addresses of the ready endpoints of service `web` in `update`.
fn ready_web(update: &pb::ConfigUpdate) -> Vec<(String, String)> {
    let mut ready: Vec<(String, String)> = update
        .services
        .iter()
        .filter(|s| s.name == "web")
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.ready)
        .map(|e| (e.address.clone(), e.agent.clone()))
        .collect();
    ready.sort();
    ready
}

fn pair(address: &str, agent: &str) -> (String, String) {
    (address.to_owned(), agent.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_signs_and_serves_the_workloads_own_listener() {
    let setup = ZoneWithMesh::start(MESH).await;
    let web1 = own_listener("web-1", "10.0.0.1");
    let (identity, mut stream) = node(&setup, "node-1", vec![web1.clone()]).await;
    stream
        .until_acked(|u| ready_web(u) == [pair("10.0.0.1", "10.0.0.1:15008")])
        .await;

    // A workload enrolled while the agent runs: registered and certified
    // in one call.
    let web2 = own_listener("web-2", "10.0.0.2");
    let answer = register(
        &setup,
        &identity,
        vec![web1, web2.clone()],
        vec![certificate_request("web-2")],
    )
    .await
    .expect("registered");
    assert_eq!(answer.certificates.len(), 1);
    assert_eq!(answer.certificates[0].workload, "web-2");
    assert_eq!(
        answer.certificates[0].spiffe_id,
        "spiffe://weft.test/ns/default/sa/web"
    );
    common::agent::verify_chain(&answer.certificates[0].chain_pem, &answer.trust_bundle_pem)
        .expect("the certificate chains to the bundle");
    assert!(answer.agent_chain_pem.is_empty());
    stream
        .until_acked(|u| {
            ready_web(u)
                == [
                    pair("10.0.0.1", "10.0.0.1:15008"),
                    pair("10.0.0.2", "10.0.0.2:15008"),
                ]
        })
        .await;

    // The whole set: web-1 no longer listed is removed, and its removal is
    // the agent's own, so the stream that registered it is not cut off.
    register(&setup, &identity, vec![web2], Vec::new())
        .await
        .expect("registered");
    stream
        .until_acked(|u| ready_web(u) == [pair("10.0.0.2", "10.0.0.2:15008")])
        .await;
    assert!(stored(&setup, "web-1").await.is_none());
    let services = setup.zone.get_json("/v1/inspect/services").await;
    assert_eq!(services[0]["endpoints"].as_array().map(Vec::len), Some(1));
    setup.zone.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_registrations_change_nothing() {
    let setup = ZoneWithMesh::start(MESH).await;
    let web1 = own_listener("web-1", "10.0.0.1");
    let (identity, _stream) = node(&setup, "node-1", vec![web1.clone()]).await;
    let web3 = own_listener("web-3", "10.0.0.3");
    let (_, _other) = node(&setup, "node-2", vec![web3.clone()]).await;

    // Another agent's workload: refused, with a new one in the same call.
    let web9 = own_listener("web-9", "10.0.0.9");
    let err = register(
        &setup,
        &identity,
        vec![web9.clone(), web3],
        vec![certificate_request("web-9")],
    )
    .await
    .expect_err("refused");
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert!(err.message().contains("node-2"), "{err}");
    // Outside the token's scope: refused, naming the field.
    let db = workload("db-1", "db", "10.0.0.8", 5432);
    let err = register(&setup, &identity, vec![web9, db], Vec::new())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().starts_with("workloads[1]"), "{err}");
    assert!(err.message().contains("db-1"), "{err}");
    // A bad listener address names its field.
    let bad = pb::Workload {
        hbone_address: "10.0.0.1".to_owned(),
        ..web1
    };
    let err = register(&setup, &identity, vec![bad], Vec::new())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message().starts_with("workloads[0].hbone_address"),
        "{err}"
    );

    // Nothing changed: web-1 is still node-1's, web-3 node-2's, and
    // neither web-9 nor db-1 exists.
    let web1 = stored(&setup, "web-1").await.expect("web-1 kept");
    assert_eq!(web1["metadata"]["labels"]["weft.io/agent"], "node-1");
    assert_eq!(web1["spec"]["hboneAddress"], "10.0.0.1:15008");
    let web3 = stored(&setup, "web-3").await.expect("web-3 kept");
    assert_eq!(web3["metadata"]["labels"]["weft.io/agent"], "node-2");
    assert!(stored(&setup, "web-9").await.is_none());
    assert!(stored(&setup, "db-1").await.is_none());
    setup.zone.stop();
}

/// web-5, placed on `agent` in network namespace `netns`.
fn placement(agent: &str, netns: &str) -> String {
    format!(
        "\
apiVersion: weft.io/v1alpha1
kind: Workload
metadata:
  name: web-5
  mesh: default
  namespace: default
  labels:
    app: web
spec:
  address: 10.0.0.5
  service: web
  serviceAccount: web
  ports:
    - port: 8080
      protocol: http
  node:
    agent: {agent}
    netns: {netns}
"
    )
}

/// The status a config stream ends with (updates before it are skipped).
async fn stream_error(stream: &mut ConfigStream) -> tonic::Status {
    loop {
        let next = tokio::time::timeout(common::DEADLINE, stream.receive.message())
            .await
            .expect("the stream answers within the deadline");
        match next {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => return status,
        }
    }
}

/// The netns of each workload placed on the agent, by name.
fn placed(update: &pb::ConfigUpdate) -> Vec<(String, String)> {
    update
        .placed
        .iter()
        .map(|p| {
            let name = p.workload.as_ref().map(|w| w.name.clone());
            (name.unwrap_or_default(), p.netns.clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placed_workloads_go_to_their_agent_only_and_outlive_its_registration() {
    let setup = ZoneWithMesh::start(MESH).await;
    let web1 = own_listener("web-1", "10.0.0.1");
    let (identity, mut stream) = node(&setup, "node-1", vec![web1.clone()]).await;
    let web3 = own_listener("web-3", "10.0.0.3");
    let (identity2, _other) = node(&setup, "node-2", vec![web3.clone()]).await;

    setup
        .zone
        .ctl(
            &["apply", "-f", "-"],
            &placement("node-1", "/run/netns/web-5"),
        )
        .await
        .expect("apply the placement");
    let update = stream.until_acked(|u| !u.placed.is_empty()).await;
    assert_eq!(placed(&update), [pair("web-5", "/run/netns/web-5")]);
    let asked = update.placed[0].workload.clone().expect("the workload");
    assert_eq!(
        (
            asked.namespace.as_str(),
            asked.service.as_str(),
            asked.address.as_str()
        ),
        ("default", "web", "10.0.0.5")
    );
    assert_eq!(asked.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(asked.ports.len(), 1);
    // Not registered yet: not an endpoint.
    assert!(
        ready_web(&update)
            .iter()
            .all(|(address, _)| address != "10.0.0.5"),
        "{:?}",
        ready_web(&update)
    );
    let services = setup.zone.get_json("/v1/inspect/services").await;
    assert!(!services.to_string().contains("10.0.0.5"), "{services}");
    // Not pushed to another agent: node-2's view, built after node-1's,
    // places nothing on it.
    let fresh = ConfigStream::open(
        setup.zone.grpc,
        &setup.pinned,
        &identity2,
        hello("node-2", vec![web3.clone()]),
    )
    .await;
    let mut fresh = fresh;
    let seen = fresh.until_acked(|u| ready_web(u).len() == 2).await;
    assert!(seen.placed.is_empty(), "{:?}", placed(&seen));

    // Another agent may not register it, by any path.
    let web5 = own_listener("web-5", "10.0.0.5");
    let err = register(
        &setup,
        &identity2,
        vec![web3.clone(), web5.clone()],
        Vec::new(),
    )
    .await
    .expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("\"node-1\""), "{err}");
    let secret = setup.zone.issue_token(&["--workload-prefix", "web-"]).await;
    let (request, _) =
        common::agent::enroll_request(&secret, "node-3", common::agent::HBONE, vec![web5.clone()]);
    let mut anonymous = connect(setup.zone.grpc, &setup.pinned, None).await;
    let err = anonymous.enroll(request).await.expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("\"node-1\""), "{err}");
    fresh
        .send
        .send(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Workloads(pb::WorkloadUpdate {
                workloads: vec![web3, web5.clone()],
            })),
        })
        .await
        .expect("send the update");
    let err = stream_error(&mut fresh).await;
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("\"node-1\""), "{err}");
    let kept = stored(&setup, "web-5").await.expect("web-5 kept");
    assert!(kept["metadata"]["labels"].get("weft.io/agent").is_none());
    assert_eq!(kept["spec"]["node"]["agent"], "node-1");

    // Its agent registers it: labelled, still placed, an endpoint.
    register(
        &setup,
        &identity,
        vec![web1.clone(), web5],
        vec![certificate_request("web-5")],
    )
    .await
    .expect("registered");
    let registered = stored(&setup, "web-5").await.expect("web-5");
    assert_eq!(registered["metadata"]["labels"]["weft.io/agent"], "node-1");
    assert_eq!(registered["spec"]["node"]["netns"], "/run/netns/web-5");
    stream
        .until_acked(|u| ready_web(u).contains(&pair("10.0.0.5", "10.0.0.5:15008")))
        .await;

    // The operator moves it while it is served: the agent is told, and
    // the workload stays registered and served until its agent says
    // otherwise.
    setup
        .zone
        .ctl(
            &["apply", "-f", "-"],
            &placement("node-1", "/proc/1234/ns/net"),
        )
        .await
        .expect("apply the new placement");
    let update = stream
        .until_acked(|u| placed(u) == [pair("web-5", "/proc/1234/ns/net")])
        .await;
    assert!(
        ready_web(&update).contains(&pair("10.0.0.5", "10.0.0.5:15008")),
        "{:?}",
        ready_web(&update)
    );
    let moved = stored(&setup, "web-5").await.expect("web-5");
    assert_eq!(moved["metadata"]["labels"]["weft.io/agent"], "node-1");

    // Its agent lets go of it: unregistered, not an endpoint, still placed.
    register(&setup, &identity, vec![web1], Vec::new())
        .await
        .expect("registered");
    let update = stream
        .until_acked(|u| {
            let ready = ready_web(u);
            ready.contains(&pair("10.0.0.1", "10.0.0.1:15008"))
                && !ready.iter().any(|(address, _)| address == "10.0.0.5")
        })
        .await;
    assert_eq!(placed(&update), [pair("web-5", "/proc/1234/ns/net")]);
    let released = stored(&setup, "web-5").await.expect("web-5 kept");
    assert!(released["metadata"]["labels"]
        .get("weft.io/agent")
        .is_none());
    assert_eq!(released["spec"]["node"]["agent"], "node-1");

    // The operator moves it back, then deletes it: each reaches the agent
    // as an update, on the same stream.
    setup
        .zone
        .ctl(
            &["apply", "-f", "-"],
            &placement("node-1", "/run/netns/web-5"),
        )
        .await
        .expect("apply the new placement");
    stream
        .until_acked(|u| placed(u) == [pair("web-5", "/run/netns/web-5")])
        .await;
    setup
        .zone
        .ctl(&["delete", "workload", "web-5"], "")
        .await
        .expect("delete");
    stream.until_acked(|u| u.placed.is_empty()).await;
    eventually("web-5 gone", || async {
        stored(&setup, "web-5").await.is_none().then_some(())
    })
    .await;
    setup.zone.stop();
}
