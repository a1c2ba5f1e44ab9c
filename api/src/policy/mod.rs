//! Policies: the resources that shape traffic (TrafficPermission,
//! HTTPRoute, Timeout, Retry, RateLimit, FaultInjection, LoadBalancing,
//! AccessLog, TCPRoute, Trace), in the targetRef model of DESIGN.md.
//!
//! - [`target`]: what a policy selects (`targetRef`, `to[].targetRef`,
//!   `rules[].from`).
//! - [`conf`]: the `default` blocks, and how they merge.
//! - [`check`]: the validation of those parts, shared by every kind.
//! - [`select`]: which policies apply to a workload, and their merge into
//!   its [`compiled::WorkloadPolicy`].
//! - [`compiled`]: what the zone pushes to an agent, per workload: only the
//!   policies that concern it, selected and merged.

pub mod check;
pub mod compiled;
pub mod conf;
pub mod examples;
pub mod select;
pub mod target;
