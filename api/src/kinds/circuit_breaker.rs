//! `CircuitBreaker`: how many calls may be open to a destination, and when
//! an endpoint that keeps failing is set aside.

use crate::kinds::policy_common::outbound_policy_spec;
use crate::policy::conf::CircuitBreakerConf;

outbound_policy_spec!(
    /// Limits and passive outlier detection for the calls the selected workloads
    /// make, per destination: over a limit a call is refused at once (503
    /// `overflow` at L7, a reset at L4) instead of queueing on an overloaded
    /// destination, and an endpoint that keeps failing is ejected for a while.
    CircuitBreakerSpec,
    CircuitBreakerConf,
    CircuitBreaker
);
