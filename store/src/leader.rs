//! Leader election for singleton work (CA signing, virtual IP allocation):
//! on PostgreSQL a session-level advisory lock held on a dedicated
//! connection, so it is released when that connection or its process dies
//! and another replica can take over; on SQLite (one process) a lease held
//! in this process.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Postgres};

use crate::backend::{Db, Store};
use crate::error::StoreError;

/// Proof of leadership; leadership ends when it is dropped (or
/// [`LeaderGuard::release`]d). On PostgreSQL, call [`LeaderGuard::check`]
/// before each piece of singleton work: if the connection was lost, so was
/// the lock.
pub struct LeaderGuard {
    name: String,
    held: Held,
}

enum Held {
    Postgres {
        conn: Option<PgConnection>,
        key: i64,
    },
    Local(Arc<Mutex<HashSet<String>>>),
}

/// The advisory lock key for a leadership name: stable across versions and
/// replicas.
fn lock_key(name: &str) -> i64 {
    let digest = Sha256::digest(format!("weft-leader:{name}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

impl Store {
    /// Tries to become the leader for `name` without waiting: `Some` if this
    /// caller now leads, `None` if someone else does.
    pub async fn try_lead(&self, name: &str) -> Result<Option<LeaderGuard>, StoreError> {
        match &self.inner.db {
            Db::Postgres(pool) => {
                let op = format!("try to lead {name:?}");
                let conn: PoolConnection<Postgres> =
                    pool.acquire().await.map_err(StoreError::db(&op))?;
                // Out of the pool: the lock lives as long as this connection.
                let mut conn = conn.detach();
                let key = lock_key(name);
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(StoreError::db(&op))?;
                if !locked {
                    let _ = conn.close().await;
                    return Ok(None);
                }
                Ok(Some(LeaderGuard {
                    name: name.to_owned(),
                    held: Held::Postgres {
                        conn: Some(conn),
                        key,
                    },
                }))
            }
            Db::Sqlite { .. } => {
                let leases = &self.inner.local_leases;
                let mut held = leases.lock().unwrap_or_else(|p| p.into_inner());
                if !held.insert(name.to_owned()) {
                    return Ok(None);
                }
                Ok(Some(LeaderGuard {
                    name: name.to_owned(),
                    held: Held::Local(leases.clone()),
                }))
            }
        }
    }
}

impl LeaderGuard {
    /// The leadership's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks that leadership is still held: on PostgreSQL, that the lock's
    /// connection is alive.
    pub async fn check(&mut self) -> Result<(), StoreError> {
        match &mut self.held {
            Held::Postgres {
                conn: Some(conn), ..
            } => conn.ping().await.map_err(|e| StoreError::LeadershipLost {
                name: self.name.clone(),
                reason: e.to_string(),
            }),
            Held::Postgres { conn: None, .. } => Err(StoreError::LeadershipLost {
                name: self.name.clone(),
                reason: "already released".to_owned(),
            }),
            Held::Local(_) => Ok(()),
        }
    }

    /// Gives leadership up and waits until another caller can take it.
    pub async fn release(mut self) {
        if let Held::Postgres { conn, key } = &mut self.held {
            if let Some(conn) = conn.take() {
                unlock(conn, *key).await;
            }
        }
        // Drop removes a local lease.
    }
}

async fn unlock(mut conn: PgConnection, key: i64) {
    // Closing the session would release the lock anyway; unlocking first
    // makes it immediate even if the close is slow.
    if let Err(e) = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut conn)
        .await
    {
        tracing::debug!(error = %e, "advisory unlock failed; closing the session releases it");
    }
    let _ = conn.close().await;
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        match &mut self.held {
            Held::Postgres { conn, key } => {
                if let Some(conn) = conn.take() {
                    match tokio::runtime::Handle::try_current() {
                        Ok(runtime) => {
                            runtime.spawn(unlock(conn, *key));
                        }
                        // No runtime: dropping the socket ends the session,
                        // which releases the lock.
                        Err(_) => drop(conn),
                    }
                }
            }
            Held::Local(leases) => {
                leases
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&self.name);
            }
        }
    }
}
