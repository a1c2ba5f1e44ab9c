//! `RateLimit`: local rate limits on outbound calls (per destination) and inbound calls (per caller).

use crate::kinds::policy_common::two_way_policy_spec;
use crate::policy::conf::RateLimitConf;

two_way_policy_spec!(
    /// Limits the calls the selected workloads make (`to`) or receive (`rules`) with local token buckets.
    RateLimitSpec,
    RateLimitConf,
    RateLimit
);
