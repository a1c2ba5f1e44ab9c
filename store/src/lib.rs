//! The zone controller's single persistence layer: resources with versions
//! and optimistic concurrency, a change feed with watch notifications,
//! bootstrap tokens, leader election, per-mesh CA sets (rotation) and virtual IP
//! allocation, on the same code path for an embedded SQLite file (the
//! default: no set-up) and PostgreSQL (several controller replicas sharing
//! one database).
//!
//! Open a store with [`Store::open`] and a URL: `sqlite:///path/file.db` or
//! `postgres://user@host/db`. Connections to PostgreSQL are not encrypted
//! (no TLS support is compiled in yet).
//!
//! Watching: [`Store::watch`] only says *that* something changed; readers
//! then call [`Store::changes_since`] with the last sequence they applied,
//! so a lost or coalesced notification never loses a change. The feed is
//! bounded ([`Store::prune_feed`]): a reader left below its floor is told
//! so (`None`) and reads everything again.

mod agents;
mod backend;
mod ca;
mod changes;
mod clock;
mod columns;
mod decoded;
mod error;
mod leader;
mod mesh_cas;
mod resources;
mod retention;
mod tokens;
mod vips;

pub use agents::{
    AgentDeparture, AgentEnrollment, AgentNack, AgentPresence, AgentRecord, VanishedAgent,
};
pub use backend::Store;
pub use ca::CaMaterial;
pub use changes::{Change, ChangeEvent, FeedEntry, Watch};
pub use clock::now_ms;
pub use error::StoreError;
pub use leader::LeaderGuard;
pub use mesh_cas::{CaRole, CaSource, MeshCaRecord, NewMeshCa};
pub use resources::{Expect, ListingMark, ListingMarks, ResourceKey, StoredResource};
pub use retention::{FeedPruned, FeedRetention};
pub use tokens::{TokenError, TokenGrant, TokenInfo, TokenSpec, WorkloadScope};
pub use vips::VipRange;
