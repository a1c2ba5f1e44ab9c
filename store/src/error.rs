//! What can go wrong in the store, named by operation and cause so that the
//! controller can report it (and tell a conflict from an outage).

use crate::resources::{Expect, ResourceKey};

/// Every failure of a store operation except token refusals, which have
/// their own type ([`crate::TokenError`]) because they are expected
/// outcomes, not faults.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL could not be used: wrong scheme, unreachable server, missing
    /// directory, refused login. The URL is shown without its password.
    #[error("cannot open store {url}: {reason}")]
    Open {
        /// The store URL, password removed.
        url: String,
        /// Why it could not be opened.
        reason: String,
    },
    /// The embedded schema migrations could not be applied.
    #[error("cannot migrate store {url}: {reason}")]
    Migrate {
        /// The store URL, password removed.
        url: String,
        /// What the migrator reported.
        reason: String,
    },
    /// A database operation failed (connection lost, lock timeout, ...).
    #[error("store operation {operation} failed: {source}")]
    Database {
        /// What the store was doing, e.g. `put Workload default/ns/a`.
        operation: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// An optimistic-concurrency check failed: someone else changed (or
    /// created, or deleted) the resource since the caller read it.
    #[error("conflict on {key}: expected {expected}, but the stored version is {}", found.map_or_else(|| "absent".to_owned(), |v| v.to_string()))]
    Conflict {
        /// The resource written.
        key: ResourceKey,
        /// What the caller expected.
        expected: Expect,
        /// The version found (`None`: the resource does not exist).
        found: Option<u64>,
    },
    /// The resource failed validation; nothing was written.
    #[error("refusing to store invalid {key}: {errors}")]
    Invalid {
        /// The resource refused.
        key: ResourceKey,
        /// Every problem found.
        errors: weft_api::ValidationErrors,
    },
    /// A row read back could not be decoded: the database was changed by
    /// something other than this crate, or by an incompatible version.
    #[error("corrupt stored data in {what}: {reason}")]
    Corrupt {
        /// Which row or column.
        what: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The virtual IP range has no free address left.
    #[error("no free virtual IP left in {range} for service {service}")]
    VipsExhausted {
        /// The configured range.
        range: String,
        /// The service that asked.
        service: String,
    },
    /// A leader's dedicated connection was lost: another replica may lead
    /// now, so singleton work must stop.
    #[error("leadership of {name:?} lost: {reason}")]
    LeadershipLost {
        /// The leadership's name.
        name: String,
        /// Why it was lost.
        reason: String,
    },
    /// A CA rotation step does not fit the mesh's CAs now (a rotation is
    /// already in progress, the CA is not the pending one, ...); nothing
    /// was changed.
    #[error("cannot change the CAs of mesh {mesh:?}: {reason}")]
    CaTransition {
        /// The mesh.
        mesh: String,
        /// Why.
        reason: String,
    },
    /// The store behind a [`crate::Watch`] was dropped.
    #[error("the store was closed")]
    Closed,
}

impl StoreError {
    /// A closure for `map_err` that wraps a driver error with what was being
    /// done.
    pub(crate) fn db(operation: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
        let operation = operation.into();
        move |source| StoreError::Database { operation, source }
    }

    /// A closure for `map_err` reporting an undecodable value.
    pub(crate) fn corrupt<E: std::fmt::Display>(
        what: impl Into<String>,
    ) -> impl FnOnce(E) -> StoreError {
        let what = what.into();
        move |e| StoreError::Corrupt {
            what,
            reason: e.to_string(),
        }
    }
}

/// Converts a non-negative database integer to the API's unsigned type.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        what: what.to_owned(),
        reason: format!("negative value {value}"),
    })
}
