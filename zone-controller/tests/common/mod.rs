//! A harness shared by the API tests: the real `weft-zone` binary on a
//! temporary SQLite file, driven through `weftctl`'s library.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use weftctl::{Cli, Client, Error};

/// How long the controller gets to start, answer and stop.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running controller, killed when dropped (also when a test fails).
pub struct Zone {
    child: Child,
    /// `http://host:port` of its API.
    pub server: String,
}

impl Zone {
    /// Starts the binary on `db` with an ephemeral port and waits until
    /// `/ready` answers 200.
    pub async fn start(db: &Path) -> Zone {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weft-zone"))
            .args(["run", "--listen", "127.0.0.1:0", "--store"])
            .arg(format!("sqlite://{}", db.display()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn weft-zone");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Own the child before anything can fail, so that Drop kills it.
        let mut zone = Zone {
            child,
            server: String::new(),
        };
        let line = rx
            .recv_timeout(DEADLINE)
            .expect("weft-zone printed its address");
        let address = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        zone.server = format!("http://{address}");
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

    /// Runs `weftctl ARGS` against this controller; `stdin` feeds `-f -`.
    pub async fn ctl(&self, args: &[&str], stdin: &str) -> Result<String, Error> {
        let mut argv = vec!["weftctl", "--server", &self.server];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).expect("valid weftctl arguments");
        let mut out = Vec::new();
        weftctl::run(cli, &mut stdin.as_bytes(), &mut out).await?;
        Ok(String::from_utf8(out).expect("UTF-8 output"))
    }
}

impl Drop for Zone {
    fn drop(&mut self) {
        // Already gone after stop(); errors do not matter here.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
