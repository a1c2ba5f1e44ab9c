//! Opening the database behind a URL (SQLite file or PostgreSQL server),
//! applying the embedded migrations, and the dispatch that lets every
//! operation run the same SQL on either backend.

use std::borrow::Cow;
use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::error::StoreError;

/// The PostgreSQL channel on which every committed change is announced (see
/// the trigger in the PostgreSQL migration).
pub(crate) const CHANGE_CHANNEL: &str = "weft_changes";

/// How long a SQLite connection waits for a lock held by another process
/// (another tool on the same file) or by a checkpoint. This process's own
/// writers never meet here: they queue for the one writer connection.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write waits in the queue for SQLite's writer connection. The
/// queue is served in order, so a wait this long means the store is far
/// behind, not that one writer was unlucky.
const SQLITE_WRITE_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// A wait in that queue worth a warning (sqlx logs it).
const SQLITE_WRITE_QUEUE_SLOW: Duration = Duration::from_secs(5);

/// Reading connections to a SQLite file (WAL lets them read while the
/// writer writes).
const SQLITE_READERS: u32 = 8;

/// A handle on the store; cheap to clone (all clones share the connection
/// pool and the change notifications).
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) db: Db,
    /// The URL without its password, for messages.
    pub(crate) url: String,
    /// Change hints for [`crate::Watch`]ers: sent after local commits, and
    /// on PostgreSQL also for every NOTIFY from any replica.
    pub(crate) changed: broadcast::Sender<()>,
    /// Leaderships held in this process (the SQLite backend's election).
    pub(crate) local_leases: Arc<Mutex<HashSet<String>>>,
    /// Resources as last decoded (see [`crate::decoded`]).
    pub(crate) decoded: crate::decoded::Decoded,
    listener: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}

/// The connection pools of one backend.
pub(crate) enum Db {
    /// SQLite takes one writer at a time. Left to its busy handler, eight
    /// connections racing for that lock are served in no order, and under
    /// load one writer can time out while others keep taking it. So writes
    /// get a pool of one connection, which hands it out first come, first
    /// served, and reads get query-only connections of their own (a write
    /// sent to them by mistake fails at once rather than racing).
    Sqlite {
        readers: SqlitePool,
        writer: SqlitePool,
    },
    Postgres(PgPool),
}

/// Runs `$body`, which only reads, with `$pool` bound to the store's pool
/// for reads; the body is compiled once per backend, so the SQL in it must
/// be portable (`$n` placeholders work on both).
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.inner.db {
            $crate::backend::Db::Sqlite { readers: $pool, .. } => $body,
            $crate::backend::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Runs `$body`, which writes, with `$pool` bound to the store's pool for
/// writes (on SQLite, its queue for the one writer connection); otherwise
/// as [`on_pool`].
macro_rules! on_writer {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.inner.db {
            $crate::backend::Db::Sqlite { writer: $pool, .. } => $body,
            $crate::backend::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_writer;

fn migration(version: i64, description: &'static str, sql: &'static str) -> Migration {
    Migration::new(
        version,
        Cow::Borrowed(description),
        MigrationType::Simple,
        Cow::Borrowed(sql),
        false,
    )
}

/// The embedded schema, one folder per backend because the column types
/// differ (JSONB, BYTEA, the NOTIFY trigger). Built by hand rather than with
/// `sqlx::migrate!`, which needs sqlx's proc-macro crate and its build time.
fn migrator(migrations: Vec<Migration>) -> Migrator {
    Migrator {
        migrations: Cow::Owned(migrations),
        ignore_missing: false,
        locking: true,
        no_tx: false,
    }
}

fn sqlite_migrations() -> Vec<Migration> {
    vec![
        migration(
            1,
            "initial",
            include_str!("../migrations/sqlite/0001_initial.sql"),
        ),
        migration(
            2,
            "agents",
            include_str!("../migrations/sqlite/0002_agents.sql"),
        ),
        migration(
            3,
            "mesh_cas",
            include_str!("../migrations/sqlite/0003_mesh_cas.sql"),
        ),
        migration(
            4,
            "agent_lifecycle",
            include_str!("../migrations/sqlite/0004_agent_lifecycle.sql"),
        ),
        migration(
            5,
            "initial_traffic_permissions",
            include_str!("../migrations/sqlite/0005_initial_traffic_permissions.sql"),
        ),
        migration(
            6,
            "feed_retention",
            include_str!("../migrations/sqlite/0006_feed_retention.sql"),
        ),
    ]
}

fn postgres_migrations() -> Vec<Migration> {
    vec![
        migration(
            1,
            "initial",
            include_str!("../migrations/postgres/0001_initial.sql"),
        ),
        migration(
            2,
            "agents",
            include_str!("../migrations/postgres/0002_agents.sql"),
        ),
        migration(
            3,
            "mesh_cas",
            include_str!("../migrations/postgres/0003_mesh_cas.sql"),
        ),
        migration(
            4,
            "agent_lifecycle",
            include_str!("../migrations/postgres/0004_agent_lifecycle.sql"),
        ),
        migration(
            5,
            "initial_traffic_permissions",
            include_str!("../migrations/postgres/0005_initial_traffic_permissions.sql"),
        ),
        migration(
            6,
            "feed_retention",
            include_str!("../migrations/postgres/0006_feed_retention.sql"),
        ),
    ]
}

/// The URL with any password replaced by `***`, for error messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl Store {
    /// Opens (creating if needed) the store at `url` and brings its schema
    /// up to date: `sqlite:///path/file.db` (the file is created if missing;
    /// WAL journal, foreign keys on, one writer connection that writes queue
    /// for in order, and query-only connections for reads) or
    /// `postgres://user:password@host:port/database`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let shown = redact_url(url);
        let open_error = |reason: String| StoreError::Open {
            url: shown.clone(),
            reason,
        };
        let (changed, _) = broadcast::channel(64);
        let (db, listener) = if url.starts_with("sqlite:") {
            (open_sqlite(url, &shown).await?, None)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = open_postgres(url, &shown).await?;
            // LISTEN before returning, so that no change committed after
            // open() is missed by this replica's watchers.
            let mut listener = PgListener::connect_with(&pool)
                .await
                .map_err(|e| open_error(format!("cannot connect the change listener: {e}")))?;
            listener
                .listen(CHANGE_CHANNEL)
                .await
                .map_err(|e| open_error(format!("cannot LISTEN {CHANGE_CHANNEL}: {e}")))?;
            let task = tokio::spawn(forward_notifications(listener, changed.clone()));
            (Db::Postgres(pool), Some(task))
        } else {
            return Err(open_error(
                "unsupported scheme: expected sqlite:///path/file.db or postgres://...".to_owned(),
            ));
        };
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                url: shown,
                changed,
                local_leases: Arc::default(),
                decoded: Default::default(),
                listener,
            }),
        })
    }

    /// The store's URL without its password.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Whether the store is PostgreSQL (shared by replicas) rather than an
    /// embedded SQLite file.
    pub fn is_shared(&self) -> bool {
        matches!(self.inner.db, Db::Postgres(_))
    }

    /// Closes every pooled connection, waiting for those in use; the store
    /// cannot be used afterwards.
    pub async fn close(&self) {
        match &self.inner.db {
            Db::Sqlite { readers, writer } => {
                readers.close().await;
                writer.close().await;
            }
            Db::Postgres(pool) => pool.close().await,
        }
    }

    /// Tells this process's watchers that something was committed.
    pub(crate) fn notify_local(&self) {
        // No receiver is fine: nobody is watching.
        let _ = self.inner.changed.send(());
    }
}

async fn open_sqlite(url: &str, shown: &str) -> Result<Db, StoreError> {
    let open_error = |reason: String| StoreError::Open {
        url: shown.to_owned(),
        reason,
    };
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| open_error(format!("not a valid SQLite URL: {e}")))?;
    let path = options.get_filename().to_owned();
    if path.as_os_str().is_empty() || path.as_os_str() == ":memory:" {
        return Err(open_error(
            "an in-memory SQLite store would lose everything; give a file path".to_owned(),
        ));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(open_error(format!(
                "directory {} does not exist",
                dir.display()
            )));
        }
    }
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(SQLITE_BUSY_TIMEOUT);
    let cannot_open = |e: sqlx::Error| open_error(format!("cannot open {}: {e}", path.display()));
    // sqlx's pool is fair by default: waiting writers get the connection
    // in the order they asked for it.
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(SQLITE_WRITE_QUEUE_TIMEOUT)
        // A burst (thousands of agents connecting) queues writes for a
        // second or two; a warning per write at sqlx's 2 s would flood.
        .acquire_slow_threshold(SQLITE_WRITE_QUEUE_SLOW)
        .connect_with(options.clone())
        .await
        .map_err(cannot_open)?;
    migrator(sqlite_migrations())
        .run(&writer)
        .await
        .map_err(migrate_error(shown))?;
    let readers = SqlitePoolOptions::new()
        .max_connections(SQLITE_READERS)
        .connect_with(options.pragma("query_only", "ON"))
        .await
        .map_err(cannot_open)?;
    Ok(Db::Sqlite { readers, writer })
}

/// Names the store (password hidden) in a failed migration.
fn migrate_error(shown: &str) -> impl Fn(sqlx::migrate::MigrateError) -> StoreError + '_ {
    move |e| StoreError::Migrate {
        url: shown.to_owned(),
        reason: e.to_string(),
    }
}

async fn open_postgres(url: &str, shown: &str) -> Result<PgPool, StoreError> {
    let open_error = |reason: String| StoreError::Open {
        url: shown.to_owned(),
        reason,
    };
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| open_error(format!("not a valid PostgreSQL URL: {e}")))?;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| open_error(e.to_string()))?;
    migrator(postgres_migrations())
        .run(&pool)
        .await
        .map_err(migrate_error(shown))?;
    Ok(pool)
}

/// Turns every NOTIFY on the change channel into a local hint. When the
/// listener's connection drops, sqlx reconnects on the next receive and
/// notifications sent meanwhile are lost, so a hint is sent then too: the
/// watchers re-read the feed and miss nothing.
async fn forward_notifications(mut listener: PgListener, changed: broadcast::Sender<()>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) => {
                let _ = changed.send(());
            }
            Ok(None) => {
                tracing::warn!("store change listener lost its connection; reconnecting");
                let _ = changed.send(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "store change listener failed; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = changed.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_removed_from_urls() {
        assert_eq!(
            redact_url("postgres://weft:s3cret@db:5432/weft?sslmode=disable"),
            "postgres://weft:***@db:5432/weft?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://weft@db/weft"),
            "postgres://weft@db/weft"
        );
        assert_eq!(
            redact_url("sqlite:///var/lib/weft.db"),
            "sqlite:///var/lib/weft.db"
        );
    }
}
