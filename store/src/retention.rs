//! Bounding the change feed: the leader deletes the entries that are both
//! older than a retention period and not among the newest kept, in short
//! transactions, and raises the feed's floor with each delete, so that a
//! reader left behind knows it must read everything again.
//!
//! The invariant readers rely on: every entry with a sequence above the
//! floor is still in the table, because a delete removes only entries at or
//! below the floor it sets in the same transaction. So a reader at position
//! `p` that reads its entries (`seq > p`) and *then* reads the floor `f` got
//! them all when `p >= f`: a prune that removed one of them would have
//! committed before that second read, with a floor above `p`. Reading the
//! floor first would not do: a prune between the two reads would go
//! unseen.

use std::time::Duration;

use crate::backend::{on_pool, on_writer, Store};
use crate::error::{to_u64, StoreError};

/// What [`Store::prune_feed`] may delete: an entry goes only when it is
/// older than `max_age` *and* not among the `keep_newest` newest, so a quiet
/// zone keeps its recent history and a busy one stays bounded by age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedRetention {
    /// Entries written less than this long ago are kept.
    pub max_age: Duration,
    /// The newest this many entries are kept, however old.
    pub keep_newest: u64,
    /// At most this many entries are deleted per transaction: SQLite has
    /// one writer, and a backlog of millions must not hold it for long.
    pub batch: u64,
}

/// What one [`Store::prune_feed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedPruned {
    /// Entries deleted.
    pub rows: u64,
    /// The feed's floor afterwards (see [`Store::feed_floor`]).
    pub floor: u64,
}

impl Store {
    /// The feed's floor: the highest sequence pruned so far (0 when none
    /// was). A reader at position `p >= floor` finds every entry after `p`
    /// in the feed; one at `p < floor` may have missed some and must read
    /// everything again. Read it *after* the entries (see the module's
    /// documentation for why).
    pub async fn feed_floor(&self) -> Result<u64, StoreError> {
        let floor: i64 = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT seq FROM feed_floor WHERE id = 1")
                .fetch_one(pool)
                .await
                .map_err(StoreError::db("read the change feed's floor"))?
        });
        to_u64(floor, "feed_floor.seq")
    }

    /// Whether a reader at `seq` may have missed pruned entries.
    pub(crate) async fn behind_floor(&self, seq: u64) -> Result<bool, StoreError> {
        Ok(seq < self.feed_floor().await?)
    }

    /// Deletes the feed entries that `retention` lets go, as of `now_ms`
    /// (milliseconds since the epoch), one batch per transaction until none
    /// is left; raises the floor over them. Idempotent. Entries go oldest
    /// first and only as an unbroken prefix: an entry stamped young by a
    /// replica whose clock runs ahead keeps the older-looking ones after it.
    pub async fn prune_feed(
        &self,
        retention: FeedRetention,
        now_ms: i64,
    ) -> Result<FeedPruned, StoreError> {
        let max_age_ms = i64::try_from(retention.max_age.as_millis()).unwrap_or(i64::MAX);
        let before_ms = now_ms.saturating_sub(max_age_ms);
        let batch = retention.batch.max(1);
        // Once for all batches: entries written meanwhile only push the
        // kept ones further from the end, so they stay kept.
        let Some(highest) = self.highest_prunable(retention.keep_newest).await? else {
            return Ok(FeedPruned {
                rows: 0,
                floor: self.feed_floor().await?,
            });
        };
        let mut rows = 0;
        loop {
            let (deleted, floor) = self.prune_batch(before_ms, highest, batch).await?;
            rows += deleted;
            if deleted < batch {
                return Ok(FeedPruned { rows, floor });
            }
            // Let the other writers in between batches.
            tokio::task::yield_now().await;
        }
    }

    /// The highest sequence that leaves the `keep` newest entries in the
    /// feed; `None` when there are no more than `keep`.
    async fn highest_prunable(&self, keep: u64) -> Result<Option<i64>, StoreError> {
        let Some(offset) = keep.checked_sub(1) else {
            return Ok(Some(i64::MAX));
        };
        let kept: Option<i64> = on_pool!(self, pool => {
            // The keep-th newest entry (the primary key's index, backwards).
            sqlx::query_scalar("SELECT seq FROM changes ORDER BY seq DESC LIMIT 1 OFFSET $1")
                .bind(i64::try_from(offset).unwrap_or(i64::MAX))
                .fetch_optional(pool)
                .await
                .map_err(StoreError::db("find the newest change feed entries to keep"))?
        });
        Ok(kept.map(|seq| seq - 1))
    }

    /// Deletes at most `batch` of the oldest entries written before
    /// `before_ms` up to `highest`, in one transaction; returns how many
    /// went and the floor after.
    async fn prune_batch(
        &self,
        before_ms: i64,
        highest: i64,
        batch: u64,
    ) -> Result<(u64, u64), StoreError> {
        let op = "prune the change feed";
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let (deleted, floor): (u64, i64) = on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(op))?;
            // A write first: it takes SQLite's write lock up front (a read
            // upgraded later could fail under another writer) and on
            // PostgreSQL serialises prunes on the floor's row.
            let floor: i64 =
                sqlx::query_scalar("UPDATE feed_floor SET seq = seq WHERE id = 1 RETURNING seq")
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StoreError::db(op))?;
            // Uncommitted writers hold later sequences than any committed
            // entry (they commit in sequence order), so none is passed over.
            let oldest: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT seq, at_ms FROM changes WHERE seq <= $1 ORDER BY seq LIMIT $2",
            )
            .bind(highest)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(op))?;
            let Some(upper) = oldest
                .iter()
                .take_while(|(_, at_ms)| *at_ms < before_ms)
                .map(|(seq, _)| *seq)
                .last()
            else {
                return Ok::<_, StoreError>((0, floor));
            };
            let deleted = sqlx::query("DELETE FROM changes WHERE seq <= $1")
                .bind(upper)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(op))?
                .rows_affected();
            sqlx::query("UPDATE feed_floor SET seq = $1 WHERE id = 1 AND seq < $1")
                .bind(upper)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(op))?;
            tx.commit().await.map_err(StoreError::db(op))?;
            Ok((deleted, floor.max(upper)))
        }.await)?;
        Ok((deleted, to_u64(floor, "feed_floor.seq")?))
    }
}
