//! Hosts made of Linux network namespaces, joined by veth pairs created
//! directly between two namespaces (never in the root namespace).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static NEXT: AtomicUsize = AtomicUsize::new(0);
const PREFIX: &str = "wt";

/// A handle on a named network namespace; cheap to clone, owns nothing.
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
}

/// Moves the calling thread into the namespace behind `file`.
fn enter_fd(file: &File) -> io::Result<()> {
    // SAFETY: setns on a valid namespace fd only changes this thread's netns.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Netns {
    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, as a node agent is given it.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("opening namespace {}", self.name))
    }

    /// A command that runs inside this namespace, as root.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.command_as(program, None)
    }

    /// A command that runs inside this namespace, as `uid` (and gid = uid,
    /// no supplementary groups) when given.
    pub fn command_as(&self, program: impl AsRef<OsStr>, uid: Option<u32>) -> Command {
        let mut cmd = Command::new(program);
        let path = CString::new(self.path()).expect("namespace names have no NUL");
        // SAFETY: the closure only makes async-signal-safe calls (open, setns,
        // close, setgroups, setgid, setuid) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let entered = libc::setns(fd, libc::CLONE_NEWNET);
                libc::close(fd);
                if entered != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(uid) = uid {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(uid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs a program inside the namespace as root and returns its stdout;
    /// a non-zero exit is an error that carries stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.output(program, args)?;
        if !out.status.success() {
            bail!(
                "`{program} {}` in {} failed ({}): {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a program inside the namespace as root; the caller judges the exit.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.command(program)
            .args(args)
            .output()
            .with_context(|| format!("running `{program} {}` in {}", args.join(" "), self.name))
    }

    /// Runs `f` on a thread that lives in this namespace; sockets it creates
    /// belong to the namespace. Panics in `f` propagate to the caller.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let file = self.open()?;
        std::thread::scope(|s| {
            let worker = s.spawn(move || {
                enter_fd(&file).context("setns into the host's namespace")?;
                f()
            });
            worker
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Starts `f` on a detached thread that lives in this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<JoinHandle<Result<T>>> {
        let file = self.open()?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn(move || {
                enter_fd(&file).context("setns into the host's namespace")?;
                f()
            })
            .context("spawning a namespace thread")
    }

    /// Pids of the processes whose network namespace this is.
    pub fn pids(&self) -> Vec<i32> {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        else {
            return Vec::new();
        };
        let me = std::process::id() as i32;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|p| *p != me)
            .collect()
    }

    /// Kills every process in the namespace and waits (bounded) until none is left.
    pub fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            for pid in pids {
                // SAFETY: sending a signal has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A host: a network namespace with `lo` up. Dropping it kills what runs in
/// it and deletes the namespace, also when a test panics.
#[derive(Debug)]
pub struct Host {
    ns: Netns,
}

impl Host {
    /// Creates a namespace named `wt<pid>-<n>` with `lo` up.
    pub fn new() -> Result<Host> {
        crate::require_root()?;
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .context("running `ip netns add` (is iproute2 installed?)")?;
        if !out.status.success() {
            bail!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let host = Host { ns: Netns { name } };
        host.run("ip", &["link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// A non-owning handle on this host's namespace.
    pub fn netns(&self) -> Netns {
        self.ns.clone()
    }
}

impl std::ops::Deref for Host {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.ns.kill_all();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns.name])
            .output();
    }
}

/// Deletes namespaces left by earlier runs of this harness whose process
/// is gone (e.g. killed before its guards ran).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            drop(Host { ns: Netns { name } });
        }
    }
}

/// Joins two hosts with a veth pair created directly between their
/// namespaces; `a_cidr`/`b_cidr` are addresses like `10.210.0.2/24`.
/// Returns the interface names on the `a` and `b` sides.
pub fn link(a: &Host, a_cidr: &str, b: &Host, b_cidr: &str) -> Result<(String, String)> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let a_if = format!("w{}-{n}a", std::process::id());
    let b_if = format!("w{}-{n}b", std::process::id());
    for name in [&a_if, &b_if] {
        if name.len() > 15 {
            bail!("interface name {name} is longer than 15 characters");
        }
    }
    let out = Command::new("ip")
        .args([
            "link",
            "add",
            &a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &b_if,
        ])
        .args(["netns", b.name()])
        .output()
        .context("running `ip link add ... type veth`")?;
    if !out.status.success() {
        bail!(
            "creating veth {a_if}/{b_if}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    for (host, ifname, cidr) in [(a, &a_if, a_cidr), (b, &b_if, b_cidr)] {
        host.run("ip", &["addr", "add", cidr, "dev", ifname])?;
        host.run("ip", &["link", "set", ifname, "up"])?;
    }
    Ok((a_if, b_if))
}

/// A LAN: a bridge in a namespace of its own, to which hosts attach with a
/// veth each, so that any number of hosts share one subnet (a zone's
/// controller and its VMs). Dropping it deletes the bridge's namespace,
/// which removes every veth attached to it.
#[derive(Debug)]
pub struct Lan {
    switch: Host,
}

impl Lan {
    /// Creates the switch namespace with bridge `br0` up.
    pub fn new() -> Result<Lan> {
        let switch = Host::new()?;
        switch.run("ip", &["link", "add", "br0", "type", "bridge"])?;
        switch.run("ip", &["link", "set", "br0", "up"])?;
        Ok(Lan { switch })
    }

    /// Plugs `host` into the LAN with address `cidr` (e.g. `10.210.1.11/24`)
    /// and returns the interface name on the host's side.
    pub fn attach(&self, host: &Host, cidr: &str) -> Result<String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let host_if = format!("w{}-{n}h", std::process::id());
        let port_if = format!("w{}-{n}p", std::process::id());
        if host_if.len() > 15 {
            bail!("interface name {host_if} is longer than 15 characters");
        }
        let out = Command::new("ip")
            .args(["link", "add", &host_if, "netns", host.name()])
            .args(["type", "veth", "peer", "name", &port_if])
            .args(["netns", self.switch.name()])
            .output()
            .context("running `ip link add ... type veth`")?;
        if !out.status.success() {
            bail!(
                "creating veth {host_if}/{port_if}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.switch
            .run("ip", &["link", "set", &port_if, "master", "br0", "up"])?;
        host.run("ip", &["addr", "add", cidr, "dev", &host_if])?;
        host.run("ip", &["link", "set", &host_if, "up"])?;
        Ok(host_if)
    }
}
