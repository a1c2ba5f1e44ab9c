//! Test databases: a SQLite file in a temporary directory, or a real
//! PostgreSQL server started for the test (initdb + pg_ctl, as the
//! `postgres` user when run as root) and removed when the test ends, even
//! on failure.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use weft_store::Store;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique_dir(prefix: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// The newest PostgreSQL server binaries installed (Debian layout).
fn pg_bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().expect(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin; \
         install them with `apt-get install -y postgresql`",
    )
}

fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
}

/// Runs a PostgreSQL tool, as `postgres` when we are root (initdb refuses
/// root).
fn pg_command(bin: &Path, tool: &str, args: &[&str]) {
    let program = bin.join(tool);
    let output = if is_root() {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&program)
            .args(args)
            .output()
    } else {
        Command::new(&program).args(args).output()
    }
    .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

/// A PostgreSQL server of its own for one test; stopped and deleted on drop.
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    pub url: String,
}

impl PgServer {
    pub async fn start() -> PgServer {
        let bin = pg_bin_dir();
        let dir = unique_dir("weft-store-pg");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .expect("run chown");
            assert!(status.success(), "chown postgres {}", dir.display());
        }
        let data = dir.join("data");
        let data_s = data.to_string_lossy().into_owned();
        let dir_s = dir.to_string_lossy().into_owned();
        let log = dir.join("log").to_string_lossy().into_owned();
        let port = free_port();
        // The server exists from here on: the guard cleans up on panic.
        let mut server = PgServer {
            bin: bin.clone(),
            dir,
            url: String::new(),
        };
        pg_command(
            &bin,
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=trust",
                "-N",
                "-E",
                "UTF8",
            ],
        );
        let options = format!(
            "-p {port} -k {dir_s} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        );
        pg_command(
            &bin,
            "pg_ctl",
            &[
                "-D", &data_s, "-o", &options, "-l", &log, "-w", "-t", "30", "start",
            ],
        );
        let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
            .await
            .expect("connect to the test server");
        sqlx::query("CREATE DATABASE weft")
            .execute(&mut conn)
            .await
            .expect("create the test database");
        server.url = format!("postgres://postgres@127.0.0.1:{port}/weft");
        server
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if data.join("postmaster.pid").exists() {
            let program = self.bin.join("pg_ctl");
            let args = [
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ]
            .map(str::to_owned);
            let _ = if is_root() {
                Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .arg(&program)
                    .args(&args)
                    .output()
            } else {
                Command::new(&program).args(&args).output()
            };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A database that a test can open several `Store` handles on (replicas).
pub enum TestDb {
    Sqlite { dir: PathBuf, url: String },
    Postgres(PgServer),
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = unique_dir("weft-store-sqlite");
        let url = format!("sqlite://{}", dir.join("store.db").display());
        TestDb::Sqlite { dir, url }
    }

    pub async fn postgres() -> TestDb {
        TestDb::Postgres(PgServer::start().await)
    }

    pub fn url(&self) -> &str {
        match self {
            TestDb::Sqlite { url, .. } => url,
            TestDb::Postgres(server) => &server.url,
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, TestDb::Postgres(_))
    }

    /// A new handle on the database (a new replica on PostgreSQL).
    pub async fn open(&self) -> Store {
        Store::open(self.url())
            .await
            .unwrap_or_else(|e| panic!("open {}: {e}", self.url()))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Sqlite { dir, .. } = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
