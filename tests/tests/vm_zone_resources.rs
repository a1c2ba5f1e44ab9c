//! Invalid resources applied to a running VM zone with `weftctl` are
//! refused with the field path, and nothing changes: not the store, not the
//! config the agents run.

use anyhow::{ensure, Result};
use serde_json::Value;
use weft_e2e::agent::describe;
use weft_e2e::echo_bin;
use weft_e2e::vmzone::bring_up;
use weft_e2e::zone::agent_entry;

const BAD: &[(&str, &str, &str)] = &[
    (
        "bad YAML",
        "apiVersion: weft.io/v1alpha1\nkind: Workload\nmetadata: {name: x\n",
        "document 1",
    ),
    (
        "unknown kind",
        "apiVersion: weft.io/v1alpha1\nkind: Gadget\nmetadata:\n  name: g\nspec: {}\n",
        "kind",
    ),
    (
        "unknown field",
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: default\n\
         spec:\n  trustDomain: e2e.weft\n  colour: red\n",
        "spec.colour",
    ),
    (
        "wrong type",
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: default\n\
         spec:\n  trustDomain: [1, 2]\n",
        "spec.trustDomain",
    ),
    (
        "dangling reference",
        "apiVersion: weft.io/v1alpha1\nkind: Workload\nmetadata:\n  name: stray-1\n  \
         mesh: nowhere\n  namespace: default\nspec:\n  address: 10.210.1.99\n  service: stray\n",
        "metadata.mesh",
    ),
    (
        "bad port in a valid file's second document",
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: other\nspec:\n  \
         trustDomain: other.weft\n---\napiVersion: weft.io/v1alpha1\nkind: Workload\n\
         metadata:\n  name: stray-2\n  mesh: other\n  namespace: default\nspec:\n  \
         address: 10.210.1.98\n  service: stray\n  ports:\n  - port: 70000\n",
        "spec.ports[0].port",
    ),
];

/// Every resource of the zone, as `weftctl get -o json` prints them.
fn everything(up: &weft_e2e::vmzone::Running) -> Result<Vec<String>> {
    ["mesh", "workload", "service"]
        .iter()
        .map(|kind| up.controller.weftctl_ok(&["get", kind, "-o", "json"]))
        .collect()
}

fn applied_versions(up: &weft_e2e::vmzone::Running) -> Result<Vec<String>> {
    let agents = up.controller.inspect("agents")?;
    Ok(up
        .zone
        .vms
        .iter()
        .map(|vm| {
            agent_entry(&agents, &vm.workload)
                .and_then(|a| a.get("appliedVersion"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        })
        .collect())
}

#[test]
fn invalid_resources_are_refused_by_path_and_change_nothing() -> Result<()> {
    let up = bring_up(echo_bin!(), &["web", "payments"], "24h")?;
    let store_before = everything(&up)?;
    let views_before = applied_versions(&up)?;
    ensure!(
        views_before.iter().all(|v| !v.is_empty()),
        "{views_before:?}"
    );

    for (i, (case, yaml, path)) in BAD.iter().enumerate() {
        let file = up.zone.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, yaml)?;
        let out = up
            .controller
            .weftctl(&["apply", "-f", &file.to_string_lossy()])?;
        ensure!(!out.status.success(), "{case}: applied\n{}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains(path),
            "{case}: the error does not name `{path}`:\n{err}"
        );
    }
    // Nothing changed: same resources (with the same versions), and the
    // agents still run the config they had acked.
    ensure!(everything(&up)? == store_before, "the store changed");
    // A valid apply of an unrelated mesh after the refusals: the agents'
    // views do not depend on it, so their versions must not move.
    let file = up.zone.path().join("unrelated.yaml");
    up.controller.apply(
        &file,
        "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: unrelated\nspec:\n  trustDomain: unrelated.weft\n",
    )?;
    ensure!(
        applied_versions(&up)? == views_before,
        "the agents' config changed"
    );
    Ok(())
}
