//! Bootstrap tokens end to end: issued, listed and revoked through the real
//! `weft-zone` binary (via `weftctl`'s library and raw HTTP), then consumed
//! straight from the SQLite file once the controller has stopped.

mod common;

use bytes::Bytes;
use common::Zone;
use http::{Method, StatusCode};
use weft_store::{Store, TokenError};
use weftctl::{Client, Error, IssuedToken, Token};

const MESH: &str = "\
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: prod
spec:
  trustDomain: prod.example
";

async fn list(zone: &Zone) -> Vec<Token> {
    #[derive(serde::Deserialize)]
    struct Tokens {
        items: Vec<Token>,
    }
    let json = zone
        .ctl(&["token", "list", "-o", "json"], "")
        .await
        .expect("token list");
    let tokens: Tokens = serde_json::from_str(&json).expect("a token list");
    tokens.items
}

async fn issue(zone: &Zone, args: &[&str]) -> IssuedToken {
    let mut argv = vec!["token", "issue", "--mesh", "prod", "-o", "json"];
    argv.extend_from_slice(args);
    let json = zone.ctl(&argv, "").await.expect("token issue");
    serde_json::from_str(&json).expect("an issued token")
}

/// POSTs a raw issue request; the status and the JSON answer.
async fn post(zone: &Zone, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
    let client = Client::new(&zone.server).expect("valid server URL");
    let answer = client
        .request(
            Method::POST,
            "/v1/tokens",
            Some(("application/json", Bytes::from(body.to_string()))),
        )
        .await
        .expect("POST /v1/tokens");
    let json = serde_json::from_slice(&answer.body).expect("a JSON answer");
    (answer.status, json)
}

/// The `path`s of a 422 answer's errors.
fn paths(answer: &serde_json::Value) -> Vec<String> {
    answer["errors"]
        .as_array()
        .expect("an errors list")
        .iter()
        .map(|e| {
            assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()));
            e["path"].as_str().expect("a path").to_owned()
        })
        .collect()
}

#[tokio::test]
async fn issue_list_revoke_then_consume_from_the_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("zone.db");
    let zone = Zone::start(&db).await;
    zone.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply mesh");

    // Issued: 201 with the secret, bound to the controller's zone.
    let (status, raw) = post(
        &zone,
        serde_json::json!({"mesh": "prod", "workloads": {"prefix": "web-"}, "ttl": "2h"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{raw}");
    assert!(raw["secret"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(raw["expiresAt"].as_str().is_some());
    assert_eq!(raw["zone"], "default");
    assert_eq!(raw["maxUses"], 1);

    let revoked = issue(&zone, &["--workload", "web-1", "--workload", "web-2"]).await;
    let fresh = issue(&zone, &["--workload-prefix", "api-", "--max-uses", "1"]).await;
    assert_eq!(revoked.token.uses, 0);
    assert!(!revoked.token.revoked);

    // `-o secret` prints the secret and nothing else.
    let secret_only = zone
        .ctl(
            &[
                "token",
                "issue",
                "--mesh",
                "prod",
                "--workload",
                "db-1",
                "-o",
                "secret",
            ],
            "",
        )
        .await
        .expect("token issue -o secret");
    assert!(secret_only.starts_with("weft-bt1."), "{secret_only:?}");
    assert_eq!(secret_only.lines().count(), 1);

    // Listed without any secret.
    let client = Client::new(&zone.server).expect("valid server URL");
    let answer = client
        .request(Method::GET, "/v1/tokens", None)
        .await
        .expect("GET /v1/tokens");
    assert_eq!(answer.status, StatusCode::OK);
    let listed = String::from_utf8(answer.body.to_vec()).expect("UTF-8");
    for secret in [&revoked.secret, &fresh.secret, &secret_only] {
        let (_, hidden) = secret.trim().rsplit_once('.').expect("id.secret");
        assert!(!listed.contains(hidden), "a secret leaked into the list");
    }
    assert!(!listed.contains("\"secret\""));
    let tokens = list(&zone).await;
    assert_eq!(tokens.len(), 4);
    let listed_revoked = tokens
        .iter()
        .find(|t| t.id == revoked.token.id)
        .expect("the token is listed");
    assert_eq!(listed_revoked, &revoked.token);
    let table = zone.ctl(&["token", "list"], "").await.expect("table");
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("web-1,web-2"), "{table}");

    // Revoked, and listed as such; unknown ids are 404.
    let out = zone
        .ctl(&["token", "revoke", &revoked.token.id], "")
        .await
        .expect("token revoke");
    assert!(out.contains("revoked"), "{out}");
    let tokens = list(&zone).await;
    assert!(tokens.iter().any(|t| t.id == revoked.token.id && t.revoked));
    assert!(tokens.iter().any(|t| t.id == fresh.token.id && !t.revoked));
    match zone.ctl(&["token", "revoke", "nosuchtoken"], "").await {
        Err(Error::Api { status, .. }) => assert_eq!(status, StatusCode::NOT_FOUND),
        other => panic!("expected 404, got {other:?}"),
    }

    zone.stop();

    // The controller wrote what the enrolment path will read.
    let store = Store::open(&format!("sqlite://{}", db.display()))
        .await
        .expect("open the store");
    match store.consume_token(&revoked.secret, "default").await {
        Err(TokenError::Revoked { id }) => assert_eq!(id, revoked.token.id),
        other => panic!("expected Revoked, got {other:?}"),
    }
    match store.consume_token(&fresh.secret, "elsewhere").await {
        Err(TokenError::WrongZone { .. }) => {}
        other => panic!("expected WrongZone, got {other:?}"),
    }
    let grant = store
        .consume_token(&fresh.secret, "default")
        .await
        .expect("a fresh token enrols once");
    assert_eq!(grant.mesh, "prod");
    assert!(grant.workloads.allows("api-7"));
    assert!(!grant.workloads.allows("web-1"));
    match store.consume_token(&fresh.secret, "default").await {
        Err(TokenError::Exhausted { max_uses, .. }) => assert_eq!(max_uses, 1),
        other => panic!("expected Exhausted, got {other:?}"),
    }
    store.close().await;
}

#[tokio::test]
async fn bad_issue_requests_name_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let zone = Zone::start(&dir.path().join("zone.db")).await;
    zone.ctl(&["apply", "-f", "-"], MESH)
        .await
        .expect("apply mesh");
    let names = serde_json::json!({"names": ["web-1"]});

    let cases = [
        (
            serde_json::json!({"mesh": "nosuch", "workloads": names}),
            "mesh",
        ),
        (
            serde_json::json!({"mesh": "prod", "workloads": names, "ttl": "forever"}),
            "ttl",
        ),
        (
            serde_json::json!({"mesh": "prod", "workloads": names, "ttl": "721h"}),
            "ttl",
        ),
        (
            serde_json::json!({"mesh": "prod", "workloads": names, "ttl": "0s"}),
            "ttl",
        ),
        (
            serde_json::json!({"mesh": "prod", "workloads": names, "maxUses": 0}),
            "maxUses",
        ),
        (
            serde_json::json!({"mesh": "prod", "workloads": names, "maxUses": 1001}),
            "maxUses",
        ),
        (
            serde_json::json!({"mesh": "prod", "workloads": {"names": ["Web_1"]}}),
            "workloads.names[0]",
        ),
        (
            serde_json::json!({"mesh": "prod", "workloads": {"prefix": ""}}),
            "workloads.prefix",
        ),
        (serde_json::json!({"mesh": "prod"}), "workloads"),
    ];
    for (body, path) in cases {
        let (status, answer) = post(&zone, body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(paths(&answer), vec![path.to_owned()], "{body}");
    }

    // Several problems are reported together.
    let (status, answer) = post(
        &zone,
        serde_json::json!({"mesh": "nosuch", "workloads": names, "ttl": "forever", "maxUses": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(paths(&answer), ["mesh", "ttl", "maxUses"]);

    // weftctl reports the refusal by field; nothing was issued.
    match zone
        .ctl(
            &[
                "token",
                "issue",
                "--mesh",
                "prod",
                "--workload",
                "a",
                "--ttl",
                "forever",
            ],
            "",
        )
        .await
    {
        Err(Error::TokenRefused { problems }) => assert_eq!(problems[0].path, "ttl"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(list(&zone).await.is_empty());
    zone.stop();
}
