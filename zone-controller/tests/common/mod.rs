//! A harness shared by the API tests: the real `weft-zone` binary on a
//! temporary SQLite file (or a PostgreSQL server of the test's own), driven
//! through `weftctl`'s library over HTTP and through a tonic client over
//! rustls that pins the zone CA, as agents do.

#![allow(dead_code)]

pub mod agent;
pub mod ca;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use weftctl::{Cli, Client, Error};

/// How long the controller gets to start, answer and stop.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The mesh most tests apply: `default`, trust domain `weft.test`, default
/// certificate lifetime.
pub const MESH: &str = "\
apiVersion: weft.io/v1alpha1
kind: Mesh
metadata:
  name: default
spec:
  trustDomain: weft.test
";

/// A running controller, killed when dropped (also when a test fails).
pub struct Zone {
    child: Child,
    /// `http://host:port` of its API.
    pub server: String,
    /// Its gRPC address.
    pub grpc: SocketAddr,
}

impl Zone {
    /// Starts the binary on `db` with ephemeral ports and waits until
    /// `/ready` answers 200.
    pub async fn start(db: &Path) -> Zone {
        Zone::start_with(&format!("sqlite://{}", db.display()), &[]).await
    }

    /// Starts the binary on the store at `url` with extra arguments.
    pub async fn start_with(url: &str, extra: &[&str]) -> Zone {
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        Zone::launch(url, extra, Stdio::inherit(), &rust_log).await
    }

    /// Starts the binary on `db` at log filter `rust_log`, with its log
    /// lines (stderr) sent to the receiver.
    pub async fn start_logged(db: &Path, rust_log: &str) -> (Zone, mpsc::Receiver<String>) {
        let url = format!("sqlite://{}", db.display());
        let mut zone = Zone::launch(&url, &[], Stdio::piped(), rust_log).await;
        let stderr = zone.child.stderr.take().expect("stderr is piped");
        (zone, lines(stderr))
    }

    async fn launch(url: &str, extra: &[&str], stderr: Stdio, rust_log: &str) -> Zone {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weft-zone"))
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
                "--store",
                url,
            ])
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn weft-zone");
        let stdout = child.stdout.take().expect("stdout is piped");
        let rx = lines(stdout);
        // Own the child before anything can fail, so that Drop kills it.
        let mut zone = Zone {
            child,
            server: String::new(),
            grpc: "0.0.0.0:0".parse().expect("an address"),
        };
        let line = rx
            .recv_timeout(DEADLINE)
            .expect("weft-zone printed its address");
        let address = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        zone.server = format!("http://{address}");
        let line = rx
            .recv_timeout(DEADLINE)
            .expect("weft-zone printed its gRPC address");
        zone.grpc = line
            .strip_prefix("grpc listening on ")
            .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
            .parse()
            .expect("a socket address");
        zone.wait_ready().await;
        zone
    }

    async fn wait_ready(&self) {
        let client = Client::new(&self.server).expect("valid server URL");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(answer) = client.request(http::Method::GET, "/ready", None).await {
                if answer.status == http::StatusCode::OK {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "weft-zone not ready in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path` as JSON (panics on a non-2xx answer).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let client = Client::new(&self.server).expect("valid server URL");
        let answer = client
            .request(http::Method::GET, path, None)
            .await
            .expect("GET answered");
        assert!(answer.status.is_success(), "GET {path}: {}", answer.status);
        serde_json::from_slice(&answer.body).expect("JSON answer")
    }

    /// Stops the controller with SIGTERM and waits for a clean exit.
    pub fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for weft-zone") {
                assert!(status.success(), "weft-zone exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "weft-zone did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the controller with SIGKILL (a crash).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs `weftctl ARGS` against this controller; `stdin` feeds `-f -`.
    pub async fn ctl(&self, args: &[&str], stdin: &str) -> Result<String, Error> {
        let mut argv = vec!["weftctl", "--server", &self.server];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).expect("valid weftctl arguments");
        let mut out = Vec::new();
        weftctl::run(cli, &mut stdin.as_bytes(), &mut out).await?;
        Ok(String::from_utf8(out).expect("UTF-8 output"))
    }

    /// Issues a bootstrap token for mesh `default` with `weftctl token
    /// issue` plus `args` (the workload scope, ...); returns its secret.
    pub async fn issue_token(&self, args: &[&str]) -> String {
        let mut argv = vec!["token", "issue", "--mesh", "default", "-o", "secret"];
        argv.extend_from_slice(args);
        self.ctl(&argv, "")
            .await
            .expect("token issue")
            .trim()
            .to_owned()
    }
}

impl Drop for Zone {
    fn drop(&mut self) {
        // Already gone after stop(); errors do not matter here.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines `from` gives, read on a thread of their own.
fn lines(from: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Polls `check` until it returns `Some`, or panics with `what` after
/// [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(what, DEADLINE, check).await
}

/// Polls `check` until it returns `Some`, or panics with `what` after
/// `timeout` (for waits longer than [`DEADLINE`], such as a CA's expiry).
pub async fn eventually_within<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
