//! The resource API end to end: the real `weft-zone` binary on a temporary
//! SQLite file, driven through `weftctl`'s library (the same code as the
//! CLI binary).

use std::path::PathBuf;

use weft_api::Resource;
use weftctl::{Error, Problem};

mod common;

use common::Zone;

/// Resource-API helpers on the shared test controller.
trait ResourceApi {
    async fn apply(&self, yaml: &str) -> Result<String, Error>;
    async fn refused(&self, yaml: &str) -> Vec<Problem>;
    async fn get(&self, args: &[&str]) -> Option<(u64, Resource)>;
}

impl ResourceApi for Zone {
    async fn apply(&self, yaml: &str) -> Result<String, Error> {
        self.ctl(&["apply", "-f", "-"], yaml).await
    }

    async fn refused(&self, yaml: &str) -> Vec<Problem> {
        match self.apply(yaml).await {
            Err(Error::Refused { problems }) => problems,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// `get -o json` of one resource: its version and the resource.
    async fn get(&self, args: &[&str]) -> Option<(u64, Resource)> {
        let mut argv = vec!["get"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["-o", "json"]);
        match self.ctl(&argv, "").await {
            Ok(json) => {
                let item: weftctl::Item = serde_json::from_str(&json).expect("an item");
                Some((item.version, item.resource))
            }
            Err(Error::Api { status, .. }) if status == http::StatusCode::NOT_FOUND => None,
            Err(other) => panic!("get {args:?} failed: {other}"),
        }
    }
}

fn db_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("zone.db")
}

const MESH_AND_WORKLOAD: &str = "\
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: prod
spec:
  trustDomain: prod.example
---
apiVersion: weft.io/v1alpha1
kind: Workload
metadata:
  name: payments-1
  mesh: prod
  namespace: payments
spec:
  address: 10.0.1.5
  service: payments
  serviceAccount: payments-api
  ports:
  - port: 8080
    protocol: http
";

/// Good Mesh change and a new Workload, then a bad Workload: none of it may
/// be written.
const ONE_BAD_AMONG_GOOD: &str = "\
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: prod
spec:
  trustDomain: changed.example
---
apiVersion: weft.io/v1alpha1
kind: Workload
metadata:
  name: payments-2
  mesh: prod
  namespace: payments
spec:
  address: 10.0.1.6
  service: payments
  serviceAccount: payments-api
  ports:
  - port: 8080
---
apiVersion: weft.io/v1alpha1
kind: Workload
metadata:
  name: payments-3
  mesh: prod
  namespace: payments
spec:
  address: 10.0.1.7
  service: payments
  serviceAccount: payments-api
  ports:
  - port: 8080
  - port: 70000
";

fn trust_domain(resource: &Resource) -> &str {
    match resource {
        Resource::Mesh(mesh) => &mesh.spec.trust_domain,
        other => panic!("expected a Mesh, got {other:?}"),
    }
}

#[tokio::test]
async fn apply_get_refuse_delete_and_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = db_in(&dir);
    let zone = Zone::start(&db).await;

    let out = zone.apply(MESH_AND_WORKLOAD).await.expect("apply");
    assert!(out.contains("Mesh prod created (version 1)"), "{out}");
    assert!(
        out.contains("Workload prod/payments/payments-1 created (version 1)"),
        "{out}"
    );
    let (version, mesh) = zone.get(&["mesh", "prod"]).await.expect("mesh exists");
    assert_eq!(version, 1);
    assert_eq!(trust_domain(&mesh), "prod.example");
    let (version, workload) = zone
        .get(&["workload", "payments-1", "-m", "prod", "-n", "payments"])
        .await
        .expect("workload exists");
    assert_eq!((version, workload.name()), (1, "payments-1"));

    // Re-applying the same file moves versions on.
    let out = zone.apply(MESH_AND_WORKLOAD).await.expect("re-apply");
    assert!(out.contains("Mesh prod configured (version 2)"), "{out}");
    let (version, _) = zone.get(&["mesh", "prod"]).await.expect("mesh exists");
    assert_eq!(version, 2);

    // One bad document among good ones: refused, naming it; nothing written.
    let problems = zone.refused(ONE_BAD_AMONG_GOOD).await;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].document, 3);
    assert_eq!(problems[0].path, "spec.ports[1].port");
    let bad_line = ONE_BAD_AMONG_GOOD
        .lines()
        .position(|l| l.contains("70000"))
        .map(|i| i + 1);
    assert_eq!(problems[0].line, bad_line);
    assert!(
        problems[0]
            .to_string()
            .starts_with("document 3, spec.ports[1].port: "),
        "{}",
        problems[0]
    );
    let (version, mesh) = zone.get(&["mesh", "prod"]).await.expect("mesh exists");
    assert_eq!((version, trust_domain(&mesh)), (2, "prod.example"));
    assert!(zone
        .get(&["workload", "payments-2", "-m", "prod"])
        .await
        .is_none());

    // The table lists what is there, with kind-specific columns.
    let table = zone
        .ctl(&["get", "workloads", "-m", "prod"], "")
        .await
        .expect("get table");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    for column in ["NAME", "MESH", "NAMESPACE", "VERSION", "ADDRESS", "SERVICE"] {
        assert!(lines[0].contains(column), "{table}");
    }
    assert!(lines[1].contains("payments-1") && lines[1].contains("10.0.1.5"));

    // A mesh that still holds resources is not deleted; a workload is.
    assert!(matches!(
        zone.ctl(&["delete", "mesh", "prod"], "").await,
        Err(Error::Api { status, .. }) if status == http::StatusCode::CONFLICT
    ));
    let out = zone
        .ctl(&["delete", "workload", "payments-1", "-m", "prod"], "")
        .await
        .expect("delete");
    assert_eq!(out.trim(), "Workload prod/payments/payments-1 deleted");
    assert!(zone
        .get(&["workload", "payments-1", "-m", "prod"])
        .await
        .is_none());
    assert!(matches!(
        zone.ctl(&["delete", "workload", "payments-1", "-m", "prod"], "").await,
        Err(Error::Api { status, .. }) if status == http::StatusCode::NOT_FOUND
    ));
    zone.apply(MESH_AND_WORKLOAD).await.expect("apply again");

    // A graceful stop, a restart on the same file: everything is still there.
    zone.stop();
    let zone = Zone::start(&db).await;
    let (version, _) = zone.get(&["mesh", "prod"]).await.expect("mesh survived");
    assert_eq!(version, 3);
    let (version, _) = zone
        .get(&["workload", "payments-1", "-m", "prod", "-n", "payments"])
        .await
        .expect("workload survived");
    assert_eq!(version, 1);
}

#[tokio::test]
async fn bad_input_is_named_by_document_and_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let zone = Zone::start(&db_in(&dir)).await;

    let problems = zone
        .refused(
            "\
apiVersion: weft.io/v1alpha1
kind: Gadget
metadata:
  name: g
spec: {}
---
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: prod
spec:
  trustDomain: prod.example
  colour: red
---
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: other
spec:
  trustDomain: [1, 2]
",
        )
        .await;
    let found: Vec<(usize, &str)> = problems
        .iter()
        .map(|p| (p.document, p.path.as_str()))
        .collect();
    assert_eq!(
        found,
        [(1, "kind"), (2, "spec.colour"), (3, "spec.trustDomain")],
        "{problems:#?}"
    );
    assert!(problems[0].reason.contains("Gadget"), "{problems:#?}");
    assert!(problems[0].reason.contains("Workload"), "{problems:#?}");

    // A dangling reference: the Workload's mesh exists neither in the store
    // nor in the request.
    let problems = zone
        .refused(&MESH_AND_WORKLOAD.replace("mesh: prod", "mesh: nowhere"))
        .await;
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(
        (problems[0].document, problems[0].path.as_str()),
        (2, "metadata.mesh")
    );
    assert!(zone.get(&["mesh", "prod"]).await.is_none());

    // An unknown kind in a URL is a clear 404.
    match zone.ctl(&["get", "gadgets"], "").await {
        Err(Error::Api { status, message }) => {
            assert_eq!(status, http::StatusCode::NOT_FOUND);
            assert!(message.contains("unknown kind"), "{message}");
        }
        other => panic!("expected a 404, got {other:?}"),
    }
    let out = zone.ctl(&["get", "meshes"], "").await.expect("empty list");
    assert_eq!(out.trim(), "No resources found.");
}
