//! What the fuzz targets share: a valid config update to apply deltas on,
//! a fixed caller identity, and the confinement of access log files, so
//! that a fuzzed policy cannot make the fuzzer write files where it likes.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::LazyLock;

use weft_agent::l7::access_log::Files;
use weft_api::policy::compiled::WorkloadPolicy;
use weft_api::policy::conf::{AccessLogBackend, AccessLogConf};
use weft_api::proto::agent::v1::{ConfigUpdate, Endpoint, InboundRule, Port, ServiceView};
use weft_api::SpiffeId;

/// A self-signed certificate, so that a fuzzed update can get past the
/// trust bundle check (which every whole view must pass) to what follows.
pub const BUNDLE_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBfjCCASWgAwIBAgIURnuKQXu3EObTdBcSdS0W0r7YS9gwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJd2VmdC1mdXp6MCAXDTI2MTEyNjIzNTUyNloYDzIxMjYxMTAy
MjM1NTI2WjAUMRIwEAYDVQQDDAl3ZWZ0LWZ1enowWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAATKb3sDBaJsRuET5erOCJ/R6js8L0WluYDSeuDa6y7GsmlXJGi8tJrX
8pOaE6DCjOZMoFMTCqrfzEe1AnnOU2T3o1MwUTAdBgNVHQ4EFgQUvEL8U6gnO+O0
5GCA1pWXO4bS+IEwHwYDVR0jBBgwFoAUvEL8U6gnO+O05GCA1pWXO4bS+IEwDwYD
VR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiBojJTCcyjTlQ8sywlL6my0
r3g6jy+mdJ++62dFg5jF7wIgCl4T5hhE7UgnC9cwtxT1cvF8JKxEEutfJAGGpIn2
vD0=
-----END CERTIFICATE-----
";

/// The version of [`base_update`], which fuzzed deltas name as their base
/// to reach the patching code.
pub const BASE_VERSION: &str = "1";

fn endpoint(address: &str, ready: bool) -> Endpoint {
    Endpoint {
        address: address.into(),
        agent: format!("{address}:15008"),
        spiffe_id: "spiffe://td/ns/default/sa/api".into(),
        ready,
        ..Default::default()
    }
}

/// A valid whole view (two services, an inbound rule for `web`): the
/// view the agent serves when a fuzzed delta arrives.
pub fn base_update() -> ConfigUpdate {
    ConfigUpdate {
        version: BASE_VERSION.into(),
        trust_bundle_pem: BUNDLE_PEM.into(),
        services: vec![
            ServiceView {
                name: "api".into(),
                namespace: "default".into(),
                zone: "east".into(),
                virtual_ip: "10.96.0.1".into(),
                ports: vec![Port {
                    port: 8080,
                    protocol: 1,
                }],
                endpoints: vec![endpoint("10.0.0.1", true), endpoint("10.0.0.2", false)],
            },
            ServiceView {
                name: "db".into(),
                namespace: "data".into(),
                zone: "east".into(),
                virtual_ip: "10.96.0.2".into(),
                ports: vec![],
                endpoints: vec![endpoint("10.0.1.1", true)],
            },
        ],
        inbound: vec![InboundRule {
            workload: "web".into(),
            allow: vec!["spiffe://td/ns/default/*".into()],
        }],
        mesh: "default".into(),
        zone: "east".into(),
        ..Default::default()
    }
}

/// The caller that inbound rules are checked against.
pub static PEER: LazyLock<SpiffeId> = LazyLock::new(|| {
    "spiffe://td/ns/default/sa/web"
        .parse()
        .unwrap_or_else(|e| panic!("the fixed peer is a SPIFFE ID: {e}"))
});

/// Access log writers shared by every input: one writer thread per file,
/// not one per input.
pub static LOGS: LazyLock<Files> = LazyLock::new(Files::default);

/// The directory fuzzed access log files are confined to.
fn log_dir() -> PathBuf {
    std::env::temp_dir().join("weft-fuzz-access-logs")
}

/// Points every absolute `File` backend of the policies at one of a few
/// files under the temporary directory (relative paths are kept: they are
/// refused before anything is opened). Returns whether anything changed.
pub fn confine_access_logs(policies: &mut [WorkloadPolicy]) -> bool {
    let mut changed = false;
    let mut confine = |conf: &mut AccessLogConf| {
        for backend in conf.backends.iter_mut().flatten() {
            if let AccessLogBackend::File { path, .. } = backend {
                if path.starts_with('/') {
                    let mut h = DefaultHasher::new();
                    path.hash(&mut h);
                    let dir = log_dir();
                    // Created on demand; a failure shows as an Open error.
                    let _ = std::fs::create_dir_all(&dir);
                    *path = dir
                        .join(format!("log-{}", h.finish() % 4))
                        .to_string_lossy()
                        .into_owned();
                    changed = true;
                }
            }
        }
    };
    for p in policies {
        confine(&mut p.inbound.access_log);
        confine(&mut p.outbound_defaults.access_log);
        for conf in p.outbound.values_mut() {
            confine(&mut conf.access_log);
        }
    }
    changed
}

/// A request from fuzz data: the first line is `METHOD URI`, each other
/// line `name: value`. `None` when the `http` crate refuses any part, as
/// hyper would have refused it before the agent saw it.
pub fn request_from(text: &[u8]) -> Option<http::request::Parts> {
    let mut lines = text.split(|&b| b == b'\n');
    let first = lines.next()?;
    let space = first.iter().position(|&b| b == b' ')?;
    let method = http::Method::from_bytes(&first[..space]).ok()?;
    let uri = http::Uri::try_from(&first[space + 1..]).ok()?;
    let mut builder = http::Request::builder().method(method).uri(uri);
    for line in lines {
        let colon = line.iter().position(|&b| b == b':')?;
        let name = http::HeaderName::from_bytes(&line[..colon]).ok()?;
        let value = http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
        builder = builder.header(name, value);
    }
    Some(builder.body(()).ok()?.into_parts().0)
}
