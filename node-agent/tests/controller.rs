//! Controller mode against a stand-in zone over real sockets and TLS:
//! enrolment (pin, refusals, retries), the config stream (ack, nack, the
//! last good view kept and persisted), restarts that do not re-enrol,
//! corrupt state, and renewal of short-lived certificates.

mod zone;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use weft_agent::config::AgentConfig;
use weft_agent::controller::{self, Controller};
use weft_agent::credentials::Credentials;
use weft_agent::metrics::Metrics;
use weft_agent::state;
use weft_agent::view::{self, NameLookup};
use weft_api::proto::agent::v1::{agent_message, AgentMessage};
use zone::{agent_config, update, Script, TempDir, Zone};

fn hello_version(m: &AgentMessage) -> String {
    match &m.message {
        Some(agent_message::Message::Hello(h)) => {
            assert_eq!(h.agent_id, "vm-1");
            assert_eq!(h.workloads.len(), 1);
            assert_eq!(h.workloads[0].name, "web");
            assert!(
                h.hbone_address.starts_with("127.0.0.1:"),
                "{}",
                h.hbone_address
            );
            h.applied_version.clone()
        }
        other => panic!("expected Hello, got {other:?}"),
    }
}

/// Starts the controller client the way the agent does; returns its task.
async fn start(
    cfg: &Arc<AgentConfig>,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<Controller>,
    view::SharedView,
    Arc<Credentials>,
) {
    let startup = controller::prepare(cfg).await.expect("ready to serve");
    let files = startup.files.expect("a sidecar's identity");
    let credentials = Arc::new(Credentials::load(&files).expect("identity loads"));
    let view = view::shared(startup.view);
    let metrics = Arc::new(Metrics::new());
    let locals = Arc::new(controller::Sidecar {
        config: cfg.clone(),
        credentials: credentials.clone(),
        metrics: metrics.clone(),
    });
    let ctl = Controller::new(cfg.clone(), startup.state, locals, view.clone(), metrics);
    let drain = weft_agent::drain::Drain::new();
    (tokio::spawn(ctl.clone().run(drain)), ctl, view, credentials)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrols_follows_the_stream_and_restarts_from_state() {
    let mut zone = Zone::start(Script::default()).await;
    let dir = TempDir::new("enrol");
    let path = zone.agent_config(dir.path());
    let cfg = Arc::new(AgentConfig::load(&path).expect("config valid"));
    let bundle = zone.state.mesh.pem();
    zone.serve_initially("v1");

    let (task, ctl, view, credentials) = start(&cfg).await;
    assert_eq!(zone.state.enrolled.load(Ordering::SeqCst), 1);
    assert_eq!(
        credentials.id().as_str(),
        "spiffe://mesh.test/ns/default/sa/default"
    );
    // State: a private directory, private files.
    let state_dir = dir.path().join("state");
    let mode = std::fs::metadata(&state_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    for f in [
        state::WORKLOAD,
        state::AGENT,
        state::BUNDLE,
        state::ENROLMENT,
    ] {
        let mode = std::fs::metadata(state_dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    assert_eq!(hello_version(&zone.next_message().await), "");
    match zone.next_message().await.message {
        Some(agent_message::Message::Ack(a)) => assert_eq!(a.version, "v1"),
        other => panic!("expected Ack v1, got {other:?}"),
    }
    assert_eq!(view.load().version, "v1");
    assert_eq!(
        view.load().lookup("api.mesh."),
        NameLookup::Service("10.96.0.10".parse().unwrap())
    );
    let status = ctl.status();
    assert!(status.connected);
    assert_eq!(status.applied_version, "v1");

    // A bad push is refused with the field, and changes nothing.
    let mut bad = update("v2", &bundle);
    bad.services[0].endpoints[0].address = "not-an-ip".into();
    zone.state.push.send(bad).unwrap();
    match zone.next_message().await.message {
        Some(agent_message::Message::Nack(n)) => {
            assert_eq!(n.version, "v2");
            assert!(
                n.reason.contains("services[0].endpoints[0].address"),
                "{}",
                n.reason
            );
        }
        other => panic!("expected Nack v2, got {other:?}"),
    }
    assert_eq!(view.load().version, "v1");
    assert_eq!(ctl.status().last_nack.unwrap().version, "v2");

    // A bundle the agent's own certificate does not chain to: refused.
    let other = zone::Ca::new("someone else");
    zone.state.push.send(update("v3", &other.pem())).unwrap();
    match zone.next_message().await.message {
        Some(agent_message::Message::Nack(n)) => {
            assert!(n.reason.starts_with("trust_bundle_pem"), "{}", n.reason)
        }
        other => panic!("expected Nack v3, got {other:?}"),
    }

    // A bundle with one more CA (a rotation starting): applied, and the
    // credentials are rebuilt to trust it.
    let generation = credentials.current().generation;
    let rotated = format!("{bundle}{}", other.pem());
    zone.state.push.send(update("v4", &rotated)).unwrap();
    match zone.next_message().await.message {
        Some(agent_message::Message::Ack(a)) => assert_eq!(a.version, "v4"),
        other => panic!("expected Ack v4, got {other:?}"),
    }
    assert_eq!(credentials.current().generation, generation + 1);
    assert_eq!(
        std::fs::read_to_string(state_dir.join(state::BUNDLE)).unwrap(),
        rotated
    );
    task.abort();

    // Restart: no second enrolment (the token is used up), the persisted
    // view is served at once, and Hello reports its version.
    let (task, _ctl, view, _) = start(&cfg).await;
    assert_eq!(zone.state.enrolled.load(Ordering::SeqCst), 1);
    assert_eq!(view.load().version, "v4");
    assert_eq!(hello_version(&zone.next_message().await), "v4");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_from_state_while_the_zone_is_down() {
    let mut zone = Zone::start(Script::default()).await;
    let dir = TempDir::new("down");
    let path = zone.agent_config(dir.path());
    zone.serve_initially("v1");
    let cfg = Arc::new(AgentConfig::load(&path).unwrap());
    let (task, _, _, _) = start(&cfg).await;
    hello_version(&zone.next_message().await);
    zone.next_message().await;
    task.abort();

    // The zone's address now refuses connections: start-up does not wait.
    let mut down = (*cfg).clone();
    down.controller.as_mut().unwrap().address = vec!["127.0.0.1:1".into()];
    let down = Arc::new(down);
    let started = tokio::time::timeout(Duration::from_secs(5), start(&down))
        .await
        .expect("start-up does not wait for the zone");
    assert_eq!(started.2.load().version, "v1");
    assert!(!started.1.status().connected);
    started.0.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_an_unavailable_zone_then_enrols() {
    let zone = Zone::start(Script {
        unavailable_first: 2,
        ..Script::default()
    })
    .await;
    let dir = TempDir::new("retry");
    let path = zone.agent_config(dir.path());
    let cfg = AgentConfig::load(&path).unwrap();
    tokio::time::timeout(Duration::from_secs(20), controller::prepare(&cfg))
        .await
        .expect("enrols after the retries")
        .expect("enrolled");
    assert_eq!(zone.state.enroll_calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_final_and_say_why() {
    let zone = Zone::start(Script {
        refuse: Some((
            Code::PermissionDenied,
            "workload web is outside the token's scope".into(),
        )),
        ..Script::default()
    })
    .await;
    let dir = TempDir::new("refused");
    let path = zone.agent_config(dir.path());
    let cfg = AgentConfig::load(&path).unwrap();
    let err = controller::prepare(&cfg).await.err().expect("refused");
    let msg = err.to_string();
    assert!(msg.starts_with("enrolment refused: "), "{msg}");
    assert!(msg.contains("outside the token's scope"), "{msg}");
    assert_eq!(zone.state.enroll_calls.load(Ordering::SeqCst), 1);

    // A wrong pin: the handshake fails, for good.
    let zone = Zone::start(Script::default()).await;
    let other = zone::Ca::new("not the zone");
    let path = agent_config(dir.path(), zone.addr, &other.pin(), "token-1");
    let cfg = AgentConfig::load(&path).unwrap();
    let msg = controller::prepare(&cfg)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        msg.contains("enrolment refused") && msg.contains("ca_pin"),
        "{msg}"
    );
    assert_eq!(zone.state.enroll_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_1_when_refused() {
    let zone = Zone::start(Script::default()).await;
    let dir = TempDir::new("binary");
    let path = agent_config(
        dir.path(),
        zone.addr,
        &zone.state.control.pin(),
        "wrong-token",
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_weft-agent"))
            .args(["run", "-c"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("enrolment refused: ") && stderr.contains("unknown token"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_names_the_file() {
    let zone = Zone::start(Script::default()).await;
    let dir = TempDir::new("corrupt");
    let path = zone.agent_config(dir.path());
    let cfg = AgentConfig::load(&path).unwrap();
    controller::prepare(&cfg).await.unwrap();
    let state_dir = dir.path().join("state");

    std::fs::write(state_dir.join(state::CONFIG), b"\xff\xff not protobuf").unwrap();
    let msg = controller::prepare(&cfg).await.err().unwrap().to_string();
    assert!(
        msg.contains("config.pb") && msg.contains("corrupt"),
        "{msg}"
    );
    std::fs::remove_file(state_dir.join(state::CONFIG)).unwrap();

    let workload = state_dir.join(state::WORKLOAD);
    let mut pem = std::fs::read_to_string(&workload).unwrap();
    pem.truncate(pem.len() / 2);
    std::fs::write(&workload, pem).unwrap();
    let msg = controller::prepare(&cfg).await.err().unwrap().to_string();
    assert!(msg.contains("workload.pem"), "{msg}");
    assert_eq!(zone.state.enrolled.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_short_lived_certificates() {
    let zone = Zone::start(Script {
        lifetime: Duration::from_secs(8),
        ..Script::default()
    })
    .await;
    let dir = TempDir::new("renew");
    let path = zone.agent_config(dir.path());
    let cfg = Arc::new(AgentConfig::load(&path).unwrap());
    let (task, ctl, _, credentials) = start(&cfg).await;
    let first = credentials.current().identity.not_after;
    // Renewed at 50-80% of 8 s; wait for two rounds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ctl.status().renewals < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no two renewals in 20 s: {:?}",
            ctl.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let current = credentials.current();
    assert!(current.generation >= 2, "credentials reloaded");
    assert!(current.identity.not_after > first);
    assert!(zone.state.renewals.load(Ordering::SeqCst) >= 2);
    task.abort();
}

/// A loopback address of this test process's own (all of 127/8 is local):
/// the agent's fixed ports there cannot collide with ports other tests
/// running at the same time take on 127.0.0.1, as "find a free port, then
/// bind it" could.
fn own_loopback() -> std::net::Ipv4Addr {
    let pid = std::process::id();
    std::net::Ipv4Addr::new(127, 88, (pid / 250 % 250) as u8, (pid % 250 + 1) as u8)
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// The real binary in controller mode: enrols, serves the zone's view on
/// its admin endpoint and its DNS proxy, and counts what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_in_controller_mode() {
    let mut zone = Zone::start(Script::default()).await;
    zone.serve_initially("v1");
    let dir = TempDir::new("binary-run");
    let path = zone.agent_config(dir.path());
    let ip = own_loopback();
    let mut yaml = std::fs::read_to_string(&path).unwrap();
    yaml.push_str(&format!(
        "inbound: {{ listen: {ip}:15008, plaintext_listen: {ip}:15006 }}\n\
         outbound: {{ capture_listen: {ip}:15001 }}\n\
         admin: {{ listen: {ip}:15000 }}\n\
         metrics: {{ listen: {ip}:15020 }}\n\
         dns: {{ listen: {ip}:15053, upstream: [127.0.0.1:9] }}\n"
    ));
    std::fs::write(&path, yaml).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft-agent"))
        .args(["run", "-c"])
        .arg(&path)
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    assert_eq!(hello_version(&zone.next_message().await), "");
    assert!(matches!(
        zone.next_message().await.message,
        Some(agent_message::Message::Ack(_))
    ));
    let admin_addr: std::net::SocketAddr = format!("{ip}:15000").parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let dump = loop {
        let body = tokio::task::spawn_blocking(move || http_get(admin_addr, "/config_dump"))
            .await
            .unwrap();
        let dump: Option<serde_json::Value> = body.and_then(|b| serde_json::from_str(&b).ok());
        if let Some(d) = dump.filter(|d| d["controller"]["applied_version"] == "v1") {
            break d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no v1 in /config_dump"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dump["controller"]["connected"], true, "{dump}");
    assert_eq!(dump["controller"]["zone"], "zone-a", "{dump}");
    assert!(dump["controller"]["workload_certificate_not_after_unix"].as_i64() > Some(0));
    assert_eq!(dump["view"]["names"]["api.mesh"], "10.96.0.10", "{dump}");

    // The DNS proxy answers from the zone's view.
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut q = hickory_proto::op::Message::new(
        42,
        hickory_proto::op::MessageType::Query,
        hickory_proto::op::OpCode::Query,
    );
    q.add_query(hickory_proto::op::Query::query(
        "api.mesh.".parse().unwrap(),
        hickory_proto::rr::RecordType::A,
    ));
    client
        .send_to(&q.to_vec().unwrap(), (ip, 15053))
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
        .await
        .expect("a DNS answer")
        .unwrap();
    let answer = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(answer.answers.len(), 1);

    let metrics_addr: std::net::SocketAddr = format!("{ip}:15020").parse().unwrap();
    let text = tokio::task::spawn_blocking(move || http_get(metrics_addr, "/metrics"))
        .await
        .unwrap()
        .unwrap();
    for line in [
        "weft_config_updates_total{result=\"ack\"} 1",
        "weft_controller_connected 1",
        "weft_dns_queries_total{result=\"mesh\"} 1",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }

    // SIGTERM: the stream is closed cleanly at once (the zone takes the
    // workload out of service), and the agent exits 0 after draining.
    let pid = child.id().expect("running") as libc::pid_t;
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within 10 s")
        .unwrap();
    assert!(status.success(), "{status}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while zone.state.clean_ends.load(Ordering::SeqCst) != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the zone saw no clean end of the stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A version split over chunks, then deltas: the agent acks only the last
/// chunk, applies a delta (patches and an omitted bundle included) on the
/// view it serves, persists the whole result, and refuses a delta on
/// another base with `base version mismatch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_chunks_and_deltas_on_its_own_base_only() {
    use weft_api::proto::agent::v1::{ConfigUpdate, ServicePatch, ServiceView};

    let mut zone = Zone::start(Script::default()).await;
    let dir = TempDir::new("delta");
    let path = zone.agent_config(dir.path());
    let cfg = Arc::new(AgentConfig::load(&path).expect("config valid"));
    let bundle = zone.state.mesh.pem();
    zone.serve_initially("v1");
    let (task, _ctl, view, _) = start(&cfg).await;
    assert_eq!(hello_version(&zone.next_message().await), "");
    match zone.next_message().await.message {
        Some(agent_message::Message::Ack(a)) => assert_eq!(a.version, "v1"),
        other => panic!("expected Ack v1, got {other:?}"),
    }

    // v2, whole, in two chunks: the first has the per-agent parts and api,
    // the second adds db.
    let mut first = update("v2", &bundle);
    first.more = true;
    let db = ServiceView {
        name: "db".into(),
        virtual_ip: "10.96.0.11".into(),
        ..first.services[0].clone()
    };
    let second = ConfigUpdate {
        version: "v2".into(),
        services: vec![db],
        ..Default::default()
    };
    zone.state.push.send(first).unwrap();
    zone.state.push.send(second).unwrap();
    match zone.next_message().await.message {
        Some(agent_message::Message::Ack(a)) => assert_eq!(a.version, "v2"),
        other => panic!("expected one Ack for v2, got {other:?}"),
    }
    assert_eq!(
        view.load().lookup("db.mesh."),
        NameLookup::Service("10.96.0.11".parse().unwrap())
    );
    assert_eq!(
        view.load().lookup("api.mesh."),
        NameLookup::Service("10.96.0.10".parse().unwrap())
    );

    // v3: a delta on v2 that removes api and turns db's endpoint not
    // ready (a patch), without the bundle (unchanged).
    let mut delta = update("v3", "");
    let mut db_now = delta.services[0].clone();
    db_now.name = "db".into();
    db_now.virtual_ip = "10.96.0.11".into();
    let was = db_now.endpoints[0].clone();
    db_now.endpoints[0].ready = false;
    delta.services.clear();
    delta.base_version = "v2".into();
    delta.removed_services = vec!["default/api".into()];
    delta.patched_services = vec![ServicePatch {
        service: Some(db_now),
        removed_endpoints: vec![was],
    }];
    zone.state.push.send(delta).unwrap();
    match zone.next_message().await.message {
        Some(agent_message::Message::Ack(a)) => assert_eq!(a.version, "v3"),
        other => panic!("expected Ack v3, got {other:?}"),
    }
    assert_eq!(view.load().version, "v3");
    assert_ne!(
        view.load().lookup("api.mesh."),
        NameLookup::Service("10.96.0.10".parse().unwrap())
    );
    // What is persisted is the whole resulting view.
    let saved = state::StateDir::open(&dir.path().join("state"))
        .unwrap()
        .config()
        .unwrap()
        .expect("a saved view");
    assert_eq!(saved.version, "v3");
    assert!(saved.base_version.is_empty());
    let names: Vec<&str> = saved.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["db"]);
    assert!(saved.patched_services.is_empty());
    assert_eq!(saved.services[0].endpoints.len(), 1);
    assert!(!saved.services[0].endpoints[0].ready);
    assert_eq!(saved.trust_bundle_pem, bundle);

    // A delta on a version the agent does not serve: refused, nothing
    // changes.
    let mut foreign = update("v4", &bundle);
    foreign.base_version = "v9".into();
    zone.state.push.send(foreign).unwrap();
    match zone.next_message().await.message {
        Some(agent_message::Message::Nack(n)) => {
            assert_eq!(n.version, "v4");
            assert!(n.reason.contains("base version mismatch"), "{}", n.reason);
        }
        other => panic!("expected Nack v4, got {other:?}"),
    }
    assert_eq!(view.load().version, "v3");
    task.abort();
}
