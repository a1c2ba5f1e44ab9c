//! Resources as last decoded, by key and change sequence. On every change
//! the leader and each replica's hub list every Workload of the zone: with
//! 10,000 of them, decoding their JSON bodies was most of a change's cost
//! (docs/benchmarks.md, control plane at scale). A row's `seq` is the
//! change-feed sequence of its last write, unique across replicas, so a
//! cached body with the same `seq` is the row's body.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use weft_api::{Kind, Resource};

use crate::resources::ResourceKey;

/// The cache; one per store handle.
#[derive(Default)]
pub(crate) struct Decoded {
    entries: Mutex<HashMap<ResourceKey, (u64, Resource)>>,
}

impl Decoded {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<ResourceKey, (u64, Resource)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Drops the entries of `kind` a whole listing of it did not return
/// (deleted resources), so that the cache holds live resources only.
pub(crate) fn forget_others(
    entries: &mut HashMap<ResourceKey, (u64, Resource)>,
    kind: Kind,
    live: &HashSet<ResourceKey>,
) {
    entries.retain(|key, _| key.kind != kind || live.contains(key));
}
