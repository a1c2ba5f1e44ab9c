//! A real host as a systemd-nspawn container: systemd as PID 1 booting the
//! cached Debian root under a throw-away overlay, on a zone's bridge with
//! a static address. What runs in it runs as on a VM, except that the
//! kernel is the machine's (see docs/real-host-tests.md).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::bridge::Bridge;
use super::image::Image;
use super::ledger::Ledger;
use super::Machine;
use crate::tempdir::TempDir;
use crate::wait;

/// How long systemd may take to finish booting (0.3-0.6 s when measured;
/// a loaded CI machine is slower).
const BOOT: Duration = Duration::from_secs(90);

/// A booted container; stopped (and its files removed) on drop.
#[derive(Debug)]
pub struct NspawnHost {
    hostname: String,
    machine: String,
    ip: Ipv4Addr,
    nspawn: Child,
    leader: u32,
    dir: TempDir,
    ledger: Ledger,
    booted_in: Duration,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct Boot<'a> {
    /// The host name systemd sets (agents take their name from it).
    pub hostname: &'a str,
    /// The bridge (zone) to attach to.
    pub bridge: &'a Bridge,
    /// Which address on the bridge: `bridge.host_ip(index)`.
    pub index: u8,
    /// The root to boot. `None`: the cached image under a tmpfs overlay
    /// (`--volatile=overlay`: every boot is fresh, nothing is copied).
    /// `Some(dir)`: a writable root the caller prepared (e.g. an overlay it
    /// installed RPMs into), booted as it is.
    pub root: Option<&'a Path>,
    /// Load a stateful firewall ([`STATEFUL_FIREWALL`]) right after boot,
    /// as most production hosts have: the kernel then tracks every
    /// connection from its first packet. A bare host (false) tracks none
    /// until a rule needs it, e.g. when the agent installs its capture.
    pub firewall: bool,
}

/// An nftables ruleset that accepts everything but makes the kernel track
/// connections (`ct state`), like any stateful host firewall.
pub const STATEFUL_FIREWALL: &str = "table inet filter {\n  chain input {\n    \
type filter hook input priority filter; policy accept;\n    \
ct state established,related accept\n  }\n}\n";

impl NspawnHost {
    /// Boots `boot.hostname` and waits until systemd has finished booting
    /// (`is-system-running` says `running` or `degraded`).
    pub fn boot(image: &Image, boot: Boot<'_>) -> Result<NspawnHost> {
        crate::require_root()?;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // The machine name names the host-side veth (`vb-<machine>`), which
        // must be unique in the root namespace across concurrent tests.
        let machine = format!("wrh{}-{n}", std::process::id());
        let dir = TempDir::new(&format!("weft-realhost-{}", boot.hostname))?;
        let ip = boot.bridge.host_ip(boot.index);
        let network = dir.join("10-host0.network");
        std::fs::write(
            &network,
            format!(
                "[Match]\nName=host0\n\n[Network]\nAddress={ip}/24\nGateway={gw}\n\
                 LinkLocalAddressing=no\nIPv6AcceptRA=no\n",
                gw = boot.bridge.gateway()
            ),
        )?;
        // The agent's DNS proxy forwards names outside the mesh to the
        // resolv.conf nameservers: the test's address, where nothing
        // answers, so that no query leaves the zone.
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, format!("nameserver {}\n", boot.bridge.gateway()))?;
        // systemd sets the host name from /etc/hostname, over nspawn's
        // --hostname: each host gets its own (agents are named after it).
        let hostname = dir.join("hostname");
        std::fs::write(&hostname, format!("{}\n", boot.hostname))?;
        let hosts = dir.join("hosts");
        std::fs::write(
            &hosts,
            format!(
                "127.0.0.1 localhost\n127.0.1.1 {}\n::1 localhost\n",
                boot.hostname
            ),
        )?;
        let console = dir.join("console.log");
        let log = File::create(&console)?;
        let mut cmd = Command::new("systemd-nspawn");
        match boot.root {
            None => cmd.arg("-D").arg(image.rootfs()).arg("--volatile=overlay"),
            Some(root) => cmd.arg("-D").arg(root),
        };
        cmd.args(["--boot", "--machine", &machine, "--hostname", boot.hostname])
            // The machine's PID 1 is not systemd: nspawn must neither
            // register with machined nor ask systemd for a scope.
            .args(["--register=no", "--keep-unit"])
            .arg(format!("--network-bridge={}", boot.bridge.name()))
            // The agent installs nftables rules and reads SO_ORIGINAL_DST.
            .arg("--capability=CAP_NET_ADMIN,CAP_NET_RAW")
            .args(["--link-journal=no", "--resolv-conf=off", "--timezone=off"])
            .arg(format!(
                "--bind-ro={}:/etc/systemd/network/10-host0.network",
                network.display()
            ))
            .arg(format!("--bind-ro={}:/etc/resolv.conf", resolv.display()))
            .arg(format!("--bind-ro={}:/etc/hostname", hostname.display()))
            .arg(format!("--bind-ro={}:/etc/hosts", hosts.display()))
            .args(["--console=pipe"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let start = Instant::now();
        let nspawn = cmd
            .spawn()
            .context("spawning systemd-nspawn (is systemd-container installed?)")?;
        let mut ledger = Ledger::new()?;
        ledger.process(nspawn.id());
        let mut host = NspawnHost {
            hostname: boot.hostname.to_owned(),
            machine,
            ip,
            nspawn,
            leader: 0,
            dir,
            ledger,
            booted_in: Duration::ZERO,
        };
        host.leader = host.find_leader()?;
        host.ledger.process(host.leader);
        host.wait_booted()?;
        if boot.firewall {
            // Before anything connects over the network (sshd is up, but
            // the test has not logged in yet).
            host.sh_ok(&format!("nft -f - <<'EOF'\n{STATEFUL_FIREWALL}EOF"))?;
        }
        host.booted_in = start.elapsed();
        Ok(host)
    }

    /// The container's PID 1 as the machine sees it: nspawn's child whose
    /// pid in its own namespace is 1.
    fn find_leader(&mut self) -> Result<u32> {
        let nspawn = self.nspawn.id();
        let console = self.dir.join("console.log");
        let found = wait::until("the container's PID 1", BOOT, || {
            if let Some(status) = self.nspawn.try_wait()? {
                return Err(wait::fatal(format!("systemd-nspawn exited ({status})")));
            }
            Ok(child_pid1(nspawn))
        });
        found.map_err(|e| anyhow::anyhow!("{e:#}\n{}", tail_file(&console)))
    }

    fn wait_booted(&mut self) -> Result<()> {
        let console = self.dir.join("console.log");
        let mut last = String::new();
        let booted = wait::until(
            &format!("systemd on {} to finish booting", self.hostname),
            BOOT,
            || {
                if let Some(status) = self.nspawn.try_wait()? {
                    return Err(wait::fatal(format!("systemd-nspawn exited ({status})")));
                }
                let out = self.sh("systemctl is-system-running")?;
                last = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                Ok(matches!(last.as_str(), "running" | "degraded").then_some(()))
            },
        );
        booted.map_err(|e| anyhow::anyhow!("{e:#}\n{}", tail_file(&console)))?;
        if last == "degraded" {
            // Not fatal (a unit a test does not need may fail in a
            // container), but worth seeing when a later check fails.
            let failed = self.sh_ok("systemctl --failed --no-legend --plain")?;
            eprintln!(
                "{}: degraded, failed units: {}",
                self.hostname,
                failed.trim()
            );
        }
        Ok(())
    }

    /// Waits until sshd answers on the host's address (from the test).
    pub fn wait_ssh(&self, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::new(self.ip.into(), 22);
        wait::until(&format!("sshd on {addr}"), timeout, || {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut banner = [0u8; 4];
            std::io::Read::read_exact(&mut stream, &mut banner)?;
            Ok((&banner == b"SSH-").then_some(()))
        })
    }

    /// Its address on the bridge.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The container's PID 1, as the machine sees it (for `nsenter`).
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// From systemd-nspawn's start to systemd having booted.
    pub fn booted_in(&self) -> Duration {
        self.booted_in
    }

    /// Everything nspawn and the container printed.
    pub fn console(&self) -> String {
        tail_file(&self.dir.join("console.log"))
    }

    /// The machine's view of the container's network namespace, for
    /// running a test binary inside it.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.leader))
    }

    /// A command that runs in every namespace of the container (as root,
    /// with a clean environment), like a root shell on the host.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "--", program])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env("HOME", "/root")
            .env("TERM", "dumb");
        cmd
    }

    /// Stops the container: SIGTERM makes nspawn ask systemd to power off;
    /// a second SIGTERM stops it at once (one SIGTERM was once seen to take
    /// over 50 s); SIGKILL if even that hangs.
    pub fn stop(&mut self) {
        if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.nspawn.id() as i32;
        for (signal, wait_for) in [
            (libc::SIGTERM, Duration::from_secs(10)),
            (libc::SIGTERM, Duration::from_secs(5)),
            (libc::SIGKILL, Duration::from_secs(5)),
        ] {
            // SAFETY: kill has no memory-safety preconditions; the child is
            // not reaped yet, so the pid is still nspawn's.
            unsafe { libc::kill(pid, signal) };
            let deadline = Instant::now() + wait_for;
            while Instant::now() < deadline {
                if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Machine for NspawnHost {
    fn name(&self) -> &str {
        &self.hostname
    }

    fn sh(&self, script: &str) -> Result<Output> {
        self.command("/bin/sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("nsenter into {} ({})", self.hostname, self.machine))
    }

    fn copy_in(&self, src: &Path, dst: &str) -> Result<()> {
        let mut cmd = self.command("/bin/sh");
        cmd.args(["-c", "cat > \"$1\"", "sh", dst]);
        super::pipe_file(cmd, src, &self.hostname, dst)
    }
}

impl Drop for NspawnHost {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- {} console -----\n{}", self.hostname, self.console());
        }
        self.stop();
    }
}

/// The child of `parent` that is PID 1 in its own pid namespace.
fn child_pid1(parent: u32) -> Option<u32> {
    let parent = parent.to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
            };
            let is_child = field("PPid:")? == parent;
            let nspid: Vec<&str> = field("NSpid:")?.split_whitespace().collect();
            (is_child && nspid.len() >= 2 && nspid.last() == Some(&"1")).then_some(pid)
        })
}

fn tail_file(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    crate::process::tail(&text, 60)
}
