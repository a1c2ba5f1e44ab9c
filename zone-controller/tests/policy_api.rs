//! Policies end to end against the real binary: a new mesh starts with
//! the `allow-all` TrafficPermission, agents receive their workloads'
//! compiled policies in `ConfigUpdate.policy_json`, a policy change makes
//! a new version, and `inspect` explains which policies apply.

mod common;

use common::agent::{enroll_with_token, hello, workload, ConfigStream, ZoneWithMesh};
use common::MESH;
use weft_api::policy::compiled::WorkloadPolicy;
use weft_api::policy::conf::Action;
use weft_api::proto::agent::v1 as pb;

fn policies_of(update: &pb::ConfigUpdate) -> Vec<WorkloadPolicy> {
    serde_json::from_str(&update.policy_json).expect("policy_json is a list of WorkloadPolicy")
}

/// The permissions of the only workload, as (policy, callers, action).
fn permissions(update: &pb::ConfigUpdate) -> Vec<(String, Vec<String>, Action)> {
    let policies = policies_of(update);
    assert_eq!(policies.len(), 1, "{policies:?}");
    policies[0]
        .inbound
        .permissions
        .iter()
        .map(|r| {
            (
                r.policy.clone(),
                r.from.iter().map(ToString::to_string).collect(),
                r.action,
            )
        })
        .collect()
}

const DENY_BATCH: &str = "\
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata:
  name: no-batch
spec:
  targetRef:
    kind: Service
    name: web
  rules:
  - from:
      kind: SpiffeIdPrefix
      value: spiffe://weft.test/ns/batch/
    default:
      action: Deny
---
apiVersion: weft.io/v1alpha1
kind: Timeout
metadata:
  name: web-timeouts
spec:
  targetRef:
    kind: Labels
    labels:
      weft.io/agent: vm-1
  to:
  - targetRef:
      kind: Mesh
    default:
      connectTimeout: 2s
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_reach_agents_and_changes_make_new_versions() {
    let setup = ZoneWithMesh::start(MESH).await;

    // The new mesh got its allow-all, in the same apply.
    let listed = setup
        .zone
        .ctl(&["get", "trafficpermissions", "--mesh", "default"], "")
        .await
        .expect("get trafficpermissions");
    assert!(listed.contains("allow-all"), "{listed}");

    let web1 = workload("web-1", "web", "10.0.0.1", 8080);
    let secret = setup.zone.issue_token(&["--workload-prefix", "web-"]).await;
    let (_, identity) = enroll_with_token(
        setup.zone.grpc,
        &setup.pinned,
        &secret,
        "vm-1",
        vec![web1.clone()],
    )
    .await;
    let mut stream = ConfigStream::open(
        setup.zone.grpc,
        &setup.pinned,
        &identity,
        hello("vm-1", vec![web1]),
    )
    .await;
    let first = stream.until_acked(|u| !u.policy_json.is_empty()).await;
    assert_eq!(
        permissions(&first),
        [(
            "allow-all".to_owned(),
            vec!["spiffe://weft.test/*".to_owned()],
            Action::Allow
        )]
    );
    assert_eq!(policies_of(&first)[0].workload, "web-1");
    // Agents that predate policies still get the allow list.
    assert_eq!(first.inbound[0].allow, ["spiffe://weft.test/*"]);

    setup
        .zone
        .ctl(&["apply", "-f", "-"], DENY_BATCH)
        .await
        .expect("apply the policies");
    let changed = stream.until_acked(|u| permissions(u).len() == 2).await;
    assert_ne!(changed.version, first.version);
    assert_eq!(
        permissions(&changed)[1],
        (
            "no-batch".to_owned(),
            vec!["spiffe://weft.test/ns/batch/*".to_owned()],
            Action::Deny
        )
    );
    let compiled = &policies_of(&changed)[0];
    assert_eq!(
        compiled
            .outbound_defaults
            .timeout
            .connect_timeout
            .map(|d| d.to_string())
            .as_deref(),
        Some("2s")
    );

    // Inspect explains it: kind by kind, in merge order.
    let view = setup
        .zone
        .get_json("/v1/inspect/workloads/default/default/web-1/policies")
        .await;
    let listed: Vec<(String, String, u64)> = view["policies"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap_or_default().to_owned(),
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["order"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("TrafficPermission".to_owned(), "allow-all".to_owned(), 1),
            ("TrafficPermission".to_owned(), "no-batch".to_owned(), 2),
            ("Timeout".to_owned(), "web-timeouts".to_owned(), 1),
        ]
    );
    let compiled_view: WorkloadPolicy =
        serde_json::from_value(view["compiled"].clone()).expect("the compiled policy");
    assert_eq!(&compiled_view, compiled);

    // The same through weftctl.
    let table = setup
        .zone
        .ctl(&["inspect", "policies", "--workload", "default/web-1"], "")
        .await
        .expect("inspect policies");
    assert!(table.contains("no-batch"), "{table}");
    assert!(table.contains("Service default/web"), "{table}");

    // Deleting a policy is a change too.
    setup
        .zone
        .ctl(
            &[
                "delete",
                "trafficpermission",
                "no-batch",
                "--mesh",
                "default",
            ],
            "",
        )
        .await
        .expect("delete the policy");
    let back = stream.until_acked(|u| permissions(u).len() == 1).await;
    assert_eq!(permissions(&back), permissions(&first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_new_mesh_gets_allow_all_and_its_own_wins() {
    let setup = ZoneWithMesh::start(MESH).await;
    let zone = &setup.zone;
    zone.ctl(
        &[
            "delete",
            "trafficpermission",
            "allow-all",
            "--mesh",
            "default",
        ],
        "",
    )
    .await
    .expect("delete allow-all");
    // Applying the existing mesh again does not bring it back.
    zone.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply the mesh again");
    let listed = zone
        .ctl(&["get", "trafficpermissions", "--mesh", "default"], "")
        .await
        .expect("get");
    assert!(!listed.contains("allow-all"), "{listed}");

    // A new mesh applied with its own allow-all keeps it as written.
    let own = "\
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: strict
spec:
  trustDomain: strict.test
---
apiVersion: weft.io/v1alpha1
kind: TrafficPermission
metadata:
  name: allow-all
  mesh: strict
spec:
  rules:
  - from:
      kind: SpiffeIdPrefix
      value: spiffe://strict.test/ns/front/
    default:
      action: Allow
";
    let applied = zone.ctl(&["apply", "-f", "-"], own).await.expect("apply");
    assert_eq!(applied.matches("TrafficPermission").count(), 1, "{applied}");
    let stored = zone
        .get_json("/v1/resources/trafficpermissions/allow-all?mesh=strict")
        .await;
    assert_eq!(
        stored["resource"]["spec"]["rules"][0]["from"]["kind"],
        "SpiffeIdPrefix"
    );

    // A mesh is deleted only once its policies are.
    let refused = zone.ctl(&["delete", "mesh", "strict"], "").await;
    let message = refused
        .expect_err("the mesh still holds a policy")
        .to_string();
    assert!(message.contains("1 TrafficPermission"), "{message}");
}
