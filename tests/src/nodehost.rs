//! A node host on the VM zone's LAN: one agent in node mode for several
//! workloads, each in a network namespace of its own linked to the host by
//! a veth pair, as containers on a bridge or pods on a node are.
//!
//! ```text
//!   LAN 10.210.1.0/24 --- node host 10.210.1.30 (weft-agent, mode: node)
//!                             | 10.211.<k>.1
//!                         workload k 10.211.<k>.2 (echo :8080, HTTP :8081)
//! ```
//!
//! Every other host of the zone routes 10.211.0.0/16 through the node host,
//! so peers reach each workload's own HBONE listener at its address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Output;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::agent::{self, Agent, AgentSpec};
use crate::apps::{self, AppAddrs};
use crate::netns::{link, Host};
use crate::process::Proc;
use crate::vmzone::{VmZone, CONTROLLER_IP, ECHO_PORT, HTTP_PORT};
use crate::zone::{Controller, Token};

/// The node host's LAN address.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 1, 30);

/// Workload `k`'s address.
pub fn workload_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        211,
        u8::try_from(k + 1).expect("fewer than 250 workloads"),
        2,
    )
}

/// One workload of the node host.
pub struct NodeWorkload {
    /// Its own namespace.
    pub host: Host,
    pub ip: Ipv4Addr,
    /// Its name in the zone (`<service>-n<k>`).
    pub name: String,
    pub service: String,
}

/// The node host and its workloads.
pub struct NodeHost {
    pub host: Host,
    pub workloads: Vec<NodeWorkload>,
    /// The agent's enrolment control socket.
    pub control: std::path::PathBuf,
}

impl NodeHost {
    /// Creates the node host on `zone`'s LAN and one workload namespace per
    /// service, with routes from every host of the zone.
    pub fn new(zone: &VmZone, services: &[&str]) -> Result<NodeHost> {
        let host = Host::new()?;
        zone.lan().attach(&host, &format!("{NODE_IP}/24"))?;
        host.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let mut workloads = Vec::new();
        for (k, service) in services.iter().enumerate() {
            let w = Host::new()?;
            let ip = workload_ip(k);
            let gateway = Ipv4Addr::new(10, 211, ip.octets()[2], 1);
            link(&host, &format!("{gateway}/24"), &w, &format!("{ip}/24"))?;
            w.run(
                "ip",
                &["route", "add", "default", "via", &gateway.to_string()],
            )?;
            w.run("ip", &["link", "set", "lo", "up"])?;
            workloads.push(NodeWorkload {
                host: w,
                ip,
                name: format!("{service}-n{k}"),
                service: (*service).to_owned(),
            });
        }
        let peers = std::iter::once(&zone.controller_host)
            .chain(std::iter::once(&zone.replica_host))
            .chain(zone.vms.iter().map(|v| &v.host));
        for peer in peers {
            peer.run(
                "ip",
                &["route", "add", "10.211.0.0/16", "via", &NODE_IP.to_string()],
            )?;
        }
        Ok(NodeHost {
            host,
            workloads,
            control: zone.dir.join("node-agent.sock"),
        })
    }

    /// The node agent's config: node mode, enrolled with `token` at
    /// `controller`, state under the zone's directory, DNS like the VMs'.
    pub fn agent_spec(
        &self,
        zone: &VmZone,
        controller: &Controller,
        token: &Token,
    ) -> Result<AgentSpec> {
        let token_file = zone.dir.join("node.token");
        std::fs::write(&token_file, &token.secret)
            .with_context(|| format!("writing {}", token_file.display()))?;
        let mut spec = AgentSpec::controlled(IpAddr::V4(NODE_IP), &[]);
        spec.remove("workload");
        spec.set("mode", "node")
            .set(
                "controller",
                json!({
                    "address": controller.grpc.to_string(),
                    "ca_pin": token.ca_pin,
                    "token_file": token_file,
                    "state_dir": zone.dir.join("node-state"),
                    "agent_name": "node",
                }),
            )
            .set(
                "dns",
                json!({"enabled": true, "listen": "127.0.0.1:15053", "upstream": [format!("{CONTROLLER_IP}:53")]}),
            )
            .set("redirect", json!({"exclude_ports": [22], "inbound": true, "dns": true}))
            .set("node.control_socket", self.control.display().to_string());
        Ok(spec)
    }

    /// Starts the node agent (as root: entering workloads' namespaces takes
    /// CAP_SYS_ADMIN) and waits until it is ready.
    pub fn start_agent(&self, zone: &VmZone, spec: &AgentSpec) -> Result<Agent> {
        Agent::start(&self.host, "node-agent", spec, &zone.dir, None)
    }

    /// Starts workload `k`'s application, answering with `marker`.
    pub fn start_app(&self, zone: &VmZone, k: usize, marker: &str) -> Result<Proc> {
        let w = &self.workloads[k];
        let addrs = AppAddrs {
            echo: SocketAddr::new(IpAddr::V4(w.ip), ECHO_PORT),
            http: SocketAddr::new(IpAddr::V4(w.ip), HTTP_PORT),
        };
        apps::start_app(
            &w.host,
            &zone.echo_bin(),
            zone.path(),
            &format!("{}-app", w.name),
            addrs,
            marker,
        )
    }

    /// `weft-agent workload enroll` for workload `k` on the node host.
    pub fn enrol(&self, k: usize) -> Result<Output> {
        let w = &self.workloads[k];
        let ip = w.ip.to_string();
        let netns = w.host.path();
        let echo = ECHO_PORT.to_string();
        let http = format!("{HTTP_PORT}/http");
        self.cli(&[
            "enroll",
            "--name",
            &w.name,
            "--service",
            &w.service,
            "--service-account",
            &w.service,
            "--address",
            &ip,
            "--netns",
            &netns,
            "--port",
            &echo,
            "--port",
            &http,
        ])
    }

    /// `weft-agent workload ARGS` against this host's node agent.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let socket = self.control.display().to_string();
        let mut all = vec!["workload", "--socket", socket.as_str()];
        all.extend_from_slice(args);
        agent::cli(&self.host, &all)
    }

    /// Like [`NodeHost::enrol`], failing with the command's output unless
    /// it succeeds.
    pub fn enrol_ok(&self, k: usize) -> Result<()> {
        let out = self.enrol(k)?;
        if !out.status.success() {
            bail!(
                "enrolling {}: {}",
                self.workloads[k].name,
                agent::describe(&out)
            );
        }
        Ok(())
    }

    /// `weft-agent workload unenroll` for workload `k`.
    pub fn unenrol(&self, k: usize) -> Result<Output> {
        self.cli(&["unenroll", &self.workloads[k].name])
    }

    /// Runs `curl` in workload `k`'s namespace (as root: captured all the
    /// same) and returns the HTTP status (0: no answer) and the body.
    pub fn curl_status(&self, k: usize, url: &str) -> Result<(u16, String)> {
        crate::vmzone::curl_status_in(&self.workloads[k].host, url)
    }

    /// Whether workload `k`'s namespace holds Weft's nftables table.
    pub fn has_rules(&self, k: usize) -> Result<bool> {
        let out = self.workloads[k].host.run("nft", &["list", "tables"])?;
        Ok(out.lines().any(|l| l.trim() == "table inet weft"))
    }

    /// The TCP ports listening in workload `k`'s namespace.
    pub fn listening(&self, k: usize) -> Result<Vec<u16>> {
        let out = self.workloads[k].host.run("ss", &["-Hltn"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter_map(|a| a.rsplit_once(':'))
            .filter_map(|(_, p)| p.parse().ok())
            .collect())
    }
}
