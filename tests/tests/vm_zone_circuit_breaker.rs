//! CircuitBreaker and HealthCheck applied to a VM zone and enforced by the
//! caller's agent: two instances of `payments`, one of which fails on
//! purpose (`/fail-unless/<the other's marker>`). An active HTTP health
//! check keeps the failing one out; passive outlier detection ejects it
//! after consecutive 5xx and lets it back after the ejection time;
//! `maxRequests` answers the requests over it `503 overflow` at once, and
//! `maxConnections` resets the TCP connections over it. A TCP health check
//! fails an instance whose application is gone while its agent runs, also
//! on a port of no declared protocol. Real controller, real agents, DNS
//! names through transparent capture.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;
use weft_e2e::vmzone::{bring_up, service_vip, wait_curl, Running, VmZone, ECHO_PORT, HTTP_PORT};
use weft_e2e::{echo_bin, wait};

const T: Duration = Duration::from_secs(30);

fn url(service: &str, path: &str) -> String {
    format!("http://{service}.mesh:{HTTP_PORT}{path}")
}

#[test]
fn health_checks_outlier_ejection_and_limits() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "payments", "payments"], "24h")?;
    let zone = &up.zone;
    let (web, good, bad) = (0, 1, 2);
    let good_marker = &up.markers[good];
    // Both instances serve web at first.
    wait_curl(zone, web, &url("payments", "/public"), good_marker)?;
    wait_curl(zone, web, &url("payments", "/public"), &up.markers[bad])?;
    let only_good = format!("/fail-unless/{good_marker}");

    // Active HTTP health check: the bad instance fails it, so it is not
    // picked, even for paths it would serve.
    up.controller.apply(
        &zone.path().join("health.yaml"),
        &format!(
            "\
apiVersion: weft.io/v1alpha1
kind: HealthCheck
metadata: {{ name: payments-health, mesh: default }}
spec:
  to:
  - targetRef: {{ kind: Service, name: payments }}
    default:
      interval: 300ms
      timeout: 1s
      unhealthyThreshold: 2
      http: {{ path: {only_good} }}
"
        ),
    )?;
    wait::until("the health check to keep the bad instance out", T, || {
        let all_good = (0..10).all(|_| {
            zone.curl_status(web, &url("payments", "/public"))
                .is_ok_and(|(status, body)| status == 200 && body.contains(good_marker))
        });
        Ok(all_good.then_some(()))
    })?;
    // Without the check, the bad instance is picked again.
    up.controller
        .weftctl_ok(&["delete", "HealthCheck", "payments-health"])?;
    wait_curl(zone, web, &url("payments", "/public"), &up.markers[bad])?;

    // Passive: three 5xx in a row eject the bad instance for 4s.
    up.controller.apply(
        &zone.path().join("outlier.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: CircuitBreaker
metadata: { name: payments-outliers, mesh: default }
spec:
  to:
  - targetRef: { kind: Service, name: payments }
    default:
      outlierDetection:
        consecutive5xx: 3
        baseEjectionTime: 4s
        maxEjectionPercent: 50
",
    )?;
    let ejected = wait::until("outlier detection to eject the bad instance", T, || {
        // Round robin: at most 3 failures, then only the good one.
        let mut statuses = Vec::new();
        for _ in 0..10 {
            let (status, _) = zone.curl_status(web, &url("payments", &only_good))?;
            statuses.push(status);
        }
        let tail_ok = statuses[6..].iter().all(|s| *s == 200);
        Ok(tail_ok.then_some(Instant::now()))
    })?;
    // While ejected, every request goes to the good instance.
    while ejected.elapsed() < Duration::from_secs(2) {
        let (status, body) = zone.curl_status(web, &url("payments", &only_good))?;
        ensure!(
            status == 200 && body.contains(good_marker),
            "an ejected endpoint was picked: {status} {body}"
        );
    }
    // After the ejection time it is picked again (and fails again).
    wait::until("the ejected instance to come back", T, || {
        let (status, _) = zone.curl_status(web, &url("payments", &only_good))?;
        Ok((status == 503).then_some(()))
    })?;
    ensure!(
        ejected.elapsed() >= Duration::from_secs(3),
        "came back after {:?}, before the ejection time",
        ejected.elapsed()
    );

    // maxRequests 2, nobody waits: of 6 slow requests at once, the ones
    // over the limit get 503 overflow at once.
    up.controller.apply(
        &zone.path().join("limits.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: CircuitBreaker
metadata: { name: payments-outliers, mesh: default }
spec:
  to:
  - targetRef: { kind: Service, name: payments }
    default:
      maxRequests: 2
",
    )?;
    let results = wait::until("maxRequests to refuse the extra requests", T, || {
        let results: Vec<(u16, String, Duration)> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        let started = Instant::now();
                        let (status, body) = zone
                            .curl_status(web, &url("payments", "/delay/2000"))
                            .unwrap_or((0, String::new()));
                        (status, body, started.elapsed())
                    })
                })
                .collect();
            calls
                .into_iter()
                .map(|c| c.join().unwrap_or((0, String::new(), Duration::ZERO)))
                .collect()
        });
        let over = results.iter().filter(|r| r.0 == 503).count();
        Ok((over >= 3).then_some(results))
    })?;
    let served = results.iter().filter(|r| r.0 == 200).count();
    ensure!(
        (1..=2).contains(&served),
        "{served} served over maxRequests 2: {results:?}"
    );
    for (status, body, took) in &results {
        if *status == 503 {
            ensure!(
                body.contains("CircuitBreaker") && *took < Duration::from_millis(1500),
                "an overflow should be answered at once by the agent: {body} after {took:?}"
            );
        }
    }
    up.agents[web].wait_metric(
        "weft_http_local_responses_total",
        &[("flag", "overflow")],
        3.0,
    )?;

    // maxConnections 1 at L4: a second TCP connection to the service's
    // virtual IP is reset while the first one lasts.
    up.controller.apply(
        &zone.path().join("connections.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: CircuitBreaker
metadata: { name: payments-outliers, mesh: default }
spec:
  to:
  - targetRef: { kind: Service, name: payments }
    default:
      maxConnections: 1
",
    )?;
    let vip = service_vip(&up.controller.inspect("services")?, "payments")
        .ok_or_else(|| anyhow::anyhow!("payments has no virtual IP"))?;
    let target = format!("{vip}:{ECHO_PORT}");
    let host = &zone.vms[web].host;
    let connect = || host.enter(|| Ok(TcpStream::connect(&target)?));
    let mut first = wait::until("maxConnections to reset a second connection", T, || {
        let mut first = connect()?;
        ensure!(echoes(&mut first), "the first connection should be served");
        let mut second = connect()?;
        Ok((!echoes(&mut second)).then_some(first))
    })?;
    ensure!(echoes(&mut first), "the first connection still works");
    drop(first);
    wait::until("a connection to fit again", T, || {
        Ok(echoes(&mut connect()?).then_some(()))
    })?;
    up.agents[web].wait_metric(
        "weft_connections_refused_total",
        &[("reason", "overflow")],
        1.0,
    )?;
    Ok(())
}

/// A TCP HealthCheck must reach the workload, not only its agent: on a
/// port of no declared protocol (and on an HTTP port) the destination's
/// agent answers an ordinary CONNECT before it dials the workload, so the
/// check is marked as a probe and answered only once the workload accepted
/// a connection. Both `payments` instances declare their first port
/// (`ECHO_PORT`, the one a TCP check dials) `detect`; the bad instance's
/// application is killed while its agent keeps running, and the check must
/// keep it out.
#[test]
fn a_tcp_health_check_fails_a_dead_workload_behind_a_live_agent() -> Result<()> {
    let zone = VmZone::new(echo_bin!(), &["web", "payments", "payments"])?;
    let controller = zone.start_controller("zone", &zone.sqlite_store("zone.db"))?;
    let mut up = Running::with_controller(zone, controller, "24h")?;
    for i in 0..3 {
        up.enrol_with(i, None, |spec| {
            if i > 0 {
                spec.set(
                    "workload.ports",
                    json!([
                        {"port": ECHO_PORT, "protocol": "detect"},
                        {"port": HTTP_PORT, "protocol": "http"},
                    ]),
                );
            }
        })?;
    }
    up.wait_converged(&up.controller)?;
    let (web, good, bad) = (0, 1, 2);
    let good_marker = up.markers[good].clone();
    let zone = &up.zone;
    wait_curl(zone, web, &url("payments", "/public"), &good_marker)?;
    wait_curl(zone, web, &url("payments", "/public"), &up.markers[bad])?;

    up.controller.apply(
        &zone.path().join("health.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: HealthCheck
metadata: { name: payments-tcp, mesh: default }
spec:
  to:
  - targetRef: { kind: Service, name: payments }
    default:
      interval: 300ms
      timeout: 1s
      unhealthyThreshold: 2
      tcp: {}
",
    )?;
    // The agent stays up; only the workload behind it goes.
    up.apps[bad].kill();
    wait::until(
        "the TCP health check to keep the dead instance out",
        T,
        || {
            let all_good = (0..10).all(|_| {
                zone.curl_status(web, &url("payments", "/public"))
                    .is_ok_and(|(status, body)| status == 200 && body.contains(&good_marker))
            });
            Ok(all_good.then_some(()))
        },
    )?;
    Ok(())
}

/// Whether `ping` comes back on the connection (false: reset or closed).
fn echoes(conn: &mut TcpStream) -> bool {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut back = [0u8; 4];
    conn.write_all(b"ping").is_ok() && conn.read_exact(&mut back).is_ok() && &back == b"ping"
}
