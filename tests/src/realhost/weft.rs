//! Weft on real hosts: a zone controller host and agent hosts on one
//! bridge, Weft installed from the packages (by the Ansible playbook, or
//! by hand as `docs/vm-zone.md` says), workloads run as systemd units, and
//! what the scenarios check (units, the zone's inventory, traffic, metrics).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;

use super::ansible;
use super::bridge::Bridge;
use super::image::Image;
use super::nspawn::{Boot, NspawnHost};
use super::Machine;
use crate::metrics::{self, Metrics};
use crate::tempdir::TempDir;
use crate::wait;

/// The workloads' HTTP port (the playbook's example declares it `http`).
pub const WORKLOAD_PORT: u16 = 8080;
/// How long a playbook run may take (~10 s per run when measured on an
/// idle machine; CI machines are shared).
pub const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(240);
/// The agents' metrics port.
pub const METRICS_PORT: u16 = 15020;
/// The zone's API, on the zone host's loopback (as the packages and the
/// playbook leave it: it has no authentication).
pub const ZONE_API: &str = "http://127.0.0.1:5681";

/// An agent host: its inventory name is its host name and its workload's
/// name; `service` is the Service its workload belongs to.
#[derive(Debug)]
pub struct AgentHost {
    /// The container.
    pub host: NspawnHost,
    /// The workload's Service.
    pub service: String,
}

/// A zone on real hosts: the bridge, the controller host (`zone`, the
/// bridge's address `.10`) and the agent hosts (`.11` on).
#[derive(Debug)]
pub struct RealZone {
    /// The cached root the hosts boot.
    pub image: Image,
    /// Agent hosts, in the order given.
    pub agents: Vec<AgentHost>,
    /// The controller's host.
    pub zone: NspawnHost,
    /// Inventory and scratch files.
    pub dir: TempDir,
    // Dropped last: the hosts detach from it first.
    bridge: Bridge,
}

impl RealZone {
    /// Boots the zone host and one host per `(hostname, service)`, all at
    /// once, with no Weft on them; with a stateful firewall on each when
    /// `firewall` (see [`Boot::firewall`]).
    pub fn boot(agents: &[(&str, &str)], firewall: bool) -> Result<RealZone> {
        let image = Image::get()?;
        let bridge = Bridge::new()?;
        let dir = TempDir::new("weft-realzone")?;
        let start = Instant::now();
        let (zone, booted) = std::thread::scope(|s| {
            let zone = s.spawn(|| {
                NspawnHost::boot(
                    &image,
                    Boot {
                        hostname: "zone",
                        bridge: &bridge,
                        index: 0,
                        root: None,
                        firewall,
                    },
                )
            });
            let hosts: Vec<_> = agents
                .iter()
                .enumerate()
                .map(|(i, (name, _))| {
                    let (image, bridge) = (&image, &bridge);
                    s.spawn(move || {
                        NspawnHost::boot(
                            image,
                            Boot {
                                hostname: name,
                                bridge,
                                index: 1 + u8::try_from(i).expect("few hosts"),
                                root: None,
                                firewall,
                            },
                        )
                    })
                })
                .collect();
            let zone = zone.join().expect("boot thread panicked");
            let hosts: Vec<Result<NspawnHost>> = hosts
                .into_iter()
                .map(|h| h.join().expect("boot thread panicked"))
                .collect();
            (zone, hosts)
        });
        let zone = zone?;
        let mut hosts = Vec::new();
        for (host, (_, service)) in booted.into_iter().zip(agents) {
            hosts.push(AgentHost {
                host: host?,
                service: (*service).to_owned(),
            });
        }
        eprintln!(
            "booted {} hosts in {:.1} s",
            1 + hosts.len(),
            start.elapsed().as_secs_f64()
        );
        Ok(RealZone {
            image,
            agents: hosts,
            zone,
            dir,
            bridge,
        })
    }

    /// The bridge the hosts are on.
    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// The agent host named `name`.
    pub fn agent(&self, name: &str) -> &AgentHost {
        self.agents
            .iter()
            .find(|a| a.host.name() == name)
            .unwrap_or_else(|| panic!("no agent host {name}"))
    }

    /// Waits until every host's sshd answers (Ansible's way in).
    pub fn wait_ssh(&self) -> Result<()> {
        self.zone.wait_ssh(Duration::from_secs(30))?;
        for a in &self.agents {
            a.host.wait_ssh(Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// Writes the inventory of these hosts for the repository's playbook
    /// (groups `weft_zone` and `weft_agents`, as
    /// `ansible/inventory.example.ini`), logging in as root with the
    /// image's key. `only` limits the agents listed (None: all).
    pub fn inventory(&self, only: Option<&[&str]>) -> Result<PathBuf> {
        let mut text = format!(
            "[weft_zone]\nzone ansible_host={}\n\n[weft_agents]\n",
            self.zone.ip()
        );
        for a in &self.agents {
            if only.is_some_and(|o| !o.contains(&a.host.name())) {
                continue;
            }
            text.push_str(&format!(
                "{} ansible_host={} weft_agent_workload_service={}\n",
                a.host.name(),
                a.host.ip(),
                a.service
            ));
        }
        text.push_str(&format!(
            "\n[all:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n\
             ansible_python_interpreter=/usr/bin/python3\n\
             ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes'\n",
            self.image.ssh_key().display()
        ));
        let path = self.dir.join("inventory.ini");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Runs `ansible/site.yml` on these hosts with the packages
    /// `zone_debs` (weft-zone's and weftctl's) and `agent_deb`; `only`
    /// limits the agents (the zone always runs).
    pub fn playbook(
        &self,
        zone_debs: &[&Path],
        agent_deb: &Path,
        only: Option<&[&str]>,
    ) -> Result<ansible::Run> {
        let inventory = self.inventory(only)?;
        let playbook = ansible::ansible_dir().join("site.yml");
        ensure!(
            playbook.is_file(),
            "{} is missing: the real-host tests install with the repository's Ansible playbook",
            playbook.display()
        );
        // Extra vars (JSON, for the list): they override
        // ansible/group_vars/all.yml, which points at target/ for operators.
        let vars = serde_json::json!({
            "weft_zone_package_files": zone_debs,
            "weft_agent_package_file": agent_deb,
        })
        .to_string();
        ansible::run_playbook(
            &playbook,
            &inventory,
            // -v: each task's result, for a failure message.
            &["-v", "-e", &vars],
            self.dir.path(),
            PLAYBOOK_TIMEOUT,
        )
    }

    /// `weftctl --server http://127.0.0.1:5681 ARGS` on the zone host, as
    /// the operator runs it there; fails unless it exits 0.
    pub fn weftctl(&self, args: &str) -> Result<String> {
        self.zone
            .sh_ok(&format!("weftctl --server {ZONE_API} {args}"))
    }

    /// `weftctl inspect WHAT -o json` on the zone host.
    pub fn inspect(&self, what: &str) -> Result<Value> {
        let text = self.weftctl(&format!("inspect {what} -o json"))?;
        serde_json::from_str(&text).with_context(|| format!("inspect {what}: {text}"))
    }

    /// Waits until every agent in `names` is `online` in the zone's
    /// inventory and has acked a config; returns the inventory.
    pub fn wait_online(&self, names: &[&str], timeout: Duration) -> Result<Value> {
        let mut last = Value::Null;
        let got = wait::until("the agents to be online in the zone", timeout, || {
            last = self.inspect("agents")?;
            let all = names.iter().all(|n| {
                agent_entry(&last, n).is_some_and(|a| {
                    a["state"] == "online"
                        && a["appliedVersion"].as_str().is_some_and(|v| !v.is_empty())
                })
            });
            Ok(all.then(|| last.clone()))
        });
        got.map_err(|e| anyhow!("{e:#}\nlast inspect agents: {last:#}"))
    }
}

/// The entry of `inspect agents` whose name is `name`.
pub fn agent_entry<'a>(agents: &'a Value, name: &str) -> Option<&'a Value> {
    agents
        .as_array()?
        .iter()
        .find(|a| a.get("name").and_then(Value::as_str) == Some(name))
}

/// Starts the workload on `host`: Python's HTTP server on
/// [`WORKLOAD_PORT`] as a transient systemd unit (`workload.service`, a
/// dynamic user), serving `marker.txt` that holds `marker`. Waits until it
/// answers on loopback (which capture leaves alone).
pub fn start_workload(host: &dyn Machine, marker: &str) -> Result<()> {
    host.sh_ok(&format!(
        "mkdir -p /srv/www && echo '{marker}' > /srv/www/marker.txt && chmod -R a+rX /srv/www && \
         systemd-run --unit=workload --property=DynamicUser=yes \
           python3 -m http.server {WORKLOAD_PORT} --directory /srv/www"
    ))?;
    wait::until(
        &format!("the workload on {}", host.name()),
        Duration::from_secs(30),
        || {
            let out = host.sh(&format!(
                "curl -sf --max-time 2 http://127.0.0.1:{WORKLOAD_PORT}/marker.txt"
            ))?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .contains(marker)
                .then_some(()))
        },
    )
}

/// `curl` on `host` as root (so capture takes it), resolving with the
/// host's resolver; returns (exit code, stdout, stderr).
pub fn curl(host: &dyn Machine, url: &str) -> Result<(i32, String, String)> {
    let out = host.sh(&format!("curl -sS --max-time 10 '{url}'"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Waits until `url`, fetched on `host`, answers with a body holding
/// `marker` (the agents converge on the zone's view within seconds).
pub fn wait_curl(host: &dyn Machine, url: &str, marker: &str, timeout: Duration) -> Result<String> {
    wait::until(
        &format!("{url} from {} to answer {marker}", host.name()),
        timeout,
        || {
            let (code, body, err) = curl(host, url)?;
            if code == 0 && body.contains(marker) {
                Ok(Some(body))
            } else {
                Err(anyhow!("curl exit {code}: {}{}", body.trim(), err.trim()))
            }
        },
    )
}

/// The agent's metrics, scraped from the test over the bridge.
pub fn scrape(ip: Ipv4Addr) -> Result<Metrics> {
    metrics::scrape_here(SocketAddr::new(ip.into(), METRICS_PORT))
}

/// Sends a plaintext HTTP request straight to `ip:port` from the test (the
/// outside) and returns what came back (empty when the connection was
/// reset or closed without an answer, as strict mode does).
pub fn plaintext_get(ip: Ipv4Addr, port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let addr = SocketAddr::new(ip.into(), port);
    let mut stream = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(stream) => stream,
        // Refused before a byte was exchanged: as good as a reset later.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(String::new()),
        Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = stream.write_all(b"GET /marker.txt HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The host facts `inspect agents` reports for an agent, checked against
/// what the host itself says; an error names what is missing or wrong.
pub fn check_host_facts(entry: &Value, host: &dyn Machine) -> Result<()> {
    let facts = &entry["host"];
    let kernel = host.sh_ok("uname -r")?;
    let os = facts["os"].as_str().unwrap_or_default();
    ensure!(
        os.contains("Debian"),
        "os {os:?} is not Debian's: {entry:#}"
    );
    ensure!(
        facts["kernel"].as_str() == Some(kernel.trim()),
        "kernel {} is not the host's {}: {entry:#}",
        facts["kernel"],
        kernel.trim()
    );
    ensure!(
        facts["cpus"].as_u64().is_some_and(|c| c >= 1),
        "cpus: {entry:#}"
    );
    ensure!(
        facts["memoryBytes"].as_u64().is_some_and(|m| m > 0),
        "memoryBytes: {entry:#}"
    );
    ensure!(
        facts["agentRssBytes"].as_u64().is_some_and(|m| m > 0),
        "agentRssBytes: {entry:#}"
    );
    Ok(())
}

/// `MainPID` of `unit` on `host` (0 when it does not run).
pub fn main_pid(host: &dyn Machine, unit: &str) -> Result<u32> {
    let out = host.sh_ok(&format!("systemctl show -p MainPID --value {unit}"))?;
    out.trim()
        .parse()
        .with_context(|| format!("MainPID of {unit}: {out}"))
}

/// Waits until `unit`'s main process runs the binary installed on disk
/// now, not one an upgrade replaced (which `/proc/PID/exe` shows as
/// `(deleted)`): after an upgrade the agent hands over to a new process,
/// which systemd takes as the main one once it serves. Returns its pid.
pub fn wait_runs_installed_binary(
    host: &dyn Machine,
    unit: &str,
    timeout: Duration,
) -> Result<u32> {
    let mut last = String::new();
    let waited = wait::until(
        &format!("{unit} on {} to run the installed binary", host.name()),
        timeout,
        || {
            let pid = main_pid(host, unit)?;
            let out = host.sh(&format!("readlink /proc/{pid}/exe"))?;
            last = format!(
                "MainPID {pid}: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
            let exe = String::from_utf8_lossy(&out.stdout);
            Ok((pid != 0 && out.status.success() && !exe.contains("(deleted)")).then_some(pid))
        },
    );
    waited.map_err(|e| anyhow!("{e:#}\nlast: {last}\n{}", host.unit_report(unit)))
}

/// The Mesh the by-hand installs apply.
pub const MESH_YAML: &str =
    "apiVersion: weft.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: default\n\
spec:\n  trustDomain: realhost.test\n  workloadCertificateLifetime: 24h\n";

/// Installs `deb` on `host` with dpkg, as an operator would by hand.
pub fn dpkg_install(host: &dyn Machine, deb: &Path) -> Result<()> {
    dpkg_install_all(host, &[deb])
}

/// Installs `debs` on `host` with one `dpkg -i`.
pub fn dpkg_install_all(host: &dyn Machine, debs: &[&Path]) -> Result<()> {
    let mut remotes = Vec::new();
    for deb in debs {
        let name = deb
            .file_name()
            .and_then(|n| n.to_str())
            .context("package file name")?;
        let remote = format!("/tmp/{name}");
        host.copy_in(deb, &remote)?;
        remotes.push(format!("'{remote}'"));
    }
    // No terminal: a conffile question would fail the install instead of
    // waiting forever; `timeout` bounds it anyway.
    host.sh_ok(&format!(
        "DEBIAN_FRONTEND=noninteractive timeout 300 dpkg -i {} </dev/null",
        remotes.join(" ")
    ))?;
    Ok(())
}

/// Installs and starts the zone controller on `host` by hand
/// (docs/vm-zone.md): the packages (`weft-zone` and `weftctl`), its flags
/// in /etc/weft/zone.env (gRPC for agents on every address, the API on
/// loopback), the Mesh. Returns the zone CA pin.
pub fn install_zone_by_hand(
    host: &dyn Machine,
    debs: &[&Path],
    timeout: Duration,
) -> Result<String> {
    dpkg_install_all(host, debs)?;
    host.write(
        "/etc/weft/zone.env",
        "WEFT_ZONE_ARGS=\"--zone realhost --store sqlite:///var/lib/weft/zone/zone.db \
         --listen 127.0.0.1:5681 --grpc-listen 0.0.0.0:5678\"\n",
        "0644",
    )?;
    host.sh_ok("systemctl enable weft-zone && systemctl restart weft-zone")?;
    host.wait_active("weft-zone", timeout)?;
    host.write("/etc/weft/mesh.yaml", MESH_YAML, "0644")?;
    wait::until("the zone to take the Mesh", timeout, || {
        let out = host.sh(&format!(
            "weftctl --server {ZONE_API} apply -f /etc/weft/mesh.yaml"
        ))?;
        if out.status.success() {
            Ok(Some(()))
        } else {
            Err(anyhow!("{}", super::describe(&out)))
        }
    })?;
    let zone = host.sh_ok(&format!("curl -sf {ZONE_API}/v1/zone"))?;
    let zone: Value = serde_json::from_str(&zone).with_context(|| format!("/v1/zone: {zone}"))?;
    zone["caPin"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no caPin in /v1/zone: {zone}"))
}

/// Issues a single-use token for `workload` on the zone host; returns the
/// secret.
pub fn issue_token(zone: &dyn Machine, workload: &str) -> Result<String> {
    let out = zone.sh_ok(&format!(
        "weftctl --server {ZONE_API} token issue --mesh default --workload {workload} \
         --ttl 30m --max-uses 1 -o secret"
    ))?;
    Ok(out.trim().to_owned())
}

/// What an agent installed by hand serves.
#[derive(Debug, Clone)]
pub struct HandAgent<'a> {
    /// The zone's gRPC endpoint, `ip:5678`.
    pub controller: &'a str,
    /// The zone CA pin.
    pub ca_pin: &'a str,
    /// A bootstrap token secret.
    pub token: &'a str,
    /// The workload's (and the agent's) name.
    pub workload: &'a str,
    /// Its Service.
    pub service: &'a str,
    /// The host's address peers reach the workload on.
    pub address: &'a str,
}

/// Writes the agent's config and token on `host` (the package installed)
/// and starts it: capture installed by the agent at start, its own uid
/// exempt (the default for `redirect.on_start`).
pub fn configure_agent_by_hand(host: &dyn Machine, a: &HandAgent<'_>) -> Result<()> {
    let yaml = format!(
        "mode: sidecar\ncontroller:\n  address: {controller}\n  ca_pin: {pin}\n  \
         token_file: /etc/weft/agent.token\n  state_dir: /var/lib/weft/agent\n\
         workload:\n  name: {w}\n  service: {s}\n  namespace: default\n  \
         service_account: {s}\n  address: {addr}\n  ports:\n    - {{ port: {WORKLOAD_PORT}, protocol: http }}\n\
         dns:\n  enabled: true\n  listen: 127.0.0.1:15053\n\
         redirect:\n  exclude_ports: [22]\n  on_start: true\n\
         metrics: {{ listen: 0.0.0.0:{METRICS_PORT} }}\n",
        controller = a.controller,
        pin = a.ca_pin,
        w = a.workload,
        s = a.service,
        addr = a.address,
    );
    host.write("/etc/weft/agent.yaml", &yaml, "0640")?;
    host.write("/etc/weft/agent.token", &format!("{}\n", a.token), "0640")?;
    host.sh_ok(
        "chgrp weft /etc/weft/agent.yaml /etc/weft/agent.token && \
         weft-agent check -c /etc/weft/agent.yaml && systemctl enable weft-agent",
    )?;
    Ok(())
}

/// Starts the agent without waiting (Type=notify: a blocking `start`
/// returns once it enrolled and serves; a caller waits with a deadline
/// instead, e.g. [`Machine::wait_active`]).
pub fn start_agent(host: &dyn Machine) -> Result<()> {
    host.sh_ok("systemctl start --no-block weft-agent")?;
    Ok(())
}
