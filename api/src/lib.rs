//! The contract between Weft's parts: SPIFFE identities, the mesh view
//! (workloads, endpoints, peer matchers) that a controller pushes to agents
//! and that a static agent config spells out by hand, and the resources
//! (`weft.io/v1alpha1`) that users apply and controllers store, with their
//! validation and reference documentation.

pub mod codec;
pub mod docs;
pub mod duration;
pub mod identity;
pub mod kinds;
pub mod mesh;
pub mod parse;
pub mod policy;
pub mod proto;
pub mod resource;
pub mod validation;

pub use duration::{Duration, DurationError};
pub use identity::{IdentityError, SpiffeId};
pub use kinds::{
    AccessLogSpec, BuiltinCa, CaChoice, CaSpec, CircuitBreakerSpec, ExternalServiceSpec,
    ExternalServiceStatus, FaultInjectionSpec, HealthCheckSpec, HttpRouteSpec, HttpRouteTo,
    LoadBalancingSpec, MeshSpec, NodePlacement, PemChoice, PemSource, PolicyRule, PolicyTo,
    ProvidedCa, RateLimitSpec, RetrySpec, ServiceSpec, ServiceStatus, TcpRouteSpec, TcpRouteTo,
    TimeoutSpec, TraceBackend, TraceConf, TraceSpec, TrafficPermissionSpec, WorkloadSpec,
    ZoneBackend, ZoneSpec,
};
pub use mesh::{Endpoint, Locality, PeerMatch, PeerMatchError, Protocol, WorkloadPort};
pub use parse::{parse_json, parse_yaml, to_yaml, EncodeError};
pub use resource::{
    AccessLog, CircuitBreaker, ExternalService, FaultInjection, HealthCheck, HttpRoute, Kind,
    LoadBalancing, Mesh, NoStatus, Object, ObjectMeta, RateLimit, Resource, Retry, Scope, Service,
    Spec, TcpRoute, Timeout, Trace, TrafficPermission, UnknownKind, Workload, Zone, API_VERSION,
    DEFAULT_MESH,
};
pub use validation::{
    check_references, DocumentErrors, ExistingResources, FieldError, FieldPath, InputErrors,
    KnownNames, PathSegment, Position, Problems, ValidationErrors,
};
