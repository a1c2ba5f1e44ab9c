//! Lessons from the incumbents' issue trackers, each proved against the
//! real `weft-zone` binary with a real gRPC client:
//! - revoking a token cuts the stream of the agent enrolled with it at once
//!   (PERMISSION_DENIED with the reason) and refuses its renewal;
//! - deleting a Workload cuts its agent likewise, refuses the workload's
//!   renewal and re-registration, and takes it out of every view;
//! - an agent that vanishes (connection dropped without a goodbye) is shown
//!   not ready at once and removed after the agent grace, and comes back
//!   with its certificate through a Hello;
//! - an agent that says goodbye (closes its stream cleanly) leaves every
//!   endpoint list at once;
//! - virtual IPs stay the same across an agent reconnect and a controller
//!   restart.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::agent::{
    certificate_request, connect, enroll_with_token, hello, pinned, workload, ConfigStream,
    Identity, ZoneWithMesh,
};
use common::{eventually, Zone, DEADLINE, MESH};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Code;
use weft_api::proto::agent::v1 as pb;

/// The short agent grace the vanishing test runs with.
const GRACE: &str = "3s";

/// The endpoints of `service` in an update, as (address, ready).
fn endpoints(update: &pb::ConfigUpdate, service: &str) -> Option<Vec<(String, bool)>> {
    update.services.iter().find(|s| s.name == service).map(|s| {
        s.endpoints
            .iter()
            .map(|e| (e.address.clone(), e.ready))
            .collect()
    })
}

/// The token id inside a secret (`weft-bt1.<id>.<secret>`).
fn token_id(secret: &str) -> String {
    secret.split('.').nth(1).expect("a token id").to_owned()
}

/// Issues a token for exactly `workload` and enrols `agent` with it;
/// returns the token's secret and the agent's identity.
async fn enroll(zone: &Zone, agent: &str, w: &pb::Workload) -> (String, Identity) {
    let secret = zone.issue_token(&["--workload", &w.name]).await;
    let pinned = pinned(zone).await;
    let (_, identity) =
        enroll_with_token(zone.grpc, &pinned, &secret, agent, vec![w.clone()]).await;
    (secret, identity)
}

/// Opens `agent`'s stream at `addr` with a Hello for `w`.
async fn open(
    zone: &Zone,
    addr: SocketAddr,
    identity: &Identity,
    agent: &str,
    w: &pb::Workload,
) -> ConfigStream {
    let pinned = pinned(zone).await;
    ConfigStream::open(addr, &pinned, identity, hello(agent, vec![w.clone()])).await
}

/// Reads the stream until it ends, acking updates; returns how it ended
/// (panics if it is still open after [`DEADLINE`]).
async fn ending(stream: &mut ConfigStream) -> tonic::Status {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.receive.message().await {
                Ok(Some(pb::ZoneMessage {
                    message: Some(pb::zone_message::Message::Config(update)),
                })) => {
                    // The zone may have ended the call already.
                    let ack = pb::AgentMessage {
                        message: Some(pb::agent_message::Message::Ack(pb::Ack {
                            version: update.version,
                        })),
                    };
                    let _ = stream.send.send(ack).await;
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream is cut within the deadline")
}

/// Renews `w`'s certificate as `identity`.
async fn renew(
    zone: &Zone,
    identity: &Identity,
    w: &str,
) -> Result<pb::RenewResponse, tonic::Status> {
    let pinned = pinned(zone).await;
    let mut client = connect(zone.grpc, &pinned, Some(identity)).await;
    client
        .renew(pb::RenewRequest {
            certificates: vec![certificate_request(w)],
            agent_csr_pem: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// `inspect agents` entry of `name`.
async fn inspected_agent(zone: &Zone, name: &str) -> serde_json::Value {
    let agents = zone.get_json("/v1/inspect/agents").await;
    agents
        .as_array()
        .expect("an array")
        .iter()
        .find(|a| a["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("agent {name} in {agents}"))
}

/// The virtual IP of `service` as `inspect services` shows it.
async fn virtual_ip(zone: &Zone, service: &str) -> Option<String> {
    let services = zone.get_json("/v1/inspect/services").await;
    services.as_array()?.iter().find(|s| s["name"] == service)?["virtualIp"]
        .as_str()
        .map(str::to_owned)
}

/// A TCP relay to the zone's gRPC port that the test can cut, so that an
/// agent's connection dies without a goodbye (as when its host vanishes).
struct Relay {
    addr: SocketAddr,
    task: JoinHandle<()>,
    freeze: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let addr = listener.local_addr().expect("the relay's address");
        let (freeze, frozen) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut frozen = frozen.clone();
                connections.spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let froze = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        _ = frozen.wait_for(|f| *f) => true,
                    };
                    if froze {
                        // Sockets open, nothing crosses: a host that
                        // vanished without a FIN.
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        Relay { addr, task, freeze }
    }

    /// Drops every relayed connection at once (the JoinSet aborts them).
    fn cut(self) {
        drop(self);
    }

    /// Stops relaying but keeps the connections open.
    fn freeze(&self) {
        self.freeze.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `web` has both endpoints, both ready.
fn both_web_ready(u: &pb::ConfigUpdate) -> bool {
    endpoints(u, "web").is_some_and(|e| e.len() == 2 && e.iter().all(|(_, r)| *r))
}

/// vm-1 fronting web-1 (10.0.0.1) and vm-2 fronting web-2 (10.0.0.2),
/// both of service `web`: enrolled, streaming (vm-2 through
/// `second_via`), each having acked a view with both endpoints ready.
struct WebPair {
    secret1: String,
    vm1: Identity,
    web1: pb::Workload,
    first: ConfigStream,
    second: ConfigStream,
}

async fn web_pair(zone: &Zone, second_via: SocketAddr) -> WebPair {
    let web1 = workload("web-1", "web", "10.0.0.1", 8080);
    let web2 = workload("web-2", "web", "10.0.0.2", 8080);
    let (secret1, vm1) = enroll(zone, "vm-1", &web1).await;
    let (_, vm2) = enroll(zone, "vm-2", &web2).await;
    let mut first = open(zone, zone.grpc, &vm1, "vm-1", &web1).await;
    let mut second = open(zone, second_via, &vm2, "vm-2", &web2).await;
    first.until_acked(both_web_ready).await;
    second.until_acked(both_web_ready).await;
    WebPair {
        secret1,
        vm1,
        web1,
        first,
        second,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_cuts_the_agent_at_once_and_refuses_its_renewal() {
    let setup = ZoneWithMesh::start(MESH).await;
    let zone = &setup.zone;
    let WebPair {
        secret1,
        vm1,
        web1,
        mut first,
        mut second,
    } = web_pair(zone, zone.grpc).await;
    renew(zone, &vm1, "web-1")
        .await
        .expect("renewal before the revocation");

    let id = token_id(&secret1);
    let out = zone
        .ctl(&["token", "revoke", &id], "")
        .await
        .expect("token revoke");
    assert!(out.contains("revoked"), "{out}");

    let status = ending(&mut first).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(
        status.message().contains("revoked") && status.message().contains(&id),
        "{status}"
    );
    let refused = renew(zone, &vm1, "web-1")
        .await
        .expect_err("renewal refused");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("revoked"), "{refused}");
    // Its endpoint leaves the other agent's view; the other agent goes on.
    second
        .until_acked(|u| endpoints(u, "web").is_some_and(|e| e == [("10.0.0.2".to_owned(), true)]))
        .await;
    let inspected = inspected_agent(zone, "vm-1").await;
    assert_eq!(inspected["state"], "gone", "{inspected}");
    assert!(
        inspected["left"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("revoked")),
        "{inspected}"
    );
    // And it cannot come back with its still-valid certificate.
    let mut again = open(zone, zone.grpc, &vm1, "vm-1", &web1).await;
    let status = ending(&mut again).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_workload_cuts_its_agent_and_takes_it_out_of_every_view() {
    let setup = ZoneWithMesh::start(MESH).await;
    let zone = &setup.zone;
    let WebPair {
        vm1,
        web1,
        mut first,
        mut second,
        ..
    } = web_pair(zone, zone.grpc).await;

    let out = zone
        .ctl(&["delete", "workload", "web-1"], "")
        .await
        .expect("delete workload");
    assert!(out.contains("deleted"), "{out}");

    let status = ending(&mut first).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(
        status.message().contains("web-1") && status.message().contains("deleted"),
        "{status}"
    );
    second
        .until_acked(|u| endpoints(u, "web").is_some_and(|e| e == [("10.0.0.2".to_owned(), true)]))
        .await;
    let refused = renew(zone, &vm1, "web-1")
        .await
        .expect_err("renewal refused");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("deleted"), "{refused}");

    // The agent reconnects still listing it: the stream is accepted, the
    // workload is not registered again.
    let mut back = open(zone, zone.grpc, &vm1, "vm-1", &web1).await;
    let update = back.until_acked(|_| true).await;
    assert_eq!(
        endpoints(&update, "web"),
        Some(vec![("10.0.0.2".to_owned(), true)])
    );
    let workloads = zone.get_json("/v1/inspect/workloads").await;
    assert!(
        !workloads
            .as_array()
            .expect("an array")
            .iter()
            .any(|w| w["name"] == "web-1"),
        "{workloads}"
    );
    let inspected = inspected_agent(zone, "vm-1").await;
    assert_eq!(
        inspected["withdrawnWorkloads"],
        serde_json::json!(["default/default/web-1"]),
        "{inspected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_agent_is_not_ready_then_removed_after_the_grace_and_can_return() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = dir.path().join("zone.db");
    let url = format!("sqlite://{}", db.display());
    let zone = Zone::start_with(&url, &["--agent-grace", GRACE]).await;
    zone.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply the mesh");
    let web1 = workload("web-1", "web", "10.0.0.1", 8080);
    let api1 = workload("web-api-1", "api", "10.0.0.2", 9090);
    let (_, vm1) = enroll(&zone, "vm-1", &web1).await;
    let (_, vm2) = enroll(&zone, "vm-2", &api1).await;
    let mut first = open(&zone, zone.grpc, &vm1, "vm-1", &web1).await;
    let relay = Relay::start(zone.grpc).await;
    let mut second = open(&zone, relay.addr, &vm2, "vm-2", &api1).await;
    let ready = |u: &pb::ConfigUpdate| {
        endpoints(u, "api").is_some_and(|e| e == [("10.0.0.2".to_owned(), true)])
    };
    first.until_acked(ready).await;
    second.until_acked(ready).await;
    let vip = virtual_ip(&zone, "api")
        .await
        .expect("api has a virtual IP");

    // Its host vanishes: the connection dies, no goodbye.
    relay.cut();
    first
        .until_acked(|u| endpoints(u, "api").is_some_and(|e| e == [("10.0.0.2".to_owned(), false)]))
        .await;
    // Then, after the grace, it is out of the list (the service and its
    // virtual IP stay).
    first
        .until_acked(|u| endpoints(u, "api").is_some_and(|e| e.is_empty()))
        .await;
    let inspected = inspected_agent(&zone, "vm-2").await;
    assert_eq!(inspected["state"], "gone", "{inspected}");
    assert!(
        inspected["left"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("vanished")),
        "{inspected}"
    );
    drop(second);

    // It returns with its still-valid certificate: a Hello is enough.
    let mut back = open(&zone, zone.grpc, &vm2, "vm-2", &api1).await;
    back.until_acked(ready).await;
    first.until_acked(ready).await;
    assert_eq!(inspected_agent(&zone, "vm-2").await["state"], "online");
    assert_eq!(
        virtual_ip(&zone, "api").await.as_deref(),
        Some(vip.as_str())
    );
    // A live agent is never taken for a vanished one: still there after
    // more than a grace (heartbeats come every third of it).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let inspected = inspected_agent(&zone, "vm-1").await;
    assert_eq!(inspected["state"], "online", "{inspected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goodbye_leaves_every_endpoint_list_at_once() {
    let setup = ZoneWithMesh::start(MESH).await;
    let zone = &setup.zone;
    let web1 = workload("web-1", "web", "10.0.0.1", 8080);
    let web2 = workload("web-2", "web", "10.0.0.2", 8080);
    let (_, vm1) = enroll(zone, "vm-1", &web1).await;
    let (_, vm2) = enroll(zone, "vm-2", &web2).await;
    let mut first = open(zone, zone.grpc, &vm1, "vm-1", &web1).await;
    let second = open(zone, zone.grpc, &vm2, "vm-2", &web2).await;
    first.until_acked(both_web_ready).await;

    // vm-2 stops: it closes its side of the stream cleanly (as the agent
    // does when it drains) and keeps reading until the zone ends it.
    let ConfigStream {
        send, mut receive, ..
    } = second;
    drop(send);
    // Well within the default 60 s grace: this is the goodbye, not silence.
    first
        .until_acked(|u| endpoints(u, "web").is_some_and(|e| e == [("10.0.0.1".to_owned(), true)]))
        .await;
    let inspected = inspected_agent(zone, "vm-2").await;
    assert_eq!(inspected["state"], "gone", "{inspected}");
    assert!(
        inspected["left"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("goodbye")),
        "{inspected}"
    );
    let end = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(_)) = receive.message().await {}
    })
    .await;
    assert!(end.is_ok(), "the zone ends the stream after the goodbye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_ips_survive_an_agent_reconnect_and_a_controller_restart() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = dir.path().join("zone.db");
    let zone = Zone::start(&db).await;
    zone.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply the mesh");
    let web1 = workload("web-1", "web", "10.0.0.1", 8080);
    let api1 = workload("api-1", "api", "10.0.0.2", 9090);
    let (_, vm1) = enroll(&zone, "vm-1", &web1).await;
    let (_, vm2) = enroll(&zone, "vm-2", &api1).await;
    let vip_of = |u: &pb::ConfigUpdate, name: &str| {
        u.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.virtual_ip.clone())
    };
    let mut first = open(&zone, zone.grpc, &vm1, "vm-1", &web1).await;
    let mut second = open(&zone, zone.grpc, &vm2, "vm-2", &api1).await;
    let update = first
        .until_acked(|u| vip_of(u, "web").is_some() && vip_of(u, "api").is_some())
        .await;
    second.until_acked(|u| vip_of(u, "api").is_some()).await;
    let (web_vip, api_vip) = (
        vip_of(&update, "web").expect("web"),
        vip_of(&update, "api").expect("api"),
    );
    assert_ne!(web_vip, api_vip);

    // vm-2 reconnects: same addresses.
    drop(second);
    let mut second = open(&zone, zone.grpc, &vm2, "vm-2", &api1).await;
    let update = second
        .until_acked(|u| endpoints(u, "api").is_some_and(|e| e == [("10.0.0.2".to_owned(), true)]))
        .await;
    assert_eq!(vip_of(&update, "web").as_deref(), Some(web_vip.as_str()));
    assert_eq!(vip_of(&update, "api").as_deref(), Some(api_vip.as_str()));

    // The controller restarts on the same store: same addresses, for
    // agents and in inspect.
    drop(first);
    drop(second);
    zone.stop();
    let zone = Zone::start(&db).await;
    let mut first = open(&zone, zone.grpc, &vm1, "vm-1", &web1).await;
    let update = first
        .until_acked(|u| vip_of(u, "web").is_some() && vip_of(u, "api").is_some())
        .await;
    assert_eq!(vip_of(&update, "web").as_deref(), Some(web_vip.as_str()));
    assert_eq!(vip_of(&update, "api").as_deref(), Some(api_vip.as_str()));
    let inspected = eventually("inspect shows the same virtual IPs", || async {
        let web = virtual_ip(&zone, "web").await?;
        let api = virtual_ip(&zone, "api").await?;
        Some((web, api))
    })
    .await;
    assert_eq!(inspected, (web_vip, api_vip));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_or_deletion_on_one_replica_cuts_streams_on_another() {
    let pg = weft_e2e::postgres::Postgres::start_local().expect("start a PostgreSQL server");
    let a = Zone::start_with(&pg.url, &["--zone", "z1", "--replica-id", "replica-a"]).await;
    let b = Zone::start_with(&pg.url, &["--zone", "z1", "--replica-id", "replica-b"]).await;
    a.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply the mesh");
    let web1 = workload("web-1", "web", "10.0.0.1", 8080);
    let web2 = workload("web-2", "web", "10.0.0.2", 8080);
    // Tokens issued on A, agents enrolled and streaming on B.
    let secret1 = a.issue_token(&["--workload", "web-1"]).await;
    let secret2 = a.issue_token(&["--workload", "web-2"]).await;
    let pin_b = pinned(&b).await;
    let (_, vm1) = enroll_with_token(b.grpc, &pin_b, &secret1, "vm-1", vec![web1.clone()]).await;
    let (_, vm2) = enroll_with_token(b.grpc, &pin_b, &secret2, "vm-2", vec![web2.clone()]).await;
    let mut first = open(&b, b.grpc, &vm1, "vm-1", &web1).await;
    let mut second = open(&b, b.grpc, &vm2, "vm-2", &web2).await;
    first.until_acked(both_web_ready).await;
    second.until_acked(both_web_ready).await;

    a.ctl(&["token", "revoke", &token_id(&secret1)], "")
        .await
        .expect("token revoke on A");
    let status = ending(&mut first).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(status.message().contains("revoked"), "{status}");

    a.ctl(&["delete", "workload", "web-2"], "")
        .await
        .expect("delete workload on A");
    let status = ending(&mut second).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(status.message().contains("web-2"), "{status}");
    let services = b.get_json("/v1/inspect/services").await;
    let web = services
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .map(|s| s["endpoints"].clone());
    assert!(
        web.is_none() || web == Some(serde_json::json!([])),
        "{services}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_found_by_keepalive_and_removed_after_the_grace() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite://{}", dir.path().join("zone.db").display());
    let zone = Zone::start_with(&url, &["--agent-grace", GRACE]).await;
    zone.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply the mesh");
    let relay = Relay::start(zone.grpc).await;
    // vm-2's stream stays open (not dropped: that would be a goodbye).
    let WebPair {
        mut first,
        second: _second,
        ..
    } = web_pair(&zone, relay.addr).await;

    // vm-2's host goes silent: no FIN, no RST, nothing. The zone's HTTP/2
    // keepalive (a ping every 20 s, 10 s to answer) finds the connection
    // dead, then the grace runs from vm-2's last heartbeat.
    relay.freeze();
    let within = Duration::from_secs(60);
    let update = first
        .first_matching(within, |u| {
            endpoints(u, "web").is_some_and(|e| e == [("10.0.0.1".to_owned(), true)])
        })
        .await;
    first.ack(&update.version).await;
    let inspected = inspected_agent(&zone, "vm-2").await;
    assert_eq!(inspected["state"], "gone", "{inspected}");
}
