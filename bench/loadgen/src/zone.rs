//! The zone controller under test: started here (so that its pid, hence
//! its peak RSS and CPU time, is known) on a fresh embedded store, and its
//! HTTP API (mesh, tokens, resources).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http::Method;
use weftctl::Client;

/// How long the controller gets to start and answer.
const START: Duration = Duration::from_secs(30);

/// A running controller, killed when dropped.
pub struct Zone {
    child: Child,
    /// The HTTP API client.
    pub api: Client,
    /// The agent gRPC address.
    pub grpc: SocketAddr,
}

impl Drop for Zone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `/proc` says about a process.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Peak resident set (VmHWM), bytes.
    pub peak_rss: u64,
    /// Current resident set (VmRSS), bytes.
    pub rss: u64,
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
}

impl Zone {
    /// Starts `binary` on a new SQLite file in `dir`, on loopback ports
    /// picked by the kernel, and waits until it is ready.
    pub async fn start(binary: &Path, dir: &Path) -> anyhow::Result<Zone> {
        let db: PathBuf = dir.join("zone.db");
        let mut child = Command::new(binary)
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
            ])
            .arg("--store")
            .arg(format!("sqlite://{}", db.display()))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("the controller's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx
            .recv_timeout(START)
            .context("the controller printed no HTTP address")?;
        let http = line
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .to_owned();
        let line = rx
            .recv_timeout(START)
            .context("the controller printed no gRPC address")?;
        let grpc = line
            .strip_prefix("grpc listening on ")
            .with_context(|| format!("unexpected second line {line:?}"))?
            .parse()
            .with_context(|| format!("gRPC address in {line:?}"))?;
        let zone = Zone {
            child,
            api: Client::new(&format!("http://{http}"))?,
            grpc,
        };
        zone.wait_ready().await?;
        Ok(zone)
    }

    /// The controller's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START;
        loop {
            if let Ok(answer) = self.api.request(Method::GET, "/ready", None).await {
                if answer.status == http::StatusCode::OK {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the controller was not ready within {START:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path` as JSON.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let answer = self.api.request(Method::GET, path, None).await?;
        if !answer.status.is_success() {
            bail!("GET {path}: {}", answer.status);
        }
        serde_json::from_slice(&answer.body).with_context(|| format!("GET {path}: not JSON"))
    }

    /// Applies a YAML document stream.
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let answer = self
            .api
            .request(
                Method::PUT,
                "/v1/resources",
                Some(("application/yaml", Bytes::from(yaml.to_owned()))),
            )
            .await?;
        if !answer.status.is_success() {
            bail!(
                "apply refused ({}): {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
        Ok(())
    }

    /// Issues a token for workloads named `prefix*`, good for `uses`
    /// enrolments; returns its secret.
    pub async fn token(&self, prefix: &str, uses: u32) -> anyhow::Result<String> {
        let body = serde_json::json!({
            "mesh": "default",
            "workloads": {"prefix": prefix},
            "ttl": "2h",
            "maxUses": uses,
        });
        let answer = self
            .api
            .request(
                Method::POST,
                "/v1/tokens",
                Some(("application/json", Bytes::from(body.to_string()))),
            )
            .await?;
        if !answer.status.is_success() {
            bail!(
                "token refused ({}): {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
        let issued: serde_json::Value = serde_json::from_slice(&answer.body)?;
        issued["secret"]
            .as_str()
            .map(str::to_owned)
            .context("the issued token has no secret")
    }

    /// Peak and current RSS and CPU time of the controller, from `/proc`.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        usage(self.pid())
    }
}

/// Peak and current RSS and CPU time of process `pid`, from `/proc`.
pub fn usage(pid: u32) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |field: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
        let value = line
            .split_whitespace()
            .nth(1)
            .with_context(|| format!("{line:?}"))?;
        Ok(value.parse::<u64>()? * 1024)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no command in /proc/pid/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i - 3)
            .with_context(|| format!("field {i} of /proc/{pid}/stat"))?
            .parse()?)
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(Usage {
        peak_rss: kib("VmHWM:")?,
        rss: kib("VmRSS:")?,
        cpu_seconds: (ticks(14)? + ticks(15)?) as f64 / hz,
    })
}
