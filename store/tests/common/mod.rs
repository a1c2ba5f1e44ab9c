//! Test databases: a SQLite file in a temporary directory, or a real
//! PostgreSQL server started for the test (the suite's one harness,
//! `weft_e2e::postgres`) and removed when the test ends, even on failure.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use weft_e2e::postgres::Postgres;
use weft_store::Store;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique_dir(prefix: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// A database that a test can open several `Store` handles on (replicas).
pub enum TestDb {
    Sqlite { dir: PathBuf, url: String },
    Postgres(Postgres),
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = unique_dir("weft-store-sqlite");
        let url = format!("sqlite://{}", dir.join("store.db").display());
        TestDb::Sqlite { dir, url }
    }

    pub async fn postgres() -> TestDb {
        TestDb::Postgres(Postgres::start_local().expect("start a PostgreSQL server"))
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
