//! The agent's configuration: a YAML file, then `WEFT_*` environment
//! overrides (`WEFT_INBOUND__MTLS=permissive`), checked as a whole before
//! anything starts so that a bad value is refused with its field and reason.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weft_api::{Endpoint, PeerMatch, WorkloadPort};

/// A configuration that cannot be used, naming the field and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is part of the message (not a `#[source]`) because the
    // config crate's error already names the key and file.
    #[error("config {path}: {cause}")]
    Load {
        path: PathBuf,
        cause: config::ConfigError,
    },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Which job the one agent binary does. Selected here and nowhere else, so
/// node and gateway modes are one more arm each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Beside a single workload, holding only that workload's identity.
    #[default]
    Sidecar,
    /// One agent for every workload of a host (not yet available).
    Node,
    /// A zone's east-west gateway (not yet available).
    Gateway,
}

/// Whether plaintext inbound connections are tolerated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Only mutually authenticated tunnels reach the workload.
    #[default]
    Strict,
    /// Plaintext on the inbound capture port is accepted too, and counted.
    Permissive,
}

/// What to do with captured traffic to an address outside the mesh view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDestination {
    /// Connect directly, as if the agent were not there.
    #[default]
    Passthrough,
    /// Reset the connection.
    Deny,
}

/// The whole agent configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default)]
    pub mode: Mode,
    pub identity: IdentityFiles,
    pub workload: WorkloadConfig,
    #[serde(default)]
    pub inbound: InboundConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub tunnel: TunnelConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub redirect: RedirectConfig,
    /// Threads carrying traffic. One (the default) runs the agent on a
    /// single-threaded runtime: measured faster and smaller for a sidecar.
    #[serde(default = "defaults::worker_threads")]
    pub worker_threads: usize,
    /// How long in-flight streams may run on after SIGTERM.
    #[serde(default = "defaults::drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// Where the workload's key material lives (PEM files).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    /// Certificate chain, leaf first; the leaf carries the SPIFFE URI SAN.
    pub cert: PathBuf,
    /// The private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// CA certificates that peers' chains must lead to.
    pub trust_bundle: PathBuf,
}

/// The workload this sidecar fronts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// The workload's own IP: tunnels may only target this address.
    pub address: IpAddr,
    /// The only ports that tunnels may reach.
    pub ports: Vec<WorkloadPort>,
}

/// Inbound: HBONE from peers and, in permissive mode, plaintext.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    #[serde(default = "defaults::hbone_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub mtls: MtlsMode,
    #[serde(default = "defaults::plaintext_listen")]
    pub plaintext_listen: SocketAddr,
    /// Callers allowed in; empty means nobody (deny by default).
    #[serde(default)]
    pub allow: Vec<PeerMatch>,
}

/// Outbound: explicit listeners, transparent capture, and the mesh view.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Where nftables sends captured outbound TCP. Loopback by default so
    /// that other hosts cannot use the agent as a relay.
    #[serde(default = "defaults::capture_listen")]
    pub capture_listen: SocketAddr,
    #[serde(default)]
    pub unknown_destination: UnknownDestination,
    #[serde(default)]
    pub listeners: Vec<OutboundListener>,
    /// Peer workloads and the agents in front of them.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// A plaintext listener on this host that tunnels to one destination, for
/// hosts where traffic capture is not wanted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundListener {
    pub listen: SocketAddr,
    /// The destination workload's `ip:port`; its IP must be an endpoint.
    pub target: SocketAddr,
}

/// Limits and tuning of the HBONE tunnels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A pooled connection with no stream for this long is closed.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections per (source identity, destination agent).
    #[serde(default = "defaults::max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// Concurrent streams per HTTP/2 connection, both directions.
    #[serde(default = "defaults::max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// Inbound TLS connections accepted at once.
    #[serde(default = "defaults::max_inbound_connections")]
    pub max_inbound_connections: usize,
    /// Outbound application connections handled at once.
    #[serde(default = "defaults::max_outbound_connections")]
    pub max_outbound_connections: usize,
    /// HTTP/2 flow-control window of one stream, in bytes.
    #[serde(default = "defaults::stream_window")]
    pub stream_window: u32,
    /// HTTP/2 flow-control window of one connection, in bytes.
    #[serde(default = "defaults::connection_window")]
    pub connection_window: u32,
}

/// The local admin endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default = "defaults::metrics_listen")]
    pub listen: SocketAddr,
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// An `EnvFilter` directive, e.g. `info` or `info,weft_agent=debug`.
    #[serde(default = "defaults::log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

/// Human-readable lines for a terminal, JSON lines for a log pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// What `weft-agent redirect install` writes into nftables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// The uid the agent runs as; its own traffic is never captured.
    #[serde(default)]
    pub agent_uid: Option<u32>,
    /// Destination ports left alone (e.g. SSH), so a host is never locked out.
    #[serde(default = "defaults::exclude_ports")]
    pub exclude_ports: Vec<u16>,
    /// Destination networks left alone, as `addr/len`.
    #[serde(default)]
    pub exclude_cidrs: Vec<String>,
    /// Also send inbound TCP to the workload's ports to the plaintext
    /// inbound port, where strict mode refuses it.
    #[serde(default = "defaults::yes")]
    pub inbound: bool,
}

mod defaults {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn worker_threads() -> usize {
        1
    }
    pub fn hbone_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 15008))
    }
    pub fn plaintext_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 15006))
    }
    pub fn capture_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 15001))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 15000))
    }
    pub fn metrics_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 15020))
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_connections_per_peer() -> usize {
        16
    }
    pub fn max_streams_per_connection() -> u32 {
        100
    }
    pub fn max_inbound_connections() -> usize {
        4096
    }
    pub fn max_outbound_connections() -> usize {
        16384
    }
    pub fn stream_window() -> u32 {
        4 << 20
    }
    pub fn connection_window() -> u32 {
        16 << 20
    }
    pub fn log_level() -> String {
        "info".to_owned()
    }
    pub fn exclude_ports() -> Vec<u16> {
        vec![22]
    }
    pub fn yes() -> bool {
        true
    }
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                serde_json::from_value(serde_json::json!({}))
                    .expect("every field of this section has a default")
            }
        }
    )*};
}
default_from_serde!(
    InboundConfig,
    OutboundConfig,
    TunnelConfig,
    AdminConfig,
    MetricsConfig,
    LogConfig,
    RedirectConfig
);

impl AgentConfig {
    /// Reads the file, applies `WEFT_*` overrides and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let load_err = |cause| ConfigError::Load {
            path: path.to_owned(),
            cause,
        };
        let cfg: AgentConfig = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Yaml))
            .add_source(
                config::Environment::with_prefix("WEFT")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env_overrides(std::env::vars()))),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(load_err)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what types alone cannot: modes, ranges, references, files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.mode {
            Mode::Sidecar => {}
            Mode::Node | Mode::Gateway => {
                return Err(invalid(
                    "mode",
                    "only `sidecar` is available in this release",
                ));
            }
        }
        for (field, path) in [
            ("identity.cert", &self.identity.cert),
            ("identity.key", &self.identity.key),
            ("identity.trust_bundle", &self.identity.trust_bundle),
        ] {
            if !path.is_file() {
                return Err(invalid(
                    field,
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        if self.workload.ports.is_empty() {
            return Err(invalid("workload.ports", "at least one port is needed"));
        }
        for (i, p) in self.workload.ports.iter().enumerate() {
            if p.port == 0 {
                return Err(invalid(
                    format!("workload.ports[{i}].port"),
                    "0 is not a port",
                ));
            }
        }
        if !self.admin.listen.ip().is_loopback() {
            return Err(invalid(
                "admin.listen",
                "must be a loopback address: the admin endpoint changes the agent and shows its config",
            ));
        }
        if !self.outbound.capture_listen.ip().is_loopback() {
            return Err(invalid(
                "outbound.capture_listen",
                "must be a loopback address, or other hosts could relay through the agent",
            ));
        }
        for (i, l) in self.outbound.listeners.iter().enumerate() {
            if !self
                .outbound
                .endpoints
                .iter()
                .any(|e| e.address == l.target.ip())
            {
                return Err(invalid(
                    format!("outbound.listeners[{i}].target"),
                    format!(
                        "{} is not the address of any outbound.endpoints entry",
                        l.target.ip()
                    ),
                ));
            }
        }
        let t = &self.tunnel;
        for (field, value) in [
            ("worker_threads", self.worker_threads),
            (
                "tunnel.max_connections_per_peer",
                t.max_connections_per_peer,
            ),
            (
                "tunnel.max_streams_per_connection",
                t.max_streams_per_connection as usize,
            ),
            ("tunnel.max_inbound_connections", t.max_inbound_connections),
            (
                "tunnel.max_outbound_connections",
                t.max_outbound_connections,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        // HTTP/2 caps windows at 2^31-1 and a smaller window than a frame
        // would stall every stream.
        for (field, value) in [
            ("tunnel.stream_window", t.stream_window),
            ("tunnel.connection_window", t.connection_window),
        ] {
            if !(65_535..=0x7fff_ffff).contains(&value) {
                return Err(invalid(field, "must be between 65535 and 2147483647 bytes"));
            }
        }
        for (i, cidr) in self.redirect.exclude_cidrs.iter().enumerate() {
            parse_cidr(cidr)
                .map_err(|reason| invalid(format!("redirect.exclude_cidrs[{i}]"), reason))?;
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }

    /// Whether `port` is one of the workload's own ports.
    pub fn serves_port(&self, port: u16) -> bool {
        self.workload.ports.iter().any(|p| p.port == port)
    }
}

/// The top-level fields of [`AgentConfig`], which `WEFT_*` variables may set.
const SECTIONS: &[&str] = &[
    "mode",
    "identity",
    "workload",
    "inbound",
    "outbound",
    "tunnel",
    "admin",
    "metrics",
    "log",
    "redirect",
    "worker_threads",
    "drain_timeout",
];

/// The `WEFT_*` variables that address the agent's config. Other tools
/// share the prefix (`WEFT_AGENT_BIN`, `WEFT_ZONE_...`), so a variable whose
/// first segment is not a config section is not an override and is ignored.
fn env_overrides(vars: impl Iterator<Item = (String, String)>) -> config::Map<String, String> {
    vars.filter(|(key, _)| {
        key.strip_prefix("WEFT_")
            .map(|rest| rest.split("__").next().unwrap_or(rest).to_ascii_lowercase())
            .is_some_and(|section| SECTIONS.contains(&section.as_str()))
    })
    .collect()
}

/// Parses `addr/len`; host bits past the prefix are ignored, as nft does.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not addr/len"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("{len:?} is not a prefix length (0-{max})"))?;
    Ok((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_the_config_fields() {
        let sample = serde_json::json!({
            "identity": {"cert": "c", "key": "k", "trust_bundle": "b"},
            "workload": {"address": "10.0.0.1", "ports": [{"port": 80}]},
        });
        let cfg: AgentConfig = serde_json::from_value(sample).unwrap();
        let value = serde_json::to_value(cfg).unwrap();
        let mut fields: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut sections = SECTIONS.to_vec();
        fields.sort_unstable();
        sections.sort_unstable();
        assert_eq!(fields, sections);
    }

    #[test]
    fn only_config_sections_are_overrides() {
        let vars = [
            ("WEFT_INBOUND__MTLS", "permissive"),
            ("WEFT_WORKER_THREADS", "2"),
            ("WEFT_AGENT_BIN", "/usr/bin/weft-agent"),
            ("WEFT_E2E_KEEP", "1"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let kept = env_overrides(vars.into_iter());
        let mut keys: Vec<&String> = kept.keys().collect();
        keys.sort();
        assert_eq!(keys, ["WEFT_INBOUND__MTLS", "WEFT_WORKER_THREADS"]);
    }
}
