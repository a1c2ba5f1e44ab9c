//! A VM zone on namespaced hosts: one controller host and N VM hosts on a
//! LAN, each VM running an application and an agent in controller mode
//! with transparent capture and DNS redirection.
//!
//! ```text
//!             controller 10.210.1.1 (weft-zone :5681 API, :5678 gRPC)
//!                          |
//!   LAN 10.210.1.0/24 -----+-------------------+----------------- ...
//!        |                                     |
//!   vm0 10.210.1.10                       vm1 10.210.1.11
//!   app :8080 echo, :8081 http            app ...
//!   agent (uid 1337) :15008, DNS :15053   agent ...
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::agent::{self, Agent, AgentSpec, AGENT_UID};
use crate::apps::{self, AppAddrs};
use crate::netns::{Host, Lan};
use crate::postgres::Postgres;
use crate::process::Proc;
use crate::tempdir::TempDir;
use crate::unique_marker;
use crate::wait;
use crate::zone::agent_entry;
use crate::zone::{Controller, Token};

/// The controller host's address.
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 1);
/// A second controller host (a replica), when a scenario needs one.
pub const REPLICA_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 2);
/// The database host's address (PostgreSQL, when a scenario needs it).
pub const DB_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 3);
/// Every VM's TCP echo port.
pub const ECHO_PORT: u16 = 8080;
/// Every VM's HTTP port.
pub const HTTP_PORT: u16 = 8081;
/// The mesh the scenarios use, and its trust domain.
pub const MESH: &str = "default";
/// The trust domain of [`MESH`].
pub const TRUST_DOMAIN: &str = "e2e.weft";

/// The address of VM `i`.
pub fn vm_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        210,
        1,
        10 + u8::try_from(i).expect("fewer than 200 VMs"),
    )
}

/// One VM host and what a scenario runs on it.
pub struct Vm {
    /// The namespace.
    pub host: Host,
    /// Its LAN address.
    pub ip: Ipv4Addr,
    /// The service its workload is an instance of (e.g. `payments`).
    pub service: String,
    /// The workload's name (`<service>-<i>`).
    pub workload: String,
}

/// The zone: a LAN, the controller host and the VMs, and a scratch
/// directory. Dropping it kills everything, deletes the hosts and the LAN,
/// then removes the files.
pub struct VmZone {
    /// The VMs, in order.
    pub vms: Vec<Vm>,
    /// The controller's host (10.210.1.1).
    pub controller_host: Host,
    /// A second controller host (10.210.1.2), for replicas.
    pub replica_host: Host,
    /// The database host (10.210.1.3).
    pub db_host: Host,
    /// Configs, state, logs.
    pub dir: TempDir,
    lan: Lan,
    echo_bin: PathBuf,
}

impl VmZone {
    /// Creates the LAN, the controller hosts and one VM per service name in
    /// `services` (VM `i` runs workload `<services[i]>-<i>`).
    pub fn new(echo_bin: PathBuf, services: &[&str]) -> Result<VmZone> {
        crate::require_root()?;
        let dir = TempDir::new("weft-zone-e2e")?;
        let lan = Lan::new()?;
        let controller_host = Host::new()?;
        lan.attach(&controller_host, &format!("{CONTROLLER_IP}/24"))?;
        let replica_host = Host::new()?;
        lan.attach(&replica_host, &format!("{REPLICA_IP}/24"))?;
        let db_host = Host::new()?;
        lan.attach(&db_host, &format!("{DB_IP}/24"))?;
        let mut vms = Vec::new();
        for (i, service) in services.iter().enumerate() {
            let host = Host::new()?;
            let ip = vm_ip(i);
            lan.attach(&host, &format!("{ip}/24"))?;
            // A default route makes the system resolver's nameserver
            // routable, so that its queries reach the DNS redirection
            // (they never leave the host: the agent answers them).
            host.run(
                "ip",
                &["route", "add", "default", "via", &CONTROLLER_IP.to_string()],
            )?;
            vms.push(Vm {
                host,
                ip,
                service: (*service).to_owned(),
                workload: format!("{service}-{i}"),
            });
        }
        Ok(VmZone {
            vms,
            controller_host,
            replica_host,
            db_host,
            dir,
            lan,
            echo_bin,
        })
    }

    /// Starts the controller on the controller host with `store` (a URL).
    pub fn start_controller(&self, name: &str, store: &str) -> Result<Controller> {
        Controller::start(
            &self.controller_host,
            name,
            IpAddr::V4(CONTROLLER_IP),
            store,
            "default",
            self.dir.path(),
        )
    }

    /// Starts a second controller (a replica) on the replica host.
    pub fn start_replica(&self, name: &str, store: &str) -> Result<Controller> {
        self.start_replica_in(name, store, "default")
    }

    /// Starts a controller for `zone` on the replica host.
    pub fn start_replica_in(&self, name: &str, store: &str, zone: &str) -> Result<Controller> {
        Controller::start(
            &self.replica_host,
            name,
            IpAddr::V4(REPLICA_IP),
            store,
            zone,
            self.dir.path(),
        )
    }

    /// Starts PostgreSQL on the database host.
    pub fn start_postgres(&self) -> Result<Postgres> {
        Postgres::start(&self.db_host, IpAddr::V4(DB_IP), self.dir.path())
    }

    /// `sqlite://` URL of a store file in the scratch directory.
    pub fn sqlite_store(&self, name: &str) -> String {
        format!("sqlite://{}", self.dir.join(name).display())
    }

    /// Applies the scenario's Mesh with certificates living `lifetime`
    /// (e.g. `24h`, `30s`).
    pub fn apply_mesh(&self, controller: &Controller, lifetime: &str) -> Result<()> {
        let yaml = format!(
            "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: {MESH}\n\
             spec:\n  trustDomain: {TRUST_DOMAIN}\n  workloadCertificateLifetime: {lifetime}\n"
        );
        controller.apply(&self.dir.join("mesh.yaml"), &yaml)?;
        Ok(())
    }

    /// Issues a single-use token for VM `i`'s workload.
    pub fn token_for(&self, controller: &Controller, i: usize) -> Result<Token> {
        controller.issue_token(MESH, &[&self.vms[i].workload], "10m", 1)
    }

    /// Starts VM `i`'s application: echo on :8080 and HTTP on :8081, whose
    /// answers carry `marker`.
    pub fn start_app(&self, i: usize, marker: &str) -> Result<Proc> {
        let vm = &self.vms[i];
        let addrs = AppAddrs {
            echo: SocketAddr::new(IpAddr::V4(vm.ip), ECHO_PORT),
            http: SocketAddr::new(IpAddr::V4(vm.ip), HTTP_PORT),
        };
        apps::start_app(
            &vm.host,
            &self.echo_bin,
            self.dir.path(),
            &format!("{}-app", vm.workload),
            addrs,
            marker,
        )
    }

    /// The state directory of VM `i`'s agent.
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&format!("{}-state", self.vms[i].workload))
    }

    /// VM `i`'s agent config in controller mode: enrols with `token` at
    /// `controller`, registers its workload (echo tcp, HTTP http), keeps
    /// state in [`VmZone::state_dir`], answers DNS on 127.0.0.1:15053.
    pub fn agent_spec(
        &self,
        i: usize,
        controller: &Controller,
        token: &Token,
    ) -> Result<AgentSpec> {
        let vm = &self.vms[i];
        let token_file = self.dir.join(&format!("{}.token", vm.workload));
        std::fs::write(&token_file, &token.secret)
            .with_context(|| format!("writing {}", token_file.display()))?;
        let mut spec = AgentSpec::controlled(
            IpAddr::V4(vm.ip),
            &[(ECHO_PORT, "tcp"), (HTTP_PORT, "http")],
        );
        spec.set(
            "controller",
            json!({
                "address": controller.grpc.to_string(),
                "ca_pin": token.ca_pin,
                "token_file": token_file,
                "state_dir": self.state_dir(i),
                "agent_name": vm.workload,
            }),
        );
        spec.set("workload.name", vm.workload.as_str())
            .set("workload.namespace", "default")
            .set("workload.service", vm.service.as_str())
            .set("workload.service_account", vm.service.as_str())
            // Names outside the mesh go to the controller host, where
            // nothing answers: queries never leave the suite's hosts.
            .set(
                "dns",
                json!({"enabled": true, "listen": "127.0.0.1:15053", "upstream": [format!("{CONTROLLER_IP}:53")]}),
            )
            .set("redirect.dns", true);
        Ok(spec)
    }

    /// Installs capture and DNS redirection on VM `i` for `spec`, then
    /// starts its agent (as [`AGENT_UID`]) and waits until it is ready.
    pub fn start_agent(&self, i: usize, spec: &AgentSpec) -> Result<Agent> {
        let vm = &self.vms[i];
        let config = self.dir.join(&format!("{}-redirect.yaml", vm.workload));
        agent::install_redirect(&vm.host, spec, &config)?;
        Agent::start(
            &vm.host,
            &format!("{}-agent", vm.workload),
            spec,
            &self.dir,
            Some(AGENT_UID),
        )
    }

    /// Starts VM `i`'s agent with `spec` expecting it to exit (a refused
    /// enrolment) within `timeout`; returns its exit status and logs.
    pub fn agent_exits(
        &self,
        i: usize,
        name: &str,
        spec: &AgentSpec,
        timeout: Duration,
    ) -> Result<(i32, String)> {
        let vm = &self.vms[i];
        let config = self.dir.join(&format!("{name}.yaml"));
        spec.write(&config)?;
        let mut cmd = vm.host.command(agent::agent_bin()?);
        cmd.arg("run").arg("-c").arg(&config);
        agent::without_weft_env(&mut cmd);
        let mut proc = Proc::spawn(name, cmd, self.dir.path())?;
        let status = proc.wait_exit(timeout)?;
        Ok((status.code().unwrap_or(-1), proc.logs()))
    }

    /// Runs `curl` on VM `i` (as root, so its traffic is captured) for
    /// `url`, resolving names through the host's resolver.
    pub fn curl(&self, i: usize, url: &str) -> Result<Output> {
        self.vms[i]
            .host
            .command("curl")
            .args(["-sS", "--max-time", "10", url])
            .output()
            .context("running curl (is it installed?)")
    }

    /// Runs `curl` on VM `i` for `url` and returns the HTTP status (0 when
    /// no response came: refused, reset, timed out) and the body.
    pub fn curl_status(&self, i: usize, url: &str) -> Result<(u16, String)> {
        curl_status_in(&self.vms[i].host, url)
    }

    /// Like [`VmZone::curl`], failing with its output unless it succeeds,
    /// and returning the body.
    pub fn curl_ok(&self, i: usize, url: &str) -> Result<String> {
        let out = self.curl(i, url)?;
        if !out.status.success() {
            bail!(
                "curl {url} from {} failed: {}",
                self.vms[i].workload,
                agent::describe(&out)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The scratch directory's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The test application's binary.
    pub fn echo_bin(&self) -> PathBuf {
        self.echo_bin.clone()
    }

    /// The LAN, to attach more hosts.
    pub fn lan(&self) -> &Lan {
        &self.lan
    }
}

const T: Duration = Duration::from_secs(30);

/// A zone with the Mesh applied, an app and an enrolled agent per VM.
pub struct Running {
    /// The zone and its hosts.
    pub zone: VmZone,
    /// The controller.
    pub controller: Controller,
    /// One agent per VM.
    pub agents: Vec<Agent>,
    /// One application per VM.
    pub apps: Vec<Proc>,
    /// The marker each VM's application answers with.
    pub markers: Vec<String>,
    /// The (single-use, now spent) token each VM enrolled with.
    pub tokens: Vec<Token>,
    /// Each agent's config.
    pub specs: Vec<AgentSpec>,
}

/// Brings up `services` (one VM each) with certificates living `lifetime`.
pub fn bring_up(echo_bin: PathBuf, services: &[&str], lifetime: &str) -> Result<Running> {
    let zone = VmZone::new(echo_bin, services)?;
    Running::start(zone, lifetime, services.len())
}

impl Running {
    /// Starts a controller on a SQLite store, applies the Mesh with
    /// certificates living `lifetime`, enrols the first `enrolled` VMs and
    /// waits until the controller shows them converged.
    pub fn start(zone: VmZone, lifetime: &str, enrolled: usize) -> Result<Running> {
        let controller = zone.start_controller("zone", &zone.sqlite_store("zone.db"))?;
        let mut running = Running::with_controller(zone, controller, lifetime)?;
        for i in 0..enrolled {
            running.enrol(i)?;
        }
        running.wait_converged(&running.controller)?;
        Ok(running)
    }

    /// Applies the Mesh through `controller`; enrols nobody.
    pub fn with_controller(
        zone: VmZone,
        controller: Controller,
        lifetime: &str,
    ) -> Result<Running> {
        zone.apply_mesh(&controller, lifetime)?;
        Ok(Running {
            zone,
            controller,
            agents: Vec::new(),
            apps: Vec::new(),
            markers: Vec::new(),
            tokens: Vec::new(),
            specs: Vec::new(),
        })
    }

    /// Starts VM `i`'s application and enrols its agent with a fresh
    /// single-use token. VMs are enrolled in order.
    pub fn enrol(&mut self, i: usize) -> Result<()> {
        self.enrol_with(i, None, |_| {})
    }

    /// Like [`Running::enrol`], with the token issued by `via` (by default
    /// the running controller) and the config changed by `edit`.
    pub fn enrol_with(
        &mut self,
        i: usize,
        via: Option<&Controller>,
        edit: impl FnOnce(&mut AgentSpec),
    ) -> Result<()> {
        let via = via.unwrap_or(&self.controller);
        let marker = unique_marker(&self.zone.vms[i].service);
        let app = self.zone.start_app(i, &marker)?;
        let token = self.zone.token_for(via, i)?;
        let mut spec = self.zone.agent_spec(i, via, &token)?;
        edit(&mut spec);
        let agent = self.zone.start_agent(i, &spec)?;
        self.apps.push(app);
        self.markers.push(marker);
        self.agents.push(agent);
        self.tokens.push(token);
        self.specs.push(spec);
        Ok(())
    }

    /// Waits until every enrolled agent streams from `controller` (its
    /// inventory names that replica as the agent's), which proves a
    /// reconnection where "online" only means "seen in the last seconds".
    pub fn wait_connected_to(&self, controller: &Controller) -> Result<()> {
        let replica = controller.get_json("/v1/zone")?["replica"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let enrolled = &self.zone.vms[..self.agents.len()];
        controller.wait_inspect(
            "agents",
            "every agent streaming from this replica",
            T,
            |agents| {
                enrolled.iter().all(|vm| {
                    agent_entry(agents, &vm.workload)
                        .and_then(|a| a.get("connectedReplica"))
                        .and_then(Value::as_str)
                        == Some(replica.as_str())
                })
            },
        )?;
        Ok(())
    }

    /// Waits until `controller` shows every enrolled agent online and
    /// every enrolled service with a virtual IP.
    pub fn wait_converged(&self, controller: &Controller) -> Result<()> {
        let enrolled = &self.zone.vms[..self.agents.len()];
        let names: Vec<&str> = enrolled.iter().map(|v| v.workload.as_str()).collect();
        controller.wait_inspect("agents", "every agent online", T, |agents| {
            names.iter().all(|n| {
                agent_entry(agents, n)
                    .and_then(|a| a.get("online"))
                    .and_then(Value::as_bool)
                    == Some(true)
            })
        })?;
        let services: Vec<&str> = enrolled.iter().map(|v| v.service.as_str()).collect();
        controller.wait_inspect("services", "every service with a virtual IP", T, |s| {
            services.iter().all(|name| service_vip(s, name).is_some())
        })?;
        Ok(())
    }
}

/// Runs `curl` in `ns` (as root, so its traffic is captured) for `url` and
/// returns the HTTP status (0 when no response came: refused, reset, timed
/// out) and the body.
pub fn curl_status_in(ns: &crate::netns::Netns, url: &str) -> Result<(u16, String)> {
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", url])
        .output()
        .context("running curl (is it installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

/// Waits until `curl url` from VM `from` answers with `marker` in the body.
pub fn wait_curl(zone: &VmZone, from: usize, url: &str, marker: &str) -> Result<String> {
    let mut last = String::new();
    let got = wait::until(&format!("{url} from vm{from} to answer"), T, || {
        let out = zone.curl(from, url)?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        last = format!("{body}{}", String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success() && body.contains(marker)).then_some(body))
    });
    got.map_err(|e| anyhow::anyhow!("{e:#}\nlast answer: {last}"))
}

/// The name of the service entry `name` in an inspect answer, if present
/// with a virtual IP.
pub fn service_vip(services: &Value, name: &str) -> Option<String> {
    services.as_array()?.iter().find_map(|s| {
        (s.get("name").and_then(Value::as_str) == Some(name))
            .then(|| {
                s.get("virtualIp")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .flatten()
    })
}
