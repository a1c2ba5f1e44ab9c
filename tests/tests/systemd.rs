//! What systemd sees of the daemons (`Type=notify`): the suite plays the
//! service manager with a datagram socket of its own as NOTIFY_SOCKET and
//! checks that READY=1 comes once the daemon serves, with a status line a
//! person can read, that WATCHDOG=1 keeps coming when WatchdogSec= asks for
//! it, and that STOPPING=1 comes with the drain. The packaged unit files
//! pass `systemd-analyze verify`, and their exposure is reported.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use weft_e2e::agent::{agent_bin, without_weft_env, AgentSpec};
use weft_e2e::netns::Host;
use weft_e2e::pki::{spiffe_id, Ca};
use weft_e2e::process::Proc;
use weft_e2e::tempdir::TempDir;

const T: Duration = Duration::from_secs(20);

/// The service manager's end: every message the daemon sends.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Manager {
    fn new(dir: &Path) -> Result<Manager> {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).context("binding the notify socket")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Manager { socket, path })
    }

    /// The next message whose lines include `wanted`, within `T`.
    fn until(&self, wanted: &str) -> Result<String> {
        self.until_line(wanted, |l| l == wanted)
    }

    /// The next message with a line for which `matches` holds, within `T`.
    fn until_line(&self, wanted: &str, matches: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + T;
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            let Ok(n) = self.socket.recv(&mut buf) else {
                continue;
            };
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message.lines().any(&matches) {
                return Ok(message);
            }
            seen.push(message);
        }
        bail!("no {wanted} from the daemon within {T:?}; got {seen:?}")
    }
}

fn serve_under_manager(cmd: &mut Command, manager: &Manager) {
    cmd.env("NOTIFY_SOCKET", &manager.path)
        .env("WATCHDOG_USEC", "300000");
}

#[test]
fn the_agent_says_ready_with_a_status_pings_the_watchdog_and_says_stopping() -> Result<()> {
    weft_e2e::require_root()?;
    let dir = TempDir::new("weft-systemd")?;
    let host = Host::new()?;
    host.run("ip", &["link", "set", "lo", "up"])?;
    let ca = Ca::new("systemd test CA")?;
    let identity = ca
        .leaf(&spiffe_id("web"))?
        .write(dir.path(), "web", &[&ca])?;
    let spec = AgentSpec::new(&identity, "127.0.0.1".parse()?, &[(8080, "tcp")]);
    let config = dir.join("agent.yaml");
    spec.write(&config)?;
    let manager = Manager::new(dir.path())?;
    let mut cmd = host.command(agent_bin()?);
    cmd.arg("run").arg("-c").arg(&config);
    without_weft_env(&mut cmd);
    serve_under_manager(&mut cmd, &manager);
    let mut agent = Proc::spawn("agent", cmd, dir.path())?;

    let ready = manager.until("READY=1")?;
    ensure!(
        ready.contains(&format!("STATUS=sidecar for {}", spiffe_id("web")))
            && ready.contains("static config")
            && ready.contains("connection(s) in flight"),
        "{ready}"
    );
    // READY=1 means serving: the admin endpoint already answers.
    let admin = "127.0.0.1:15000".parse()?;
    let answer =
        host.enter(move || weft_e2e::http::get(admin, "/ready", Duration::from_secs(5)))?;
    ensure!(
        answer.status == 200,
        "READY=1 before /ready: {}",
        answer.status
    );
    // WatchdogSec=300ms: pings every 100 ms.
    for _ in 0..3 {
        manager.until("WATCHDOG=1")?;
    }
    agent.signal(libc::SIGTERM)?;
    let stopping = manager.until("STOPPING=1")?;
    ensure!(stopping.contains("STATUS=SIGTERM: draining"), "{stopping}");
    let status = agent.wait_exit(T)?;
    ensure!(status.success(), "{status}\n{}", agent.logs());
    Ok(())
}

#[test]
fn the_zone_says_ready_once_it_serves() -> Result<()> {
    weft_e2e::require_root()?;
    let dir = TempDir::new("weft-systemd-zone")?;
    let host = Host::new()?;
    host.run("ip", &["link", "set", "lo", "up"])?;
    let manager = Manager::new(dir.path())?;
    // As the unit runs it: the settings file, and a flag over one of its keys.
    let config = dir.join("zone.yaml");
    let store = format!("sqlite://{}", dir.join("zone.db").display());
    std::fs::write(
        &config,
        format!("store: {store}\nlisten: 127.0.0.1:5681\ngrpc_listen: 10.9.9.9:1\n"),
    )?;
    let mut cmd = host.command(weft_e2e::binaries::find("weft-zone", "WEFT_ZONE_BIN")?);
    cmd.arg("run").arg("--config").arg(&config);
    cmd.args(["--grpc-listen", "127.0.0.1:5678"]);
    without_weft_env(&mut cmd);
    serve_under_manager(&mut cmd, &manager);
    let mut zone = Proc::spawn("zone", cmd, dir.path())?;
    let ready = manager.until("READY=1")?;
    ensure!(
        ready.contains(
            "STATUS=serving zone default on 127.0.0.1:5681 (API) and 127.0.0.1:5678 (agents)"
        ),
        "{ready}"
    );
    // The sole replica wins the election; the status line says so, at
    // once or in a later update.
    let leads = |l: &str| l.starts_with("STATUS=serving zone default") && l.ends_with("; leader");
    if !ready.lines().any(leads) {
        manager.until_line("STATUS=...; leader", leads)?;
    }
    manager.until("WATCHDOG=1")?;
    zone.signal(libc::SIGTERM)?;
    manager.until("STOPPING=1")?;
    let status = zone.wait_exit(T)?;
    ensure!(status.success(), "{status}\n{}", zone.logs());
    Ok(())
}

/// A bad settings file is refused before anything starts, naming the key
/// and the file; `check` accepts a good one.
#[test]
fn the_zone_refuses_a_bad_settings_file() -> Result<()> {
    let dir = TempDir::new("weft-zone-settings")?;
    let zone = weft_e2e::binaries::find("weft-zone", "WEFT_ZONE_BIN")?;
    let cases = [
        (
            "listen_address: 0.0.0.0:5681\n",
            "unknown field `listen_address`",
        ),
        (
            "listen: everywhere\n",
            "invalid listen \"everywhere\" (`listen` in ",
        ),
        (
            "agent_grace: 5 minutes\n",
            "invalid agent_grace \"5 minutes\"",
        ),
        ("zone: [east\n", "config file "),
        ("log_format: xml\n", "invalid log_format \"xml\""),
    ];
    let config = dir.join("zone.yaml");
    for (yaml, expected) in cases {
        std::fs::write(&config, yaml)?;
        for command in ["check", "run"] {
            let out = Command::new(&zone)
                .arg(command)
                .arg("--config")
                .arg(&config)
                .output()?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(!out.status.success(), "{command} accepted {yaml:?}");
            ensure!(stderr.contains(expected), "{command} {yaml:?}: {stderr}");
        }
    }
    std::fs::write(&config, "zone: east\nsans: [zone.example]\n")?;
    let out = Command::new(&zone)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(stdout.starts_with("zone east: "), "{stdout}");

    // `log_format: json`: every log line is one JSON object.
    std::fs::write(
        &config,
        format!(
            "log_format: json\nstore: sqlite://{}\nlisten: 127.0.0.1:0\ngrpc_listen: 127.0.0.1:0\n",
            dir.join("json.db").display()
        ),
    )?;
    let mut child = Command::new(&zone)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let serving = (|| -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .context("no `weft-zone serving` line in 20 s")?;
            let value: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("a log line that is not JSON: {line}"))?;
            if value.pointer("/fields/message").and_then(|m| m.as_str())
                == Some("weft-zone serving")
            {
                return Ok(value);
            }
        }
    })();
    let _ = child.kill();
    let _ = child.wait();
    let serving = serving?;
    ensure!(
        serving.pointer("/fields/zone").and_then(|z| z.as_str()) == Some("default"),
        "{serving}"
    );
    Ok(())
}

/// A root holding the host's systemd units and the built binaries where
/// the units expect them, for `systemd-analyze --root`.
fn unit_root(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("root");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    std::fs::create_dir_all(root.join("usr/bin"))?;
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::create_dir_all(root.join("etc/systemd/system"))?;
    std::fs::create_dir_all(root.join("usr/lib/systemd"))?;
    let copied = Command::new("cp")
        .args(["-r", "/lib/systemd/system"])
        .arg(root.join("usr/lib/systemd/"))
        .status()?;
    ensure!(copied.success(), "copying the host's units");
    std::fs::copy(agent_bin()?, root.join("usr/bin/weft-agent"))?;
    std::fs::copy(
        weft_e2e::binaries::find("weft-zone", "WEFT_ZONE_BIN")?,
        root.join("usr/bin/weft-zone"),
    )?;
    std::fs::copy("/bin/kill", root.join("bin/kill"))?;
    for unit in ["weft-agent.service", "weft-zone.service"] {
        std::fs::copy(units.join(unit), root.join("etc/systemd/system").join(unit))?;
    }
    Ok(root)
}

#[test]
fn the_unit_files_pass_systemd_analyze() -> Result<()> {
    let dir = TempDir::new("weft-units")?;
    let root = unit_root(dir.path())?;
    let mut verify = Command::new("systemd-analyze");
    verify
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args([
            "/etc/systemd/system/weft-agent.service",
            "/etc/systemd/system/weft-zone.service",
        ]);
    let out = verify
        .output()
        .context("running systemd-analyze (is systemd installed?)")?;
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for unit in ["weft-agent.service", "weft-zone.service"] {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=30"])
            .arg(format!("--root={}", root.display()))
            .arg(unit)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let overall = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .with_context(|| format!("no exposure level for {unit}: {text}"))?;
        eprintln!("{overall}");
        ensure!(
            out.status.success(),
            "{unit} is more exposed than 3.0: {overall}"
        );
    }
    Ok(())
}
