//! The agent's HTTP entry points after hyper: arbitrary bytes as the
//! stream of one client connection (HTTP/1.1, or HTTP/2 after its preface,
//! as the agent's listener tells them apart), served by a service that does
//! to each request what the L7 proxy does before sending it on: inbound,
//! the TrafficPermission check, hop-by-hop stripping and the peer identity
//! header; outbound, the HTTPRoute lookup and its filters (header edits,
//! rewrites, redirects), backend choice, and `prepare` for HTTP/1.1 and
//! HTTP/2 next hops; and an access log line from a text template.

#![no_main]

use std::convert::Infallible;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_agent::l7::access_log::{text, Entry};
use weft_agent::l7::inbound::PEER_IDENTITY_HEADER;
use weft_agent::l7::outbound::{prepare, redirect_location, rewrite, strip_hop_by_hop};
use weft_agent::l7::policy::{Filter, Policy};
use weft_api::policy::compiled::WorkloadPolicy;

/// The destination the fuzzed requests are sent to.
const DESTINATION: &str = "default/api";

/// Routes with every kind of filter, chosen by the request's path and
/// headers; permissions that allow and deny by method, path and header.
const POLICY: &str = r#"{
  "workload": "web",
  "inbound": {
    "permissions": [
      {"policy": "deny-admin", "from": ["spiffe://td/*"], "action": "Deny",
       "http": [{"path": {"type": "PathPrefix", "value": "/admin"}},
                {"headers": [{"type": "RegularExpression", "name": "x-user", "value": "root|admin.*"}]}]},
      {"policy": "allow-get", "from": ["spiffe://td/ns/default/*"], "action": "Allow",
       "http": [{"method": "GET"}, {"path": {"type": "RegularExpression", "value": "/api/v[0-9]+/.*"},
                 "queryParams": [{"type": "Exact", "name": "debug", "value": "1"}]}]}
    ]
  },
  "outbound": {
    "default/api": {
      "routes": [
        {"policy": "rewrite", "rule": {
          "matches": [{"path": {"type": "PathPrefix", "value": "/api/"}}],
          "default": {
            "filters": [
              {"type": "RequestHeaderModifier", "set": [{"name": "x-route", "value": "rewrite"}],
               "add": [{"name": "x-added", "value": "1"}], "remove": ["x-remove"]},
              {"type": "UrlRewrite", "hostname": "rewritten.default.mesh:8080",
               "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}},
              {"type": "ResponseHeaderModifier", "set": [{"name": "x-resp", "value": "1"}]}
            ],
            "backendRefs": [{"name": "api", "weight": 3}, {"name": "db", "namespace": "data", "weight": 1, "port": 5432}]
          }}},
        {"policy": "full", "rule": {
          "matches": [{"path": {"type": "RegularExpression", "value": "/full(/.*)?"}},
                      {"headers": [{"type": "Prefix", "name": "x-full", "value": "y"}]}],
          "default": {"filters": [
            {"type": "UrlRewrite", "path": {"type": "ReplaceFullPath", "replaceFullPath": "/replaced"}}
          ]}}},
        {"policy": "redirect-root", "rule": {
          "matches": [{"path": {"type": "PathPrefix", "value": "/"}, "headers": [{"type": "Present", "name": "x-redirect"}]}],
          "default": {"filters": [
            {"type": "RequestRedirect", "scheme": "https", "port": 8443,
             "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}, "statusCode": 301}
          ]}}},
        {"policy": "redirect", "rule": {
          "matches": [{"path": {"type": "Exact", "value": "/old"}}, {"method": "POST"}],
          "default": {"filters": [
            {"type": "RequestRedirect", "hostname": "new.example",
             "path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}},
            {"type": "RequestMirror", "backendRef": {"name": "db", "namespace": "data"}}
          ]}}},
        {"policy": "catch-all", "rule": {"default": {"filters": [
          {"type": "UrlRewrite", "hostname": "catch.all"}
        ]}}}
      ]
    }
  }
}"#;

/// The access log template filled for each request.
const TEMPLATE: &str = "%START_TIME% %DIRECTION% %METHOD% %PATH% %AUTHORITY% %PROTOCOL% %STATUS% %ROUTE% %FLAG% %NOPE%";

static COMPILED: LazyLock<Policy> = LazyLock::new(|| {
    let p: WorkloadPolicy = serde_json::from_str(POLICY)
        .unwrap_or_else(|e| panic!("the fixed policy is valid JSON: {e}"));
    Policy::compile(&p, &weft_fuzz::LOGS)
        .unwrap_or_else(|e| panic!("the fixed policy compiles: {e}"))
});

/// Request bodies read at most: the input bounds them anyway.
const MAX_BODY: usize = 64 * 1024;

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let policy = &*COMPILED;
    let (mut parts, body) = req.into_parts();

    // Inbound: the permission check, then what is done before forwarding.
    let verdict = policy.inbound.request(&weft_fuzz::PEER, &parts);
    let mut inbound = parts.clone();
    strip_hop_by_hop(&mut inbound.headers);
    if let Ok(value) = HeaderValue::from_str(weft_fuzz::PEER.as_str()) {
        inbound.headers.insert(PEER_IDENTITY_HEADER, value);
    }

    // Outbound: the route and its filters, as `outbound::routed` does.
    let mut response = Response::new(Full::new(Bytes::new()));
    let out = policy.outbound(DESTINATION);
    let mut route_name = "";
    if let Some(route) = out.route(&parts) {
        route_name = route.policy.as_str();
        let prefix = route.matched_prefix(&parts).map(str::to_owned);
        for filter in &route.filters {
            match filter {
                Filter::RequestHeaders(edits) => edits.apply(&mut parts.headers),
                Filter::ResponseHeaders(edits) => edits.apply(response.headers_mut()),
                Filter::Rewrite { hostname, path } => rewrite(
                    &mut parts,
                    hostname.as_ref(),
                    path.as_ref(),
                    prefix.as_deref(),
                ),
                Filter::Redirect {
                    scheme,
                    hostname,
                    port,
                    path,
                    ..
                } => {
                    let location = redirect_location(
                        &parts,
                        scheme.as_ref(),
                        hostname.as_deref(),
                        *port,
                        path.as_ref(),
                        prefix.as_deref(),
                    );
                    if let Ok(value) = HeaderValue::from_str(&location) {
                        response.headers_mut().insert(http::header::LOCATION, value);
                    }
                }
                Filter::Mirror { .. } => {
                    let mut copy = parts.clone();
                    prepare(&mut copy);
                }
            }
        }
        let _ = route.pick_backend();
    }
    let mut h2 = parts.clone();
    h2.version = Version::HTTP_2;
    prepare(&mut h2);
    let mut h1 = parts.clone();
    h1.version = Version::HTTP_11;
    prepare(&mut h1);

    let path = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let line = text(
        TEMPLATE,
        &Entry {
            direction: "outbound",
            method: parts.method.as_str(),
            path,
            authority: parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or(""),
            route: route_name,
            flag: if verdict.allowed() { "" } else { "denied" },
            ..Entry::default()
        },
    );
    assert!(line.ends_with('\n'));

    let _ = Limited::new(body, MAX_BODY).collect().await;
    Ok(response)
}

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    LazyLock::force(&COMPILED);
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let conn =
            builder.serve_connection(TokioIo::new(server), hyper::service::service_fn(handle));
        let write = async {
            let _ = client_write.write_all(data).await;
            let _ = client_write.shutdown().await;
        };
        let read = async {
            let mut sink = Vec::new();
            let _ = client_read.read_to_end(&mut sink).await;
        };
        // A stalled connection (a request waiting for more body) is cut
        // off: the time per input stays bounded.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            tokio::join!(conn, write, read)
        })
        .await;
    });
});
