//! The spec (and status) types of each kind, one module per kind, each with
//! the checks that only that kind needs.

mod access_log;
mod circuit_breaker;
mod external_service;
mod fault_injection;
mod health_check;
mod http_route;
mod load_balancing;
mod mesh;
mod policy_common;
mod rate_limit;
mod retry;
mod service;
mod tcp_route;
mod timeout;
mod trace;
mod traffic_permission;
mod workload;
mod zone;

pub use access_log::AccessLogSpec;
pub use circuit_breaker::CircuitBreakerSpec;
pub use health_check::HealthCheckSpec;

pub use external_service::{ExternalServiceSpec, ExternalServiceStatus};
pub use fault_injection::FaultInjectionSpec;
pub use http_route::{HttpRouteSpec, HttpRouteTo};
pub use load_balancing::LoadBalancingSpec;
pub use mesh::{
    BuiltinCa, CaChoice, CaSpec, MeshSpec, PemChoice, PemSource, ProvidedCa,
    DEFAULT_WORKLOAD_CERT_LIFETIME, MAX_WORKLOAD_CERT_LIFETIME, MIN_WORKLOAD_CERT_LIFETIME,
};
pub use policy_common::{PolicyRule, PolicyTo};
pub use rate_limit::RateLimitSpec;
pub use retry::RetrySpec;
pub use service::{ServiceSpec, ServiceStatus};
pub use tcp_route::{CompiledTcpRoute, TcpRouteConf, TcpRouteRule, TcpRouteSpec, TcpRouteTo};
pub use timeout::TimeoutSpec;
pub use trace::{TraceBackend, TraceConf, TraceSpec};
pub use traffic_permission::{TrafficPermissionSpec, ALLOW_ALL};
pub use workload::{NodePlacement, WorkloadSpec};
pub use zone::{ZoneBackend, ZoneSpec};
