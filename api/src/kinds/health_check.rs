//! `HealthCheck`: active checks of each endpoint of a destination.

use crate::kinds::policy_common::outbound_policy_spec;
use crate::policy::conf::HealthCheckConf;

outbound_policy_spec!(
    /// Active health checks sent by the selected workloads' agents to each
    /// endpoint of a destination, through the tunnel like a call: an endpoint
    /// that fails them is not picked until it passes again.
    HealthCheckSpec,
    HealthCheckConf,
    HealthCheck
);
