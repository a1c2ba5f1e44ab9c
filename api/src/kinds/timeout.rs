//! `Timeout`: connect, idle and request timeouts of outbound calls.

use crate::kinds::policy_common::outbound_policy_spec;
use crate::policy::conf::TimeoutConf;

outbound_policy_spec!(
    /// Sets timeouts on the calls the selected workloads make, per destination.
    TimeoutSpec,
    TimeoutConf,
    Timeout
);
