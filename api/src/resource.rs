//! The resource envelope shared by every kind (`apiVersion`, `kind`,
//! `metadata`, `spec`, and `status` where the controller reports one) and
//! the enum of kinds that `weftctl apply -f` and the zone controller's HTTP
//! API accept.
//!
//! Adding a kind: a variant in [`Kind`] (with its name and scope), a spec
//! type implementing [`Spec`] in `kinds/`, a variant in [`Resource`]; the
//! compiler then points at every `match` to extend.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize};

use crate::kinds::{
    AccessLogSpec, CircuitBreakerSpec, ExternalServiceSpec, FaultInjectionSpec, HealthCheckSpec,
    HttpRouteSpec, LoadBalancingSpec, MeshSpec, RateLimitSpec, RetrySpec, ServiceSpec,
    TcpRouteSpec, TimeoutSpec, TraceSpec, TrafficPermissionSpec, WorkloadSpec, ZoneSpec,
};
use crate::validation::{
    dns1123_label, ExistingResources, FieldError, FieldPath, Problems, ValidationErrors,
};

/// The only API version this crate reads and writes; Kubernetes CRDs use the
/// same group and version.
pub const API_VERSION: &str = "weft.io/v1alpha1";

/// The mesh a mesh-scoped resource belongs to when `metadata.mesh` is left
/// out.
pub const DEFAULT_MESH: &str = "default";

/// Every kind of resource, so that a name in a document can be checked and
/// the known ones listed when it is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A trust domain with its CA: see [`MeshSpec`].
    Mesh,
    /// A zone of the control plane: see [`ZoneSpec`].
    Zone,
    /// A workload registered by its agent: see [`WorkloadSpec`].
    Workload,
    /// A service derived from workloads: see [`ServiceSpec`].
    Service,
    /// A destination outside the mesh: see [`ExternalServiceSpec`].
    ExternalService,
    /// A policy: Who may call which workloads; see [`TrafficPermissionSpec`].
    TrafficPermission,
    /// A policy: How HTTP requests to a service are routed; see [`HttpRouteSpec`].
    HttpRoute,
    /// A policy: Timeouts of outbound calls; see [`TimeoutSpec`].
    Timeout,
    /// A policy: Retries of outbound calls; see [`RetrySpec`].
    Retry,
    /// A policy: Rate limits of outbound and inbound calls; see [`RateLimitSpec`].
    RateLimit,
    /// A policy: Faults injected into outbound HTTP requests; see [`FaultInjectionSpec`].
    FaultInjection,
    /// A policy: How endpoints are picked; see [`LoadBalancingSpec`].
    LoadBalancing,
    /// A policy: Access logging of calls; see [`AccessLogSpec`].
    AccessLog,
    /// A policy: How TCP connections to a service are split; see [`TcpRouteSpec`].
    TcpRoute,
    /// A policy: Distributed tracing of HTTP requests; see [`TraceSpec`].
    Trace,
    /// A policy: Connection and request limits and outlier ejection; see [`CircuitBreakerSpec`].
    CircuitBreaker,
    /// A policy: Active health checks of endpoints; see [`HealthCheckSpec`].
    HealthCheck,
}

/// Where a kind's resources live, which decides whether `metadata.mesh` and
/// `metadata.namespace` apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Outside any mesh and namespace (Mesh, Zone).
    Global,
    /// Inside a mesh, not in a namespace (the policies).
    Mesh,
    /// Inside a mesh and a namespace (Workload, Service, ExternalService).
    Namespaced,
}

impl Kind {
    /// All kinds, in the order the reference documents them.
    pub const ALL: [Kind; 17] = [
        Kind::Mesh,
        Kind::Zone,
        Kind::Workload,
        Kind::Service,
        Kind::ExternalService,
        Kind::TrafficPermission,
        Kind::HttpRoute,
        Kind::Timeout,
        Kind::Retry,
        Kind::RateLimit,
        Kind::FaultInjection,
        Kind::LoadBalancing,
        Kind::AccessLog,
        Kind::TcpRoute,
        Kind::Trace,
        Kind::CircuitBreaker,
        Kind::HealthCheck,
    ];

    /// The policy kinds, in the order the reference documents them.
    pub const POLICIES: [Kind; 12] = [
        Kind::TrafficPermission,
        Kind::HttpRoute,
        Kind::Timeout,
        Kind::Retry,
        Kind::RateLimit,
        Kind::FaultInjection,
        Kind::LoadBalancing,
        Kind::AccessLog,
        Kind::TcpRoute,
        Kind::Trace,
        Kind::CircuitBreaker,
        Kind::HealthCheck,
    ];

    /// The name written in `kind:`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Mesh => "Mesh",
            Kind::Zone => "Zone",
            Kind::Workload => "Workload",
            Kind::Service => "Service",
            Kind::ExternalService => "ExternalService",
            Kind::TrafficPermission => "TrafficPermission",
            Kind::HttpRoute => "HTTPRoute",
            Kind::Timeout => "Timeout",
            Kind::Retry => "Retry",
            Kind::RateLimit => "RateLimit",
            Kind::FaultInjection => "FaultInjection",
            Kind::LoadBalancing => "LoadBalancing",
            Kind::AccessLog => "AccessLog",
            Kind::TcpRoute => "TCPRoute",
            Kind::Trace => "Trace",
            Kind::CircuitBreaker => "CircuitBreaker",
            Kind::HealthCheck => "HealthCheck",
        }
    }

    /// Whether the kind lives in a mesh, a namespace, or neither.
    pub const fn scope(self) -> Scope {
        match self {
            Kind::Mesh | Kind::Zone => Scope::Global,
            Kind::Workload | Kind::Service | Kind::ExternalService => Scope::Namespaced,
            Kind::TrafficPermission
            | Kind::HttpRoute
            | Kind::Timeout
            | Kind::Retry
            | Kind::RateLimit
            | Kind::FaultInjection
            | Kind::LoadBalancing
            | Kind::AccessLog
            | Kind::TcpRoute
            | Kind::Trace
            | Kind::CircuitBreaker
            | Kind::HealthCheck => Scope::Mesh,
        }
    }

    /// Whether the kind has a `status` block (fields set by the controller).
    pub const fn has_status(self) -> bool {
        matches!(self, Kind::Service | Kind::ExternalService)
    }

    /// Whether the kind is a policy (selects workloads with `targetRef`).
    pub const fn is_policy(self) -> bool {
        matches!(self.scope(), Scope::Mesh)
    }

    /// Whether `metadata.mesh` applies to this kind.
    pub const fn in_mesh(self) -> bool {
        matches!(self.scope(), Scope::Mesh | Scope::Namespaced)
    }

    /// Whether `metadata.namespace` is required for this kind.
    pub const fn namespaced(self) -> bool {
        matches!(self.scope(), Scope::Namespaced)
    }

    /// The known kinds as a readable list, for error messages.
    pub fn known_list() -> String {
        Kind::ALL.map(Kind::as_str).join(", ")
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a `kind:` value is not one this crate knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?}; known kinds: {list}", list = Kind::known_list())]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// The `metadata` block: what names a resource and groups it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// The resource's name, unique per kind within its mesh and namespace: a
    /// DNS-1123 label (lowercase letters, digits and `-`, at most 63).
    pub name: String,
    /// The mesh the resource belongs to. Only for kinds inside a mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = DEFAULT_MESH))]
    pub mesh: Option<String>,
    /// The namespace of a namespaced kind (a DNS-1123 label); it is also the
    /// namespace in workload identities and mesh DNS names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels for selecting resources (e.g. by policies), with keys and values
    /// as in Kubernetes: `[prefix/]name` and values of at most 63 characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// Metadata with just a name, for resources outside any mesh.
    pub fn named(name: &str) -> Self {
        ObjectMeta {
            name: name.to_owned(),
            ..ObjectMeta::default()
        }
    }

    /// Metadata of a namespaced resource in a mesh.
    pub fn namespaced(mesh: &str, namespace: &str, name: &str) -> Self {
        ObjectMeta {
            name: name.to_owned(),
            mesh: Some(mesh.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: BTreeMap::new(),
        }
    }
}

/// The status type of kinds that have none: it has no values, so such a
/// resource's `status` is always `None` and `status:` in input is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NoStatus {}

/// What every kind's spec type provides, so that [`Object`] can decode,
/// validate and document any kind the same way.
pub trait Spec:
    Sized + Clone + fmt::Debug + PartialEq + Serialize + DeserializeOwned + JsonSchema
{
    /// The kind whose spec this is.
    const KIND: Kind;

    /// The fields the controller sets ([`NoStatus`] for kinds without any).
    type Status: Clone + fmt::Debug + PartialEq + Serialize + DeserializeOwned + JsonSchema;

    /// Checks the spec on its own, adding every problem under `path`
    /// (`spec`). The metadata is given for checks that depend on it.
    fn validate(&self, metadata: &ObjectMeta, path: &FieldPath, problems: &mut Problems);

    /// Checks a status, adding every problem under `path` (`status`).
    fn validate_status(_status: &Self::Status, _path: &FieldPath, _problems: &mut Problems) {}

    /// Checks references from this resource to others (beyond its mesh,
    /// which [`Object::check_references`] checks for every kind).
    fn check_references(
        _object: &Object<Self>,
        _existing: &dyn ExistingResources,
        _problems: &mut Problems,
    ) {
    }

    /// Wraps a typed object into the enum of all kinds.
    fn into_resource(object: Object<Self>) -> Resource;
}

/// One resource of a known kind: metadata, the user's spec and, for kinds
/// that have one, the status the controller sets. `apiVersion` and `kind`
/// are implied by the type and written out when serialized.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<S: Spec> {
    /// Name, mesh, namespace and labels.
    pub metadata: ObjectMeta,
    /// What the user (or, for derived kinds, the controller) asks for.
    pub spec: S,
    /// What the controller observed or allocated; never taken from `apply`.
    pub status: Option<S::Status>,
}

/// A Mesh resource.
pub type Mesh = Object<MeshSpec>;
/// A Zone resource.
pub type Zone = Object<ZoneSpec>;
/// A Workload resource.
pub type Workload = Object<WorkloadSpec>;
/// A Service resource.
pub type Service = Object<ServiceSpec>;
/// An ExternalService resource.
pub type ExternalService = Object<ExternalServiceSpec>;
/// A TrafficPermission resource.
pub type TrafficPermission = Object<TrafficPermissionSpec>;
/// A HTTPRoute resource.
pub type HttpRoute = Object<HttpRouteSpec>;
/// A Timeout resource.
pub type Timeout = Object<TimeoutSpec>;
/// A Retry resource.
pub type Retry = Object<RetrySpec>;
/// A RateLimit resource.
pub type RateLimit = Object<RateLimitSpec>;
/// A FaultInjection resource.
pub type FaultInjection = Object<FaultInjectionSpec>;
/// A LoadBalancing resource.
pub type LoadBalancing = Object<LoadBalancingSpec>;
/// An AccessLog resource.
pub type AccessLog = Object<AccessLogSpec>;
/// A TCPRoute resource.
pub type TcpRoute = Object<TcpRouteSpec>;
/// A Trace resource.
pub type Trace = Object<TraceSpec>;
/// A CircuitBreaker resource.
pub type CircuitBreaker = Object<CircuitBreakerSpec>;
/// A HealthCheck resource.
pub type HealthCheck = Object<HealthCheckSpec>;

impl<S: Spec> Object<S> {
    /// A resource without status.
    pub fn new(metadata: ObjectMeta, spec: S) -> Self {
        Object {
            metadata,
            spec,
            status: None,
        }
    }

    /// The mesh the resource is in, with the default applied; `None` for
    /// kinds outside any mesh.
    pub fn mesh(&self) -> Option<&str> {
        S::KIND
            .in_mesh()
            .then(|| self.metadata.mesh.as_deref().unwrap_or(DEFAULT_MESH))
    }

    /// Fills in what a reader may leave out (`metadata.mesh`), so that stored
    /// and echoed resources are explicit. Spec defaults are applied while
    /// decoding.
    pub fn apply_defaults(&mut self) {
        if S::KIND.in_mesh() && self.metadata.mesh.is_none() {
            self.metadata.mesh = Some(DEFAULT_MESH.to_owned());
        }
    }

    /// Checks the resource on its own and reports every problem found.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut problems = Problems::default();
        validate_metadata(S::KIND, &self.metadata, &mut problems);
        self.spec
            .validate(&self.metadata, &FieldPath::of(&["spec"]), &mut problems);
        if let Some(status) = &self.status {
            S::validate_status(status, &FieldPath::of(&["status"]), &mut problems);
        }
        problems.finish()
    }

    /// Checks that what the resource refers to exists (its mesh, and what
    /// the kind adds), reporting every dangling reference.
    pub fn check_references(
        &self,
        existing: &dyn ExistingResources,
    ) -> Result<(), ValidationErrors> {
        let mut problems = Problems::default();
        if let Some(mesh) = self.mesh() {
            if !existing.mesh_exists(mesh) {
                problems.add(
                    FieldPath::of(&["metadata", "mesh"]),
                    format!("mesh {mesh:?} does not exist; create the Mesh first"),
                );
            }
        }
        S::check_references(self, existing, &mut problems);
        problems.finish()
    }
}

fn validate_metadata(kind: Kind, meta: &ObjectMeta, problems: &mut Problems) {
    let path = FieldPath::of(&["metadata"]);
    problems.check(path.field("name"), dns1123_label(&meta.name));
    match (&meta.mesh, kind.in_mesh()) {
        (Some(mesh), true) => problems.check(path.field("mesh"), dns1123_label(mesh)),
        (Some(_), false) => problems.add(
            path.field("mesh"),
            format!("{kind} is not inside a mesh; remove metadata.mesh"),
        ),
        (None, _) => {}
    }
    match (&meta.namespace, kind.namespaced()) {
        (Some(namespace), true) => {
            problems.check(path.field("namespace"), dns1123_label(namespace))
        }
        (Some(_), false) => problems.add(
            path.field("namespace"),
            format!("{kind} is not namespaced; remove metadata.namespace"),
        ),
        (None, true) => problems.add(
            path.field("namespace"),
            format!("is required: {kind} is a namespaced kind"),
        ),
        (None, false) => {}
    }
    crate::validation::check_labels(&meta.labels, &path.field("labels"), problems);
}

impl<S: Spec> Serialize for Object<S> {
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        let len = if self.status.is_some() { 5 } else { 4 };
        let mut st = s.serialize_struct("Object", len)?;
        st.serialize_field("apiVersion", API_VERSION)?;
        st.serialize_field("kind", S::KIND.as_str())?;
        st.serialize_field("metadata", &self.metadata)?;
        st.serialize_field("spec", &self.spec)?;
        if let Some(status) = &self.status {
            st.serialize_field("status", status)?;
        }
        st.end()
    }
}

const FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
const FIELDS_WITH_STATUS: &[&str] = &["apiVersion", "kind", "metadata", "spec", "status"];

fn fields_of(kind: Kind) -> &'static [&'static str] {
    if kind.has_status() {
        FIELDS_WITH_STATUS
    } else {
        FIELDS
    }
}

/// Reads a key and refuses the ones not in the list, inside the key's own
/// deserialization so that the error's path names the key.
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = &'static str;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = &'static str;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.0
            .iter()
            .find(|field| **field == v)
            .copied()
            .ok_or_else(|| E::unknown_field(v, self.0))
    }
}

/// Reads a string that must have one value (`apiVersion`, `kind`).
struct ExpectSeed(&'static str);

impl<'de> DeserializeSeed<'de> for ExpectSeed {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        let found = String::deserialize(d)?;
        if found == self.0 {
            Ok(())
        } else {
            Err(de::Error::invalid_value(
                de::Unexpected::Str(&found),
                &self.0,
            ))
        }
    }
}

struct ObjectVisitor<S>(PhantomData<S>);

impl<'de, S: Spec> Visitor<'de> for ObjectVisitor<S> {
    type Value = Object<S>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a {} resource (a mapping with apiVersion, kind, metadata and spec)",
            S::KIND
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let fields = fields_of(S::KIND);
        let (mut api_version, mut kind) = (false, false);
        let mut metadata: Option<ObjectMeta> = None;
        let mut spec: Option<S> = None;
        let mut status: Option<Option<S::Status>> = None;
        while let Some(key) = map.next_key_seed(KeySeed(fields))? {
            let duplicate = match key {
                "apiVersion" => std::mem::replace(&mut api_version, true),
                "kind" => std::mem::replace(&mut kind, true),
                "metadata" => metadata.is_some(),
                "spec" => spec.is_some(),
                _ => status.is_some(),
            };
            if duplicate {
                return Err(de::Error::duplicate_field(key));
            }
            match key {
                "apiVersion" => map.next_value_seed(ExpectSeed(API_VERSION))?,
                "kind" => map.next_value_seed(ExpectSeed(S::KIND.as_str()))?,
                "metadata" => metadata = Some(map.next_value()?),
                "spec" => spec = Some(map.next_value()?),
                _ => status = Some(map.next_value()?),
            }
        }
        if !api_version {
            return Err(de::Error::missing_field("apiVersion"));
        }
        if !kind {
            return Err(de::Error::missing_field("kind"));
        }
        Ok(Object {
            metadata: metadata.ok_or_else(|| de::Error::missing_field("metadata"))?,
            spec: spec.ok_or_else(|| de::Error::missing_field("spec"))?,
            status: status.flatten(),
        })
    }
}

impl<'de, S: Spec> Deserialize<'de> for Object<S> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct("Object", fields_of(S::KIND), ObjectVisitor(PhantomData))
    }
}

/// A resource of any kind: what `apply -f` reads, the HTTP API accepts and
/// the store keeps.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    /// See [`MeshSpec`].
    Mesh(Mesh),
    /// See [`ZoneSpec`].
    Zone(Zone),
    /// See [`WorkloadSpec`].
    Workload(Workload),
    /// See [`ServiceSpec`].
    Service(Service),
    /// See [`ExternalServiceSpec`].
    ExternalService(ExternalService),
    /// See [`TrafficPermissionSpec`].
    TrafficPermission(TrafficPermission),
    /// See [`HttpRouteSpec`].
    HttpRoute(HttpRoute),
    /// See [`TimeoutSpec`].
    Timeout(Timeout),
    /// See [`RetrySpec`].
    Retry(Retry),
    /// See [`RateLimitSpec`].
    RateLimit(RateLimit),
    /// See [`FaultInjectionSpec`].
    FaultInjection(FaultInjection),
    /// See [`LoadBalancingSpec`].
    LoadBalancing(LoadBalancing),
    /// See [`AccessLogSpec`].
    AccessLog(AccessLog),
    /// See [`TcpRouteSpec`].
    TcpRoute(TcpRoute),
    /// See [`TraceSpec`].
    Trace(Trace),
    /// See [`CircuitBreakerSpec`].
    CircuitBreaker(CircuitBreaker),
    /// See [`HealthCheckSpec`].
    HealthCheck(HealthCheck),
}

/// Runs the same code on the typed object inside any [`Resource`].
macro_rules! on_object {
    ($resource:expr, $object:pat => $body:expr) => {
        match $resource {
            Resource::Mesh($object) => $body,
            Resource::Zone($object) => $body,
            Resource::Workload($object) => $body,
            Resource::Service($object) => $body,
            Resource::ExternalService($object) => $body,
            Resource::TrafficPermission($object) => $body,
            Resource::HttpRoute($object) => $body,
            Resource::Timeout($object) => $body,
            Resource::Retry($object) => $body,
            Resource::RateLimit($object) => $body,
            Resource::FaultInjection($object) => $body,
            Resource::LoadBalancing($object) => $body,
            Resource::AccessLog($object) => $body,
            Resource::TcpRoute($object) => $body,
            Resource::Trace($object) => $body,
            Resource::CircuitBreaker($object) => $body,
            Resource::HealthCheck($object) => $body,
        }
    };
}

impl Resource {
    /// The resource's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Mesh(_) => Kind::Mesh,
            Resource::Zone(_) => Kind::Zone,
            Resource::Workload(_) => Kind::Workload,
            Resource::Service(_) => Kind::Service,
            Resource::ExternalService(_) => Kind::ExternalService,
            Resource::TrafficPermission(_) => Kind::TrafficPermission,
            Resource::HttpRoute(_) => Kind::HttpRoute,
            Resource::Timeout(_) => Kind::Timeout,
            Resource::Retry(_) => Kind::Retry,
            Resource::RateLimit(_) => Kind::RateLimit,
            Resource::FaultInjection(_) => Kind::FaultInjection,
            Resource::LoadBalancing(_) => Kind::LoadBalancing,
            Resource::AccessLog(_) => Kind::AccessLog,
            Resource::TcpRoute(_) => Kind::TcpRoute,
            Resource::Trace(_) => Kind::Trace,
            Resource::CircuitBreaker(_) => Kind::CircuitBreaker,
            Resource::HealthCheck(_) => Kind::HealthCheck,
        }
    }

    /// The resource's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        on_object!(self, o => &o.metadata)
    }

    /// The resource's name.
    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    /// The mesh the resource is in, with the default applied; `None` for
    /// kinds outside any mesh.
    pub fn mesh(&self) -> Option<&str> {
        on_object!(self, o => o.mesh())
    }

    /// Fills in what a reader may leave out; see [`Object::apply_defaults`].
    pub fn apply_defaults(&mut self) {
        on_object!(self, o => o.apply_defaults())
    }

    /// A policy's `spec.targetRef`; `None` for kinds that are not policies.
    pub fn target_ref(&self) -> Option<&crate::policy::target::TargetRef> {
        match self {
            Resource::TrafficPermission(o) => Some(&o.spec.target_ref),
            Resource::HttpRoute(o) => Some(&o.spec.target_ref),
            Resource::Timeout(o) => Some(&o.spec.target_ref),
            Resource::Retry(o) => Some(&o.spec.target_ref),
            Resource::RateLimit(o) => Some(&o.spec.target_ref),
            Resource::FaultInjection(o) => Some(&o.spec.target_ref),
            Resource::LoadBalancing(o) => Some(&o.spec.target_ref),
            Resource::AccessLog(o) => Some(&o.spec.target_ref),
            Resource::TcpRoute(o) => Some(&o.spec.target_ref),
            Resource::Trace(o) => Some(&o.spec.target_ref),
            Resource::CircuitBreaker(o) => Some(&o.spec.target_ref),
            Resource::HealthCheck(o) => Some(&o.spec.target_ref),
            Resource::Mesh(_)
            | Resource::Zone(_)
            | Resource::Workload(_)
            | Resource::Service(_)
            | Resource::ExternalService(_) => None,
        }
    }

    /// Whether the controller-owned `status` is present.
    pub fn has_status(&self) -> bool {
        on_object!(self, o => o.status.is_some())
    }

    /// Checks the resource on its own and reports every problem found.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        on_object!(self, o => o.validate())
    }

    /// Checks that what the resource refers to exists.
    pub fn check_references(
        &self,
        existing: &dyn ExistingResources,
    ) -> Result<(), ValidationErrors> {
        on_object!(self, o => o.check_references(existing))
    }

    /// Decodes a resource of a known kind from a generic JSON value (what a
    /// store or an API response holds), naming the field path on error.
    pub fn from_json_value(value: serde_json::Value) -> Result<Resource, FieldError> {
        let kind = match value.get("kind") {
            Some(serde_json::Value::String(kind)) => kind
                .parse::<Kind>()
                .map_err(|e| FieldError::new(FieldPath::of(&["kind"]), e.to_string()))?,
            _ => {
                return Err(FieldError::new(
                    FieldPath::of(&["kind"]),
                    format!(
                        "is required (a string); known kinds: {}",
                        Kind::known_list()
                    ),
                ))
            }
        };
        fn typed<S: Spec>(value: serde_json::Value) -> Result<Resource, FieldError> {
            serde_path_to_error::deserialize::<_, Object<S>>(value)
                .map(S::into_resource)
                .map_err(|e| {
                    let path = crate::parse::field_path(e.path());
                    crate::parse::refine(FieldError::new(path, e.inner().to_string()))
                })
        }
        match kind {
            Kind::Mesh => typed::<MeshSpec>(value),
            Kind::Zone => typed::<ZoneSpec>(value),
            Kind::Workload => typed::<WorkloadSpec>(value),
            Kind::Service => typed::<ServiceSpec>(value),
            Kind::ExternalService => typed::<ExternalServiceSpec>(value),
            Kind::TrafficPermission => typed::<TrafficPermissionSpec>(value),
            Kind::HttpRoute => typed::<HttpRouteSpec>(value),
            Kind::Timeout => typed::<TimeoutSpec>(value),
            Kind::Retry => typed::<RetrySpec>(value),
            Kind::RateLimit => typed::<RateLimitSpec>(value),
            Kind::FaultInjection => typed::<FaultInjectionSpec>(value),
            Kind::LoadBalancing => typed::<LoadBalancingSpec>(value),
            Kind::AccessLog => typed::<AccessLogSpec>(value),
            Kind::TcpRoute => typed::<TcpRouteSpec>(value),
            Kind::Trace => typed::<TraceSpec>(value),
            Kind::CircuitBreaker => typed::<CircuitBreakerSpec>(value),
            Kind::HealthCheck => typed::<HealthCheckSpec>(value),
        }
    }
}

impl<S: Spec> From<Object<S>> for Resource {
    fn from(object: Object<S>) -> Self {
        S::into_resource(object)
    }
}

impl Serialize for Resource {
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        on_object!(self, o => o.serialize(s))
    }
}

impl<'de> Deserialize<'de> for Resource {
    /// Buffers the document to find its kind, so positions are lost; user
    /// input goes through [`crate::parse`] instead, which keeps them.
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        Resource::from_json_value(value).map_err(de::Error::custom)
    }
}
