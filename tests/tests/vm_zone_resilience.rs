//! A VM zone under stress: certificates that rotate every few seconds under
//! continuous traffic, a controller killed mid-traffic (and an agent
//! restarted while it is away), and two controller replicas on one real
//! PostgreSQL server whose leader is killed.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::{json, Value};
use weft_e2e::vmzone::{bring_up, service_vip, wait_curl, Running, VmZone, ECHO_PORT, HTTP_PORT};
use weft_e2e::zone::Controller;
use weft_e2e::{echo_bin, traffic, wait};

const T: Duration = Duration::from_secs(30);

fn vip_of(controller: &Controller, service: &str) -> Result<IpAddr> {
    let services = controller.inspect("services")?;
    service_vip(&services, service)
        .ok_or_else(|| anyhow!("no VIP for {service}: {services:#}"))?
        .parse()
        .context("the VIP is not an IP")
}

#[test]
fn certificates_rotate_under_traffic_without_a_failure() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "payments"], "30s")?;
    let vip = vip_of(&up.controller, "payments")?;
    let addr = SocketAddr::new(vip, ECHO_PORT);
    wait_curl(
        &up.zone,
        0,
        &format!("http://payments.mesh:{HTTP_PORT}/"),
        &up.markers[1],
    )?;
    let renewed =
        |i: usize| up.agents[i].metric("weft_certificate_renewals_total", &[("result", "ok")]);
    let before = (renewed(0)?, renewed(1)?);

    // 75 s covers at least two renewals of a 30 s certificate at 50-80%.
    let stop = Instant::now() + Duration::from_secs(75);
    let host = &up.zone.vms[0].host;
    let marker = up.markers[1].clone();
    let steady = host.spawn(move || traffic::long_lived(addr, T, |_| Instant::now() >= stop))?;
    let fresh = host.spawn(move || {
        let done = AtomicU64::new(0);
        let fresh = traffic::NewConnections {
            addr,
            timeout: T,
            marker,
            len: 16 * 1024,
            every: Duration::from_millis(200),
        };
        fresh.run(&done, |_| Instant::now() >= stop)
    })?;
    let round_trips = steady
        .join()
        .map_err(|_| anyhow!("long-lived thread panicked"))?
        .context("the long-lived connection broke")?;
    let connections = fresh
        .join()
        .map_err(|_| anyhow!("new-connection thread panicked"))?
        .context("a new connection failed")?;
    ensure!(
        round_trips > 100 && connections > 50,
        "{round_trips} round trips, {connections} connections"
    );

    for (i, was) in [(0, before.0), (1, before.1)] {
        let now = renewed(i)?;
        ensure!(
            now >= was + 2.0,
            "agent {i} renewed {now} times (was {was}):\n{}",
            up.agents[i].proc.logs()
        );
        ensure!(
            up.agents[i].metric("weft_certificate_renewals_total", &[("result", "failed")])? == 0.0,
            "agent {i} had a failed renewal"
        );
    }
    Ok(())
}

/// Stops agent `i` with SIGTERM and starts it again with the same config.
fn restart_agent(up: &mut Running, i: usize) -> Result<()> {
    up.agents[i].proc.signal(libc::SIGTERM)?;
    let status = up.agents[i].proc.wait_exit(T)?;
    ensure!(status.success(), "agent {i} exited {status} on SIGTERM");
    up.agents[i] = up.zone.start_agent(i, &up.specs[i])?;
    Ok(())
}

#[test]
fn controller_killed_traffic_continues_and_agents_reconverge() -> Result<()> {
    let zone = VmZone::new(echo_bin!(), &["web", "payments", "orders"])?;
    let mut up = Running::start(zone, "24h", 2)?;
    let payments = format!("http://payments.mesh:{HTTP_PORT}/");
    let web = format!("http://web.mesh:{HTTP_PORT}/");
    wait_curl(&up.zone, 0, &payments, &up.markers[1])?;

    // Continuous traffic while the controller dies.
    let vip = vip_of(&up.controller, "payments")?;
    let web_vip = vip_of(&up.controller, "web")?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (stop, done) = (stop.clone(), done.clone());
        let connections = traffic::NewConnections {
            addr: SocketAddr::new(vip, ECHO_PORT),
            timeout: T,
            marker: up.markers[1].clone(),
            len: 8 * 1024,
            every: Duration::from_millis(50),
        };
        // Bounded: at most 2000 connections even if nobody stops it.
        up.zone.vms[0]
            .host
            .spawn(move || connections.run(&done, |n| n >= 2000 || stop.load(Ordering::Acquire)))?
    };
    let at_kill = done.load(Ordering::Acquire);
    up.controller.kill();
    wait::until("20 more connections after the kill", T, || {
        Ok((done.load(Ordering::Acquire) >= at_kill + 20).then_some(()))
    })?;

    stop.store(true, Ordering::Release);
    traffic
        .join()
        .map_err(|_| anyhow!("traffic thread panicked"))?
        .context("traffic failed while the controller was away")?;

    // An agent restarted while the controller is down serves from its
    // persisted certificate and config, both ways.
    restart_agent(&mut up, 1)?;
    wait_curl(&up.zone, 0, &payments, &up.markers[1])?;
    wait_curl(&up.zone, 1, &web, &up.markers[0])?;

    // The controller comes back on the same store; agents reconnect, and a
    // change made now (a new service) reaches them.
    up.controller = up
        .zone
        .start_controller("zone-again", &up.zone.sqlite_store("zone.db"))?;
    up.wait_connected_to(&up.controller)?;
    up.wait_converged(&up.controller)?;
    // The restart and the agents' reconnections left the virtual IPs alone.
    ensure!(
        vip_of(&up.controller, "payments")? == vip,
        "payments' VIP changed"
    );
    ensure!(
        vip_of(&up.controller, "web")? == web_vip,
        "web's VIP changed"
    );
    up.enrol(2)?;
    up.wait_converged(&up.controller)?;
    let orders = format!("http://orders.mesh:{HTTP_PORT}/");
    wait_curl(&up.zone, 0, &orders, &up.markers[2])?;
    wait_curl(&up.zone, 1, &orders, &up.markers[2])?;
    Ok(())
}

/// Whether the controller says it is the leader (`GET /v1/zone`).
fn is_leader(controller: &Controller) -> Result<bool> {
    let zone = controller.get_json("/v1/zone")?;
    zone.get("leader")
        .and_then(Value::as_bool)
        .ok_or_else(|| anyhow!("/v1/zone has no leader field: {zone:#}"))
}

#[test]
fn replicas_on_postgres_fail_over_without_losing_anything() -> Result<()> {
    let zone = VmZone::new(echo_bin!(), &["web", "payments", "orders"])?;
    let pg = zone.start_postgres()?;
    let url = pg.url.clone();
    let a = zone.start_controller("zone-a", &url)?;
    let mut b = zone.start_replica("zone-b", &url)?;
    let leaders = wait::until("exactly one leader", T, || {
        let (la, lb) = (is_leader(&a)?, is_leader(&b)?);
        Ok((la != lb).then_some((la, lb)))
    })?;
    let a_leads = leaders.0;
    // Agents know both replicas; VM 0 prefers a, VM 1 prefers b.
    let mut up = Running::with_controller(zone, a, "24h")?;
    let (a_grpc, b_grpc) = (up.controller.grpc.to_string(), b.grpc.to_string());
    for i in 0..2 {
        let order = if i == 0 {
            [&a_grpc, &b_grpc]
        } else {
            [&b_grpc, &a_grpc]
        };
        up.enrol_with(i, None, |spec| {
            spec.set("controller.address", json!(order));
        })?;
    }
    up.wait_converged(&b)?;
    // Changes on one replica reach agents streaming from the other.
    wait_curl(
        &up.zone,
        0,
        &format!("http://payments.mesh:{HTTP_PORT}/"),
        &up.markers[1],
    )?;
    wait_curl(
        &up.zone,
        1,
        &format!("http://web.mesh:{HTTP_PORT}/"),
        &up.markers[0],
    )?;
    let before = b.get_json("/v1/resources/Service")?;
    let services = b.inspect("services")?;
    let vips: Vec<Option<String>> = ["web", "payments"]
        .iter()
        .map(|s| service_vip(&services, s))
        .collect();

    // Kill the leader; the other takes over, and nothing is lost.
    if a_leads {
        up.controller.kill();
    } else {
        b.kill();
    }
    let survivor: &Controller = if a_leads { &b } else { &up.controller };
    wait::until("the survivor to lead", T, || {
        Ok(is_leader(survivor)?.then_some(()))
    })?;
    // Every agent streams from the survivor now (the killed replica's
    // agents reconnected), not merely "seen lately".
    up.wait_connected_to(survivor)?;
    up.wait_converged(survivor)?;
    let after = survivor.get_json("/v1/resources/Service")?;
    ensure!(
        before == after,
        "services changed across the failover:\n{before:#}\n{after:#}"
    );
    let services = survivor.inspect("services")?;
    for (s, vip) in ["web", "payments"].iter().zip(vips) {
        ensure!(service_vip(&services, s) == vip, "{s}'s VIP changed");
    }
    let survivor_grpc = survivor.grpc.to_string();
    wait_curl(
        &up.zone,
        0,
        &format!("http://payments.mesh:{HTTP_PORT}/"),
        &up.markers[1],
    )?;

    // The new leader allocates for a service enrolled after the failover.
    let via = if a_leads { Some(&b) } else { None };
    up.enrol_with(2, via, |spec| {
        spec.set("controller.address", json!([survivor_grpc]));
    })?;
    let survivor: &Controller = if a_leads { &b } else { &up.controller };
    up.wait_converged(survivor)?;
    wait_curl(
        &up.zone,
        0,
        &format!("http://orders.mesh:{HTTP_PORT}/"),
        &up.markers[2],
    )?;
    wait_curl(
        &up.zone,
        1,
        &format!("http://orders.mesh:{HTTP_PORT}/"),
        &up.markers[2],
    )?;
    Ok(())
}
