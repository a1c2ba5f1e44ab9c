//! ExternalServices in a VM zone: a workload whose agent refuses unknown
//! destinations reaches a server outside the mesh only once an
//! ExternalService declares it, by its mesh name, by the host's address,
//! or by a host name the agent resolves; the agent dials the host itself,
//! names it in the `Host` header, applies the policies that name the
//! ExternalService, and counts the calls. Deleting it closes the way again.
//! Real controller and agent, DNS names through transparent capture.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use weft_e2e::apps::{start_app, AppAddrs};
use weft_e2e::vmzone::{Running, VmZone, ECHO_PORT, HTTP_PORT};
use weft_e2e::{client, echo_bin, unique_marker, wait};

const T: Duration = Duration::from_secs(30);
/// Where the web VM's own loopback server listens (HTTP; echo one below).
const LOCAL_HTTP: u16 = 9099;

#[test]
fn external_services_open_the_way_out_under_their_policies() -> Result<()> {
    let zone = VmZone::new(echo_bin!(), &["web", "outside"])?;
    let controller = zone.start_controller("zone", &zone.sqlite_store("zone.db"))?;
    let mut up = Running::with_controller(zone, controller, "24h")?;
    up.enrol_with(0, None, |spec| {
        spec.set("outbound.unknown_destination", "deny");
    })?;
    up.wait_converged(&up.controller)?;
    scenario(&up).map_err(|e| {
        anyhow!(
            "{e:#}\nweb's agent: {}",
            weft_e2e::process::tail(&up.agents[0].proc.logs(), 40)
        )
    })
}

fn scenario(up: &Running) -> Result<()> {
    let zone = &up.zone;
    let web = 0;
    // Not in the mesh: no agent on the outside VM.
    let outside_marker = unique_marker("outside");
    let _outside = zone.start_app(1, &outside_marker)?;
    let outside_ip = zone.vms[1].ip;
    let direct = format!("http://{outside_ip}:{HTTP_PORT}/direct");

    // The agent refuses what the mesh does not know.
    let (status, body) = zone.curl_status(web, &direct)?;
    ensure!(
        status == 0,
        "outside reached before any ExternalService: {status} {body}"
    );

    let local_marker = unique_marker("local");
    let _local = start_app(
        &zone.vms[web].host,
        &zone.echo_bin(),
        zone.path(),
        "web-local-app",
        AppAddrs {
            echo: SocketAddr::from((Ipv4Addr::LOCALHOST, LOCAL_HTTP - 1)),
            http: SocketAddr::from((Ipv4Addr::LOCALHOST, LOCAL_HTTP)),
        },
        &local_marker,
    )?;
    up.controller.apply(
        &zone.path().join("external.yaml"),
        &format!(
            "\
apiVersion: weft.io/v1alpha1
kind: ExternalService
metadata: {{ name: ledger, mesh: default, namespace: default }}
spec: {{ host: '{outside_ip}', port: {HTTP_PORT}, protocol: http }}
---
apiVersion: weft.io/v1alpha1
kind: ExternalService
metadata: {{ name: vault, mesh: default, namespace: default }}
spec: {{ host: '{outside_ip}', port: {ECHO_PORT} }}
---
apiVersion: weft.io/v1alpha1
kind: ExternalService
metadata: {{ name: sidecar-cache, mesh: default, namespace: default }}
spec: {{ host: localhost, port: {LOCAL_HTTP}, protocol: http }}
"
        ),
    )?;

    // By its mesh name: the agent dials the host and names it.
    let by_name = wait::until("ledger.mesh to answer", T, || {
        let (status, body) =
            zone.curl_status(web, &format!("http://ledger.mesh:{HTTP_PORT}/hi"))?;
        Ok((status == 200 && body.contains(&outside_marker)).then_some(body))
    })?;
    let host_header = format!("header host: {outside_ip}:{HTTP_PORT}");
    ensure!(
        by_name.to_ascii_lowercase().contains(&host_header),
        "the request did not name the external host ({host_header}): {by_name}"
    );
    // Declared by address: a call straight to it goes through too.
    let (status, body) = zone.curl_status(web, &direct)?;
    ensure!(
        status == 200 && body.contains(&outside_marker),
        "straight to the declared address: {status} {body}"
    );
    // A host name, resolved by the agent (here to the VM's own loopback).
    // The leader gives each its address in turn: the agent may learn of
    // this one a little later.
    let cache = format!("http://sidecar-cache.default.mesh:{LOCAL_HTTP}/cache");
    let body = wait::until("sidecar-cache.mesh to answer", T, || {
        let (status, body) = zone.curl_status(web, &cache)?;
        Ok((status == 200 && body.contains(&local_marker)).then_some(body))
    })?;
    ensure!(
        body.to_ascii_lowercase()
            .contains(&format!("header host: localhost:{LOCAL_HTTP}")),
        "by a host name the agent resolves: {body}"
    );
    // TCP: bytes both ways, intact, at the virtual IP the zone allocated.
    let vault_vip = virtual_ip(up, "vault")?;
    let data = client::payload("vault", 64 * 1024);
    wait::until("vault to echo", T, || {
        let echoed = zone.vms[web].host.enter(|| {
            client::echo_roundtrip(
                SocketAddr::new(vault_vip, ECHO_PORT),
                &data,
                Duration::from_secs(10),
            )
        });
        Ok(echoed.is_ok().then_some(()))
    })?;

    // The policies that name the ExternalService apply to it alone.
    up.controller.apply(
        &zone.path().join("fault.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: FaultInjection
metadata: { name: ledger-teapot, mesh: default }
spec:
  to:
  - targetRef: { kind: ExternalService, name: ledger, namespace: default }
    default: { http: [ { abort: { httpStatus: 418, percentage: 100 } } ] }
",
    )?;
    wait::until("the fault on ledger", T, || {
        let (status, _) = zone.curl_status(web, &format!("http://ledger.mesh:{HTTP_PORT}/x"))?;
        Ok((status == 418).then_some(()))
    })?;
    let (status, body) = zone.curl_status(
        web,
        &format!("http://sidecar-cache.default.mesh:{LOCAL_HTTP}/untouched"),
    )?;
    ensure!(
        status == 200 && body.contains(&local_marker),
        "another ExternalService under the fault: {status} {body}"
    );
    up.agents[web].wait_metric(
        "weft_http_requests_total",
        &[
            ("direction", "outbound"),
            ("destination", "external:default/ledger"),
            ("status", "418"),
        ],
        1.0,
    )?;
    up.agents[web].wait_metric(
        "weft_connections_opened_total",
        &[("destination_identity", "external:default/vault")],
        1.0,
    )?;

    // Deleted: its names and addresses are unknown again.
    up.controller
        .weftctl_ok(&["delete", "ExternalService", "ledger", "-n", "default"])?;
    wait::until("ledger to be refused again", T, || {
        let (status, _) = zone.curl_status(web, &direct)?;
        Ok((status == 0).then_some(()))
    })?;
    let (status, body) = zone.curl_status(web, &format!("http://ledger.mesh:{HTTP_PORT}/gone"))?;
    ensure!(
        status == 0,
        "a deleted ExternalService answered: {status} {body}"
    );
    Ok(())
}

/// The virtual IP the zone gave ExternalService `name` (namespace default).
fn virtual_ip(up: &Running, name: &str) -> Result<IpAddr> {
    wait::until(&format!("a virtual IP for {name}"), T, || {
        let out = up.controller.weftctl_ok(&[
            "get",
            "ExternalService",
            name,
            "-n",
            "default",
            "-o",
            "json",
        ])?;
        let value: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("weftctl get: {out}"))?;
        // The API's answer wraps the resource: look for its status.
        let vip = find(&value, "virtualIp")
            .and_then(serde_json::Value::as_str)
            .map(str::parse::<IpAddr>)
            .transpose()
            .map_err(|e| anyhow!("{e}: {out}"))?;
        Ok(vip)
    })
}

fn find<'v>(value: &'v serde_json::Value, key: &str) -> Option<&'v serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|v| find(v, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|v| find(v, key)),
        _ => None,
    }
}
