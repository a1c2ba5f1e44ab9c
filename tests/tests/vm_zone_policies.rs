//! Policies applied to a VM zone and enforced by the agents themselves, on
//! both sides of each call: TrafficPermission (default deny once the
//! initial allow-all is gone, deny wins, 403 at L7 and a reset at L4),
//! HTTPRoute (header match, weighted split across services), Retry and
//! Timeout, LoadBalancing (per request at L7, per connection at L4), and
//! `weftctl inspect policies`. Real controller, real agents,
//! DNS names through transparent capture.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{ensure, Result};
use weft_e2e::vmzone::{bring_up, service_vip, wait_curl, ECHO_PORT, HTTP_PORT};
use weft_e2e::{client, echo_bin, wait};

const T: Duration = Duration::from_secs(30);

fn url(service: &str, path: &str) -> String {
    format!("http://{service}.mesh:{HTTP_PORT}{path}")
}

#[test]
fn permissions_routes_and_resilience_from_the_zone() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "payments", "orders"], "24h")?;
    let zone = &up.zone;
    let (web, payments, orders) = (0, 1, 2);
    // The new mesh's initial allow-all lets every workload in.
    wait_curl(
        zone,
        orders,
        &url("payments", "/private"),
        &up.markers[payments],
    )?;

    // Replace it: payments takes GETs under /public, /flaky and /delay from
    // web only, and nobody may reach /public/admin; orders is open to the
    // mesh.
    up.controller.apply(
        &zone.path().join("permissions.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata: { name: payments-callers, mesh: default }
spec:
  targetRef: { kind: Service, name: payments }
  rules:
  - from: { kind: Service, name: web }
    default:
      action: Allow
      http:
      - { method: GET, path: { type: PathPrefix, value: /public } }
      - { method: GET, path: { type: PathPrefix, value: /flaky } }
      - { method: GET, path: { type: PathPrefix, value: /delay } }
  - from: { kind: Mesh }
    default:
      action: Deny
      http: [ { path: { type: PathPrefix, value: /public/admin } } ]
---
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata: { name: orders-open, mesh: default }
spec:
  targetRef: { kind: Service, name: orders }
  rules: [ { from: { kind: Mesh }, default: { action: Allow } } ]
",
    )?;
    up.controller
        .weftctl_ok(&["delete", "TrafficPermission", "allow-all"])?;

    // Default deny: what no rule allows gets 403 from payments' agent.
    wait::until("payments to refuse web's /private", T, || {
        let (status, _) = zone.curl_status(web, &url("payments", "/private"))?;
        Ok((status == 403).then_some(()))
    })?;
    let (status, body) = zone.curl_status(web, &url("payments", "/public/hello"))?;
    ensure!(
        status == 200 && body.contains(&up.markers[payments]),
        "{status} {body}"
    );
    // Deny wins over web's allow.
    let (status, body) = zone.curl_status(web, &url("payments", "/public/admin"))?;
    ensure!(
        status == 403 && body.contains("payments-callers"),
        "{status} {body}"
    );
    // orders is not web: refused, while orders itself is open to web.
    let (status, _) = zone.curl_status(orders, &url("payments", "/public/hello"))?;
    ensure!(status == 403, "orders got {status} from payments");
    wait_curl(zone, web, &url("orders", "/anything"), &up.markers[orders])?;
    // At L4: payments' TCP port has no rule without `http`: web's
    // connection is reset.
    let services = up.controller.inspect("services")?;
    let vip: std::net::IpAddr = service_vip(&services, "payments")
        .ok_or_else(|| anyhow::anyhow!("no VIP: {services:#}"))?
        .parse()?;
    let data = client::payload("denied", 4096);
    let echo = zone.vms[web].host.enter(|| {
        client::echo_roundtrip(
            std::net::SocketAddr::new(vip, ECHO_PORT),
            &data,
            Duration::from_secs(5),
        )
    });
    ensure!(echo.is_err(), "a TCP connection nothing allows got through");
    up.agents[payments].wait_metric(
        "weft_http_local_responses_total",
        &[
            ("direction", "inbound"),
            ("flag", "denied"),
            ("policy", "payments-callers"),
        ],
        1.0,
    )?;
    up.agents[payments].wait_metric(
        "weft_denied_streams_total",
        &[("reason", "not_allowed")],
        1.0,
    )?;

    // Routing on web's side: calls to orders carrying `x-canary: yes` go
    // to payments; the others are split evenly between the two.
    up.controller.apply(
        &zone.path().join("routes.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: HTTPRoute
metadata: { name: orders-canary, mesh: default }
spec:
  targetRef: { kind: Service, name: web }
  to:
  - targetRef: { kind: Service, name: orders }
    rules:
    - matches: [ { headers: [ { type: Exact, name: x-canary, value: 'yes' } ] } ]
      default:
        backendRefs: [ { name: payments } ]
    - default:
        backendRefs: [ { name: orders, weight: 1 }, { name: payments, weight: 1 } ]
---
apiVersion: weft.io/v1alpha1
kind: Retry
metadata: { name: payments-retries, mesh: default }
spec:
  to:
  - targetRef: { kind: Service, name: payments }
    default: { numRetries: 2, retryOn: [ 5xx ] }
---
apiVersion: weft.io/v1alpha1
kind: Timeout
metadata: { name: payments-timeout, mesh: default }
spec:
  to:
  - targetRef: { kind: Service, name: payments }
    default: { requestTimeout: 700ms }
",
    )?;
    let canary = wait::until("the canary header to reach payments", T, || {
        let out = zone.vms[web]
            .host
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-H",
                "x-canary: yes",
                &url("orders", "/public/canary"),
            ])
            .output()?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(body.contains(&up.markers[payments]).then_some(body))
    })?;
    ensure!(canary.contains("/public/canary"), "{canary}");
    let (mut to_orders, mut to_payments) = (0, 0);
    for i in 0..40 {
        let (status, body) =
            zone.curl_status(web, &url("orders", &format!("/public/split-{i}")))?;
        ensure!(status == 200, "split request {i}: {status} {body}");
        if body.contains(&up.markers[orders]) {
            to_orders += 1;
        } else if body.contains(&up.markers[payments]) {
            to_payments += 1;
        }
    }
    ensure!(
        to_orders >= 8 && to_payments >= 8 && to_orders + to_payments == 40,
        "an even split gave orders {to_orders}, payments {to_payments}"
    );

    // Every other /flaky answer is a 503: web's retries hide them.
    wait::until("web's retry policy", T, || {
        let ok = (0..6).all(|_| {
            zone.curl_status(web, &url("payments", "/flaky"))
                .is_ok_and(|(status, _)| status == 200)
        });
        Ok(ok.then_some(()))
    })?;
    // Slower than the 700ms request timeout: 504 from web's agent.
    let (status, body) = zone.curl_status(web, &url("payments", "/delay/3000"))?;
    ensure!(status == 504, "{status} {body}");

    // What applies to web, and why.
    let workload = format!("default/{}", zone.vms[web].workload);
    let shown = up.controller.weftctl_ok(&[
        "inspect",
        "policies",
        "--workload",
        &workload,
        "-o",
        "json",
    ])?;
    for name in ["orders-canary", "payments-retries", "payments-timeout"] {
        ensure!(
            shown.contains(name),
            "inspect policies lacks {name}: {shown}"
        );
    }
    Ok(())
}

#[test]
fn load_balancing_and_mirroring_from_the_zone() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "api", "api", "shadow"], "24h")?;
    let zone = &up.zone;
    let (web, api_a, api_b, shadow) = (0, 1, 2, 3);
    let which = |body: &str| {
        if body.contains(&up.markers[api_a]) {
            Some(api_a)
        } else if body.contains(&up.markers[api_b]) {
            Some(api_b)
        } else {
            None
        }
    };
    // Round robin by default: both instances answer.
    wait::until("both api instances in web's view", T, || {
        let mut seen = [false; 2];
        for i in 0..8 {
            let (_, body) = zone.curl_status(web, &url("api", &format!("/rr-{i}")))?;
            if let Some(k) = which(&body) {
                seen[k - api_a] = true;
            }
        }
        Ok((seen == [true, true]).then_some(()))
    })?;

    up.controller.apply(
        &zone.path().join("lb.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: LoadBalancing
metadata: { name: sticky-users, mesh: default }
spec:
  targetRef: { kind: Service, name: web }
  to:
  - targetRef: { kind: Service, name: api }
    default:
      algorithm: { type: ConsistentHash, hashOn: { type: Header, name: x-user } }
---
apiVersion: weft.io/v1alpha1
kind: HTTPRoute
metadata: { name: api-shadowed, mesh: default }
spec:
  targetRef: { kind: Service, name: web }
  to:
  - targetRef: { kind: Service, name: api }
    rules:
    - default:
        filters: [ { type: RequestMirror, backendRef: { name: shadow }, percentage: 100 } ]
",
    )?;
    let user = |name: &str, path: &str| -> Result<Option<usize>> {
        let out = zone.vms[web]
            .host
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-H",
                &format!("x-user: {name}"),
                &url("api", path),
            ])
            .output()?;
        Ok(which(&String::from_utf8_lossy(&out.stdout)))
    };
    // Once the policy is in force, one user always lands on one instance.
    wait::until("alice to stick to one api instance", T, || {
        let first = user("alice", "/sticky")?;
        let all_same = (0..10)
            .map(|_| user("alice", "/sticky"))
            .collect::<Result<Vec<_>>>()?;
        Ok((first.is_some() && all_same.iter().all(|k| *k == first)).then_some(()))
    })?;
    // Different users spread over both (16 users on one instance: 2^-15).
    let mut seen = [false; 2];
    for i in 0..16 {
        if let Some(k) = user(&format!("user-{i}"), "/spread")? {
            seen[k - api_a] = true;
        }
    }
    ensure!(
        seen == [true, true],
        "16 users all hashed to one instance: {seen:?}"
    );
    // Every request web sent to api was copied to shadow.
    up.agents[shadow].wait_metric(
        "weft_http_requests_total",
        &[("direction", "inbound"), ("status", "200")],
        16.0,
    )?;
    Ok(())
}

/// LoadBalancing `LeastRequest` on TCP connections: each new connection
/// goes to the endpoint with fewer connections open from the caller's
/// agent, counted across config updates. A source IP hash first pins three
/// long-lived connections from web to one api instance; once LeastRequest
/// replaces it (a new view, which must still see those three), the next
/// three all go to the other instance. Round robin would split them.
#[test]
fn least_request_sends_tcp_connections_to_the_endpoint_with_fewer_open() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "api", "api"], "24h")?;
    let zone = &up.zone;
    let (web, api) = (0, [1, 2]);
    let vip = service_vip(&up.controller.inspect("services")?, "api")
        .ok_or_else(|| anyhow::anyhow!("api has no virtual IP"))?;
    let target = format!("{vip}:{ECHO_PORT}");
    let host = &zone.vms[web].host;
    // A connection through web's capture that the api instance answers.
    let connect = || -> Result<TcpStream> {
        let mut conn = host.enter(|| Ok(TcpStream::connect(&target)?))?;
        ensure!(echoes(&mut conn), "a connection to api should be served");
        Ok(conn)
    };
    // The tunnelled connections each api instance's agent carries, once
    // the ones closed before have gone and the `total` open ones are in.
    let open = |total: f64| -> Result<[f64; 2]> {
        wait::until(&format!("{total} connections open to api"), T, || {
            let counts = [
                up.agents[api[0]].metric("weft_open_streams", &[("direction", "inbound")])?,
                up.agents[api[1]].metric("weft_open_streams", &[("direction", "inbound")])?,
            ];
            Ok((counts[0] + counts[1] == total).then_some(counts))
        })
    };
    let algorithm = |algorithm: &str| {
        up.controller.apply(
            &zone.path().join("lb.yaml"),
            &format!(
                "\
apiVersion: weft.io/v1alpha1
kind: LoadBalancing
metadata: {{ name: api-connections, mesh: default }}
spec:
  targetRef: {{ kind: Service, name: web }}
  to:
  - targetRef: {{ kind: Service, name: api }}
    default:
      algorithm: {algorithm}
      localityAware: false
"
            ),
        )
    };

    // Every connection of web has its one source address: hashed on it,
    // all go to one instance (without the policy, round robin splits them).
    algorithm("{ type: ConsistentHash, hashOn: { type: SourceIp } }")?;
    let (mut held, busy) = wait::until("a source IP hash to pin web's connections", T, || {
        open(0.0)?;
        let conns = (0..3).map(|_| connect()).collect::<Result<Vec<_>>>()?;
        let counts = open(3.0)?;
        Ok(counts.iter().position(|c| *c == 3.0).map(|i| (conns, i)))
    })?;
    let idle = 1 - busy;

    // LeastRequest: the three held connections count, so the next one goes
    // to the idle instance (while the hash is still in force it would not).
    algorithm("{ type: LeastRequest }")?;
    let first = wait::until("LeastRequest to pick the idle instance", T, || {
        open(3.0)?;
        let conn = connect()?;
        Ok((open(4.0)?[idle] == 1.0).then_some(conn))
    })?;
    held.push(first);
    // And so do the next two: it has fewer open all along.
    for _ in 0..2 {
        held.push(connect()?);
    }
    let counts = open(6.0)?;
    ensure!(
        counts[idle] == 3.0,
        "new connections should all go to the instance with fewer open: {counts:?} (idle: {idle})"
    );
    drop(held);
    open(0.0)?;
    Ok(())
}

/// Whether `ping` comes back on the connection (false: reset or closed).
fn echoes(conn: &mut TcpStream) -> bool {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut back = [0u8; 4];
    conn.write_all(b"ping").is_ok() && conn.read_exact(&mut back).is_ok() && &back == b"ping"
}
