//! The log filter changed while the real `weft-zone` binary runs: what
//! `/v1/logging` shows and accepts, and what the zone then writes on stderr.

mod common;

use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Zone, DEADLINE};
use http::{Method, StatusCode};
use weftctl::Client;

async fn put(client: &Client, body: &str) -> (StatusCode, serde_json::Value) {
    let answer = client
        .request(
            Method::PUT,
            "/v1/logging",
            Some(("application/json", Bytes::from(body.to_owned()))),
        )
        .await
        .expect("PUT answered");
    let json = serde_json::from_slice(&answer.body).expect("JSON answer");
    (answer.status, json)
}

/// The log lines up to the first that contains `needle` (which is last).
fn lines_until(logs: &Receiver<String>, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = logs
            .recv_timeout(left.max(Duration::from_millis(1)))
            .unwrap_or_else(|_| panic!("no log line with {needle:?}; saw {seen:#?}"));
        let found = line.contains(needle);
        seen.push(line);
        if found {
            return seen;
        }
    }
}

#[tokio::test]
async fn the_log_filter_changes_while_the_zone_runs_and_bad_filters_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (zone, logs) = Zone::start_logged(&dir.path().join("zone.db"), "warn").await;
    let client = Client::new(&zone.server).expect("valid server URL");

    let shown = zone.get_json("/v1/logging").await;
    assert_eq!(shown["filter"], "warn");
    // At warn, a request is not logged.
    zone.get_json("/healthz").await;

    let (status, json) = put(&client, r#"{"filter": "warn,weft_zone::api_server=debug"}"#).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["filter"], "weft_zone::api_server=debug,warn");
    let before = lines_until(&logs, "log filter replaced");
    assert!(
        before.iter().all(|l| !l.contains("/healthz")),
        "a request was logged at warn: {before:#?}"
    );
    zone.get_json("/v1/zone").await;
    lines_until(&logs, "/v1/zone");

    // A bad filter names the field and leaves the one in force.
    for (body, reason) in [
        (r#"{"filter": "weft_zone=loud"}"#, "not a filter"),
        (r#"{"filter": ""}"#, "must not be empty"),
        (r#"{"level": "debug"}"#, "unknown field"),
    ] {
        let (status, json) = put(&client, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {json}");
        let error = &json["errors"][0];
        assert!(
            error["reason"].as_str().is_some_and(|r| r.contains(reason)),
            "{body}: {json}"
        );
    }
    let (_, json) = put(&client, r#"{"filter": 7}"#).await;
    assert_eq!(json["errors"][0]["path"], "filter", "{json}");
    let shown = zone.get_json("/v1/logging").await;
    assert_eq!(shown["filter"], "weft_zone::api_server=debug,warn");

    // The same through weftctl.
    let shown = zone.ctl(&["log-level"], "").await.expect("log-level");
    assert_eq!(shown.trim(), "weft_zone::api_server=debug,warn");
    let set = zone.ctl(&["log-level", "info"], "").await.expect("set");
    assert_eq!(set.trim(), "info");
    let refused = zone
        .ctl(&["log-level", "weft_zone=loud"], "")
        .await
        .expect_err("refused");
    assert!(refused.to_string().contains("filter"), "{refused}");
    zone.stop();
}
