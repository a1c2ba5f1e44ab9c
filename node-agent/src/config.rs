//! The agent's configuration: a YAML file, then `WEFT_*` environment
//! overrides (`WEFT_INBOUND__MTLS=permissive`), checked as a whole before
//! anything starts so that a bad value is refused with its field and reason.

use std::collections::BTreeMap;
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
    /// The packaged `/etc/weft/agent.yaml` marks with [`PLACEHOLDER`] the
    /// values only the operator knows; all of them are named at once, so
    /// that one `weft-agent check` says everything that is left to do.
    #[error(
        "config {path}: still the packaged placeholder {PLACEHOLDER} in {}: \
         set {} (the comments in the file say what each is)",
        fields.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", "),
        if fields.len() == 1 { "it" } else { "them" }
    )]
    Placeholders { path: PathBuf, fields: Vec<String> },
}

/// What the packaged config writes where a value must come from the
/// operator (the zone's address, its CA pin, the workload). It is not a
/// valid value of any of those fields, but some placeholders would
/// otherwise pass (`CHANGE-ME:5678` is a `host:port`) and others fail as
/// type errors one at a time, so they are looked for first, by name.
pub const PLACEHOLDER: &str = "CHANGE-ME";

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
    /// One agent for every workload of a host: each workload, in its own
    /// network namespace, gets its own identity, sockets and limits.
    Node,
    /// A zone's east-west gateway (reserved for multi-zone).
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
    /// Static identity from PEM files. Exactly one of `identity` and
    /// `controller` is set.
    #[serde(default)]
    pub identity: Option<IdentityFiles>,
    /// Controller mode: enrol with the zone and follow its config stream.
    #[serde(default)]
    pub controller: Option<ControllerConfig>,
    /// The workload this sidecar fronts (sidecar mode; a node agent's
    /// workloads are enrolled while it runs).
    #[serde(default)]
    pub workload: Option<WorkloadConfig>,
    #[serde(default)]
    pub node: NodeConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub inbound: InboundConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// Protocol detection on ports that declare no protocol.
    #[serde(default)]
    pub detect: DetectConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub redirect: RedirectConfig,
    /// Static mode only: the workload's policies in the form the zone
    /// pushes (`weft_api::policy::compiled::WorkloadPolicy`). Set, inbound
    /// goes by its TrafficPermission rules (default deny) instead of
    /// `inbound.allow`.
    #[serde(default)]
    pub policy: Option<weft_api::policy::compiled::WorkloadPolicy>,
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

/// How the agent reaches its zone controller, and where it keeps what it
/// learnt from it so that it can restart while the controller is away.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// `host:port` of the zone's agent gRPC endpoint (port 5678), or a
    /// list of them (replicas of one zone), tried in order.
    #[serde(deserialize_with = "one_or_many")]
    pub address: Vec<String>,
    /// The DNS name the zone's certificate must carry (not the address).
    #[serde(default = "defaults::server_name")]
    pub server_name: String,
    /// `sha256:<hex>` of the zone's control-plane CA certificate (DER), as
    /// printed by `weftctl token issue`; needed only to enrol.
    #[serde(default)]
    pub ca_pin: Option<String>,
    /// A file holding the bootstrap token; needed only to enrol.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Keys, certificates and the last good config (created 0700).
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    /// The agent's name in its zone; the hostname's first label by default.
    #[serde(default)]
    pub agent_name: Option<String>,
    /// Where peers reach this agent's HBONE listener; by default
    /// `workload.address` with the port of `inbound.listen`.
    #[serde(default)]
    pub hbone_address: Option<SocketAddr>,
    /// How often the agent reports its host facts (its RSS and CPU time
    /// move) on the config stream, besides at each connection.
    #[serde(default = "defaults::host_facts_period", with = "humantime_serde")]
    pub host_facts_period: Duration,
}

/// The workload this sidecar fronts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// The Workload's name in its zone (required in controller mode).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "defaults::namespace")]
    pub namespace: String,
    /// The Service the workload belongs to (required in controller mode).
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default = "defaults::namespace")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The workload's own IP: tunnels may only target this address.
    pub address: IpAddr,
    /// The only ports that tunnels may reach.
    pub ports: Vec<WorkloadPort>,
}

/// Node mode: how many workloads one agent takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Enrolling one more is refused: each costs descriptors, tasks and a
    /// certificate.
    #[serde(default = "defaults::max_workloads")]
    pub max_workloads: usize,
    /// Connections one workload may have through the agent at once, in
    /// each direction (the node's `tunnel.max_inbound_connections`,
    /// `tunnel.max_inbound_streams` and `tunnel.max_outbound_connections`,
    /// per workload), so that one
    /// workload's flood is refused at its own limit and cannot starve the
    /// others of descriptors, memory or streams. Its buffered bytes are
    /// bounded with them: each connection holds at most its splice
    /// buffers and one tunnel stream window.
    #[serde(default = "defaults::max_connections_per_workload")]
    pub max_connections_per_workload: usize,
    /// The Unix socket `weft-agent workload enroll|unenroll` talks to.
    /// Created owner-only (0600): enrolling decides whose traffic the
    /// agent captures, so only the agent's user (or root) may ask.
    #[serde(default = "defaults::control_socket")]
    pub control_socket: PathBuf,
}

/// The DNS proxy that answers mesh names with virtual IPs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// On by default in controller mode, off with a static identity (which
    /// has no service names to answer).
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default = "defaults::dns_listen")]
    pub listen: SocketAddr,
    /// Where other names are forwarded; by default the nameservers of
    /// /etc/resolv.conf.
    #[serde(default)]
    pub upstream: Vec<SocketAddr>,
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
    /// `http`: the agent serves the listener's connections request by
    /// request, with the outbound policies of `service` (static mode).
    #[serde(default)]
    pub protocol: weft_api::Protocol,
    /// Static mode, `protocol: http`: the service (`<namespace>/<name>`)
    /// the target stands for, the key of `policy.outbound`.
    #[serde(default)]
    pub service: Option<String>,
}

/// Protocol detection on ports whose protocol is not declared: how long
/// the agent waits for a client's first bytes before carrying the
/// connection as TCP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectConfig {
    /// The longest wait for bytes that decide HTTP or not. Client-first
    /// protocols send at once, so it only delays server-first protocols
    /// (the client waits for a greeting), by this much at connection
    /// setup: 100 ms by default, well above a client's send after connect
    /// (microseconds, a few ms on a loaded host) and small next to a
    /// greeting's usual client timeouts (seconds). Declare such ports
    /// `tcp` to skip the wait.
    #[serde(default = "defaults::detect_timeout", with = "humantime_serde")]
    pub timeout: Duration,
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
    /// Inbound CONNECT streams (each one connection into the workload)
    /// open at once, across all tunnel connections.
    #[serde(default = "defaults::max_outbound_connections")]
    pub max_inbound_streams: usize,
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
    /// Also send the host's DNS queries (UDP and TCP port 53) to the DNS
    /// proxy, when it is enabled.
    #[serde(default = "defaults::yes")]
    pub dns: bool,
    /// `weft-agent run` (re)installs these rules before it serves, as
    /// `redirect install` does, so that a reboot (which empties nftables)
    /// never leaves a host without capture. Needs CAP_NET_ADMIN.
    #[serde(default)]
    pub on_start: bool,
}

mod defaults {
    use std::net::SocketAddr;
    use std::path::PathBuf;
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
    pub fn detect_timeout() -> Duration {
        Duration::from_millis(100)
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
    pub fn server_name() -> String {
        "weft-zone".to_owned()
    }
    pub fn host_facts_period() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_workloads() -> usize {
        256
    }
    pub fn max_connections_per_workload() -> usize {
        1024
    }
    pub fn control_socket() -> PathBuf {
        PathBuf::from("/run/weft/agent.sock")
    }
    pub fn state_dir() -> PathBuf {
        PathBuf::from("/var/lib/weft/agent")
    }
    pub fn namespace() -> String {
        "default".to_owned()
    }
    pub fn dns_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 15053))
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
    RedirectConfig,
    DetectConfig,
    DnsConfig,
    NodeConfig
);

impl AgentConfig {
    /// Reads the file, applies `WEFT_*` overrides and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let load_err = |cause| ConfigError::Load {
            path: path.to_owned(),
            cause,
        };
        let merged = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Yaml))
            .add_source(
                config::Environment::with_prefix("WEFT")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env_overrides(std::env::vars()))),
            )
            .build()
            .map_err(load_err)?;
        // Untyped first: a placeholder left in a typed field (an address, a
        // port) would otherwise be reported as a type error, and only the
        // first one.
        let raw: serde_json::Value = merged.clone().try_deserialize().map_err(load_err)?;
        let mut fields = Vec::new();
        find_placeholders(&raw, "", &mut fields);
        if !fields.is_empty() {
            return Err(ConfigError::Placeholders {
                path: path.to_owned(),
                fields,
            });
        }
        let cfg: AgentConfig = merged.try_deserialize().map_err(load_err)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what types alone cannot: modes, ranges, references, files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(policy) = &self.policy {
            crate::l7::policy::Policy::compile(policy, &crate::l7::access_log::FILES)
                .map_err(|e| invalid(format!("policy.{}", e.field), e.reason))?;
        }
        match self.mode {
            Mode::Sidecar => {
                if self.workload.is_none() {
                    return Err(invalid(
                        "workload",
                        "missing: the workload this sidecar fronts (address, ports, name)",
                    ));
                }
            }
            Mode::Node => self.validate_node()?,
            Mode::Gateway => {
                return Err(invalid(
                    "mode",
                    "`gateway` is reserved for multi-zone east-west gateways, not available in this release",
                ));
            }
        }
        match (&self.identity, &self.controller) {
            (Some(identity), None) => identity.validate()?,
            (None, Some(controller)) => {
                controller.validate()?;
                if let Some(workload) = &self.workload {
                    workload.validate_for_controller()?;
                }
                // The zone sends these; a hand-written copy would be ignored.
                if !self.outbound.endpoints.is_empty() {
                    return Err(invalid(
                        "outbound.endpoints",
                        "not used in controller mode (the zone sends the mesh view); remove it",
                    ));
                }
                if !self.inbound.allow.is_empty() {
                    return Err(invalid(
                        "inbound.allow",
                        "not used in controller mode (the zone sends who may call the workload); remove it",
                    ));
                }
                if self.policy.is_some() {
                    return Err(invalid(
                        "policy",
                        "not used in controller mode (the zone sends the workload's policies); remove it",
                    ));
                }
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "identity",
                    "set either `identity` (static certificate files) or `controller` \
                     (enrol with a zone), not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "controller",
                    "missing: set `controller` (enrol with a zone) or `identity` \
                     (static certificate files)",
                ))
            }
        }
        // A registered workload with no ports only makes calls; a static
        // sidecar without ports would have nothing to do.
        let ports = self.workload.as_ref().map_or(&[][..], |w| &w.ports[..]);
        if ports.is_empty() && self.controller.is_none() {
            return Err(invalid("workload.ports", "at least one port is needed"));
        }
        for (i, p) in ports.iter().enumerate() {
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
        // With a controller the view arrives later; a target outside it is
        // handled like any unknown destination.
        for (i, l) in self.outbound.listeners.iter().enumerate() {
            if self.controller.is_none()
                && !self
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
            let service_ok = l.service.as_deref().is_some_and(|s| {
                s.split_once('/').is_some_and(|(ns, name)| {
                    weft_api::validation::dns1123_label(ns).is_ok()
                        && weft_api::validation::dns1123_label(name).is_ok()
                })
            });
            // A detect listener may name no service (HTTP is then only
            // seen by the destination's agent), but not a malformed one.
            let needs_service = match l.protocol {
                weft_api::Protocol::Http => true,
                weft_api::Protocol::Detect => l.service.is_some(),
                weft_api::Protocol::Tcp => false,
            };
            if self.controller.is_none() && needs_service && !service_ok {
                return Err(invalid(
                    format!("outbound.listeners[{i}].service"),
                    "an http listener names the service it reaches as <namespace>/<name>",
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
            ("tunnel.max_inbound_streams", t.max_inbound_streams),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        // Zero would carry every connection as TCP before its first byte;
        // a long wait stalls server-first protocols for that long.
        if self.detect.timeout.is_zero() || self.detect.timeout > Duration::from_secs(10) {
            return Err(invalid(
                "detect.timeout",
                "must be more than 0 and at most 10s",
            ));
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
        if self.dns_enabled() && self.dns.listen.port() == 0 {
            return Err(invalid("dns.listen", "port 0 cannot receive queries"));
        }
        for (i, u) in self.dns.upstream.iter().enumerate() {
            if u.port() == 0 || *u == self.dns.listen {
                return Err(invalid(
                    format!("dns.upstream[{i}]"),
                    format!("{u} is not a usable upstream (port 0, or the proxy itself)"),
                ));
            }
        }
        Ok(())
    }

    /// Whether the DNS proxy runs: on by default in controller mode.
    pub fn dns_enabled(&self) -> bool {
        self.dns.enabled.unwrap_or(self.controller.is_some())
    }

    /// The agent's name in its zone: configured, or the hostname.
    pub fn agent_name(&self) -> String {
        self.controller
            .as_ref()
            .and_then(|c| c.agent_name.clone())
            .or_else(|| {
                // The first label: agent names are DNS labels.
                sysinfo::System::host_name()
                    .and_then(|h| h.split('.').next().map(str::to_ascii_lowercase))
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| "localhost".to_owned())
    }

    /// Where peers reach a sidecar's HBONE listener; `None` for a node
    /// agent, whose workloads each have their own.
    pub fn hbone_address(&self) -> Option<SocketAddr> {
        let workload = self.workload.as_ref()?;
        Some(
            self.controller
                .as_ref()
                .and_then(|c| c.hbone_address)
                .unwrap_or_else(|| SocketAddr::new(workload.address, self.inbound.listen.port())),
        )
    }

    /// The config a node agent's workload proxies run with: the node's,
    /// with the per-workload connection limits.
    pub fn per_workload(&self) -> AgentConfig {
        let mut config = self.clone();
        config.tunnel.max_inbound_connections = self.node.max_connections_per_workload;
        config.tunnel.max_outbound_connections = self.node.max_connections_per_workload;
        config.tunnel.max_inbound_streams = self.node.max_connections_per_workload;
        config
    }

    /// Node mode: enrolled with a zone, serving only what it enrols.
    fn validate_node(&self) -> Result<(), ConfigError> {
        let refuse =
            |field: &str, why: &str| Err(invalid(field, format!("not used in node mode: {why}")));
        if self.controller.is_none() {
            return Err(invalid(
                "controller",
                "node mode needs a zone: each workload's certificate is issued as it is enrolled",
            ));
        }
        if self.workload.is_some() {
            return refuse(
                "workload",
                "workloads are enrolled while the agent runs (`weft-agent workload enroll`, or placed by the zone); remove it",
            );
        }
        if !self.outbound.listeners.is_empty() {
            return refuse(
                "outbound.listeners",
                "workloads' traffic is captured in their own namespaces; remove it",
            );
        }
        if self.redirect.on_start {
            return refuse(
                "redirect.on_start",
                "capture rules are installed in each workload's namespace as it is enrolled",
            );
        }
        if self
            .controller
            .as_ref()
            .is_some_and(|c| c.hbone_address.is_some())
        {
            return refuse(
                "controller.hbone_address",
                "each workload has its own HBONE listener, in its namespace, at its address",
            );
        }
        if self.node.max_workloads == 0 {
            return Err(invalid("node.max_workloads", "must be at least 1"));
        }
        if !self.node.control_socket.is_absolute() {
            return Err(invalid(
                "node.control_socket",
                format!(
                    "{} is not an absolute path",
                    self.node.control_socket.display()
                ),
            ));
        }
        if self.node.max_connections_per_workload == 0 {
            return Err(invalid(
                "node.max_connections_per_workload",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl IdentityFiles {
    fn validate(&self) -> Result<(), ConfigError> {
        for (field, path) in [
            ("identity.cert", &self.cert),
            ("identity.key", &self.key),
            ("identity.trust_bundle", &self.trust_bundle),
        ] {
            if !path.is_file() {
                return Err(invalid(
                    field,
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        Ok(())
    }
}

/// Appends to `out` the path (`workload.ports[0].port`) of every string
/// value under `value` that contains [`PLACEHOLDER`].
fn find_placeholders(value: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) if s.contains(PLACEHOLDER) => out.push(path.to_owned()),
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                find_placeholders(item, &format!("{path}[{i}]"), out);
            }
        }
        serde_json::Value::Object(fields) => {
            for (key, item) in fields {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                find_placeholders(item, &path, out);
            }
        }
        _ => {}
    }
}

/// A string or a list of strings, so that one zone address stays as
/// simple to write as before replicas existed.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

impl ControllerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.address.is_empty() {
            return Err(invalid(
                "controller.address",
                "at least one host:port is needed",
            ));
        }
        for (i, address) in self.address.iter().enumerate() {
            let port = address
                .rsplit_once(':')
                .and_then(|(host, port)| (!host.is_empty()).then_some(port))
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0);
            if port.is_none() {
                let field = if self.address.len() == 1 {
                    "controller.address".to_owned()
                } else {
                    format!("controller.address[{i}]")
                };
                return Err(invalid(
                    field,
                    format!("{address:?} is not host:port (e.g. zone.example:5678)"),
                ));
            }
        }
        if rustls_pki_types::ServerName::try_from(self.server_name.as_str()).is_err() {
            return Err(invalid(
                "controller.server_name",
                format!("{:?} is not a DNS name", self.server_name),
            ));
        }
        if let Some(pin) = &self.ca_pin {
            parse_ca_pin(pin).map_err(|reason| invalid("controller.ca_pin", reason))?;
        }
        if let Some(name) = &self.agent_name {
            // The zone's rule: a DNS-1123 subdomain short enough to be a
            // label value (`weft.io/agent`) on the workloads it registers.
            weft_api::validation::dns1123_subdomain(name)
                .map_err(|reason| invalid("controller.agent_name", reason))?;
            if name.len() > 63 {
                return Err(invalid(
                    "controller.agent_name",
                    format!("{name:?} is longer than 63 characters"),
                ));
            }
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid("controller.state_dir", "must not be empty"));
        }
        Ok(())
    }
}

impl WorkloadConfig {
    fn validate_for_controller(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("workload.name", &self.name),
            ("workload.service", &self.service),
        ] {
            match value {
                None => {
                    return Err(invalid(
                        field,
                        "is required in controller mode (it is how the zone knows the workload)",
                    ))
                }
                Some(v) => check_name(field, v)?,
            }
        }
        check_name("workload.namespace", &self.namespace)?;
        weft_api::validation::dns1123_subdomain(&self.service_account)
            .map_err(|reason| invalid("workload.service_account", reason))?;
        Ok(())
    }
}

/// A DNS label (RFC 1123), so that names, namespaces and services make
/// mesh DNS names and SPIFFE path segments alike; the zone checks the same.
fn check_name(field: &str, value: &str) -> Result<(), ConfigError> {
    weft_api::validation::dns1123_label(value).map_err(|reason| invalid(field, reason))
}

/// Parses `sha256:<64 lowercase hex>` into the 32-byte digest.
pub fn parse_ca_pin(pin: &str) -> Result<[u8; 32], String> {
    let hex = pin
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("{pin:?} must start with sha256:"))?;
    if hex.len() != 64 {
        return Err(format!(
            "{pin:?} must be sha256: followed by 64 hex digits, got {}",
            hex.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{pin:?} has a non-hex digit"))?;
    }
    Ok(out)
}

/// The top-level fields of [`AgentConfig`], which `WEFT_*` variables may set.
const SECTIONS: &[&str] = &[
    "mode",
    "identity",
    "controller",
    "workload",
    "node",
    "dns",
    "inbound",
    "outbound",
    "tunnel",
    "detect",
    "admin",
    "metrics",
    "log",
    "redirect",
    "policy",
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

    fn controller_cfg(patch: serde_json::Value) -> AgentConfig {
        let mut v = serde_json::json!({
            "controller": {
                "address": "zone.example:5678",
                "ca_pin": format!("sha256:{}", "ab".repeat(32)),
                "token_file": "/etc/weft/token",
            },
            "workload": {"name": "web", "service": "web", "address": "10.0.0.5", "ports": [{"port": 8080}]},
        });
        merge(&mut v, patch);
        serde_json::from_value(v).unwrap()
    }

    fn merge(into: &mut serde_json::Value, patch: serde_json::Value) {
        match (into, patch) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    fn field_of(cfg: &AgentConfig) -> String {
        match cfg.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn controller_mode_defaults() {
        let cfg = controller_cfg(serde_json::json!({}));
        cfg.validate().unwrap();
        let c = cfg.controller.as_ref().unwrap();
        assert_eq!(c.server_name, "weft-zone");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/weft/agent"));
        let workload = cfg.workload.as_ref().unwrap();
        assert_eq!(workload.namespace, "default");
        assert_eq!(workload.service_account, "default");
        assert_eq!(cfg.hbone_address(), Some("10.0.0.5:15008".parse().unwrap()));
        assert!(cfg.dns_enabled());
        assert_eq!(cfg.dns.listen, "127.0.0.1:15053".parse().unwrap());
        assert!(cfg.redirect.dns);
        assert!(!cfg.agent_name().is_empty());
        let named = controller_cfg(serde_json::json!({"controller": {"agent_name": "vm-7"}}));
        assert_eq!(named.agent_name(), "vm-7");
    }

    #[test]
    fn detection_waits_100ms_by_default_and_boundedly() {
        let cfg = controller_cfg(serde_json::json!({}));
        assert_eq!(cfg.detect.timeout, Duration::from_millis(100));
        let ports = &cfg.workload.as_ref().unwrap().ports;
        assert!(ports
            .iter()
            .all(|p| p.protocol == weft_api::Protocol::Detect));
        for bad in ["0s", "11s"] {
            let cfg = controller_cfg(serde_json::json!({"detect": {"timeout": bad}}));
            assert_eq!(field_of(&cfg), "detect.timeout", "{bad}");
        }
        let cfg = controller_cfg(serde_json::json!({"detect": {"timeout": "250ms"}}));
        cfg.validate().unwrap();
        assert_eq!(cfg.detect.timeout, Duration::from_millis(250));
    }

    #[test]
    fn exactly_one_of_identity_and_controller() {
        let both = controller_cfg(serde_json::json!({
            "identity": {"cert": "c", "key": "k", "trust_bundle": "b"}
        }));
        assert_eq!(field_of(&both), "identity");
        let mut neither = controller_cfg(serde_json::json!({}));
        neither.controller = None;
        assert_eq!(field_of(&neither), "controller");
        let err = neither.validate().unwrap_err().to_string();
        assert!(
            err.contains("`controller`") && err.contains("`identity`"),
            "{err}"
        );
    }

    #[test]
    fn node_mode_takes_no_workload_of_its_own() {
        let mut node = controller_cfg(serde_json::json!({"mode": "node"}));
        node.workload = None;
        node.validate().unwrap();
        assert_eq!(node.hbone_address(), None);
        assert_eq!(node.per_workload().tunnel.max_inbound_connections, 1024);
        let with_workload = controller_cfg(serde_json::json!({"mode": "node"}));
        assert_eq!(field_of(&with_workload), "workload");
        for (patch, field) in [
            (
                serde_json::json!({"node": {"max_workloads": 0}}),
                "node.max_workloads",
            ),
            (
                serde_json::json!({"node": {"max_connections_per_workload": 0}}),
                "node.max_connections_per_workload",
            ),
            (
                serde_json::json!({"redirect": {"on_start": true}}),
                "redirect.on_start",
            ),
            (
                serde_json::json!({"controller": {"hbone_address": "10.0.0.1:15008"}}),
                "controller.hbone_address",
            ),
        ] {
            let mut c = controller_cfg(serde_json::json!({"mode": "node"}));
            c.workload = None;
            merge_into(&mut c, patch);
            assert_eq!(field_of(&c), field);
        }
        let mut static_node = node.clone();
        static_node.controller = None;
        assert_eq!(field_of(&static_node), "controller");
        let mut sidecar = node.clone();
        sidecar.mode = Mode::Sidecar;
        assert_eq!(field_of(&sidecar), "workload");
        let gateway = controller_cfg(serde_json::json!({"mode": "gateway"}));
        assert_eq!(field_of(&gateway), "mode");
    }

    fn merge_into(cfg: &mut AgentConfig, patch: serde_json::Value) {
        let mut v = serde_json::to_value(&*cfg).unwrap();
        merge(&mut v, patch);
        *cfg = serde_json::from_value(v).unwrap();
    }

    #[test]
    fn controller_fields_are_checked() {
        for (patch, field) in [
            (
                serde_json::json!({"workload": {"name": null}}),
                "workload.name",
            ),
            (
                serde_json::json!({"workload": {"service": null}}),
                "workload.service",
            ),
            (
                serde_json::json!({"workload": {"name": "Web_1"}}),
                "workload.name",
            ),
            (
                serde_json::json!({"workload": {"namespace": "a.b"}}),
                "workload.namespace",
            ),
            (
                serde_json::json!({"controller": {"address": "zone.example"}}),
                "controller.address",
            ),
            (
                serde_json::json!({"controller": {"address": ":5678"}}),
                "controller.address",
            ),
            (
                serde_json::json!({"controller": {"address": ["zone-a:5678", "zone-b"]}}),
                "controller.address[1]",
            ),
            (
                serde_json::json!({"controller": {"address": []}}),
                "controller.address",
            ),
            (
                serde_json::json!({"controller": {"ca_pin": "md5:abc"}}),
                "controller.ca_pin",
            ),
            (
                serde_json::json!({"controller": {"ca_pin": "sha256:abc"}}),
                "controller.ca_pin",
            ),
            (
                serde_json::json!({"controller": {"ca_pin": format!("sha256:{}", "zz".repeat(32))}}),
                "controller.ca_pin",
            ),
            (
                serde_json::json!({"controller": {"server_name": "not a name"}}),
                "controller.server_name",
            ),
            (
                serde_json::json!({"controller": {"agent_name": "Bad Name"}}),
                "controller.agent_name",
            ),
            (
                serde_json::json!({"dns": {"listen": "127.0.0.1:0"}}),
                "dns.listen",
            ),
            (
                serde_json::json!({"dns": {"upstream": ["10.0.0.2:53", "10.0.0.3:0"]}}),
                "dns.upstream[1]",
            ),
        ] {
            let cfg = controller_cfg(patch.clone());
            assert_eq!(field_of(&cfg), field, "{patch}");
        }
        // Unknown fields are refused in the new sections too.
        let mut v = serde_json::to_value(controller_cfg(serde_json::json!({}))).unwrap();
        v["controller"]["tokn_file"] = "x".into();
        assert!(serde_json::from_value::<AgentConfig>(v).is_err());
    }

    /// The file the weft-agent package installs as /etc/weft/agent.yaml:
    /// as shipped, `check` names every placeholder left at once; filled in,
    /// it is a valid controller-mode sidecar config.
    #[test]
    fn the_packaged_config_names_its_placeholders_and_is_valid_filled_in() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config/agent.yaml");
        match AgentConfig::load(&shipped) {
            Err(e @ ConfigError::Placeholders { .. }) => {
                let ConfigError::Placeholders { fields, .. } = &e else {
                    unreachable!()
                };
                let mut fields = fields.clone();
                fields.sort();
                assert_eq!(
                    fields,
                    [
                        "controller.address",
                        "controller.ca_pin",
                        "workload.address",
                        "workload.name",
                        "workload.ports[0].port",
                        "workload.service",
                    ]
                );
                let message = e.to_string();
                assert!(
                    message.contains("`controller.ca_pin`") && message.contains("CHANGE-ME"),
                    "{message}"
                );
            }
            other => panic!("expected the placeholders to be named, got {other:?}"),
        }
        let text = std::fs::read_to_string(&shipped).unwrap();
        let filled = text
            .replace("CHANGE-ME:5678", "zone.example:5678")
            .replace("sha256:CHANGE-ME", &format!("sha256:{}", "ab".repeat(32)))
            .replace("name: CHANGE-ME", "name: web")
            .replace("service: CHANGE-ME", "service: web")
            .replace("address: CHANGE-ME", "address: 10.0.0.2")
            .replace("port: CHANGE-ME", "port: 8080");
        let path =
            std::env::temp_dir().join(format!("weft-agent-packaged-{}.yaml", std::process::id()));
        std::fs::write(&path, filled).unwrap();
        let loaded = AgentConfig::load(&path);
        let _ = std::fs::remove_file(&path);
        let cfg = loaded.expect("the packaged config, filled in, is valid");
        let controller = cfg.controller.as_ref().unwrap();
        assert_eq!(
            controller.token_file.as_deref(),
            Some(Path::new("/etc/weft/agent.token"))
        );
        assert_eq!(controller.state_dir, Path::new("/var/lib/weft/agent"));
        assert_eq!(
            cfg.redirect.agent_uid, None,
            "capture stays off until the operator opts in"
        );
    }

    #[test]
    fn ca_pin_parses() {
        let pin = parse_ca_pin(&format!("sha256:{}", "0f".repeat(32))).unwrap();
        assert_eq!(pin, [0x0f; 32]);
    }

    #[test]
    fn only_config_sections_are_overrides() {
        let vars = [
            ("WEFT_INBOUND__MTLS", "permissive"),
            ("WEFT_WORKER_THREADS", "2"),
            ("WEFT_CONTROLLER__ADDRESS", "zone:5678"),
            ("WEFT_DNS__ENABLED", "false"),
            ("WEFT_AGENT_BIN", "/usr/bin/weft-agent"),
            ("WEFT_E2E_KEEP", "1"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let kept = env_overrides(vars.into_iter());
        let mut keys: Vec<&String> = kept.keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "WEFT_CONTROLLER__ADDRESS",
                "WEFT_DNS__ENABLED",
                "WEFT_INBOUND__MTLS",
                "WEFT_WORKER_THREADS"
            ]
        );
    }
}
