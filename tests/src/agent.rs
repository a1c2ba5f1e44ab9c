//! The real `weft-agent` binary: finding it, writing its config, starting it
//! in a host and waiting until it serves, reading its metrics, and running
//! its other subcommands (`check`, `redirect`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::metrics::{self, Metrics};
use crate::netns::Netns;
use crate::pki::IdentityFiles;
use crate::process::Proc;
use crate::tempdir::TempDir;
use crate::wait;

/// The uid the agent runs as when traffic capture is on, so that the
/// redirect rules leave its own connections alone.
pub const AGENT_UID: u32 = 1337;

/// Finds the agent binary (see [`crate::binaries::find`]).
pub fn agent_bin() -> Result<PathBuf> {
    crate::binaries::find("weft-agent", "WEFT_AGENT_BIN")
}

/// An agent configuration, edited as a JSON tree and written as YAML.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The whole tree; `set` is the usual way to change it.
    pub value: Value,
}

impl AgentSpec {
    /// A sidecar for the workload at `address` serving `ports` (port,
    /// protocol), with the documented default listeners, nobody allowed in,
    /// no outbound listeners or endpoints, and human logs at debug level
    /// for the agent itself.
    pub fn new(identity: &IdentityFiles, address: IpAddr, ports: &[(u16, &str)]) -> AgentSpec {
        let mut spec = AgentSpec::controlled(address, ports);
        spec.set(
            "identity",
            json!({
                "cert": identity.cert, "key": identity.key, "trust_bundle": identity.trust_bundle,
            }),
        );
        spec
    }

    /// Like [`AgentSpec::new`] without an identity: the caller adds either
    /// `identity` or a `controller` section.
    pub fn controlled(address: IpAddr, ports: &[(u16, &str)]) -> AgentSpec {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(port, proto)| json!({"port": port, "protocol": proto}))
            .collect();
        AgentSpec {
            value: json!({
                "workload": { "address": address.to_string(), "ports": ports },
                "inbound": {
                    "listen": "0.0.0.0:15008", "mtls": "strict",
                    "plaintext_listen": "0.0.0.0:15006", "allow": [],
                },
                "outbound": {
                    "capture_listen": "127.0.0.1:15001", "unknown_destination": "passthrough",
                    "listeners": [], "endpoints": [],
                },
                "admin": { "listen": "127.0.0.1:15000" },
                "metrics": { "listen": "0.0.0.0:15020" },
                "log": { "level": "info,weft_agent=debug", "format": "human" },
                "redirect": { "agent_uid": AGENT_UID, "exclude_ports": [22], "exclude_cidrs": [], "inbound": true },
                "drain_timeout": "10s",
            }),
        }
    }

    /// Removes a top-level section (e.g. `workload` for a node agent).
    pub fn remove(&mut self, section: &str) -> &mut Self {
        if let Some(map) = self.value.as_object_mut() {
            map.remove(section);
        }
        self
    }

    /// Sets the field at a dotted path (e.g. `inbound.mtls`), creating
    /// objects on the way.
    pub fn set(&mut self, path: &str, value: impl Into<Value>) -> &mut Self {
        let mut node = &mut self.value;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            if !node.is_object() {
                *node = json!({});
            }
            let map = node.as_object_mut().expect("made an object above");
            if parts.peek().is_none() {
                map.insert(part.to_owned(), value.into());
                return self;
            }
            node = map.entry(part.to_owned()).or_insert_with(|| json!({}));
        }
        self
    }

    /// Appends to the array at a dotted path (created if missing).
    pub fn push(&mut self, path: &str, item: Value) -> &mut Self {
        let current = self.get(path).cloned().unwrap_or_else(|| json!([]));
        let mut items = current.as_array().cloned().unwrap_or_default();
        items.push(item);
        self.set(path, Value::Array(items))
    }

    /// The field at a dotted path.
    pub fn get(&self, path: &str) -> Option<&Value> {
        path.split('.')
            .try_fold(&self.value, |node, part| node.get(part))
    }

    /// Adds an outbound endpoint: workload `address`, fronted by the agent
    /// at `address:15008` that must prove `identity`.
    pub fn endpoint(&mut self, address: IpAddr, identity: &str) -> &mut Self {
        let agent = SocketAddr::new(address, 15008).to_string();
        self.push(
            "outbound.endpoints",
            json!({"address": address.to_string(), "agent": agent, "identity": identity}),
        )
    }

    /// Adds an explicit outbound listener `listen -> target`.
    pub fn listener(&mut self, listen: SocketAddr, target: SocketAddr) -> &mut Self {
        self.push(
            "outbound.listeners",
            json!({"listen": listen.to_string(), "target": target.to_string()}),
        )
    }

    /// Allows a caller (exact SPIFFE ID, or a prefix ending in `*`).
    pub fn allow(&mut self, peer: &str) -> &mut Self {
        self.push("inbound.allow", json!(peer))
    }

    /// The YAML text.
    pub fn to_yaml(&self) -> String {
        crate::yaml::to_yaml(&self.value)
    }

    /// Writes the YAML to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_yaml()).with_context(|| format!("writing {}", path.display()))
    }

    fn addr(&self, path: &str, default: &str) -> Result<SocketAddr> {
        let text = self.get(path).and_then(Value::as_str).unwrap_or(default);
        text.parse()
            .with_context(|| format!("{path} = {text:?} is not ip:port"))
    }

    /// Where to reach a listener configured at `path` from the same host
    /// (`0.0.0.0` becomes `127.0.0.1`).
    fn reachable(&self, path: &str, default: &str) -> Result<SocketAddr> {
        let mut addr = self.addr(path, default)?;
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        Ok(addr)
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The process, for signals, exit status and logs.
    pub proc: Proc,
    ns: Netns,
    admin: SocketAddr,
    metrics: SocketAddr,
    config: PathBuf,
}

impl Agent {
    /// Writes `spec` to `<dir>/<name>.yaml`, starts `weft-agent run -c` in
    /// `ns` (as `uid` when given, after giving `dir` to that uid) and waits
    /// until `/ready` answers 200.
    pub fn start(
        ns: &Netns,
        name: &str,
        spec: &AgentSpec,
        dir: &TempDir,
        uid: Option<u32>,
    ) -> Result<Agent> {
        let config = dir.join(&format!("{name}.yaml"));
        spec.write(&config)?;
        if let Some(uid) = uid {
            dir.chown_all(uid)?;
        }
        let mut cmd = ns.command_as(agent_bin()?, uid);
        cmd.arg("run").arg("-c").arg(&config);
        without_weft_env(&mut cmd);
        let proc = Proc::spawn(name, cmd, dir.path())?;
        let mut agent = Agent {
            proc,
            ns: ns.clone(),
            admin: spec.reachable("admin.listen", "127.0.0.1:15000")?,
            metrics: spec.reachable("metrics.listen", "0.0.0.0:15020")?,
            config,
        };
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Waits until `GET /ready` answers 200; fails early (with the logs)
    /// if the agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        wait::ready(&self.ns, &mut self.proc, self.admin, timeout)
    }

    /// The config file the agent was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The admin address, as reachable from the agent's host.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Sends `METHOD path` to the admin endpoint from the agent's host.
    pub fn admin(&self, method: &str, path: &str) -> Result<crate::http::Response> {
        let admin = self.admin;
        self.ns
            .enter(|| crate::http::request(admin, method, path, Duration::from_secs(5)))
    }

    /// `GET /config_dump`, parsed.
    pub fn config_dump(&self) -> Result<Value> {
        let resp = self.admin("GET", "/config_dump")?;
        if resp.status != 200 {
            bail!("GET /config_dump answered {}: {}", resp.status, resp.text());
        }
        serde_json::from_slice(&resp.body).context("/config_dump is not JSON")
    }

    /// Scrapes the agent's metrics.
    pub fn metrics(&self) -> Result<Metrics> {
        metrics::scrape(&self.ns, self.metrics)
    }

    /// Waits until the sum of `name{labels}` is at least `at_least`, and
    /// returns it; the error shows the agent's `weft_` metrics and logs.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64) -> Result<f64> {
        let mut last = Metrics::default();
        let got = wait::until(
            &format!("{name}{labels:?} >= {at_least}"),
            Duration::from_secs(10),
            || {
                last = self.metrics()?;
                Ok(last.get(name, labels).filter(|v| *v >= at_least))
            },
        );
        got.map_err(|e| {
            anyhow!(
                "{e:#}\nmetrics of {}:\n{}\n{}",
                self.proc.name(),
                last.dump("weft_"),
                self.proc.logs()
            )
        })
    }

    /// The sum of `name{labels}` right now, 0 when no sample matches (a
    /// labelled gauge or counter appears only once it was first touched).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(self.metrics()?.sum(name, labels))
    }

    /// Waits up to `timeout` until the sum of `name{labels}` (0 when no
    /// sample matches) satisfies `ok`, described by `what` (e.g. `"== 0"`),
    /// and returns it; the error shows the agent's `weft_` metrics and logs.
    pub fn wait_metric_until(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        what: &str,
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let mut last = Metrics::default();
        let got = wait::until(&format!("{name}{labels:?} {what}"), timeout, || {
            last = self.metrics()?;
            let value = last.sum(name, labels);
            Ok(ok(value).then_some(value))
        });
        got.map_err(|e| {
            anyhow!(
                "{e:#}\nmetrics of {}:\n{}\n{}",
                self.proc.name(),
                last.dump("weft_"),
                self.proc.logs()
            )
        })
    }
}

/// Removes `WEFT_*` variables (like `WEFT_AGENT_BIN`) from a command's
/// environment: the agent reads them as config overrides.
pub fn without_weft_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("WEFT_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs `weft-agent ARGS` in `ns` as root and returns its output.
/// Writes `spec` to `config` and runs `weft-agent redirect install` with it
/// in `ns`, failing with the command's output if it does not succeed.
pub fn install_redirect(ns: &Netns, spec: &AgentSpec, config: &Path) -> Result<()> {
    spec.write(config)?;
    let out = cli(
        ns,
        &["redirect", "install", "-c", &config.to_string_lossy()],
    )?;
    anyhow::ensure!(
        out.status.success(),
        "redirect install failed: {}",
        describe(&out)
    );
    Ok(())
}

pub fn cli(ns: &Netns, args: &[&str]) -> Result<Output> {
    let bin = agent_bin()?;
    without_weft_env(&mut ns.command(&bin))
        .args(args)
        .output()
        .with_context(|| format!("running weft-agent {}", args.join(" ")))
}

/// Runs `weft-agent ARGS` in the current namespace and returns its output.
pub fn cli_here(args: &[&str]) -> Result<Output> {
    let bin = agent_bin()?;
    without_weft_env(&mut Command::new(&bin))
        .args(args)
        .output()
        .with_context(|| format!("running weft-agent {}", args.join(" ")))
}

/// stdout and stderr of an output, labelled, for messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
