//! The real `weft-zone` controller in a host, and `weftctl` pointed at it:
//! starting, applying resources, issuing tokens, inspecting, killing.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::agent::{describe, without_weft_env};
use crate::netns::Netns;
use crate::process::Proc;
use crate::wait;

/// The controller's HTTP API port (resources, tokens, inspect).
pub const API_PORT: u16 = 5681;
/// The controller's agent gRPC port.
pub const GRPC_PORT: u16 = 5678;

/// A running zone controller.
#[derive(Debug)]
pub struct Controller {
    /// The process, for signals and logs.
    pub proc: Proc,
    ns: Netns,
    /// `ip:5681`.
    pub api: SocketAddr,
    /// `ip:5678`, what agents dial.
    pub grpc: SocketAddr,
}

/// A bootstrap token as `weftctl token issue -o json` prints it.
#[derive(Debug, Clone)]
pub struct Token {
    /// The public id, for `token revoke`.
    pub id: String,
    /// What the agent presents.
    pub secret: String,
    /// The controller CA's pin the agent checks on first contact.
    pub ca_pin: String,
}

impl Controller {
    /// Starts `weft-zone run` in `ns` on `ip` with `store` (a URL) for zone
    /// `zone`, logs in `log_dir`, and waits until its API answers `/ready`.
    pub fn start(
        ns: &Netns,
        name: &str,
        ip: IpAddr,
        store: &str,
        zone: &str,
        log_dir: &Path,
    ) -> Result<Controller> {
        let api = SocketAddr::new(ip, API_PORT);
        let grpc = SocketAddr::new(ip, GRPC_PORT);
        let mut cmd = ns.command(crate::binaries::find("weft-zone", "WEFT_ZONE_BIN")?);
        cmd.args(["run", "--store", store, "--zone", zone])
            .args(["--listen", &api.to_string()])
            .args(["--grpc-listen", &grpc.to_string()])
            .args(["--san", &ip.to_string()])
            .env("RUST_LOG", "info,weft_zone=debug");
        without_weft_env(&mut cmd);
        let proc = Proc::spawn(name, cmd, log_dir)?;
        let mut controller = Controller {
            proc,
            ns: ns.clone(),
            api,
            grpc,
        };
        controller.wait_ready(Duration::from_secs(30))?;
        Ok(controller)
    }

    /// Waits until `GET /ready` answers 200; fails early if it exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        wait::ready(&self.ns, &mut self.proc, self.api, timeout)
    }

    /// `http://ip:5681`, for `weftctl --server`.
    pub fn server_url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// Runs `weftctl --server URL ARGS` from the controller's host.
    pub fn weftctl(&self, args: &[&str]) -> Result<Output> {
        weftctl(&self.ns, &self.server_url(), args)
    }

    /// Like [`Controller::weftctl`], failing with its output unless it succeeds.
    pub fn weftctl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.weftctl(args)?;
        if !out.status.success() {
            bail!("weftctl {} failed: {}", args.join(" "), describe(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `weftctl apply -f` with `yaml` written to `file`.
    pub fn apply(&self, file: &Path, yaml: &str) -> Result<String> {
        std::fs::write(file, yaml).with_context(|| format!("writing {}", file.display()))?;
        self.weftctl_ok(&["apply", "-f", &file.to_string_lossy()])
    }

    /// Issues a token for `mesh` that lets `workloads` enrol `max_uses`
    /// times within `ttl` (e.g. `10m`).
    pub fn issue_token(
        &self,
        mesh: &str,
        workloads: &[&str],
        ttl: &str,
        max_uses: u32,
    ) -> Result<Token> {
        let uses = max_uses.to_string();
        let mut args = vec!["token", "issue", "--mesh", mesh, "--ttl", ttl];
        args.extend(["--max-uses", &uses, "-o", "json"]);
        for w in workloads {
            args.extend(["--workload", w]);
        }
        let text = self.weftctl_ok(&args)?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("token issue printed no JSON: {text}"))?;
        let field = |name: &str| -> Result<String> {
            v.get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("token issue output has no {name}: {text}"))
        };
        Ok(Token {
            id: field("id")?,
            secret: field("secret")?,
            ca_pin: field("caPin")?,
        })
    }

    /// `GET /v1/inspect/<what>` (agents, services, workloads) as JSON.
    pub fn inspect(&self, what: &str) -> Result<Value> {
        self.get_json(&format!("/v1/inspect/{what}"))
    }

    /// `GET path` on the API, parsed as JSON; an error unless 200.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        let api = self.api;
        let resp = self
            .ns
            .enter(|| crate::http::get(api, path, Duration::from_secs(5)))?;
        if resp.status != 200 {
            bail!("GET {path} answered {}: {}", resp.status, resp.text());
        }
        serde_json::from_slice(&resp.body).with_context(|| format!("GET {path} is not JSON"))
    }

    /// `GET /metrics` on the API, parsed.
    pub fn metrics(&self) -> Result<crate::metrics::Metrics> {
        crate::metrics::scrape(&self.ns, self.api)
    }

    /// Waits until `ok` holds for `GET /v1/inspect/<what>`, and returns it.
    pub fn wait_inspect(
        &self,
        what: &str,
        describe_it: &str,
        timeout: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = Value::Null;
        let got = wait::until(describe_it, timeout, || {
            last = self.inspect(what)?;
            Ok(ok(&last).then(|| last.clone()))
        });
        got.map_err(|e| {
            anyhow!(
                "{e:#}\nlast /v1/inspect/{what}: {last:#}\n{}",
                self.proc.logs()
            )
        })
    }

    /// SIGKILL, and waits until it is gone.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// Runs `weftctl --server URL ARGS` in `ns`.
pub fn weftctl(ns: &Netns, server: &str, args: &[&str]) -> Result<Output> {
    let bin = crate::binaries::find("weftctl", "WEFTCTL_BIN")?;
    without_weft_env(&mut ns.command(&bin))
        .args(["--server", server])
        .args(args)
        .output()
        .with_context(|| format!("running weftctl {}", args.join(" ")))
}

/// The agents in an inspect answer whose `name` is `name`.
pub fn agent_entry<'a>(agents: &'a Value, name: &str) -> Option<&'a Value> {
    agents
        .as_array()?
        .iter()
        .find(|a| a.get("name").and_then(Value::as_str) == Some(name))
}
