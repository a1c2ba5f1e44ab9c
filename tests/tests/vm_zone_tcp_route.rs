//! TCPRoute applied to a VM zone: TCP connections from web to orders' echo
//! port are split by weight between orders and payments by web's agent,
//! each connection picking a backend service and then one of its
//! endpoints. The echo apps say who they are when asked. Then a Trace from
//! the zone: the HTTP apps receive W3C trace context set by the agents.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use weft_e2e::vmzone::{bring_up, service_vip, ECHO_PORT, HTTP_PORT};
use weft_e2e::{client, echo_bin, wait};

const T: Duration = Duration::from_secs(30);

#[test]
fn tcp_connections_split_by_weight_across_services() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "payments", "orders"], "24h")?;
    let zone = &up.zone;
    let (web, payments, orders) = (0, 1, 2);
    let services = up.controller.inspect("services")?;
    let vip: std::net::IpAddr = service_vip(&services, "orders")
        .ok_or_else(|| anyhow::anyhow!("no VIP: {services:#}"))?
        .parse()?;
    let orders_echo = SocketAddr::new(vip, ECHO_PORT);
    let who = || {
        zone.vms[web]
            .host
            .enter(|| client::who(orders_echo, Duration::from_secs(5)))
    };
    // Before any TCPRoute: orders answers.
    let first = wait::until("orders' echo through the mesh", T, || {
        Ok(who().ok().filter(|m| *m == up.markers[orders]))
    })?;
    ensure!(first == up.markers[orders]);

    up.controller.apply(
        &zone.path().join("tcp-route.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: TCPRoute
metadata: { name: orders-split, mesh: default }
spec:
  targetRef: { kind: Service, name: web }
  to:
  - targetRef: { kind: Service, name: orders }
    rules:
    - default:
        backendRefs: [ { name: orders, weight: 1 }, { name: payments, weight: 3 } ]
",
    )?;
    wait::until("a connection to orders to reach payments", T, || {
        Ok(who().ok().filter(|m| *m == up.markers[payments]))
    })?;
    let (mut to_orders, mut to_payments) = (0, 0);
    for i in 0..60 {
        let m = who().map_err(|e| anyhow::anyhow!("connection {i}: {e:#}"))?;
        if m == up.markers[orders] {
            to_orders += 1;
        } else if m == up.markers[payments] {
            to_payments += 1;
        } else {
            anyhow::bail!("connection {i} answered by {m}");
        }
    }
    // 1:3 of 60 is 15:45; far tails of the binomial are allowed for.
    ensure!(
        (5..=27).contains(&to_orders) && to_orders + to_payments == 60,
        "a 1:3 split gave orders {to_orders}, payments {to_payments}"
    );
    // Whole echo still works through the routed connection.
    let data = client::payload("tcp-route", 64 * 1024);
    zone.vms[web]
        .host
        .enter(|| client::echo_roundtrip(orders_echo, &data, Duration::from_secs(10)))?;

    // Gone: connections go to orders again.
    up.controller
        .weftctl_ok(&["delete", "TCPRoute", "orders-split"])?;
    wait::until("the route to go", T, || {
        let all_orders = (0..8).all(|_| who().is_ok_and(|m| m == up.markers[orders]));
        Ok(all_orders.then_some(()))
    })?;

    // Trace from the zone, without a backend: headers are propagated, the
    // caller's trace kept from web's agent to orders' app.
    up.controller.apply(
        &zone.path().join("trace.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: Trace
metadata: { name: everyone, mesh: default }
spec:
  default: { sampling: 100 }
",
    )?;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let body = wait::until("orders' app to get web's trace", T, || {
        let out = zone.vms[web]
            .host
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-H",
                &format!("traceparent: 00-{trace_id}-b7ad6b7169203331-01"),
                &format!("http://orders.mesh:{HTTP_PORT}/traced"),
            ])
            .output()?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        // Until the Trace reaches web's agent, the app's own header passes
        // through untouched: wait for a new span id on the trace.
        Ok(
            (body.contains(&format!("header traceparent: 00-{trace_id}-"))
                && !body.contains("b7ad6b7169203331"))
            .then_some(body),
        )
    })?;
    ensure!(
        body.contains(&up.markers[orders]) && !body.contains("b7ad6b7169203331"),
        "a new span per hop: {body}"
    );
    Ok(())
}
