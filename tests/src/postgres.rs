//! A real PostgreSQL server for tests, as the `postgres` user when run as
//! root (initdb and the server refuse root) on a data directory made for the test: either on
//! loopback in the test's own namespace (store and controller tests), or
//! inside a host of the suite so that controllers on other hosts reach it
//! over the LAN. Dropping it stops the server (fast shutdown).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;
use crate::process::Proc;
use crate::tempdir::TempDir;
use crate::wait;

/// The port a server in a host of the suite listens on.
pub const PORT: u16 = 5432;

/// A running server.
#[derive(Debug)]
pub struct Postgres {
    proc: Proc,
    /// `postgres://postgres@ip:port/weft`.
    pub url: String,
    // Declared last: the server stops before its files go.
    _dir: Option<TempDir>,
}

/// A loopback address for one server of this process (all of 127/8 is
/// local): PostgreSQL cannot take port 0, and a port found free on
/// 127.0.0.1 may be taken by a parallel test before the server binds it.
fn own_loopback() -> Ipv4Addr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    Ipv4Addr::new(
        127,
        (100 + n % 100) as u8,
        (pid / 250 % 250) as u8,
        (pid % 250 + 1) as u8,
    )
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

/// The uid and gid of the `postgres` user.
fn postgres_ids() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .context("running id")?;
        if !out.status.success() {
            bail!("no postgres user: apt-get install -y postgresql");
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("id printed no number")
    };
    Ok((id("-u")?, id("-g")?))
}

fn checked(what: &str, out: std::io::Result<Output>) -> Result<()> {
    let out = out.with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Postgres {
    /// A server of its own on port 5432 of a loopback address of its own,
    /// in the calling process's namespace, with its files in a temporary directory.
    pub fn start_local() -> Result<Postgres> {
        let dir = TempDir::new("weft-pg")?;
        let ip = IpAddr::V4(own_loopback());
        let port = PORT;
        let command = |program: &Path, ids: Option<(u32, u32)>| {
            let mut cmd = Command::new(program);
            if let Some((uid, gid)) = ids {
                cmd.uid(uid).gid(gid);
            }
            cmd
        };
        let mut pg = Postgres::start_with(command, ip, port, dir.path())?;
        pg._dir = Some(dir);
        Ok(pg)
    }

    /// A server in `ns` on `ip:5432`, with its files under `<dir>/pg`.
    pub fn start(ns: &Netns, ip: IpAddr, dir: &Path) -> Result<Postgres> {
        // The namespace is entered before the uid changes (setns needs root).
        let command = |program: &Path, ids: Option<(u32, u32)>| {
            ns.command_as(program, ids.map(|(uid, _)| uid))
        };
        Postgres::start_with(command, ip, PORT, dir)
    }

    /// Creates a cluster, starts the server with commands made by
    /// `command` (which decides the namespace and runs them as the given
    /// uid and gid, when root), creates database `weft`.
    fn start_with(
        command: impl Fn(&Path, Option<(u32, u32)>) -> Command,
        ip: IpAddr,
        port: u16,
        dir: &Path,
    ) -> Result<Postgres> {
        let bin = bin_dir()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let ids = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_ids()?)
        } else {
            None
        };
        let as_postgres = |tool: &str| command(&bin.join(tool), ids);
        let root = dir.join("pg");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", root.display()))?;
        }
        let data = root.join("data");
        checked(
            "initdb",
            as_postgres("initdb")
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "-N", "-E", "UTF8"])
                .output(),
        )?;
        // initdb trusts loopback only; controllers may connect over a LAN.
        let hba = data.join("pg_hba.conf");
        let mut rules =
            std::fs::read_to_string(&hba).with_context(|| format!("reading {}", hba.display()))?;
        rules.push_str(&format!("host all all {ip}/16 trust\n"));
        std::fs::write(&hba, rules).with_context(|| format!("writing {}", hba.display()))?;
        let mut cmd = as_postgres("postgres");
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&root)
            .args(["-c", &format!("listen_addresses={ip}")])
            .args(["-c", "fsync=off", "-c", "max_connections=200"]);
        let mut proc = Proc::spawn("postgres", cmd, dir)?;
        let addr = SocketAddr::new(ip, port);
        let up = wait::until(
            &format!("postgres on {addr}"),
            Duration::from_secs(30),
            || {
                if let Some(status) = proc.try_exit()? {
                    return Err(wait::fatal(format!("exited ({status})")));
                }
                let mut check = command(&bin.join("pg_isready"), None);
                let out = check.args(server_args(ip, port)).output()?;
                Ok(out.status.success().then_some(()))
            },
        );
        if let Err(e) = up {
            proc.kill();
            bail!("postgres did not start: {e:#}\n{}", proc.logs());
        }
        let pg = Postgres {
            proc,
            url: format!("postgres://postgres@{ip}:{port}/weft"),
            _dir: None,
        };
        checked(
            "createdb",
            as_postgres("createdb")
                .args(server_args(ip, port))
                .arg("weft")
                .output(),
        )?;
        Ok(pg)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: it ends the backends too,
        // which a SIGKILL of the postmaster would leave behind.
        if self.proc.signal(libc::SIGINT).is_ok()
            && self.proc.wait_exit(Duration::from_secs(10)).is_ok()
        {
            return;
        }
        self.proc.kill();
    }
}

/// The arguments that point a PostgreSQL client tool (`pg_isready`,
/// `createdb`) at the server on `ip:port` as user `postgres`.
fn server_args(ip: IpAddr, port: u16) -> [String; 6] {
    [
        "-h".to_owned(),
        ip.to_string(),
        "-p".to_owned(),
        port.to_string(),
        "-U".to_owned(),
        "postgres".to_owned(),
    ]
}
