//! A whole VM zone: a zone controller and three VMs whose agents enrol with
//! bootstrap tokens, get their certificates and config from the controller,
//! and carry traffic between services called by DNS name through
//! transparent capture. Bad tokens are refused, each with its cause.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use serde_json::Value;
use weft_e2e::vmzone::{
    bring_up, service_vip, wait_curl, Running, VmZone, ECHO_PORT, HTTP_PORT, MESH,
};
use weft_e2e::zone::{agent_entry, Controller};
use weft_e2e::{client, echo_bin, wait};

const T: Duration = Duration::from_secs(30);

#[test]
fn enrolled_services_call_each_other_by_dns_name() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "payments", "orders"], "24h")?;
    let zone = &up.zone;
    // Every VM reaches every other service by its mesh names.
    for from in 0..3 {
        for to in (0..3).filter(|to| *to != from) {
            let service = &zone.vms[to].service;
            let marker = &up.markers[to];
            for name in [
                format!("{service}.default.mesh"),
                format!("{service}.mesh"),
                format!("{service}.default.default.mesh"),
            ] {
                let body = wait_curl(
                    zone,
                    from,
                    &format!("http://{name}:{HTTP_PORT}/hello"),
                    marker,
                )?;
                ensure!(body.contains("/hello"), "{body}");
            }
        }
    }
    // HTTP ports are served by the agents' L7 proxies on both sides.
    up.agents[0].wait_metric(
        "weft_http_requests_total",
        &[
            ("direction", "outbound"),
            ("destination", "default/payments"),
            ("status", "200"),
        ],
        3.0,
    )?;
    up.agents[1].wait_metric(
        "weft_http_requests_total",
        &[("direction", "inbound"), ("status", "200")],
        3.0,
    )?;
    // TCP through the virtual IP too, and the bytes went through tunnels.
    let services = up.controller.inspect("services")?;
    let vip: IpAddr = service_vip(&services, "payments")
        .ok_or_else(|| anyhow::anyhow!("no VIP for payments: {services:#}"))?
        .parse()?;
    let data = client::payload(&up.markers[1], 256 * 1024);
    zone.vms[0]
        .host
        .enter(|| client::echo_roundtrip(SocketAddr::new(vip, ECHO_PORT), &data, T))?;
    up.agents[0].wait_metric("weft_handshakes_total", &[("direction", "outbound")], 1.0)?;
    up.agents[1].wait_metric("weft_handshakes_total", &[("direction", "inbound")], 1.0)?;

    // An unknown mesh name is NXDOMAIN: curl fails to resolve it.
    let out = zone.curl(0, &format!("http://nosuch.default.mesh:{HTTP_PORT}/"))?;
    ensure!(!out.status.success(), "an unknown mesh name resolved");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("resolve"), "curl: {err}");

    // The inventory shows the agents, their workloads and acked config.
    let agents = up.controller.inspect("agents")?;
    for vm in &zone.vms {
        let a = agent_entry(&agents, &vm.workload)
            .ok_or_else(|| anyhow::anyhow!("{} missing: {agents:#}", vm.workload))?;
        let applied = a
            .get("appliedVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        ensure!(
            !applied.is_empty(),
            "{} acked no config: {a:#}",
            vm.workload
        );
    }
    let workloads = up.controller.inspect("workloads")?;
    ensure!(
        workloads.as_array().map(Vec::len) == Some(3),
        "{workloads:#}"
    );
    let table = up.controller.weftctl_ok(&["inspect", "agents"])?;
    for vm in &zone.vms {
        ensure!(
            table.contains(&vm.workload),
            "inspect agents table: {table}"
        );
    }
    // The zone's own metrics: three streams, enrolments, pushes acked.
    let metrics = up.controller.metrics()?;
    for (name, labels, at_least) in [
        ("weft_zone_config_streams", &[][..], 3.0),
        (
            "weft_zone_enrolments_total",
            &[("result", "enrolled")][..],
            3.0,
        ),
        (
            "weft_zone_config_answers_total",
            &[("answer", "ack")][..],
            3.0,
        ),
        ("weft_zone_config_ack_seconds_count", &[][..], 3.0),
        ("weft_zone_leader", &[][..], 1.0),
    ] {
        let value = metrics.sum(name, labels);
        ensure!(
            value >= at_least,
            "{name}{labels:?} is {value}, expected at least {at_least}:\n{}",
            metrics.dump("weft_zone")
        );
    }
    ensure!(
        metrics.sum("weft_zone_config_streams", &[]) == 3.0,
        "{}",
        metrics.dump("weft_zone")
    );
    Ok(())
}

/// Starts VM `i`'s agent with `secret` as its token (fresh state) and
/// returns its exit code and logs; it must not become ready.
fn refused(
    zone: &VmZone,
    controller: &Controller,
    i: usize,
    case: &str,
    secret: &str,
) -> Result<(i32, String)> {
    let mut token = zone.token_for(controller, i)?;
    token.secret = secret.to_owned();
    let mut spec = zone.agent_spec(i, controller, &token)?;
    let state = zone.path().join(format!("refused-{case}-state"));
    spec.set("controller.state_dir", state.to_string_lossy().as_ref());
    zone.agent_exits(i, &format!("refused-{case}"), &spec, T)
}

/// Host facts reach the zone at enrolment and again every
/// `controller.host_facts_period`, and `weftctl inspect agents` shows them.
#[test]
fn agents_report_host_facts_periodically() -> Result<()> {
    let zone = VmZone::new(echo_bin!(), &["web"])?;
    let controller = zone.start_controller("zone", &zone.sqlite_store("zone.db"))?;
    let mut up = Running::with_controller(zone, controller, "24h")?;
    up.enrol_with(0, None, |spec| {
        spec.set("controller.host_facts_period", "1s");
    })?;
    let workload = up.zone.vms[0].workload.clone();
    let facts = |agents: &Value| agent_entry(agents, &workload).map(|a| a["host"].clone());
    let first = up.controller.wait_inspect("agents", "host facts", T, |a| {
        facts(a).is_some_and(|h| h["agentRssBytes"].as_u64().unwrap_or(0) > 0)
    })?;
    let first = facts(&first).unwrap_or_default();
    for key in ["os", "kernel", "hostname"] {
        ensure!(
            first[key].as_str().is_some_and(|v| !v.is_empty()),
            "{key}: {first:#}"
        );
    }
    for key in ["cpus", "memoryBytes", "reportedAtUnix"] {
        ensure!(first[key].as_u64().unwrap_or(0) > 0, "{key}: {first:#}");
    }
    ensure!(first["agentCpuSeconds"].as_f64().is_some(), "{first:#}");
    // Reported again, not only at the stream's Hello.
    let reported = first["reportedAtUnix"].as_u64().unwrap_or(0);
    up.controller
        .wait_inspect("agents", "a later host-facts report", T, |a| {
            facts(a).is_some_and(|h| h["reportedAtUnix"].as_u64().unwrap_or(0) >= reported + 2)
        })?;
    let table = up.controller.weftctl_ok(&["inspect", "agents"])?;
    ensure!(
        table.contains("HOST") && table.contains(" s CPU"),
        "{table}"
    );
    Ok(())
}

#[test]
fn bad_tokens_are_refused_with_their_cause() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "payments"], "24h")?;
    let (zone, ctl) = (&up.zone, &up.controller);

    // Reused beyond its bound: VM 1's token was single use and is spent.
    let cases: Vec<(&str, String, &str)> = vec![
        ("reused", up.tokens[1].secret.clone(), "used"),
        ("unknown", "weft-bt1.nosuchid.0000".to_owned(), "unknown"),
        (
            "revoked",
            {
                let t = ctl.issue_token(MESH, &[&zone.vms[1].workload], "10m", 1)?;
                ctl.weftctl_ok(&["token", "revoke", &t.id])?;
                t.secret
            },
            "revoked",
        ),
        (
            "expired",
            {
                let t = ctl.issue_token(MESH, &[&zone.vms[1].workload], "1s", 1)?;
                // Waiting for the expiry is the point of this case.
                wait::until("the token to expire", T, || {
                    let list = ctl.weftctl_ok(&["token", "list", "-o", "json"])?;
                    let v: Value = serde_json::from_str(&list)?;
                    let expired = v["items"].as_array().into_iter().flatten().any(|tok| {
                        tok.get("id").and_then(Value::as_str) == Some(t.id.as_str())
                            && tok.get("expired").and_then(Value::as_bool) == Some(true)
                    });
                    Ok(expired.then_some(()))
                })?;
                t.secret
            },
            "expired",
        ),
        (
            "wrong-zone",
            {
                let east = zone.start_replica_in("east", &zone.sqlite_store("zone.db"), "east")?;
                let t = east.issue_token(MESH, &[&zone.vms[1].workload], "10m", 1)?;
                t.secret
            },
            "zone",
        ),
    ];
    for (case, secret, cause) in cases {
        let (code, logs) = refused(zone, ctl, 1, case, &secret)?;
        ensure!(code == 1, "{case}: exit {code}\n{logs}");
        ensure!(
            logs.contains("enrolment refused") && logs.to_lowercase().contains(cause),
            "{case}: the logs do not say `enrolment refused` and `{cause}`:\n{logs}"
        );
    }
    // A good token, but the name of an agent that is online (a cloned
    // host): refused, and the agent in place keeps its name.
    let fresh = ctl.issue_token(MESH, &[&zone.vms[1].workload], "10m", 1)?;
    let (code, logs) = refused(zone, ctl, 1, "name-in-use", &fresh.secret)?;
    ensure!(
        code == 1
            && logs.contains("enrolment refused")
            && logs.contains("in use by an online agent"),
        "name in use: exit {code}\n{logs}"
    );
    // A workload outside the token's scope is refused too.
    let other = ctl.issue_token(MESH, &["somebody-else"], "10m", 1)?;
    let (code, logs) = refused(zone, ctl, 1, "scope", &other.secret)?;
    ensure!(
        code == 1 && logs.contains("enrolment refused"),
        "scope: exit {code}\n{logs}"
    );
    let agents = ctl.inspect("agents")?;
    if agents.as_array().map(Vec::len) != Some(2) {
        bail!("refused agents were registered: {agents:#}");
    }
    Ok(())
}
