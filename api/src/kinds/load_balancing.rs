//! `LoadBalancing`: how the endpoint of an outbound call is picked.

use crate::kinds::policy_common::outbound_policy_spec;
use crate::policy::conf::LoadBalancingConf;

outbound_policy_spec!(
    /// Picks endpoints for the calls the selected workloads make, per destination.
    LoadBalancingSpec,
    LoadBalancingConf,
    LoadBalancing
);
