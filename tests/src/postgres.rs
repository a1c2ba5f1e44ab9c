//! A real PostgreSQL server for the scenarios, running inside a host of the
//! suite (so that controllers on other hosts reach it over the LAN), as the
//! `postgres` user, on a data directory made for the test. It dies with its
//! host.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;
use crate::process::Proc;
use crate::wait;

/// The port the server listens on.
pub const PORT: u16 = 5432;

/// A running server.
#[derive(Debug)]
pub struct Postgres {
    /// The `postgres` process.
    pub proc: Proc,
    /// `postgres://postgres@ip:5432/weft`.
    pub url: String,
}

/// The newest PostgreSQL server binaries installed (Debian layout).
fn bin_dir() -> Result<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((version, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin).ok_or_else(|| {
        anyhow!("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: apt-get install -y postgresql")
    })
}

/// The uid of the `postgres` user (initdb and the server refuse root).
fn postgres_uid() -> Result<u32> {
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .context("running id -u postgres")?;
    if !out.status.success() {
        bail!("no postgres user: apt-get install -y postgresql");
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("id -u postgres printed no number")
}

impl Postgres {
    /// Creates a cluster in `<dir>/pg`, starts the server in `ns` on
    /// `ip:5432` and creates the database `weft`.
    pub fn start(ns: &Netns, ip: IpAddr, dir: &Path) -> Result<Postgres> {
        let bin = bin_dir()?;
        let uid = postgres_uid()?;
        let root = dir.join("pg");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        std::os::unix::fs::chown(&root, Some(uid), None)
            .with_context(|| format!("chown {}", root.display()))?;
        let data = root.join("data");
        let out = ns
            .command_as(bin.join("initdb"), Some(uid))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-N", "-E", "UTF8"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // initdb trusts local connections only; the controllers connect
        // over the suite's LAN.
        let hba = data.join("pg_hba.conf");
        let mut rules =
            std::fs::read_to_string(&hba).with_context(|| format!("reading {}", hba.display()))?;
        rules.push_str(&format!("host all all {ip}/16 trust\n"));
        std::fs::write(&hba, rules).with_context(|| format!("writing {}", hba.display()))?;
        let mut cmd = ns.command_as(bin.join("postgres"), Some(uid));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &PORT.to_string(), "-k"])
            .arg(&root)
            .args(["-c", &format!("listen_addresses={ip}")])
            .args(["-c", "fsync=off", "-c", "max_connections=200"]);
        let mut proc = Proc::spawn("postgres", cmd, dir)?;
        let addr = SocketAddr::new(ip, PORT);
        if let Err(e) = wait::port_open(ns, addr, Duration::from_secs(30)) {
            proc.kill();
            bail!("postgres did not start: {e:#}\n{}", proc.logs());
        }
        let out = ns
            .command_as(bin.join("createdb"), Some(uid))
            .args([
                "-h",
                &ip.to_string(),
                "-p",
                &PORT.to_string(),
                "-U",
                "postgres",
                "weft",
            ])
            .output()
            .context("running createdb")?;
        if !out.status.success() {
            bail!("createdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Postgres {
            proc,
            url: format!("postgres://postgres@{ip}:{PORT}/weft"),
        })
    }
}
