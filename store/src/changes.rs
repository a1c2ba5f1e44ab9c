//! The change feed: every put and delete in commit order, and watch hints
//! that say when to read it again.

use tokio::sync::broadcast;
use weft_api::{Kind, Resource};

use crate::agents::{AGENT_CUT_VERSION, AGENT_KIND};
use crate::backend::{on_pool, Store};
use crate::columns::Columns;
use crate::error::{to_u64, StoreError};
use crate::mesh_cas::MESH_CA_KIND;
use crate::resources::ResourceKey;

/// Bumps the change sequence; the first statement of every write
/// transaction (see the migrations for why).
pub(crate) const NEXT_SEQ: &str =
    "UPDATE change_sequence SET value = value + 1 WHERE id = 1 RETURNING value";

/// Appends one entry to the feed, with when it was written (what
/// [`Store::prune_feed`] ages it by).
pub(crate) const INSERT_CHANGE: &str =
    "INSERT INTO changes (seq, kind, mesh, namespace, name, version, deleted, at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Takes the next change sequence inside the transaction `$tx`
/// (serialising it with every other writer) and returns it; `$op` names
/// the write in errors.
macro_rules! take_seq {
    ($tx:expr, $op:expr) => {{
        let seq: i64 = sqlx::query_scalar($crate::changes::NEXT_SEQ)
            .fetch_one(&mut *$tx)
            .await
            .map_err($crate::error::StoreError::db($op))?;
        seq
    }};
}
pub(crate) use take_seq;

/// Appends the feed entry at `$seq` inside the transaction `$tx`: every
/// writer (resources, agents, mesh CAs) records its change this one way.
macro_rules! append_change {
    ($tx:expr, $op:expr, $seq:expr, $kind:expr, $mesh:expr, $namespace:expr, $name:expr, $version:expr, $deleted:expr) => {{
        sqlx::query($crate::changes::INSERT_CHANGE)
            .bind($seq)
            .bind($kind)
            .bind($mesh)
            .bind($namespace)
            .bind($name)
            .bind($version)
            .bind($deleted)
            .bind($crate::clock::now_ms())
            .execute(&mut *$tx)
            .await
            .map_err($crate::error::StoreError::db($op))?;
    }};
}
pub(crate) use append_change;

/// What happened to a resource at one point of the feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeEvent {
    /// Created or replaced; this is its new version.
    Put {
        /// The version written.
        version: u64,
    },
    /// Deleted; this was its last version.
    Deleted {
        /// The version that was deleted.
        version: u64,
    },
}

/// One entry of the change feed, for controllers that keep derived state
/// (agent views, service endpoints) up to date without re-reading
/// everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its position in the feed: strictly increasing in commit order.
    pub seq: u64,
    /// The resource changed.
    pub key: ResourceKey,
    /// What happened to it.
    pub event: ChangeEvent,
}

/// One entry of the whole feed: a resource change, an inventory
/// transition of an agent (enrolled, connected, disconnected), or a change
/// of a mesh's CAs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEntry {
    /// A resource was put or deleted.
    Resource(Change),
    /// An agent's inventory entry changed in a way its mesh's views depend
    /// on.
    Agent {
        /// Its position in the feed.
        seq: u64,
        /// The agent's zone.
        zone: String,
        /// The agent's mesh.
        mesh: String,
        /// The agent's name.
        name: String,
        /// Whether the agent was cut off (its token revoked): whoever holds
        /// its stream must end it.
        cut: bool,
    },
    /// The CAs of a mesh changed (a CA added, promoted or dropped): its
    /// trust bundle must be pushed again.
    MeshCa {
        /// Its position in the feed.
        seq: u64,
        /// The mesh.
        mesh: String,
    },
}

impl FeedEntry {
    /// The entry's position in the feed.
    pub fn seq(&self) -> u64 {
        match self {
            FeedEntry::Resource(change) => change.seq,
            FeedEntry::Agent { seq, .. } | FeedEntry::MeshCa { seq, .. } => *seq,
        }
    }
}

/// Notifications that something changed in the store, on this process
/// (SQLite) or on any replica sharing the database (PostgreSQL).
/// Notifications are hints and may be coalesced: after each, read
/// [`Store::changes_since`] from the last sequence applied.
pub struct Watch {
    receiver: broadcast::Receiver<()>,
}

impl Watch {
    /// Waits until something may have changed since the previous call (or
    /// since the watch was made). Several changes may give one
    /// notification. Fails only when the store is gone.
    pub async fn changed(&mut self) -> Result<(), StoreError> {
        match self.receiver.recv().await {
            Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return Err(StoreError::Closed),
        }
        // Coalesce what is already queued: one re-read covers it all.
        while let Ok(()) | Err(broadcast::error::TryRecvError::Lagged(_)) = self.receiver.try_recv()
        {
        }
        Ok(())
    }
}

impl Store {
    /// Starts watching for changes. Make the watch *before* reading the
    /// state it guards (`current_seq`, `list`), so no change falls between.
    pub fn watch(&self) -> Watch {
        Watch {
            receiver: self.inner.changed.subscribe(),
        }
    }

    /// The sequence of the last committed change (0 for a new store). A
    /// reader takes it, lists what it needs, then follows
    /// `changes_since(seq)`; changes that raced the listing appear again
    /// there, so readers apply changes by version.
    pub async fn current_seq(&self) -> Result<u64, StoreError> {
        let seq: i64 = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT value FROM change_sequence WHERE id = 1")
                .fetch_one(pool)
                .await
                .map_err(StoreError::db("read the change sequence"))?
        });
        to_u64(seq, "change_sequence.value")
    }

    /// Every resource change after `seq`, oldest first (inventory and CA
    /// entries are skipped: see [`Store::feed_since`]); `None` when `seq`
    /// is below the feed's floor (some were pruned: read everything again).
    pub async fn changes_since(&self, seq: u64) -> Result<Option<Vec<Change>>, StoreError> {
        let Some(entries) = self.feed_since(seq).await? else {
            return Ok(None);
        };
        Ok(Some(
            entries
                .into_iter()
                .filter_map(|entry| match entry {
                    FeedEntry::Resource(change) => Some(change),
                    FeedEntry::Agent { .. } | FeedEntry::MeshCa { .. } => None,
                })
                .collect(),
        ))
    }

    /// [`Store::changed_keys_since`] with each resource as it is now
    /// (`None`: deleted since): what a reader that kept a listing applies
    /// to bring it up to date.
    pub async fn changed_since(
        &self,
        seq: u64,
        kind: Kind,
        mesh: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<(ResourceKey, Option<Resource>)>>, StoreError> {
        let Some(keys) = self.changed_keys_since(seq, kind, mesh, limit).await? else {
            return Ok(None);
        };
        let mut changed = Vec::with_capacity(keys.len());
        for key in keys {
            let now = self.get(&key).await?.map(|stored| stored.resource);
            changed.push((key, now));
        }
        Ok(Some(changed))
    }

    /// The keys of the resources of `kind` (in `mesh`, or in any) put or deleted after
    /// `seq`, each once, oldest change first; `None` when more than
    /// `limit` changed (re-reading the whole listing is cheaper then) or
    /// when `seq` is below the feed's floor (changes after it may have been
    /// pruned: the listing must be read again). What lets a reader that
    /// kept a listing bring it up to date.
    pub async fn changed_keys_since(
        &self,
        seq: u64,
        kind: Kind,
        mesh: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<ResourceKey>>, StoreError> {
        let after = i64::try_from(seq).unwrap_or(i64::MAX);
        let most = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let op = format!("read the {kind} changes since {seq}");
        let rows: Vec<(String, String, String)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT mesh, namespace, name FROM changes \
                 WHERE seq > $1 AND kind = $2 AND ($3 IS NULL OR mesh = $3) \
                 ORDER BY seq LIMIT $4",
            )
            .bind(after)
            .bind(kind.as_str())
            .bind(mesh)
            .bind(most)
            .fetch_all(pool)
            .await
            .map_err(StoreError::db(&op))?
        });
        // The floor after the rows: see [`Store::feed_floor`].
        if rows.len() > limit || self.behind_floor(seq).await? {
            return Ok(None);
        }
        let mut keys: Vec<ResourceKey> = Vec::with_capacity(rows.len());
        for (mesh, namespace, name) in rows {
            let key = ResourceKey::from_columns(kind.as_str(), mesh, namespace, name)?;
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        Ok(Some(keys))
    }

    /// Whether an agent of `mesh` in `zone` was enrolled, connected,
    /// disconnected, left or cut off after `seq` (the inventory entries of
    /// the feed; heartbeats are not in it). Also true when `seq` is below the
    /// feed's floor: entries after it may have been pruned, so whether one
    /// changed is unknown and the caller must assume so.
    pub async fn agents_changed_since(
        &self,
        seq: u64,
        zone: &str,
        mesh: &str,
    ) -> Result<bool, StoreError> {
        let after = i64::try_from(seq).unwrap_or(i64::MAX);
        let op = format!("read the agent changes since {seq}");
        let found: Option<i64> = on_pool!(self, pool => {
            // The zone is kept in the namespace column.
            sqlx::query_scalar(
                "SELECT seq FROM changes \
                 WHERE seq > $1 AND kind = $2 AND mesh = $3 AND namespace = $4 LIMIT 1",
            )
            .bind(after)
            .bind(AGENT_KIND)
            .bind(mesh)
            .bind(zone)
            .fetch_optional(pool)
            .await
            .map_err(StoreError::db(&op))?
        });
        // The floor after the rows: see [`Store::feed_floor`].
        Ok(found.is_some() || self.behind_floor(seq).await?)
    }

    /// Every entry of the feed after `seq`, resources, agents and CAs, oldest
    /// first; `None` when `seq` is below the feed's floor (entries after it
    /// may have been pruned): the follower must resynchronise from a full
    /// read, as it does when it starts.
    pub async fn feed_since(&self, seq: u64) -> Result<Option<Vec<FeedEntry>>, StoreError> {
        let entries = self.feed_rows_since(seq).await?;
        // The floor after the rows: see [`Store::feed_floor`].
        if self.behind_floor(seq).await? {
            return Ok(None);
        }
        Ok(Some(entries))
    }

    /// The rows of [`Store::feed_since`], decoded, whatever the floor.
    async fn feed_rows_since(&self, seq: u64) -> Result<Vec<FeedEntry>, StoreError> {
        let after = i64::try_from(seq).unwrap_or(i64::MAX);
        let op = format!("read changes since {seq}");
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT seq, kind, mesh, namespace, name, version, deleted FROM changes \
                 WHERE seq > $1 ORDER BY seq",
            )
            .bind(after)
            .fetch_all(pool)
            .await
            .map_err(StoreError::db(&op))?;
            rows.iter()
                .map(|row| {
                    let cols = Columns::new(row, "changes");
                    let seq: i64 = cols.get("seq")?;
                    let kind: String = cols.get("kind")?;
                    let mesh: String = cols.get("mesh")?;
                    let namespace: String =
                        cols.get("namespace")?;
                    let name: String = cols.get("name")?;
                    let version: i64 = cols.get("version")?;
                    let deleted: bool = cols.get("deleted")?;
                    let version = to_u64(version, "changes.version")?;
                    let seq = to_u64(seq, "changes.seq")?;
                    if kind == AGENT_KIND {
                        // The zone is kept in the namespace column.
                        // The version column says whether it was cut off.
                        let cut = version == AGENT_CUT_VERSION;
                        return Ok(FeedEntry::Agent { seq, zone: namespace, mesh, name, cut });
                    }
                    if kind == MESH_CA_KIND {
                        return Ok(FeedEntry::MeshCa { seq, mesh });
                    }
                    Ok(FeedEntry::Resource(Change {
                        seq,
                        key: ResourceKey::from_columns(&kind, mesh, namespace, name)?,
                        event: if deleted {
                            ChangeEvent::Deleted { version }
                        } else {
                            ChangeEvent::Put { version }
                        },
                    }))
                })
                .collect()
        })
    }
}
