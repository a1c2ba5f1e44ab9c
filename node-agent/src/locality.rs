//! Locality tiers for `LoadBalancing` `localityAware`: how near each
//! endpoint of a service is to the calling workload, so that a pick can
//! keep to the nearest tier that has a usable endpoint and fail over
//! outwards only when that tier has none.
//!
//! Tiers, nearest first (see [`Rank`]): the caller's Weft zone, region,
//! zone and subzone; its Weft zone, region and zone; its Weft zone and
//! region; its Weft zone; other Weft zones. The failure-domain parts come
//! from the well-known workload labels ([`weft_api::Locality`]).
//!
//! Ranks are computed once per service and caller locality, on the first
//! pick after a view arrives, and kept with the service (a view is
//! immutable, so they stay right until the next view replaces the
//! service): a pick then compares small integers, never strings, and
//! allocates nothing.

use std::sync::Arc;

use arc_swap::ArcSwap;
use weft_api::Locality;

/// How near an endpoint is to the caller: lower is nearer.
pub type Rank = u8;

/// Same Weft zone, region, zone and subzone.
pub const SAME_SUBZONE: Rank = 0;
/// Same Weft zone, region and zone.
pub const SAME_ZONE: Rank = 1;
/// Same Weft zone and region.
pub const SAME_REGION: Rank = 2;
/// Same Weft zone only.
pub const SAME_WEFT_ZONE: Rank = 3;
/// Another Weft zone: the failover of last resort.
pub const OTHER_WEFT_ZONE: Rank = 4;

/// Where an endpoint runs, as the agent's view holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    /// Whether it runs in the Weft zone of the view (the caller's).
    pub local_zone: bool,
    /// Its failure domain inside its Weft zone.
    pub locality: Locality,
}

/// The tier of an endpoint at `place` for a caller at `caller` (in the
/// view's Weft zone). The parts nest: a zone counts only inside the same
/// region, a subzone only inside the same zone, as zone names are only
/// unique within their region.
pub fn rank(caller: &Locality, place: &Place) -> Rank {
    if !place.local_zone {
        return OTHER_WEFT_ZONE;
    }
    let l = &place.locality;
    if l.region != caller.region {
        SAME_WEFT_ZONE
    } else if l.zone != caller.zone {
        SAME_REGION
    } else if l.subzone != caller.subzone {
        SAME_ZONE
    } else {
        SAME_SUBZONE
    }
}

/// The rank of every endpoint of one service for one caller locality, in
/// the service's endpoint order.
#[derive(Debug)]
pub struct Tiers {
    caller: Locality,
    ranks: Box<[Rank]>,
}

impl Tiers {
    /// Ranks `places` (a service's endpoints, in order) for `caller`.
    pub fn new<'a>(caller: &Locality, places: impl IntoIterator<Item = &'a Place>) -> Self {
        Tiers {
            caller: caller.clone(),
            ranks: places.into_iter().map(|p| rank(caller, p)).collect(),
        }
    }

    /// The rank of endpoint `i`; past the end (never, for the tiers of the
    /// service itself), the farthest.
    pub fn rank(&self, i: usize) -> Rank {
        self.ranks.get(i).copied().unwrap_or(Rank::MAX)
    }

    /// The caller locality these tiers are for.
    pub fn caller(&self) -> &Locality {
        &self.caller
    }
}

/// The most caller localities whose tiers one service keeps: a node agent
/// has one per distinct locality of its workloads (usually one, since they
/// share a node). Past it, tiers are computed per pick rather than kept,
/// so a huge set of localities cannot grow the agent's memory.
const MAX_CALLERS: usize = 16;

/// The tiers of one service per caller locality, filled on first use.
#[derive(Debug, Default)]
pub struct TierCache {
    computed: ArcSwap<Vec<Arc<Tiers>>>,
}

impl TierCache {
    /// The tiers of `places` for `caller`: kept ones when there are (a
    /// reference count, no allocation), else computed now and kept.
    pub fn get<'a>(
        &self,
        caller: &Locality,
        places: impl IntoIterator<Item = &'a Place>,
    ) -> Arc<Tiers> {
        if let Some(found) = self.computed.load().iter().find(|t| t.caller == *caller) {
            return found.clone();
        }
        let tiers = Arc::new(Tiers::new(caller, places));
        tracing::debug!(
            caller = %caller,
            endpoints = tiers.ranks.len(),
            nearest = tiers.ranks.iter().min().copied().unwrap_or(Rank::MAX),
            "locality tiers computed"
        );
        self.computed.rcu(|kept| {
            let mut kept = Vec::clone(kept);
            if kept.len() < MAX_CALLERS && !kept.iter().any(|t| t.caller == *caller) {
                kept.push(tiers.clone());
            }
            kept
        });
        tiers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locality(region: &str, zone: &str, subzone: &str) -> Locality {
        Locality {
            region: region.into(),
            zone: zone.into(),
            subzone: subzone.into(),
        }
    }

    fn at(local_zone: bool, region: &str, zone: &str, subzone: &str) -> Place {
        Place {
            local_zone,
            locality: locality(region, zone, subzone),
        }
    }

    #[test]
    fn tiers_widen_from_subzone_to_other_weft_zones() {
        let caller = locality("eu", "a", "r1");
        let cases = [
            (at(true, "eu", "a", "r1"), SAME_SUBZONE),
            (at(true, "eu", "a", "r2"), SAME_ZONE),
            (at(true, "eu", "a", ""), SAME_ZONE),
            (at(true, "eu", "b", "r1"), SAME_REGION),
            (at(true, "us", "a", "r1"), SAME_WEFT_ZONE),
            (at(true, "", "", ""), SAME_WEFT_ZONE),
            (at(false, "eu", "a", "r1"), OTHER_WEFT_ZONE),
        ];
        for (place, want) in cases {
            assert_eq!(rank(&caller, &place), want, "{place:?}");
        }
    }

    #[test]
    fn unlabelled_callers_and_endpoints_are_all_one_tier() {
        // A mesh without the labels: every endpoint of the zone is alike.
        let caller = Locality::default();
        let places = [at(true, "", "", ""), at(true, "", "", "")];
        let tiers = Tiers::new(&caller, &places);
        assert_eq!((tiers.rank(0), tiers.rank(1)), (SAME_SUBZONE, SAME_SUBZONE));
        // A zone-only label on the caller still ranks endpoints alike.
        let caller = locality("", "a", "");
        let tiers = Tiers::new(&caller, &places);
        assert_eq!(tiers.rank(0), tiers.rank(1));
        assert_eq!(tiers.rank(2), Rank::MAX);
    }

    #[test]
    fn the_cache_computes_once_per_caller_and_stays_bounded() {
        let cache = TierCache::default();
        let places = [at(true, "eu", "a", ""), at(true, "eu", "b", "")];
        let a = locality("eu", "a", "");
        let first = cache.get(&a, &places);
        let again = cache.get(&a, &places);
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!((first.rank(0), first.rank(1)), (SAME_SUBZONE, SAME_REGION));
        let b = cache.get(&locality("eu", "b", ""), &places);
        assert_eq!((b.rank(0), b.rank(1)), (SAME_REGION, SAME_SUBZONE));
        for i in 0..2 * MAX_CALLERS {
            let _ = cache.get(&locality("x", &i.to_string(), ""), &places);
        }
        assert_eq!(cache.computed.load().len(), MAX_CALLERS);
    }
}
