//! `AccessLog`: where the agents log the calls of the selected workloads.

use crate::kinds::policy_common::two_way_policy_spec;
use crate::policy::conf::AccessLogConf;

two_way_policy_spec!(
    /// Logs the calls the selected workloads make (`to`) or receive (`rules`).
    AccessLogSpec,
    AccessLogConf,
    AccessLog
);
