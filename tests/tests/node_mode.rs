//! Node mode on a namespaced host: one agent serves two workloads, each in
//! its own network namespace, next to sidecar-mode VMs of the same zone.
//! Workloads are enrolled and unenrolled while they run; each presents its
//! own certificate (seen by a TLS server of the suite's own); traffic flows
//! both ways between node and sidecar modes under L4 and L7 policies; a
//! node agent cannot take another host's workload; a restarted agent
//! captures every workload again.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use weft_e2e::agent;
use weft_e2e::nodehost::NodeHost;
use weft_e2e::vmzone::{service_vip, Running, VmZone, ECHO_PORT, HTTP_PORT, MESH, TRUST_DOMAIN};
use weft_e2e::witness::TlsWitness;
use weft_e2e::{echo_bin, unique_marker, wait};

const T: Duration = Duration::from_secs(30);
/// Where the probe VM's peers are told its HBONE listener is: the witness.
const WITNESS_PORT: u16 = 16008;
/// The capture, HBONE, plaintext and DNS ports the agent opens in each
/// enrolled workload's namespace.
const AGENT_PORTS: [u16; 4] = [15001, 15006, 15008, 15053];

fn url(service: &str, path: &str) -> String {
    format!("http://{service}.default.mesh:{HTTP_PORT}{path}")
}

fn id(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}")
}

/// A zone with `probe` (vm0, its HBONE address pointing at a witness) and
/// `api` (vm1) as sidecars, and a node host with `web` and `shop`.
struct Scene {
    up: Running,
    node: NodeHost,
    witness: TlsWitness,
    node_agent: weft_e2e::agent::Agent,
    node_spec: weft_e2e::agent::AgentSpec,
    node_markers: Vec<String>,
    _node_apps: Vec<weft_e2e::process::Proc>,
}

fn scene() -> Result<Scene> {
    scene_with(&["web", "shop"], 2)
}

/// [`scene`] with the node host's workloads running `services`, the first
/// `enrolled` of them enrolled with the local command.
fn scene_with(services: &[&str], enrolled: usize) -> Result<Scene> {
    scene_tuned(services, enrolled, |_| {})
}

/// [`scene_with`] with the node agent's config changed by `edit`.
fn scene_tuned(
    services: &[&str],
    enrolled: usize,
    edit: impl FnOnce(&mut weft_e2e::agent::AgentSpec),
) -> Result<Scene> {
    let zone = VmZone::new(echo_bin!(), &["probe", "api"])?;
    let node = NodeHost::new(&zone, services)?;
    let controller = zone.start_controller("zone", &zone.sqlite_store("zone.db"))?;
    let mut up = Running::with_controller(zone, controller, "24h")?;
    let probe_ip = up.zone.vms[0].ip;
    up.enrol_with(0, None, |spec| {
        spec.set(
            "controller.hbone_address",
            SocketAddr::from((probe_ip, WITNESS_PORT)).to_string(),
        );
    })?;
    up.enrol(1)?;
    up.wait_converged(&up.controller)?;
    let state = up.zone.state_dir(0);
    let identity = std::fs::read_to_string(state.join("workload.pem")).context("probe identity")?;
    let bundle = std::fs::read_to_string(state.join("bundle.pem")).context("probe bundle")?;
    let witness = TlsWitness::start(
        &up.zone.vms[0].host,
        SocketAddr::from((probe_ip, WITNESS_PORT)),
        &identity,
        &bundle,
    )?;

    // The token also names api-1, the VM's workload, so that taking it is
    // refused by ownership, not by the token.
    let mut names: Vec<&str> = node.workloads.iter().map(|w| w.name.as_str()).collect();
    names.push("api-1");
    let token = up.controller.issue_token(MESH, &names, "10m", 1)?;
    let mut node_spec = node.agent_spec(&up.zone, &up.controller, &token)?;
    edit(&mut node_spec);
    let node_agent = node.start_agent(&up.zone, &node_spec)?;
    let mut node_markers = Vec::new();
    let mut node_apps = Vec::new();
    for k in 0..node.workloads.len() {
        let marker = unique_marker(&node.workloads[k].service);
        node_apps.push(node.start_app(&up.zone, k, &marker)?);
        node_markers.push(marker);
        if k < enrolled {
            node.enrol_ok(k)?;
        }
    }
    Ok(Scene {
        up,
        node,
        witness,
        node_agent,
        node_spec,
        node_markers,
        _node_apps: node_apps,
    })
}

/// Waits until `curl` from node workload `k` to `url` answers `marker`.
fn wait_node_curl(s: &Scene, k: usize, url: &str, marker: &str) -> Result<()> {
    let mut last = (0, String::new());
    wait::until(&format!("{url} from node workload {k}"), T, || {
        last = s.node.curl_status(k, url)?;
        Ok((last.0 == 200 && last.1.contains(marker)).then_some(()))
    })
    .with_context(|| format!("last answer: {last:?}"))
}

/// Waits until `curl` from VM `i` to `url` answers `marker`.
fn wait_vm_curl(s: &Scene, i: usize, url: &str, marker: &str) -> Result<()> {
    weft_e2e::vmzone::wait_curl(&s.up.zone, i, url, marker).map(|_| ())
}

/// An echo connection from node workload `k` to api's echo port, through
/// the mesh; it must stay up while other workloads come and go.
fn open_echo(s: &Scene, k: usize) -> Result<TcpStream> {
    let vip: std::net::IpAddr = service_vip(&s.up.controller.inspect("services")?, "api")
        .context("api has a virtual IP")?
        .parse()?;
    let target = SocketAddr::new(vip, ECHO_PORT);
    let tcp = s.node.workloads[k]
        .host
        .enter(move || Ok(TcpStream::connect_timeout(&target, Duration::from_secs(5))?))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(tcp)
}

fn echo(tcp: &mut TcpStream, round: usize) -> Result<()> {
    let data = format!("round {round} through the node agent\n");
    tcp.write_all(data.as_bytes())?;
    let mut back = vec![0u8; data.len()];
    tcp.read_exact(&mut back).context("echo answer")?;
    ensure!(
        back == data.as_bytes(),
        "echo answered {:?}",
        String::from_utf8_lossy(&back)
    );
    Ok(())
}

#[test]
fn node_mode_enrols_running_workloads_with_their_own_identity() -> Result<()> {
    let mut s = scene()?;
    let (web, shop) = (0, 1);
    let (probe, api) = (0, 1);

    // Captured in their namespaces, each with the agent's sockets there.
    for k in [web, shop] {
        ensure!(s.node.has_rules(k)?, "no capture rules in workload {k}");
        let ports = s.node.listening(k)?;
        ensure!(
            AGENT_PORTS.iter().all(|p| ports.contains(p)),
            "workload {k} listens on {ports:?}"
        );
    }

    // Node to sidecar and sidecar to node, by DNS name, over mTLS.
    wait_node_curl(&s, web, &url("api", "/"), &s.up.markers[api])?;
    wait_vm_curl(&s, api, &url("web", "/"), &s.node_markers[web])?;
    wait_vm_curl(&s, api, &url("shop", "/"), &s.node_markers[shop])?;
    // The zone knows each by its own HBONE listener.
    let workloads = s.up.controller.inspect("workloads")?;
    let own = |name: &str| {
        workloads
            .as_array()
            .and_then(|all| all.iter().find(|w| w["name"] == name))
            .and_then(|w| w["hboneAddress"].as_str())
            .map(str::to_owned)
    };
    ensure!(
        own("web-n0").as_deref() == Some("10.211.1.2:15008")
            && own("shop-n1").as_deref() == Some("10.211.2.2:15008")
            && own("api-1").is_none(),
        "{workloads:#}"
    );
    // Between two workloads of the same node.
    wait_node_curl(&s, web, &url("shop", "/"), &s.node_markers[shop])?;

    // Each workload's connections present its own certificate, as the
    // suite's TLS server sees it.
    let probe_vip: std::net::IpAddr = service_vip(&s.up.controller.inspect("services")?, "probe")
        .context("probe has a virtual IP")?
        .parse()?;
    for k in [web, shop] {
        let target = SocketAddr::new(probe_vip, ECHO_PORT);
        let wanted = id(&s.node.workloads[k].service);
        wait::until(&format!("the witness to see {wanted}"), T, || {
            let _ = s.node.workloads[k].host.enter(move || {
                let mut tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
                let _ = tcp.write_all(b"who are you\n");
                Ok(())
            });
            Ok(s.witness.seen().contains(&wanted).then_some(()))
        })?;
    }
    let seen = s.witness.seen();
    ensure!(
        seen.iter().all(|i| *i == id("web") || *i == id("shop")),
        "the witness saw another identity: {seen:?}"
    );
    let _ = probe;

    // Enrolment goes through the owner-only control socket, not the
    // loopback admin port any local user can reach.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&s.node.control)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "control socket mode {mode:o}");
    let admin = "127.0.0.1:15000".parse()?;
    let answer = s.node.host.enter(move || {
        weft_e2e::http::request(admin, "DELETE", "/workloads/web-n0", Duration::from_secs(5))
    })?;
    ensure!(
        answer.status == 403,
        "DELETE on the admin port: {}",
        answer.status
    );
    ensure!(s.node.has_rules(web)?, "the admin port unenrolled web");

    // A node agent cannot take another host's workload.
    let w0 = s.node.workloads[web].host.path();
    let out = s.node.cli(&[
        "enroll",
        "--name",
        "api-1",
        "--service",
        "api",
        "--address",
        "10.211.9.2",
        "--netns",
        &w0,
    ])?;
    let text = agent::describe(&out);
    ensure!(
        !out.status.success() && text.contains("403") && text.contains("api-1"),
        "{text}"
    );
    wait_vm_curl(&s, probe, &url("api", "/"), &s.up.markers[api])?;

    // Unenrol and enrol web again while shop keeps a connection open.
    let mut held = open_echo(&s, shop)?;
    echo(&mut held, 0)?;
    let out = s.node.unenrol(web)?;
    ensure!(out.status.success(), "{}", agent::describe(&out));
    ensure!(!s.node.has_rules(web)?, "rules left in web's namespace");
    let ports = s.node.listening(web)?;
    ensure!(
        !AGENT_PORTS.iter().any(|p| ports.contains(p)),
        "agent sockets left in web: {ports:?}"
    );
    ensure!(
        ports.contains(&ECHO_PORT) && ports.contains(&HTTP_PORT),
        "web's own sockets: {ports:?}"
    );
    echo(&mut held, 1)?;
    s.node.enrol_ok(web)?;
    wait_node_curl(&s, web, &url("api", "/"), &s.up.markers[api])?;
    echo(&mut held, 2)?;
    drop(held);

    // A restarted agent captures both again from its state directory.
    s.node_agent.proc.kill();
    let mut restarted = s.node.start_agent(&s.up.zone, &s.node_spec)?;
    for k in [web, shop] {
        ensure!(
            s.node.has_rules(k)?,
            "no rules in workload {k} after the restart"
        );
    }
    wait_node_curl(&s, shop, &url("api", "/"), &s.up.markers[api])?;
    wait_vm_curl(&s, api, &url("web", "/"), &s.node_markers[web])?;
    restarted.proc.kill();
    Ok(())
}

#[test]
fn node_and_sidecar_modes_share_l4_and_l7_policies() -> Result<()> {
    let s = scene()?;
    let (web, shop) = (0, 1);
    let api = 1;
    wait_node_curl(&s, web, &url("api", "/"), &s.up.markers[api])?;

    s.up.controller.apply(
        &s.up.zone.path().join("permissions.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata: { name: api-callers, mesh: default }
spec:
  targetRef: { kind: Service, name: api }
  rules:
  - from: { kind: Service, name: web }
    default:
      action: Allow
      http: [ { method: GET, path: { type: PathPrefix, value: /public } } ]
---
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata: { name: web-callers, mesh: default }
spec:
  targetRef: { kind: Service, name: web }
  rules: [ { from: { kind: Service, name: api }, default: { action: Allow } } ]
",
    )?;
    s.up.controller
        .weftctl_ok(&["delete", "TrafficPermission", "allow-all"])?;

    // L7, node to sidecar: web may GET /public only; shop nothing (403).
    wait::until("api to refuse web's /private", T, || {
        Ok((s.node.curl_status(web, &url("api", "/private"))?.0 == 403).then_some(()))
    })?;
    let (status, body) = s.node.curl_status(web, &url("api", "/public/x"))?;
    ensure!(
        status == 200 && body.contains(&s.up.markers[api]),
        "{status} {body}"
    );
    let (status, _) = s.node.curl_status(shop, &url("api", "/public/x"))?;
    ensure!(status == 403, "shop got {status}");
    // Sidecar to node: api may call web; nothing allows api into shop.
    wait_vm_curl(&s, api, &url("web", "/"), &s.node_markers[web])?;
    let (status, _) = s.up.zone.curl_status(api, &url("shop", "/"))?;
    ensure!(status == 403, "api into shop got {status}");
    // L4: shop's TCP connection to api's echo port is reset.
    let reset = open_echo(&s, shop).and_then(|mut tcp| echo(&mut tcp, 0));
    ensure!(reset.is_err(), "shop's TCP connection to api went through");
    Ok(())
}

#[test]
fn the_zone_places_workloads_on_a_node_agent() -> Result<()> {
    let s = scene_with(&["web", "cart"], 1)?;
    let cart = 1;
    let api = 1;
    ensure!(
        !s.node.has_rules(cart)?,
        "cart is captured before it is placed"
    );
    let netns = s.node.workloads[cart].host.path();
    let ip = s.node.workloads[cart].ip;
    s.up.controller.apply(
        &s.up.zone.path().join("placed.yaml"),
        &format!(
            "\
apiVersion: weft.io/v1alpha1
kind: Workload
metadata: {{ name: cart-n1, mesh: default, namespace: default }}
spec:
  address: {ip}
  service: cart
  serviceAccount: cart
  ports: [ {{ port: {ECHO_PORT} }}, {{ port: {HTTP_PORT}, protocol: http }} ]
  node: {{ agent: node, netns: {netns} }}
"
        ),
    )?;
    // The node agent enrols it: captured, with its own identity, and
    // reachable from a sidecar by name.
    wait::until("the node agent to capture the placed workload", T, || {
        Ok(s.node.has_rules(cart)?.then_some(()))
    })?;
    wait_vm_curl(&s, api, &url("cart", "/"), &s.node_markers[cart])?;
    wait_node_curl(&s, cart, &url("api", "/"), &s.up.markers[api])?;
    let listed = String::from_utf8_lossy(&s.node.cli(&["list"])?.stdout).into_owned();
    ensure!(
        listed.contains("\"cart-n1\"")
            && listed.contains("\"zone\"")
            && listed.contains(&id("cart")),
        "{listed}"
    );
    // Deleting the placement unenrols it, leaving its namespace as it was.
    s.up.controller
        .weftctl_ok(&["delete", "Workload", "cart-n1"])?;
    let mut ports = Vec::new();
    wait::until("the node agent to release the workload", T, || {
        ports = s.node.listening(cart)?;
        let released = !s.node.has_rules(cart)? && !AGENT_PORTS.iter().any(|p| ports.contains(p));
        Ok(released.then_some(()))
    })
    .with_context(|| format!("cart still listens on {ports:?}"))?;
    ensure!(
        ports.contains(&ECHO_PORT) && ports.contains(&HTTP_PORT),
        "cart's own sockets: {ports:?}"
    );
    Ok(())
}

/// Latency percentiles of `n` sequential HTTP requests from node workload
/// `k` to `target`; every request must succeed.
fn quiet_latencies(
    s: &Scene,
    k: usize,
    target: SocketAddr,
    n: usize,
) -> Result<(Duration, Duration)> {
    let mut took = s.node.workloads[k].host.enter(move || {
        let mut took = Vec::with_capacity(n);
        for i in 0..n {
            let started = std::time::Instant::now();
            let r = weft_e2e::http::get(target, "/quiet", Duration::from_secs(5))
                .with_context(|| format!("quiet request {i}"))?;
            ensure!(r.status == 200, "quiet request {i} answered {}", r.status);
            took.push(started.elapsed());
        }
        Ok(took)
    })?;
    took.sort();
    Ok((took[n / 2], took[n * 99 / 100]))
}

#[test]
fn a_noisy_workload_is_held_to_its_own_limits() -> Result<()> {
    const LIMIT: usize = 32;
    let s = scene_tuned(&["noisy", "quiet"], 2, |spec| {
        spec.set("node.max_connections_per_workload", LIMIT as u64);
    })?;
    let (noisy, quiet) = (0, 1);
    let api = 1;
    wait_node_curl(&s, quiet, &url("api", "/"), &s.up.markers[api])?;
    wait_node_curl(&s, noisy, &url("api", "/"), &s.up.markers[api])?;
    let vip: std::net::IpAddr = service_vip(&s.up.controller.inspect("services")?, "api")
        .context("api has a virtual IP")?
        .parse()?;
    let http_target = SocketAddr::new(vip, HTTP_PORT);
    let before = quiet_latencies(&s, quiet, http_target, 200)?;

    // The noisy workload opens four times its limit of connections and
    // holds them; those over its limit are reset by the agent.
    let mut held = Vec::new();
    for _ in 0..LIMIT * 4 {
        if let Ok(tcp) = open_echo(&s, noisy) {
            held.push(tcp);
        }
    }
    let mut through = 0;
    for (i, tcp) in held.iter_mut().enumerate() {
        if echo(tcp, i).is_ok() {
            through += 1;
        }
    }
    ensure!(
        (1..=LIMIT).contains(&through),
        "{through} of the noisy workload's {} connections went through (limit {LIMIT})",
        held.len()
    );
    // Meanwhile the quiet workload is served, every request.
    let during = quiet_latencies(&s, quiet, http_target, 200)?;
    eprintln!(
        "quiet workload, 200 sequential requests (debug build): p50 {:?} p99 {:?} alone, p50 {:?} p99 {:?} with the noisy one at its limit ({through} connections held)",
        before.0, before.1, during.0, during.1
    );
    Ok(())
}
