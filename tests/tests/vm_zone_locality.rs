//! Locality-aware load balancing through a real VM zone: `web` runs in
//! topology zone `a`; `payments` has one instance in `a` and two in `b`
//! (labels `topology.kubernetes.io/{region,zone}` on the workloads, which
//! the agents register and the zone passes on with each endpoint).
//! Without a LoadBalancing, calls spread over all three; a LoadBalancing
//! keeps every call in `a`; `localityAware: false` spreads them again;
//! when the `a` instance's agent dies, calls fail over to `b` with no more
//! failures than the CircuitBreaker's outlier detection allows. Real
//! controller, real agents, DNS names through transparent capture.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::json;
use weft_e2e::vmzone::{wait_curl, Running, VmZone, HTTP_PORT};
use weft_e2e::zone::agent_entry;
use weft_e2e::{echo_bin, wait};

const T: Duration = Duration::from_secs(30);

const WEB: usize = 0;
const LOCAL: usize = 1;
const REMOTE: [usize; 2] = [2, 3];

fn url() -> String {
    format!("http://payments.mesh:{HTTP_PORT}/public")
}

/// Which instance answered each of `n` calls from `web` (its marker's
/// index; `None` for a failed call).
fn answers(up: &Running, n: usize) -> Result<Vec<Option<usize>>> {
    (0..n)
        .map(|_| {
            let (status, body) = up.zone.curl_status(WEB, &url())?;
            Ok((status == 200)
                .then(|| up.markers.iter().position(|m| body.contains(m.as_str())))
                .flatten())
        })
        .collect()
}

fn load_balancing(up: &Running, locality_aware: Option<bool>) -> Result<()> {
    let aware = locality_aware.map_or(String::new(), |a| format!("\n      localityAware: {a}"));
    up.controller.apply(
        &up.zone.path().join("lb.yaml"),
        &format!(
            "\
apiVersion: weft.io/v1alpha1
kind: LoadBalancing
metadata: {{ name: payments-lb, mesh: default }}
spec:
  to:
  - targetRef: {{ kind: Service, name: payments }}
    default:
      algorithm: {{ type: RoundRobin }}{aware}
"
        ),
    )?;
    Ok(())
}

/// Waits until `n` calls in a row all reach `want`'s instances, then
/// checks `n` more do too.
fn wait_only(up: &Running, what: &str, want: &[usize], n: usize) -> Result<()> {
    let only = |got: &[Option<usize>]| got.iter().all(|a| a.is_some_and(|i| want.contains(&i)));
    wait::until(what, T, || Ok(only(&answers(up, n)?).then_some(())))?;
    let got = answers(up, n)?;
    ensure!(only(&got), "{what}: then calls went to {got:?}");
    Ok(())
}

#[test]
fn locality_aware_load_balancing_prefers_the_callers_zone_and_fails_over() -> Result<()> {
    let services = ["web", "payments", "payments", "payments"];
    let zones = ["a", "a", "b", "b"];
    let zone = VmZone::new(echo_bin!(), &services)?;
    let controller = zone.start_controller("zone", &zone.sqlite_store("zone.db"))?;
    let mut up = Running::with_controller(zone, controller, "24h")?;
    for (i, z) in zones.iter().enumerate() {
        up.enrol_with(i, None, |spec| {
            spec.set(
                "workload.labels",
                json!({
                    "topology.kubernetes.io/region": "eu",
                    "topology.kubernetes.io/zone": z,
                }),
            );
        })?;
    }
    up.wait_converged(&up.controller)?;
    // The zone knows where each workload runs.
    let workloads = up.controller.inspect("workloads")?;
    for (vm, z) in up.zone.vms.iter().zip(zones) {
        let locality = agent_entry(&workloads, &vm.workload).and_then(|w| w.get("locality"));
        ensure!(
            locality.and_then(|l| l.as_str()) == Some(&format!("eu/{z}")),
            "inspect workloads shows {} at {locality:?}",
            vm.workload
        );
    }

    // No LoadBalancing: every instance serves web, whatever its zone.
    for i in [LOCAL, REMOTE[0], REMOTE[1]] {
        wait_curl(&up.zone, WEB, &url(), &up.markers[i])?;
    }

    // A LoadBalancing (localityAware by default): only the instance in
    // web's zone.
    load_balancing(&up, None)?;
    wait_only(&up, "every call to stay in zone a", &[LOCAL], 20)?;

    // localityAware: false spreads over every zone again.
    load_balancing(&up, Some(false))?;
    wait::until("calls to spread over both zones", T, || {
        let got: BTreeSet<Option<usize>> = answers(&up, 12)?.into_iter().collect();
        Ok((got == BTreeSet::from([Some(LOCAL), Some(REMOTE[0]), Some(REMOTE[1])])).then_some(()))
    })?;

    // Back to locality-aware, with outlier detection bounding the failures
    // a dead local instance may cause before it is ejected.
    up.controller.apply(
        &up.zone.path().join("outliers.yaml"),
        "\
apiVersion: weft.io/v1alpha1
kind: CircuitBreaker
metadata: { name: payments-outliers, mesh: default }
spec:
  to:
  - targetRef: { kind: Service, name: payments }
    default:
      outlierDetection:
        consecutive5xx: 2
        baseEjectionTime: 60s
        maxEjectionPercent: 50
",
    )?;
    load_balancing(&up, Some(true))?;
    wait_only(&up, "every call to stay in zone a again", &[LOCAL], 20)?;

    // The local instance's agent dies: calls fail over to zone b, both of
    // its instances, with at most outlier detection's 2 failures.
    up.agents[LOCAL].proc.kill();
    let mut failures = 0;
    let mut calls = 0;
    wait::until("calls to fail over to zone b", T, || {
        let got = answers(&up, 1)?;
        calls += 1;
        match got[0] {
            None => {
                failures += 1;
                Ok(None)
            }
            Some(i) => Ok(REMOTE.contains(&i).then_some(())),
        }
    })?;
    ensure!(
        failures <= 2,
        "{failures} of {calls} calls failed during the failover; outlier detection allows 2"
    );
    let got = answers(&up, 20)?;
    let seen: BTreeSet<Option<usize>> = got.iter().copied().collect();
    ensure!(
        seen == BTreeSet::from([Some(REMOTE[0]), Some(REMOTE[1])]),
        "after the failover calls went to {got:?}, not to both of zone b's instances"
    );
    Ok(())
}
