//! `Retry`: when and how often failed outbound calls are retried.

use crate::kinds::policy_common::outbound_policy_spec;
use crate::policy::conf::RetryConf;

outbound_policy_spec!(
    /// Retries the failed calls the selected workloads make, per destination.
    RetrySpec,
    RetryConf,
    Retry
);
