//! `FaultInjection`: delays and aborts injected into outbound HTTP requests, to test how callers cope.

use crate::kinds::policy_common::outbound_policy_spec;
use crate::policy::conf::FaultConf;

outbound_policy_spec!(
    /// Delays or aborts a share of the HTTP requests the selected workloads send, per destination.
    FaultInjectionSpec,
    FaultConf,
    FaultInjection
);
