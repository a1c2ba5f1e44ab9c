//! The spec (and status) types of each kind, one module per kind, each with
//! the checks that only that kind needs.

mod external_service;
mod mesh;
mod service;
mod workload;
mod zone;

pub use external_service::ExternalServiceSpec;
pub use mesh::{
    BuiltinCa, CaChoice, CaSpec, MeshSpec, PemChoice, PemSource, ProvidedCa,
    DEFAULT_WORKLOAD_CERT_LIFETIME, MAX_WORKLOAD_CERT_LIFETIME, MIN_WORKLOAD_CERT_LIFETIME,
};
pub use service::{ServiceSpec, ServiceStatus};
pub use workload::WorkloadSpec;
pub use zone::{ZoneBackend, ZoneSpec};
