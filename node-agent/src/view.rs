//! The mesh view that outbound, inbound and DNS work from: which agent
//! fronts each workload address, which services have virtual IPs and names,
//! and who may call the local workload. Built from the static config or from
//! a zone's `ConfigUpdate`, checked whole before use, and swapped atomically
//! so that every connection sees one consistent version.

use std::cmp::Ordering as Order;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use weft_api::policy::compiled::WorkloadPolicy;
use weft_api::policy::conf::{Algorithm, HashOn};
use weft_api::proto::agent::endpoint_order;
use weft_api::proto::agent::v1::{
    ConfigUpdate, Endpoint as PbEndpoint, ExternalServiceView, ServiceView,
};
use weft_api::{Endpoint, Locality, PeerMatch, SpiffeId};

use crate::config::AgentConfig;
use crate::l7::policy::Policy;
use crate::locality::{Place, TierCache, Tiers};

/// The view in force, shared by every part of the agent.
pub type SharedView = Arc<ArcSwap<MeshView>>;

/// Why a `ConfigUpdate` cannot be applied: the field path and the reason,
/// which is what the agent sends back in its Nack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ViewError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> ViewError {
    ViewError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// One instance of a service, whether the zone reports it ready, and where
/// it runs (for locality-aware picks). The place stays out of [`Endpoint`],
/// which a connection clones: it would cost allocations per connection.
#[derive(Debug, Clone)]
pub struct ServiceEndpoint {
    pub endpoint: Endpoint,
    pub ready: bool,
    pub place: Place,
}

/// A service reached through its virtual IP.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `<namespace>/<name>`, the destination label of L7 metrics.
    pub key: crate::metrics::Label,
    pub zone: String,
    pub virtual_ip: IpAddr,
    /// Ports the service declares; empty means any port.
    pub ports: Vec<u16>,
    /// Those of `ports` declared HTTP: served by the L7 proxy.
    pub http_ports: Vec<u16>,
    /// Those of `ports` with no declared protocol: each connection is
    /// classified by its first bytes (`crate::detect`).
    pub detect_ports: Vec<u16>,
    pub endpoints: Vec<ServiceEndpoint>,
    /// An ExternalService: the agent dials this host itself (no endpoints,
    /// no tunnel).
    pub external: Option<crate::external::External>,
    next: AtomicUsize,
    /// CircuitBreaker counts, shared with the other views of the service.
    destination: Arc<crate::resilience::Destination>,
    /// Ejection and health check state per endpoint (same order), shared
    /// the same way.
    health: Vec<Arc<crate::resilience::EndpointHealth>>,
    /// Locality tiers of the endpoints per caller locality, computed on
    /// first use (see [`crate::locality`]).
    tiers: TierCache,
}

impl Service {
    /// Round robin over the ready endpoints; over all of them when none is
    /// ready (a controller that just restarted may report every peer
    /// not-ready while they are in fact serving). Ejected or unhealthy
    /// endpoints are skipped unless all are (see [`Service::usable`]).
    pub fn pick(&self) -> Option<&Endpoint> {
        self.pick_near(None)
    }

    /// [`Service::pick`] within the nearest tier of `tiers` that has a
    /// usable endpoint (`None`: every endpoint alike).
    pub fn pick_near(&self, tiers: Option<&Tiers>) -> Option<&Endpoint> {
        let i = self.round_robin_index(tiers)?;
        self.endpoints.get(i).map(|e| &e.endpoint)
    }

    /// The index in [`Service::endpoints`] of [`Service::pick_near`]'s pick.
    fn round_robin_index(&self, tiers: Option<&Tiers>) -> Option<usize> {
        // Counted, not collected: this runs for every captured connection.
        let usable = self.usable(tiers).count();
        if usable == 0 {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // Health may change between the two walks (another task ejects an
        // endpoint): then the first usable one left, not a refusal.
        self.usable(tiers)
            .nth(n % usable)
            .or_else(|| self.usable(tiers).next())
    }

    /// The locality tiers of the endpoints for a caller at `caller`, for
    /// [`Service::pick_near`] and [`Service::pick_with`]: computed once per
    /// view and caller locality, then shared.
    pub fn tiers(&self, caller: &Locality) -> Arc<Tiers> {
        self.tiers
            .get(caller, self.endpoints.iter().map(|e| &e.place))
    }

    /// The CircuitBreaker counts of the service.
    pub fn destination(&self) -> &Arc<crate::resilience::Destination> {
        &self.destination
    }

    /// The health of each endpoint, in [`Service::endpoints`] order.
    pub fn health(&self) -> &[Arc<crate::resilience::EndpointHealth>] {
        &self.health
    }

    /// Counts an attempt on `endpoint` for outlier detection; logs an
    /// ejection. Found by address: the attempt may have been picked from
    /// an older view.
    pub fn record(
        &self,
        endpoint: &Endpoint,
        attempt: crate::resilience::Attempt,
        outlier: &crate::resilience::Outlier,
    ) {
        if let Some(i) = self.index_of(endpoint) {
            self.record_at(i, attempt, outlier);
        }
    }

    /// [`Service::record`] for the endpoint at `index` of this view (what
    /// [`Service::pick_index`] gave), without looking it up.
    pub fn record_at(
        &self,
        index: usize,
        attempt: crate::resilience::Attempt,
        outlier: &crate::resilience::Outlier,
    ) {
        let Some(e) = self.endpoints.get(index) else {
            return;
        };
        if crate::resilience::record(&self.health, index, attempt, outlier) {
            tracing::info!(
                destination = self.key.as_str(),
                endpoint = %e.endpoint.address,
                "endpoint ejected by outlier detection"
            );
        }
    }

    fn index_of(&self, endpoint: &Endpoint) -> Option<usize> {
        self.endpoints
            .iter()
            .position(|e| e.endpoint.address == endpoint.address)
    }

    /// [`Service::pick_index`]'s endpoint itself, for tests.
    #[cfg(test)]
    pub fn pick_with(
        &self,
        algorithm: &Algorithm,
        tiers: Option<&Tiers>,
        req: &http::request::Parts,
        client: IpAddr,
    ) -> Option<&Endpoint> {
        let index = self.pick_index(algorithm, tiers, req, client)?;
        self.endpoint_at(index)
    }

    /// Picks an endpoint for one HTTP request by the LoadBalancing
    /// algorithm, among the ready ones (all of them when none is ready),
    /// within the nearest tier of `tiers` that has a usable endpoint
    /// (`None`: every endpoint alike). It returns the endpoint's index in
    /// this view, so that the request's counts ([`Service::track_at`],
    /// [`Service::record_at`]) need no search.
    pub fn pick_index(
        &self,
        algorithm: &Algorithm,
        tiers: Option<&Tiers>,
        req: &http::request::Parts,
        client: IpAddr,
    ) -> Option<usize> {
        match algorithm {
            Algorithm::RoundRobin => self.round_robin_index(tiers),
            Algorithm::Random => self.random_index(tiers),
            Algorithm::LeastRequest => {
                self.least_loaded(tiers, |i| self.health.get(i).map_or(0, |h| h.requests()))
            }
            Algorithm::ConsistentHash { hash_on } => match hash_key(hash_on, req, client) {
                Some(key) => self.rendezvous(key, tiers),
                None => self.random_index(tiers),
            },
        }
    }

    /// The endpoint at `index` of this view.
    pub fn endpoint_at(&self, index: usize) -> Option<&Endpoint> {
        self.endpoints.get(index).map(|e| &e.endpoint)
    }

    /// The endpoints a request may go to. With `tiers`: the usable ones
    /// (ready, not ejected, not failing health checks) of the nearest tier
    /// that has any. Otherwise, or when no endpoint anywhere is usable:
    /// the ready ones (all when none is), less those ejected or failing
    /// health checks, unless that leaves none (panic mode: better a likely
    /// failure than a certain one).
    /// Yields indices in [`Service::endpoints`].
    fn usable<'s>(&'s self, tiers: Option<&'s Tiers>) -> impl Iterator<Item = usize> + 's {
        let now = crate::resilience::now_ms();
        let healthy = move |i: usize| self.health.get(i).is_none_or(|h| h.available(now));
        let rank = move |i: usize| tiers.map_or(0, |t| t.rank(i));
        let nearest = tiers.and_then(|_| {
            self.endpoints
                .iter()
                .enumerate()
                .filter(|(i, e)| e.ready && healthy(*i))
                .map(|(i, _)| rank(i))
                .min()
        });
        // Only the fallback below needs these: skip their passes when a
        // tier has a usable endpoint.
        let any_ready = nearest.is_some() || self.endpoints.iter().any(|e| e.ready);
        let any_healthy = nearest.is_some()
            || self
                .endpoints
                .iter()
                .enumerate()
                .any(|(i, e)| (e.ready || !any_ready) && healthy(i));
        self.endpoints
            .iter()
            .enumerate()
            .filter(move |(i, e)| match nearest {
                Some(tier) => e.ready && healthy(*i) && rank(*i) == tier,
                None => (e.ready || !any_ready) && (!any_healthy || healthy(*i)),
            })
            .map(|(i, _)| i)
    }

    fn random_index(&self, tiers: Option<&Tiers>) -> Option<usize> {
        let n = self.usable(tiers).count();
        if n == 0 {
            return None;
        }
        self.usable(tiers)
            .nth(fastrand::usize(0..n))
            .or_else(|| self.usable(tiers).next())
    }

    /// Power of two choices: of two distinct usable endpoints picked at
    /// random, the one with the lower `load` (the first on a tie, which is
    /// as random as the second). Near-best balance at O(1) cost, and, with
    /// distinct choices, the less loaded of two endpoints always. Yields an
    /// index in [`Service::endpoints`].
    fn least_loaded(&self, tiers: Option<&Tiers>, load: impl Fn(usize) -> u32) -> Option<usize> {
        let n = self.usable(tiers).count();
        if n < 2 {
            return self.usable(tiers).next();
        }
        let a = fastrand::usize(0..n);
        let b = match fastrand::usize(0..n - 1) {
            b if b >= a => b + 1,
            b => b,
        };
        // One walk for both; health may change meanwhile (another task
        // ejects an endpoint): then whichever was found, or the first
        // usable one left, not a refusal.
        let (lo, hi) = (a.min(b), a.max(b));
        let mut walk = self.usable(tiers);
        let at_lo = walk.nth(lo);
        let at_hi = walk.nth(hi - lo - 1);
        let (x, y) = if a < b {
            (at_lo, at_hi)
        } else {
            (at_hi, at_lo)
        };
        match (x, y) {
            (Some(x), Some(y)) => Some(if load(y) < load(x) { y } else { x }),
            (Some(one), None) | (None, Some(one)) => Some(one),
            (None, None) => self.usable(tiers).next(),
        }
    }

    /// The route of one TCP connection to endpoint `index`, CONNECT to
    /// `port`, counted as open to it while the route's guard lives.
    fn tunnel_to(&self, index: usize, port: u16) -> Route<'_> {
        match self.endpoints.get(index) {
            Some(e) => Route::Tunnel {
                endpoint: &e.endpoint,
                authority: SocketAddr::new(e.endpoint.address, port),
                open: self
                    .health
                    .get(index)
                    .map(crate::resilience::EndpointHealth::open_connection),
            },
            None => Route::Refuse("no_endpoints"),
        }
    }

    /// Rendezvous hashing: the same key keeps its endpoint while that
    /// endpoint stays, and only its keys move when one goes.
    fn rendezvous(&self, key: u64, tiers: Option<&Tiers>) -> Option<usize> {
        self.usable(tiers).max_by_key(|&i| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            self.endpoints[i].endpoint.address.hash(&mut h);
            h.finish()
        })
    }

    /// Counts a request in flight to `endpoint` until the guard drops, in
    /// the endpoint's state shared with the service's other views.
    pub fn track(&self, endpoint: &Endpoint) -> Option<crate::resilience::InFlight<'_>> {
        self.track_at(self.index_of(endpoint)?)
    }

    /// [`Service::track`] for the endpoint at `index` of this view.
    pub fn track_at(&self, index: usize) -> Option<crate::resilience::InFlight<'_>> {
        Some(self.health.get(index)?.start_request())
    }
}

/// The hash of a client address, the same for an HTTP request and a TCP
/// connection from it.
fn hash_ip(client: IpAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    client.hash(&mut h);
    h.finish()
}

fn hash_key(hash_on: &HashOn, req: &http::request::Parts, client: IpAddr) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match hash_on {
        HashOn::Header { name } => req.headers.get(name.as_str())?.as_bytes().hash(&mut h),
        HashOn::Cookie { name } => {
            let cookies = req.headers.get_all(http::header::COOKIE);
            let value = cookies
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|line| {
                    line.split(';').find_map(|kv| {
                        let (k, v) = kv.trim().split_once('=')?;
                        (k == name).then_some(v)
                    })
                })?;
            value.hash(&mut h);
        }
        HashOn::SourceIp => return Some(hash_ip(client)),
    }
    Some(h.finish())
}

/// Where a captured connection goes.
#[derive(Debug)]
pub enum Route<'a> {
    /// To a service's HTTP port: served request by request by the L7
    /// proxy, each request picking its own endpoint.
    Http { service: &'a Service, port: u16 },
    /// Through a tunnel to `endpoint`'s agent, CONNECT to `authority`.
    Tunnel {
        endpoint: &'a Endpoint,
        authority: SocketAddr,
        /// The connection counted as open to a service's endpoint, for
        /// LoadBalancing `LeastRequest` at L4: to be held while it lasts.
        /// `None` for a workload's own address (no service to balance).
        open: Option<crate::resilience::OpenConnection>,
    },
    /// To an ExternalService's TCP port: dialled by the agent itself.
    External {
        service: &'a Service,
        external: &'a crate::external::External,
    },
    /// A mesh address that cannot be served: reset, with the reason.
    Refuse(&'static str),
    /// Not a mesh address.
    Outside,
}

/// What the DNS proxy knows about a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameLookup {
    /// A mesh service's virtual IP.
    Service(IpAddr),
    /// Under `.mesh` but no such service.
    UnknownMeshName,
    /// Not a mesh name: forward it.
    NotMesh,
}

/// How a Nack for a delta on a version the agent does not serve starts:
/// the zone answers it with the whole view.
pub const BASE_MISMATCH: &str = "base version mismatch";

/// Chunks of one version kept before the last arrives: a bound on what a
/// zone can make the agent buffer (at 1 MiB per chunk, 1 GiB).
const MAX_CHUNKS: usize = 1024;

/// Reassembles the chunks of an update (all but the last have `more`).
#[derive(Debug, Default)]
pub struct Chunks {
    pending: Option<ConfigUpdate>,
    count: usize,
}

impl Chunks {
    /// Adds a chunk; the whole update once its last chunk is in. A chunk of
    /// another version drops what was pending (the zone moved on).
    pub fn push(&mut self, chunk: ConfigUpdate) -> Result<Option<ConfigUpdate>, ViewError> {
        let more = chunk.more;
        let merged = match self.pending.take() {
            Some(mut first) if first.version == chunk.version => {
                self.count += 1;
                if self.count > MAX_CHUNKS {
                    self.count = 0;
                    return Err(bad(
                        "more",
                        format!("version {} spans over {MAX_CHUNKS} chunks", chunk.version),
                    ));
                }
                first.services.extend(chunk.services);
                first.removed_services.extend(chunk.removed_services);
                first.patched_services.extend(chunk.patched_services);
                first
            }
            _ => {
                self.count = 1;
                chunk
            }
        };
        if more {
            self.pending = Some(merged);
            return Ok(None);
        }
        self.count = 0;
        let mut whole = merged;
        join_service_parts(&mut whole.services);
        Ok(Some(ConfigUpdate {
            more: false,
            ..whole
        }))
    }
}

/// Joins a service sent in parts (`SERVICE_PARTS`): consecutive entries
/// with the same namespace and name become one, with the first entry's
/// other fields and every entry's endpoints in order. A zone that does not
/// split services never sends one twice, so this changes nothing then.
pub fn join_service_parts(services: &mut Vec<ServiceView>) {
    services.dedup_by(|part, first| {
        let same = part.namespace == first.namespace && part.name == first.name;
        if same {
            first.endpoints.append(&mut part.endpoints);
        }
        same
    });
}

/// The whole view an update leads to: itself if whole, else the delta
/// applied on `current` (the view the agent serves), which must be the
/// delta's base. Services keep the zone's order (by namespace, then name);
/// a patched service's endpoints are sorted as the zone sorts them, so the
/// result is the very view the zone would have sent whole. A delta's empty
/// trust bundle means unchanged: the result carries the current one.
pub fn resolve(
    current: Option<&ConfigUpdate>,
    update: ConfigUpdate,
) -> Result<ConfigUpdate, ViewError> {
    if update.base_version.is_empty() {
        return Ok(update);
    }
    let current = match current {
        Some(current) if current.version == update.base_version => current,
        _ => {
            let serving = current.map(|c| c.version.as_str()).unwrap_or_default();
            return Err(bad(
                "base_version",
                format!(
                    "{BASE_MISMATCH}: the delta applies on {:?}, the agent serves {serving:?}",
                    update.base_version
                ),
            ));
        }
    };
    let key = |s: &ServiceView| format!("{}/{}", s.namespace, s.name);
    let mut services: BTreeMap<String, ServiceView> = current
        .services
        .iter()
        .map(|s| (key(s), s.clone()))
        .collect();
    for gone in &update.removed_services {
        services.remove(gone);
    }
    for s in update.services {
        services.insert(key(&s), s);
    }
    for (i, patch) in update.patched_services.into_iter().enumerate() {
        let field = format!("patched_services[{i}]");
        let Some(now) = patch.service else {
            return Err(bad(
                format!("{field}.service"),
                "missing: a patch names the service it changes",
            ));
        };
        let Some(held) = services.get_mut(&key(&now)) else {
            return Err(bad(
                field,
                format!(
                    "patches service {}, which the base view {:?} does not hold",
                    key(&now),
                    update.base_version
                ),
            ));
        };
        let mut endpoints = without(
            &field,
            std::mem::take(&mut held.endpoints),
            &patch.removed_endpoints,
        )?;
        endpoints.extend(now.endpoints);
        endpoints.sort_by(endpoint_order);
        // Every other field as the zone has it now.
        *held = ServiceView { endpoints, ..now };
    }
    let trust_bundle_pem = if update.trust_bundle_pem.is_empty() {
        current.trust_bundle_pem.clone()
    } else {
        update.trust_bundle_pem
    };
    Ok(ConfigUpdate {
        services: services.into_values().collect(),
        trust_bundle_pem,
        base_version: String::new(),
        removed_services: Vec::new(),
        patched_services: Vec::new(),
        more: false,
        ..update
    })
}

/// `endpoints` less one equal endpoint (every field) per entry of
/// `removed`, each of which must be there; `field` names the patch in the
/// error. Both sorted, then one walk: a large service stays cheap to patch.
fn without(
    field: &str,
    mut endpoints: Vec<PbEndpoint>,
    removed: &[PbEndpoint],
) -> Result<Vec<PbEndpoint>, ViewError> {
    if removed.is_empty() {
        return Ok(endpoints);
    }
    let absent = |j: usize| {
        let e = &removed[j];
        bad(
            format!("{field}.removed_endpoints[{j}]"),
            format!(
                "{} (agent {}, {}, ready {}) is not an endpoint of the service in the base view",
                e.address, e.agent, e.spiffe_id, e.ready
            ),
        )
    };
    endpoints.sort_by(endpoint_order);
    let mut order: Vec<usize> = (0..removed.len()).collect();
    order.sort_by(|&a, &b| endpoint_order(&removed[a], &removed[b]));
    let mut gone = order.into_iter().peekable();
    let mut kept = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        match gone.peek().map(|&j| (j, endpoint_order(&removed[j], &e))) {
            // Smaller than every endpoint left and matched by none before.
            Some((j, Order::Less)) => return Err(absent(j)),
            Some((_, Order::Equal)) => {
                gone.next();
            }
            _ => kept.push(e),
        }
    }
    match gone.next() {
        Some(j) => Err(absent(j)),
        None => Ok(kept),
    }
}

/// The whole view at one version.
#[derive(Debug, Default)]
pub struct MeshView {
    /// The zone's version; empty for a static config.
    pub version: String,
    pub mesh: String,
    pub zone: String,
    endpoints: HashMap<IpAddr, Endpoint>,
    services: HashMap<IpAddr, Arc<Service>>,
    names: HashMap<String, IpAddr>,
    /// Services by `<namespace>/<name>` (HTTPRoute backends), and
    /// ExternalServices by `external:<namespace>/<name>`.
    by_key: HashMap<String, Arc<Service>>,
    /// ExternalServices declared by IP address, by that address and port.
    external_addresses: HashMap<SocketAddr, Arc<Service>>,
    /// Per local workload, by name: a sidecar has one, a node agent one per
    /// enrolled workload, all sharing the services and endpoints above.
    locals: HashMap<String, Local>,
    /// What a local workload without its own entry gets: a static config's
    /// single workload, or (from a zone) the default deny.
    fallback: Local,
}

/// What the view says about one local workload.
#[derive(Debug, Default)]
struct Local {
    /// Callers allowed in when no policy is known.
    allow: Vec<PeerMatch>,
    /// Its policies; `None`: none known (a static config without
    /// `policy`, or a zone that predates policies), so inbound goes by
    /// `allow`.
    policy: Option<Arc<Policy>>,
}

/// The DNS suffix of mesh names.
pub const MESH_SUFFIX: &str = "mesh";

impl MeshView {
    /// The view a static config spells out: endpoints and the allow list.
    pub fn from_static(config: &AgentConfig) -> Self {
        // A static HTTP listener stands for a service of the endpoints at
        // its target's address.
        let by_key = config
            .outbound
            .listeners
            .iter()
            .filter(|l| l.protocol != weft_api::Protocol::Tcp)
            .filter_map(|l| {
                let key = l.service.as_ref()?;
                let (namespace, name) = key.split_once('/')?;
                let endpoints: Vec<ServiceEndpoint> = config
                    .outbound
                    .endpoints
                    .iter()
                    .filter(|e| e.address == l.target.ip())
                    .map(|e| ServiceEndpoint {
                        endpoint: e.clone(),
                        ready: true,
                        place: Place {
                            local_zone: true,
                            locality: Locality::default(),
                        },
                    })
                    .collect();
                let destination = crate::resilience::destination(key);
                let service = Service {
                    health: endpoints
                        .iter()
                        .map(|e| destination.endpoint(e.endpoint.address))
                        .collect(),
                    destination,
                    name: name.to_owned(),
                    namespace: namespace.to_owned(),
                    key: key.as_str().into(),
                    zone: String::new(),
                    virtual_ip: IpAddr::from([0, 0, 0, 0]),
                    ports: vec![l.target.port()],
                    http_ports: vec![l.target.port()],
                    detect_ports: Vec::new(),
                    endpoints,
                    external: None,
                    next: AtomicUsize::new(0),
                    tiers: TierCache::default(),
                };
                Some((key.clone(), Arc::new(service)))
            })
            .collect();
        MeshView {
            by_key,
            endpoints: config
                .outbound
                .endpoints
                .iter()
                .map(|e| (e.address, e.clone()))
                .collect(),
            fallback: Local {
                allow: config.inbound.allow.clone(),
                // Checked when the config was loaded.
                policy: config
                    .policy
                    .as_ref()
                    .and_then(|p| Policy::compile(p, &crate::l7::access_log::FILES).ok())
                    .map(Arc::new),
            },
            ..MeshView::default()
        }
    }

    /// Checks every field of a zone's update and builds the view from it,
    /// with the inbound rules and policies of every workload the update
    /// names (the zone sends only this agent's).
    pub fn from_update(update: &ConfigUpdate) -> Result<Self, ViewError> {
        if update.version.is_empty() {
            return Err(bad("version", "must not be empty"));
        }
        check_bundle(&update.trust_bundle_pem)?;
        if !update.patched_services.is_empty() {
            // Patches only make sense on a base: `resolve` applies them.
            return Err(bad(
                "patched_services",
                "a whole view (no base_version) carries no patches",
            ));
        }
        let mut view = MeshView {
            version: update.version.clone(),
            mesh: update.mesh.clone(),
            zone: update.zone.clone(),
            ..MeshView::default()
        };
        for (i, s) in update.services.iter().enumerate() {
            let field = format!("services[{i}]");
            let service = service(&field, s, &update.zone)?;
            for e in &service.endpoints {
                view.endpoints
                    .entry(e.endpoint.address)
                    .or_insert_with(|| e.endpoint.clone());
            }
            let Some(vip) = service.virtual_ip_if_any() else {
                continue;
            };
            view.check_vip_free(&field, vip)?;
            let local = service.zone.is_empty() || service.zone == update.zone;
            for name in names(&service) {
                // `<svc>.<ns>.mesh` prefers the local zone's instance.
                match view.names.get(&name) {
                    Some(_) if !local => {}
                    _ => {
                        view.names.insert(name, vip);
                    }
                }
            }
            let service = Arc::new(service);
            view.by_key.insert(
                format!("{}/{}", service.namespace, service.name),
                service.clone(),
            );
            view.services.insert(vip, service);
        }
        for (i, e) in update.external_services.iter().enumerate() {
            view.add_external(&format!("external_services[{i}]"), e)?;
        }
        let (policies, fallback) = policies_of(&update.policy_json)?;
        view.fallback.policy = fallback;
        for (name, policy) in policies {
            view.locals.entry(name).or_default().policy = Some(policy);
        }
        for (i, rule) in update.inbound.iter().enumerate() {
            let mut allow = Vec::with_capacity(rule.allow.len());
            for (j, m) in rule.allow.iter().enumerate() {
                let parsed: PeerMatch = m
                    .parse()
                    .map_err(|e| bad(format!("inbound[{i}].allow[{j}]"), format!("{e}")))?;
                allow.push(parsed);
            }
            view.locals
                .entry(rule.workload.clone())
                .or_default()
                .allow
                .extend(allow);
        }
        Ok(view)
    }

    /// A virtual IP names one service only.
    fn check_vip_free(&self, field: &str, vip: IpAddr) -> Result<(), ViewError> {
        match self.services.get(&vip) {
            Some(other) => Err(bad(
                format!("{field}.virtual_ip"),
                format!(
                    "{vip} is also the virtual IP of {}.{}",
                    other.name, other.namespace
                ),
            )),
            None => Ok(()),
        }
    }

    /// Adds an ExternalService: its virtual IP, its mesh names and its
    /// host's name unless a mesh service has them, and its host's address
    /// when declared by IP (so that a connection straight to it gets the
    /// same policies).
    fn add_external(&mut self, field: &str, e: &ExternalServiceView) -> Result<(), ViewError> {
        let service = external_service(field, e)?;
        let vip = service.virtual_ip;
        self.check_vip_free(field, vip)?;
        let service = Arc::new(service);
        let mut names = names(&service);
        if let Some(external) = &service.external {
            match &external.host {
                crate::external::Host::Name(host) => names.push(host.clone()),
                crate::external::Host::Ip(ip) => {
                    self.external_addresses
                        .entry(SocketAddr::new(*ip, external.port))
                        .or_insert_with(|| service.clone());
                }
            }
        }
        for name in names {
            self.names.entry(name).or_insert(vip);
        }
        self.by_key
            .insert(service.key.as_str().to_owned(), service.clone());
        self.services.insert(vip, service);
        Ok(())
    }

    /// Where a captured connection of local workload `local` (at
    /// `caller`) to `dst` goes.
    pub fn route(&self, dst: SocketAddr, local: &str, caller: &Locality) -> Route<'_> {
        self.route_from(dst, local, caller, None)
    }

    /// [`MeshView::route`] for a connection from application address
    /// `client`, which a LoadBalancing consistent hash on `SourceIp` keeps
    /// on one endpoint.
    pub fn route_from(
        &self,
        dst: SocketAddr,
        local: &str,
        caller: &Locality,
        client: Option<IpAddr>,
    ) -> Route<'_> {
        if let Some(endpoint) = self.endpoints.get(&dst.ip()) {
            return Route::Tunnel {
                endpoint,
                authority: dst,
                open: None,
            };
        }
        let service = match self.services.get(&dst.ip()) {
            Some(service) => service,
            None => match self.external_addresses.get(&dst) {
                Some(service) => service,
                None => return Route::Outside,
            },
        };
        if !service.ports.is_empty() && !service.ports.contains(&dst.port()) {
            return Route::Refuse("port_not_in_service");
        }
        if service.http_ports.contains(&dst.port()) {
            return Route::Http {
                service,
                port: dst.port(),
            };
        }
        if let Some(external) = &service.external {
            return Route::External { service, external };
        }
        if let Some(route) = self
            .policy(local)
            .and_then(|p| p.tcp_route(service.key.as_str()))
        {
            return self.tcp_routed(route, dst.port(), local, caller, client);
        }
        match self.pick_connection(service, local, caller, client) {
            Some(index) => service.tunnel_to(index, dst.port()),
            None => Route::Refuse("no_endpoints"),
        }
    }

    /// Whether a connection to `dst` is classified before it is routed: a
    /// service's port of no declared protocol.
    pub fn detects(&self, dst: SocketAddr) -> bool {
        !self.endpoints.contains_key(&dst.ip())
            && self
                .services
                .get(&dst.ip())
                .is_some_and(|s| s.detect_ports.contains(&dst.port()))
    }

    /// `route`, for a connection `crate::detect` classified: HTTP on a
    /// service's undeclared port goes to the L7 proxy as on a port declared
    /// HTTP, unless a TCPRoute of `local` routes the service (the operator
    /// asked for L4 routing there); anything else is routed as TCP.
    pub fn route_detected(
        &self,
        dst: SocketAddr,
        local: &str,
        caller: &Locality,
        client: Option<IpAddr>,
        detected: crate::detect::Detected,
    ) -> Route<'_> {
        if detected == crate::detect::Detected::Http && self.detects(dst) {
            if let Some(service) = self.services.get(&dst.ip()) {
                let tcp_routed = self
                    .policy(local)
                    .is_some_and(|p| p.tcp_route(service.key.as_str()).is_some());
                if !tcp_routed {
                    return Route::Http {
                        service,
                        port: dst.port(),
                    };
                }
            }
        }
        self.route_from(dst, local, caller, client)
    }

    /// A TCP connection under a TCPRoute: a backend service by weight, then
    /// an endpoint of it, on the backend's port or the one dialled.
    fn tcp_routed(
        &self,
        route: &crate::l7::policy::TcpRoute,
        port: u16,
        local: &str,
        caller: &Locality,
        client: Option<IpAddr>,
    ) -> Route<'_> {
        let Some(backend) = route.pick_backend() else {
            return Route::Refuse("no_backend");
        };
        let Some(service) = self.by_key.get(&backend.key) else {
            tracing::info!(policy = %route.policy, backend = %backend.key, "TCPRoute backend is not a known service");
            return Route::Refuse("unknown_backend");
        };
        match self.pick_connection(service, local, caller, client) {
            Some(index) => service.tunnel_to(index, backend.port.unwrap_or(port)),
            None => Route::Refuse("no_endpoints"),
        }
    }

    /// An endpoint of `service` for one TCP connection of `local`, by the
    /// LoadBalancing that applies: within the caller's nearest usable tier
    /// when locality-aware, then `Random`, `LeastRequest` (the endpoint
    /// with fewer TCP connections open from this agent, of two), a
    /// consistent hash on the client's address (`SourceIp`), or round robin
    /// (also for header or cookie hashes, which a TCP connection has none
    /// of). Yields an index in [`Service::endpoints`].
    fn pick_connection(
        &self,
        service: &Service,
        local: &str,
        caller: &Locality,
        client: Option<IpAddr>,
    ) -> Option<usize> {
        // One lookup of the outbound policy for both the tiers and the
        // algorithm: this runs for every captured connection.
        let out = self.policy(local).map(|p| p.outbound(service.key.as_str()));
        let tiers = out
            .filter(|o| o.locality_aware)
            .map(|_| service.tiers(caller));
        let tiers = tiers.as_deref();
        match (out.map(|o| &o.algorithm), client) {
            (Some(Algorithm::Random), _) => service.random_index(tiers),
            (Some(Algorithm::LeastRequest), _) => service.least_loaded(tiers, |i| {
                service.health.get(i).map_or(0, |h| h.connections())
            }),
            (
                Some(Algorithm::ConsistentHash {
                    hash_on: HashOn::SourceIp,
                }),
                Some(client),
            ) => service.rendezvous(hash_ip(client), tiers),
            _ => service.round_robin_index(tiers),
        }
    }

    /// Looks a DNS name up (any case, with or without the final dot).
    pub fn lookup(&self, name: &str) -> NameLookup {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(vip) = self.names.get(&name) {
            return NameLookup::Service(*vip);
        }
        if name == MESH_SUFFIX || name.ends_with(".mesh") {
            NameLookup::UnknownMeshName
        } else {
            NameLookup::NotMesh
        }
    }

    fn local(&self, name: &str) -> &Local {
        self.locals.get(name).unwrap_or(&self.fallback)
    }

    /// Local workload `name`'s policies, if any are known.
    pub fn policy(&self, name: &str) -> Option<&Arc<Policy>> {
        let local = self.local(name);
        local.policy.as_ref().or(self.fallback.policy.as_ref())
    }

    /// Every service by `<namespace>/<name>`, for the health checks.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.by_key.values()
    }

    /// The service whose virtual IP is `ip`, if any.
    pub fn service_at(&self, ip: IpAddr) -> Option<&Service> {
        self.services.get(&ip).map(|s| &**s)
    }

    /// A service by `<namespace>/<name>`.
    pub fn service_by_key(&self, key: &str) -> Option<&Service> {
        self.by_key.get(key).map(|s| &**s)
    }

    /// Callers allowed into local workload `name`.
    pub fn allow(&self, name: &str) -> &[PeerMatch] {
        &self.local(name).allow
    }

    /// Whether `ip` is a mesh address (a workload or a virtual IP).
    pub fn knows(&self, ip: IpAddr) -> bool {
        self.endpoints.contains_key(&ip) || self.services.contains_key(&ip)
    }

    /// Counts for the admin endpoint.
    pub fn summary(&self) -> serde_json::Value {
        let mut names: Vec<(&String, &IpAddr)> = self.names.iter().collect();
        names.sort();
        serde_json::json!({
            "version": self.version,
            "mesh": self.mesh,
            "zone": self.zone,
            "endpoints": self.endpoints.len(),
            "services": self.services.len(),
            "names": names.into_iter().map(|(n, ip)| (n.clone(), serde_json::Value::from(ip.to_string()))).collect::<serde_json::Map<_, _>>(),
            "allow": self.locals.iter().map(|(name, l)| (name.clone(), l.allow.iter().map(ToString::to_string).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
        })
    }
}

impl Service {
    fn virtual_ip_if_any(&self) -> Option<IpAddr> {
        (!self.virtual_ip.is_unspecified()).then_some(self.virtual_ip)
    }
}

fn names(s: &Service) -> Vec<String> {
    let mut out = vec![format!("{}.{}.{MESH_SUFFIX}", s.name, s.namespace)];
    if !s.zone.is_empty() {
        out.push(format!(
            "{}.{}.{}.{MESH_SUFFIX}",
            s.name, s.namespace, s.zone
        ));
    }
    if s.namespace == "default" {
        out.push(format!("{}.{MESH_SUFFIX}", s.name));
    }
    out
}

/// A virtual IP as the zone sends it. None yet (allocation pending) is
/// served by workload address only; the unspecified address marks it.
fn virtual_ip(field: &str, text: &str) -> Result<IpAddr, ViewError> {
    if text.is_empty() {
        return Ok(IpAddr::from([0, 0, 0, 0]));
    }
    let ip: IpAddr = text
        .parse()
        .map_err(|_| bad(field, format!("{text:?} is not an IP address")))?;
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return Err(bad(field, format!("{ip} cannot be a virtual IP")));
    }
    Ok(ip)
}

fn label(field: &str, value: &str) -> Result<(), ViewError> {
    weft_api::validation::dns1123_label(value).map_err(|reason| bad(field, reason))
}

/// One service of a view whose Weft zone is `view_zone`.
fn service(
    field: &str,
    s: &weft_api::proto::agent::v1::ServiceView,
    view_zone: &str,
) -> Result<Service, ViewError> {
    label(&format!("{field}.name"), &s.name)?;
    label(&format!("{field}.namespace"), &s.namespace)?;
    if !s.zone.is_empty() {
        label(&format!("{field}.zone"), &s.zone)?;
    }
    let virtual_ip = virtual_ip(&format!("{field}.virtual_ip"), &s.virtual_ip)?;
    let mut ports = Vec::with_capacity(s.ports.len());
    let mut http_ports = Vec::new();
    let mut detect_ports = Vec::new();
    for (j, p) in s.ports.iter().enumerate() {
        match u16::try_from(p.port) {
            Ok(port) if port != 0 => {
                ports.push(port);
                if p.protocol == weft_api::proto::agent::v1::Protocol::Http as i32 {
                    http_ports.push(port);
                } else if p.protocol == weft_api::proto::agent::v1::Protocol::Detect as i32 {
                    detect_ports.push(port);
                }
            }
            _ => {
                return Err(bad(
                    format!("{field}.ports[{j}].port"),
                    format!("{} is not a port", p.port),
                ))
            }
        }
    }
    let mut endpoints = Vec::with_capacity(s.endpoints.len());
    for (j, e) in s.endpoints.iter().enumerate() {
        let f = format!("{field}.endpoints[{j}]");
        let address: IpAddr = e.address.parse().map_err(|_| {
            bad(
                format!("{f}.address"),
                format!("{:?} is not an IP address", e.address),
            )
        })?;
        let agent: SocketAddr = e.agent.parse().map_err(|_| {
            bad(
                format!("{f}.agent"),
                format!("{:?} is not ip:port", e.agent),
            )
        })?;
        if agent.port() == 0 {
            return Err(bad(format!("{f}.agent"), "port 0 is not an HBONE port"));
        }
        let identity: SpiffeId = e
            .spiffe_id
            .parse()
            .map_err(|err| bad(format!("{f}.spiffe_id"), format!("{err}")))?;
        if !e.zone.is_empty() {
            label(&format!("{f}.zone"), &e.zone)?;
        }
        endpoints.push(ServiceEndpoint {
            endpoint: Endpoint {
                address,
                agent,
                identity,
            },
            ready: e.ready,
            place: Place {
                // Empty: the zone of the view, which sent it.
                local_zone: e.zone.is_empty() || e.zone == view_zone,
                locality: Locality {
                    region: e.locality_region.clone(),
                    zone: e.locality_zone.clone(),
                    subzone: e.locality_subzone.clone(),
                },
            },
        });
    }
    let key = format!("{}/{}", s.namespace, s.name);
    let destination = crate::resilience::destination(&key);
    Ok(Service {
        health: endpoints
            .iter()
            .map(|e| destination.endpoint(e.endpoint.address))
            .collect(),
        destination,
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        key: key.as_str().into(),
        zone: s.zone.clone(),
        virtual_ip,
        ports,
        http_ports,
        detect_ports,
        endpoints,
        external: None,
        next: AtomicUsize::new(0),
        tiers: TierCache::default(),
    })
}

/// An ExternalService of a zone's update, checked.
fn external_service(field: &str, e: &ExternalServiceView) -> Result<Service, ViewError> {
    label(&format!("{field}.name"), &e.name)?;
    label(&format!("{field}.namespace"), &e.namespace)?;
    let virtual_ip = virtual_ip(&format!("{field}.virtual_ip"), &e.virtual_ip)?;
    if virtual_ip.is_unspecified() {
        return Err(bad(
            format!("{field}.virtual_ip"),
            "missing: the zone sends ExternalServices once they have one",
        ));
    }
    let port = e.port.unwrap_or_default();
    let number = match u16::try_from(port.port) {
        Ok(n) if n != 0 => n,
        _ => {
            return Err(bad(
                format!("{field}.port.port"),
                format!("{} is not a port", port.port),
            ))
        }
    };
    let host_ok = match e.host.parse::<IpAddr>() {
        Ok(ip) => weft_api::validation::unicast_address(ip),
        Err(_) => weft_api::validation::dns1123_subdomain(&e.host.to_ascii_lowercase()),
    };
    host_ok.map_err(|reason| bad(format!("{field}.host"), reason))?;
    let external = crate::external::External::new(&e.host, number)
        .ok_or_else(|| bad(format!("{field}.host"), "cannot be a Host header"))?;
    let http = port.protocol == weft_api::proto::agent::v1::Protocol::Http as i32;
    // The key policies name it by (`weft_api::policy::select::destination_key`).
    let key = format!("external:{}/{}", e.namespace, e.name);
    Ok(Service {
        destination: crate::resilience::destination(&key),
        health: Vec::new(),
        name: e.name.clone(),
        namespace: e.namespace.clone(),
        key: key.as_str().into(),
        zone: String::new(),
        virtual_ip,
        ports: vec![number],
        http_ports: if http { vec![number] } else { Vec::new() },
        // An ExternalService's protocol is declared (the zone refuses
        // `detect` there).
        detect_ports: Vec::new(),
        endpoints: Vec::new(),
        external: Some(external),
        next: AtomicUsize::new(0),
        tiers: TierCache::default(),
    })
}

/// Every local workload's compiled policy from a zone's `policy_json`,
/// and what a workload it names not gets (default deny, nothing routed);
/// an empty field is a zone that predates policies (inbound then goes by
/// the `inbound` allow lists).
#[allow(clippy::type_complexity)]
fn policies_of(json: &str) -> Result<(Vec<(String, Arc<Policy>)>, Option<Arc<Policy>>), ViewError> {
    if json.is_empty() {
        return Ok((Vec::new(), None));
    }
    let all: Vec<WorkloadPolicy> = serde_json::from_str(json).map_err(|e| {
        bad(
            "policy_json",
            format!("not a list of workload policies: {e}"),
        )
    })?;
    let mut compiled = Vec::with_capacity(all.len());
    for (i, p) in all.iter().enumerate() {
        let policy = Policy::compile(p, &crate::l7::access_log::FILES)
            .map_err(|e| bad(format!("policy_json[{i}].{}", e.field), e.reason))?;
        compiled.push((p.workload.clone(), Arc::new(policy)));
    }
    let deny = Policy::compile(&WorkloadPolicy::default(), &crate::l7::access_log::FILES)
        .map_err(|e| bad("policy_json", e.to_string()))?;
    Ok((compiled, Some(Arc::new(deny))))
}

/// The bundle must hold at least one certificate, and each must parse.
pub fn check_bundle(pem: &str) -> Result<(), ViewError> {
    let field = "trust_bundle_pem";
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(field, format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(field, "holds no PEM certificate"));
    }
    for (i, c) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(c.as_ref())
            .map_err(|e| bad(field, format!("certificate {i} is not valid X.509: {e}")))?;
    }
    Ok(())
}

/// A shared view holding `view`.
pub fn shared(view: MeshView) -> SharedView {
    Arc::new(ArcSwap::from_pointee(view))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::proto::agent::v1::{
        ExternalServiceView, InboundRule, Port, ServicePatch, ServiceView,
    };

    fn bundle() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem()
    }

    fn endpoint(ip: &str, ready: bool) -> PbEndpoint {
        PbEndpoint {
            address: ip.into(),
            agent: format!("{ip}:15008"),
            spiffe_id: "spiffe://td/ns/default/sa/api".into(),
            ready,
            ..Default::default()
        }
    }

    fn sample() -> ConfigUpdate {
        ConfigUpdate {
            version: "7".into(),
            trust_bundle_pem: bundle(),
            services: vec![
                ServiceView {
                    name: "api".into(),
                    namespace: "default".into(),
                    zone: "east".into(),
                    virtual_ip: "10.96.0.1".into(),
                    ports: vec![Port {
                        port: 8080,
                        protocol: 0,
                    }],
                    endpoints: vec![
                        endpoint("10.0.0.1", true),
                        endpoint("10.0.0.2", false),
                        endpoint("10.0.0.3", true),
                    ],
                },
                ServiceView {
                    name: "db".into(),
                    namespace: "data".into(),
                    zone: "east".into(),
                    virtual_ip: "10.96.0.2".into(),
                    ports: vec![],
                    endpoints: vec![endpoint("10.0.1.1", false), endpoint("10.0.1.2", false)],
                },
            ],
            inbound: vec![
                InboundRule {
                    workload: "web".into(),
                    allow: vec!["spiffe://td/ns/default/*".into()],
                },
                InboundRule {
                    workload: "other".into(),
                    allow: vec!["spiffe://td/ns/x/sa/y".into()],
                },
            ],
            mesh: "default".into(),
            zone: "east".into(),
            ..Default::default()
        }
    }

    fn authority(route: Route<'_>) -> SocketAddr {
        match route {
            Route::Tunnel { authority, .. } => authority,
            other => panic!("expected a tunnel, got {other:?}"),
        }
    }

    #[test]
    fn builds_names_routes_and_allow_list() {
        let view = MeshView::from_update(&sample()).unwrap();
        let api: IpAddr = "10.96.0.1".parse().unwrap();
        let db: IpAddr = "10.96.0.2".parse().unwrap();
        for name in [
            "api.default.mesh",
            "api.default.east.mesh.",
            "api.mesh",
            "API.MESH",
        ] {
            assert_eq!(view.lookup(name), NameLookup::Service(api), "{name}");
        }
        assert_eq!(view.lookup("db.data.mesh"), NameLookup::Service(db));
        // The shorthand is for the default namespace only.
        assert_eq!(view.lookup("db.mesh"), NameLookup::UnknownMeshName);
        assert_eq!(view.lookup("mesh."), NameLookup::UnknownMeshName);
        assert_eq!(view.lookup("example.com"), NameLookup::NotMesh);
        assert_eq!(view.lookup("notmesh"), NameLookup::NotMesh);

        // Ready endpoints in turn; the not-ready one is skipped.
        let vip = SocketAddr::new(api, 8080);
        let picks: Vec<SocketAddr> = (0..4)
            .map(|_| authority(view.route(vip, "web", &Locality::default())))
            .collect();
        let expected: Vec<SocketAddr> = [
            "10.0.0.1:8080",
            "10.0.0.3:8080",
            "10.0.0.1:8080",
            "10.0.0.3:8080",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(picks, expected);
        // None ready: every endpoint is used rather than none.
        let mut seen: Vec<SocketAddr> = (0..2)
            .map(|_| authority(view.route(SocketAddr::new(db, 5432), "web", &Locality::default())))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                "10.0.1.1:5432".parse().unwrap(),
                "10.0.1.2:5432".parse().unwrap()
            ]
        );
        // A port the service does not declare.
        assert!(matches!(
            view.route(SocketAddr::new(api, 9999), "web", &Locality::default()),
            Route::Refuse(_)
        ));
        // A workload address is routed as dialled.
        let direct: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        assert_eq!(
            authority(view.route(direct, "web", &Locality::default())),
            direct
        );
        assert!(matches!(
            view.route("192.0.2.1:80".parse().unwrap(), "web", &Locality::default()),
            Route::Outside
        ));

        let allow: Vec<String> = view.allow("web").iter().map(ToString::to_string).collect();
        assert_eq!(allow, ["spiffe://td/ns/default/*"]);
    }

    #[test]
    fn bad_updates_name_the_field() {
        type Patch = fn(&mut ConfigUpdate);
        let cases: [(Patch, &str); 9] = [
            (|u| u.version.clear(), "version"),
            (
                |u| u.trust_bundle_pem = "nothing".into(),
                "trust_bundle_pem",
            ),
            (
                |u| u.services[0].virtual_ip = "10.96.0.300".into(),
                "services[0].virtual_ip",
            ),
            (
                |u| u.services[1].virtual_ip = "10.96.0.1".into(),
                "services[1].virtual_ip",
            ),
            (
                |u| u.services[0].endpoints[1].address = "x".into(),
                "services[0].endpoints[1].address",
            ),
            (
                |u| u.services[0].endpoints[0].agent = "10.0.0.1".into(),
                "services[0].endpoints[0].agent",
            ),
            (
                |u| u.services[1].endpoints[0].spiffe_id = "spiffe://td/x".into(),
                "services[1].endpoints[0].spiffe_id",
            ),
            (|u| u.services[0].name = "Api".into(), "services[0].name"),
            (
                |u| u.inbound[1].allow[0] = "*".into(),
                "inbound[1].allow[0]",
            ),
        ];
        for (patch, field) in cases {
            let mut u = sample();
            patch(&mut u);
            let err = MeshView::from_update(&u).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().starts_with(field));
        }
    }
    /// A delta on `sample()` (version 7) to version 8.
    fn delta() -> ConfigUpdate {
        ConfigUpdate {
            version: "8".into(),
            base_version: "7".into(),
            inbound: sample().inbound,
            mesh: "default".into(),
            zone: "east".into(),
            ..Default::default()
        }
    }

    fn patch(service: ServiceView, removed: Vec<PbEndpoint>) -> ServicePatch {
        ServicePatch {
            service: Some(service),
            removed_endpoints: removed,
        }
    }

    fn api_now(endpoints: Vec<PbEndpoint>) -> ServiceView {
        ServiceView {
            name: "api".into(),
            namespace: "default".into(),
            zone: "east".into(),
            virtual_ip: "10.96.0.1".into(),
            ports: vec![
                Port {
                    port: 8080,
                    protocol: 0,
                },
                Port {
                    port: 9001,
                    protocol: 1,
                },
            ],
            endpoints,
        }
    }

    #[test]
    fn a_patched_delta_resolves_to_the_whole_view_the_zone_would_send() {
        let base = sample();
        let mut update = delta();
        // api: 10.0.0.2 turns ready, 10.0.0.3 goes, 10.0.0.10 and a
        // second copy of 10.0.0.1 arrive, port 9001 is added.
        update.patched_services = vec![patch(
            api_now(vec![
                endpoint("10.0.0.10", true),
                endpoint("10.0.0.2", true),
                endpoint("10.0.0.1", true),
            ]),
            vec![endpoint("10.0.0.3", true), endpoint("10.0.0.2", false)],
        )];
        update.removed_services = vec!["data/db".into()];
        let cache = ServiceView {
            name: "cache".into(),
            namespace: "data".into(),
            zone: "east".into(),
            virtual_ip: "10.96.0.3".into(),
            ports: vec![],
            endpoints: vec![endpoint("10.0.2.1", true)],
        };
        update.services = vec![cache.clone()];
        // What the zone sends whole at version 8: services by key,
        // endpoints sorted by (address, agent, spiffe_id, ready).
        let expected = ConfigUpdate {
            version: "8".into(),
            trust_bundle_pem: base.trust_bundle_pem.clone(),
            services: vec![
                cache,
                api_now(vec![
                    endpoint("10.0.0.1", true),
                    endpoint("10.0.0.1", true),
                    endpoint("10.0.0.10", true),
                    endpoint("10.0.0.2", true),
                ]),
            ],
            base_version: String::new(),
            ..delta()
        };
        let resolved = resolve(Some(&base), update).unwrap();
        assert_eq!(resolved, expected);
        let view = MeshView::from_update(&resolved).unwrap();
        assert_eq!(view.version, "8");
    }

    #[test]
    fn patches_that_do_not_fit_the_base_name_the_field() {
        let base = sample();
        let mut unknown = delta();
        unknown.patched_services = vec![
            patch(api_now(vec![]), vec![]),
            patch(
                ServiceView {
                    name: "gone".into(),
                    namespace: "default".into(),
                    ..Default::default()
                },
                vec![],
            ),
        ];
        let err = resolve(Some(&base), unknown).unwrap_err();
        assert_eq!(err.field, "patched_services[1]", "{err}");
        assert!(err.reason.contains("default/gone"), "{err}");

        let mut absent = delta();
        absent.patched_services = vec![patch(
            api_now(vec![]),
            vec![endpoint("10.0.0.1", true), endpoint("10.0.0.1", false)],
        )];
        let err = resolve(Some(&base), absent).unwrap_err();
        assert_eq!(
            err.field, "patched_services[0].removed_endpoints[1]",
            "{err}"
        );

        // One removal per equal endpoint: a second one finds none left.
        let mut twice = delta();
        twice.patched_services = vec![patch(
            api_now(vec![]),
            vec![endpoint("10.0.0.3", true), endpoint("10.0.0.3", true)],
        )];
        let err = resolve(Some(&base), twice).unwrap_err();
        assert_eq!(
            err.field, "patched_services[0].removed_endpoints[1]",
            "{err}"
        );

        let mut nameless = delta();
        nameless.patched_services = vec![ServicePatch::default()];
        let err = resolve(Some(&base), nameless).unwrap_err();
        assert_eq!(err.field, "patched_services[0].service", "{err}");
    }

    #[test]
    fn a_delta_without_a_bundle_keeps_the_current_one() {
        let base = sample();
        let resolved = resolve(Some(&base), delta()).unwrap();
        assert_eq!(resolved.trust_bundle_pem, base.trust_bundle_pem);
        assert!(MeshView::from_update(&resolved).is_ok());
        // A bundle in a delta replaces it.
        let other = bundle();
        let replaced = resolve(
            Some(&base),
            ConfigUpdate {
                trust_bundle_pem: other.clone(),
                ..delta()
            },
        )
        .unwrap();
        assert_eq!(replaced.trust_bundle_pem, other);
    }

    #[test]
    fn a_whole_view_needs_its_bundle_and_no_patches() {
        let mut whole = sample();
        whole.trust_bundle_pem.clear();
        let resolved = resolve(None, whole).unwrap();
        let err = MeshView::from_update(&resolved).unwrap_err();
        assert_eq!(err.field, "trust_bundle_pem", "{err}");

        let mut patched = sample();
        patched.patched_services = vec![patch(api_now(vec![]), vec![])];
        let err = MeshView::from_update(&patched).unwrap_err();
        assert_eq!(err.field, "patched_services", "{err}");
    }

    #[test]
    fn chunks_gather_patches_too() {
        let mut chunks = Chunks::default();
        let mut first = delta();
        first.more = true;
        first.patched_services = vec![patch(api_now(vec![]), vec![])];
        assert_eq!(chunks.push(first).unwrap(), None);
        let last = ConfigUpdate {
            version: "8".into(),
            patched_services: vec![patch(api_now(vec![]), vec![])],
            ..Default::default()
        };
        let whole = chunks.push(last).unwrap().expect("the last chunk");
        assert_eq!(whole.patched_services.len(), 2);
        assert_eq!(whole.base_version, "7");
    }

    #[test]
    fn chunks_join_a_service_sent_in_parts() {
        let mut api = api_now(vec![endpoint("10.0.0.1", true), endpoint("10.0.0.2", true)]);
        let mut head = api.clone();
        head.endpoints.truncate(1);
        let mut rest = api.clone();
        rest.endpoints.remove(0);
        // Another service after the parts stays apart.
        let mut other = api_now(vec![endpoint("10.0.0.3", true)]);
        other.name = "other".into();
        let mut chunks = Chunks::default();
        let first = ConfigUpdate {
            version: "9".into(),
            services: vec![head],
            more: true,
            ..Default::default()
        };
        assert_eq!(chunks.push(first).unwrap(), None);
        let last = ConfigUpdate {
            version: "9".into(),
            services: vec![rest, other.clone()],
            ..Default::default()
        };
        let whole = chunks.push(last).unwrap().expect("the last chunk");
        api.endpoints
            .sort_by(weft_api::proto::agent::endpoint_order);
        assert_eq!(whole.services, vec![api, other]);
    }

    #[test]
    fn ejected_endpoints_are_skipped_unless_all_are_and_survive_a_new_view() {
        use crate::resilience::{Attempt, Outlier};
        let mut view = api_now(vec![endpoint("10.0.0.1", true), endpoint("10.0.0.2", true)]);
        view.name = "ejections".into();
        let first = service("services[0]", &view, "east").unwrap();
        let outlier = Outlier {
            consecutive_5xx: 1,
            consecutive_gateway: None,
            interval_ms: 10_000,
            base_ms: 60_000,
            max_percent: 100,
        };
        let bad = first.endpoints[1].endpoint.clone();
        first.record(&bad, Attempt::ServerError, &outlier);
        // A new view of the same service keeps the ejection.
        let second = service("services[0]", &view, "east").unwrap();
        for s in [&first, &second] {
            for _ in 0..4 {
                assert_eq!(
                    s.pick().unwrap().address,
                    first.endpoints[0].endpoint.address
                );
            }
        }
        // All ejected: all are used again (panic mode).
        second.record(
            &first.endpoints[0].endpoint,
            Attempt::GatewayError,
            &outlier,
        );
        let picked: std::collections::HashSet<IpAddr> = (0..4)
            .filter_map(|_| second.pick().map(|e| e.address))
            .collect();
        assert_eq!(picked.len(), 2);
    }

    /// An endpoint of `api` in topology zone `zone` of region `eu`.
    fn in_zone(ip: &str, zone: &str, ready: bool) -> PbEndpoint {
        PbEndpoint {
            locality_region: "eu".into(),
            locality_zone: zone.into(),
            ..endpoint(ip, ready)
        }
    }

    fn caller_in(zone: &str) -> Locality {
        Locality {
            region: "eu".into(),
            zone: zone.into(),
            subzone: String::new(),
        }
    }

    /// `api` with one endpoint in zone `a` (10.0.0.2) and two in `b`.
    fn split_service(name: &str, a_ready: bool) -> Service {
        let mut view = api_now(vec![
            in_zone("10.0.0.1", "b", true),
            in_zone("10.0.0.2", "a", a_ready),
            in_zone("10.0.0.3", "b", true),
        ]);
        view.name = name.into();
        service("services[0]", &view, "east").unwrap()
    }

    fn request() -> http::request::Parts {
        http::Request::builder()
            .header("x-user", "u")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn addresses(picks: impl Iterator<Item = IpAddr>) -> std::collections::BTreeSet<String> {
        picks.map(|ip| ip.to_string()).collect()
    }

    const ALGORITHMS: [fn() -> Algorithm; 4] = [
        || Algorithm::RoundRobin,
        || Algorithm::Random,
        || Algorithm::LeastRequest,
        || Algorithm::ConsistentHash {
            hash_on: HashOn::Header {
                name: "x-user".into(),
            },
        },
    ];

    #[test]
    fn locality_aware_picks_keep_to_the_callers_zone_with_every_algorithm() {
        let s = split_service("tiers-local", true);
        let tiers = s.tiers(&caller_in("a"));
        let client: IpAddr = "10.0.9.9".parse().unwrap();
        for algorithm in ALGORITHMS.map(|a| a()) {
            let picked = addresses((0..30).filter_map(|_| {
                s.pick_with(&algorithm, Some(&tiers), &request(), client)
                    .map(|e| e.address)
            }));
            assert_eq!(
                picked,
                addresses(["10.0.0.2".parse().unwrap()].into_iter()),
                "{algorithm:?}"
            );
        }
        // A caller in `b` keeps to `b`'s two, spread between them.
        let tiers = s.tiers(&caller_in("b"));
        let picked = addresses((0..6).filter_map(|_| s.pick_near(Some(&tiers)).map(|e| e.address)));
        assert_eq!(
            picked.into_iter().collect::<Vec<_>>(),
            ["10.0.0.1", "10.0.0.3"]
        );
    }

    #[test]
    fn http_least_request_counts_requests_still_running_under_a_new_view() {
        let old = split_service("least-requests", true);
        let client: IpAddr = "10.0.9.9".parse().unwrap();
        let least = Algorithm::LeastRequest;
        let busy = old
            .pick_with(&least, None, &request(), client)
            .expect("an endpoint")
            .address;
        let endpoint = old
            .endpoints
            .iter()
            .find(|e| e.endpoint.address == busy)
            .map(|e| e.endpoint.clone())
            .expect("picked from the service");
        let running = old.track(&endpoint).expect("a tracked endpoint");
        // A config update made a new view of the same service: it sees the
        // request still running on the old one.
        let new = split_service("least-requests", true);
        for _ in 0..30 {
            let picked = new
                .pick_with(&least, None, &request(), client)
                .map(|e| e.address);
            assert_ne!(picked, Some(busy));
        }
        drop(running);
        let picked = addresses((0..60).filter_map(|_| {
            new.pick_with(&least, None, &request(), client)
                .map(|e| e.address)
        }));
        assert!(picked.contains(&busy.to_string()), "{picked:?}");
    }

    #[test]
    fn without_locality_awareness_picks_spread_over_every_zone() {
        let s = split_service("tiers-spread", true);
        let picked = addresses((0..6).filter_map(|_| s.pick_near(None).map(|e| e.address)));
        assert_eq!(picked.len(), 3, "{picked:?}");
        let client: IpAddr = "10.0.9.9".parse().unwrap();
        let picked = addresses((0..200).filter_map(|_| {
            s.pick_with(&Algorithm::Random, None, &request(), client)
                .map(|e| e.address)
        }));
        assert_eq!(picked.len(), 3, "{picked:?}");
    }

    #[test]
    fn an_unready_local_endpoint_fails_over_to_the_next_tier() {
        let s = split_service("tiers-unready", false);
        let tiers = s.tiers(&caller_in("a"));
        let picked = addresses((0..6).filter_map(|_| s.pick_near(Some(&tiers)).map(|e| e.address)));
        assert_eq!(
            picked.into_iter().collect::<Vec<_>>(),
            ["10.0.0.1", "10.0.0.3"]
        );
    }

    #[test]
    fn an_ejected_local_endpoint_fails_over_to_the_next_tier() {
        use crate::resilience::{Attempt, Outlier};
        let s = split_service("tiers-ejected", true);
        let tiers = s.tiers(&caller_in("a"));
        let outlier = Outlier {
            consecutive_5xx: 1,
            consecutive_gateway: None,
            interval_ms: 10_000,
            base_ms: 60_000,
            max_percent: 100,
        };
        let local = s.endpoints[1].endpoint.clone();
        assert_eq!(s.pick_near(Some(&tiers)).unwrap().address, local.address);
        s.record(&local, Attempt::ServerError, &outlier);
        let picked = addresses((0..6).filter_map(|_| s.pick_near(Some(&tiers)).map(|e| e.address)));
        assert_eq!(
            picked.into_iter().collect::<Vec<_>>(),
            ["10.0.0.1", "10.0.0.3"]
        );
        // Every endpoint ejected: panic mode spreads over all, as without
        // tiers.
        for e in [&s.endpoints[0], &s.endpoints[2]] {
            s.record(&e.endpoint, Attempt::ServerError, &outlier);
        }
        let picked = addresses((0..6).filter_map(|_| s.pick_near(Some(&tiers)).map(|e| e.address)));
        assert_eq!(picked.len(), 3, "{picked:?}");
    }

    #[test]
    fn consistent_hash_stays_within_the_tier_and_moves_only_on_failover() {
        let mut view = api_now(vec![
            in_zone("10.0.0.1", "a", true),
            in_zone("10.0.0.2", "a", true),
            in_zone("10.0.0.3", "b", true),
            in_zone("10.0.0.4", "b", true),
        ]);
        view.name = "tiers-hash".into();
        let s = service("services[0]", &view, "east").unwrap();
        let hash = Algorithm::ConsistentHash {
            hash_on: HashOn::Header {
                name: "x-user".into(),
            },
        };
        let client: IpAddr = "10.0.9.9".parse().unwrap();
        let with_user = |user: &str| {
            http::Request::builder()
                .header("x-user", user)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let tiers = s.tiers(&caller_in("a"));
        let mut seen = std::collections::BTreeSet::new();
        let mut first = Vec::new();
        for user in 0..40 {
            let req = with_user(&user.to_string());
            let picked = s
                .pick_with(&hash, Some(&tiers), &req, client)
                .unwrap()
                .address;
            for _ in 0..3 {
                let again = s
                    .pick_with(&hash, Some(&tiers), &req, client)
                    .unwrap()
                    .address;
                assert_eq!(again, picked, "user {user}");
            }
            seen.insert(picked.to_string());
            first.push(picked);
        }
        // Keys spread over the local tier only.
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["10.0.0.1", "10.0.0.2"]
        );
        // 10.0.0.1 goes unready: only its keys move, and within the tier.
        let mut s = s;
        s.endpoints[0].ready = false;
        let tiers = s.tiers(&caller_in("a"));
        for (user, before) in first.iter().enumerate() {
            let req = with_user(&user.to_string());
            let now = s
                .pick_with(&hash, Some(&tiers), &req, client)
                .unwrap()
                .address;
            assert_eq!(now.to_string(), "10.0.0.2", "user {user} was on {before}");
        }
        // The whole local tier unready: keys fail over to `b`, still
        // hashed (both of its endpoints get some).
        s.endpoints[1].ready = false;
        let moved = addresses((0..40).map(|user| {
            s.pick_with(&hash, Some(&tiers), &with_user(&user.to_string()), client)
                .unwrap()
                .address
        }));
        assert_eq!(
            moved.into_iter().collect::<Vec<_>>(),
            ["10.0.0.3", "10.0.0.4"]
        );
    }

    #[test]
    fn a_load_balancing_policy_makes_l4_routes_locality_aware_by_default() {
        let mut update = sample();
        update.services[0].endpoints = vec![
            in_zone("10.0.0.1", "b", true),
            in_zone("10.0.0.2", "a", true),
            in_zone("10.0.0.3", "b", true),
        ];
        update.services[0].name = "tiers-route".into();
        let vip = SocketAddr::new("10.96.0.1".parse().unwrap(), 8080);
        let picks = |update: &ConfigUpdate| {
            let view = MeshView::from_update(update).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..6 {
                seen.insert(
                    authority(view.route(vip, "web", &caller_in("a")))
                        .ip()
                        .to_string(),
                );
            }
            seen.into_iter().collect::<Vec<_>>()
        };
        // No policy at all: spread, as before locality awareness.
        assert_eq!(picks(&update), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        // A LoadBalancing that only sets the algorithm: locality-aware.
        update.policy_json = r#"[{"workload": "web", "outboundDefaults":
            {"loadBalancing": {"algorithm": {"type": "RoundRobin"}}}}]"#
            .into();
        assert_eq!(picks(&update), ["10.0.0.2"]);
        // localityAware: false spreads again.
        update.policy_json = r#"[{"workload": "web", "outboundDefaults":
            {"loadBalancing": {"algorithm": {"type": "RoundRobin"}, "localityAware": false}}}]"#
            .into();
        assert_eq!(picks(&update), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        // Endpoints of another Weft zone come last, after every local tier.
        update.policy_json = r#"[{"workload": "web", "outboundDefaults":
            {"loadBalancing": {"localityAware": true}}}]"#
            .into();
        update.services[0].endpoints[1].zone = "west".into();
        assert_eq!(picks(&update), ["10.0.0.1", "10.0.0.3"]);
    }

    #[test]
    fn tcp_connections_follow_a_source_ip_hash_and_random() {
        let mut update = sample();
        update.services[0].endpoints = (1..=4)
            .map(|i| endpoint(&format!("10.0.0.{i}"), true))
            .collect();
        let vip = SocketAddr::new("10.96.0.1".parse().unwrap(), 8080);
        let from = |view: &MeshView, client: &str| {
            let client: IpAddr = client.parse().unwrap();
            authority(view.route_from(vip, "web", &Locality::default(), Some(client))).ip()
        };
        update.policy_json = r#"[{"workload": "web", "outboundDefaults":
            {"loadBalancing": {"algorithm": {"type": "ConsistentHash", "hashOn": {"type": "SourceIp"}}}}}]"#
            .into();
        let view = MeshView::from_update(&update).unwrap();
        // One client keeps its endpoint; many clients spread.
        let first = from(&view, "192.0.2.7");
        assert!((0..20).all(|_| from(&view, "192.0.2.7") == first));
        let spread: std::collections::HashSet<IpAddr> = (1..=60)
            .map(|i| from(&view, &format!("192.0.2.{i}")))
            .collect();
        assert!(spread.len() >= 3, "{spread:?}");
        // Random: one client's connections go to several endpoints.
        update.policy_json = r#"[{"workload": "web", "outboundDefaults":
            {"loadBalancing": {"algorithm": {"type": "Random"}}}}]"#
            .into();
        let view = MeshView::from_update(&update).unwrap();
        let picked: std::collections::HashSet<IpAddr> =
            (0..60).map(|_| from(&view, "192.0.2.7")).collect();
        assert!(picked.len() >= 3, "{picked:?}");
    }

    #[test]
    fn tcp_least_request_goes_to_fewer_open_connections_across_views() {
        let mut update = sample();
        update.services[0].name = "least-connections".into();
        update.services[0].endpoints = vec![endpoint("10.0.0.1", true), endpoint("10.0.0.2", true)];
        update.policy_json = r#"[{"workload": "web", "outboundDefaults":
            {"loadBalancing": {"algorithm": {"type": "LeastRequest"}}}}]"#
            .into();
        let vip = SocketAddr::new("10.96.0.1".parse().unwrap(), 8080);
        let here = Locality::default();
        // A connection held open, as the outbound proxy holds it: its
        // count outlives the route and the view.
        let view = MeshView::from_update(&update).unwrap();
        let Route::Tunnel {
            authority: busy,
            open: Some(held),
            ..
        } = view.route(vip, "web", &here)
        else {
            panic!("a service's TCP connection should be counted");
        };
        // Each new connection (closed at once) goes to the other endpoint.
        for _ in 0..20 {
            assert_ne!(authority(view.route(vip, "web", &here)), busy);
        }
        // A config update replaces the view: the new one sees the open
        // connection all the same.
        let next = MeshView::from_update(&update).unwrap();
        drop(view);
        for _ in 0..20 {
            assert_ne!(authority(next.route(vip, "web", &here)), busy);
        }
        // Once it closes, both endpoints take connections again.
        drop(held);
        let picked: std::collections::HashSet<SocketAddr> = (0..40)
            .map(|_| authority(next.route(vip, "web", &here)))
            .collect();
        assert_eq!(picked.len(), 2, "{picked:?}");
        // Connections held open spread evenly: the less loaded of the two
        // endpoints always takes the next one.
        let open: Vec<Route<'_>> = (0..10).map(|_| next.route(vip, "web", &here)).collect();
        let on_busy = open
            .iter()
            .filter(|r| matches!(r, Route::Tunnel { authority, .. } if *authority == busy))
            .count();
        assert_eq!(on_busy, 5, "{open:?}");
    }

    #[test]
    fn a_patch_moves_an_endpoint_between_localities() {
        let mut base = sample();
        base.services[0].endpoints = vec![
            in_zone("10.0.0.1", "a", true),
            in_zone("10.0.0.3", "b", true),
        ];
        let mut update = delta();
        // The workload's zone label changed: removed as it was, added as
        // it is.
        update.patched_services = vec![patch(
            api_now(vec![in_zone("10.0.0.1", "b", true)]),
            vec![in_zone("10.0.0.1", "a", true)],
        )];
        let resolved = resolve(Some(&base), update).unwrap();
        let api = resolved.services.iter().find(|s| s.name == "api").unwrap();
        let zones: Vec<&str> = api
            .endpoints
            .iter()
            .map(|e| e.locality_zone.as_str())
            .collect();
        assert_eq!(zones, ["b", "b"]);
        // A removal must match the location too.
        let mut wrong = delta();
        wrong.patched_services = vec![patch(api_now(vec![]), vec![in_zone("10.0.0.1", "b", true)])];
        let err = resolve(Some(&base), wrong).unwrap_err();
        assert_eq!(
            err.field, "patched_services[0].removed_endpoints[0]",
            "{err}"
        );
    }

    fn external(name: &str, vip: &str, host: &str, port: u32, http: bool) -> ExternalServiceView {
        ExternalServiceView {
            name: name.into(),
            namespace: "pay".into(),
            virtual_ip: vip.into(),
            host: host.into(),
            port: Some(Port {
                port,
                protocol: i32::from(http),
            }),
        }
    }

    #[test]
    fn external_services_get_their_names_and_are_dialled_by_the_agent() {
        let mut update = sample();
        update.external_services = vec![
            external("stripe", "10.96.0.9", "API.Stripe.com", 443, false),
            external("ledger", "10.96.0.10", "192.0.2.7", 80, true),
        ];
        let view = MeshView::from_update(&update).unwrap();
        let vip: IpAddr = "10.96.0.9".parse().unwrap();
        assert_eq!(view.lookup("stripe.pay.mesh"), NameLookup::Service(vip));
        // The host's own name too, so applications keep calling it.
        assert_eq!(view.lookup("api.stripe.com."), NameLookup::Service(vip));
        match view.route(SocketAddr::new(vip, 443), "web", &Locality::default()) {
            Route::External { service, external } => {
                assert_eq!(service.key.as_str(), "external:pay/stripe");
                assert_eq!(external.authority, "api.stripe.com:443");
            }
            other => panic!("not external: {other:?}"),
        }
        assert!(matches!(
            view.route(SocketAddr::new(vip, 80), "web", &Locality::default()),
            Route::Refuse("port_not_in_service")
        ));
        // An HTTP port goes through L7, where policies find it by its key.
        let ledger = SocketAddr::from(([10, 96, 0, 10], 80));
        assert!(
            matches!(view.route(ledger, "web", &Locality::default()), Route::Http { service, .. } if service.key.as_str() == "external:pay/ledger")
        );
        // Declared by address: a connection straight to it is the service too.
        let direct = SocketAddr::from(([192, 0, 2, 7], 80));
        assert!(matches!(
            view.route(direct, "web", &Locality::default()),
            Route::Http { .. }
        ));
        assert!(matches!(
            view.route(
                SocketAddr::from(([192, 0, 2, 7], 81)),
                "web",
                &Locality::default()
            ),
            Route::Outside
        ));
        assert!(view.service_by_key("external:pay/ledger").is_some());
    }

    #[test]
    fn a_mesh_service_keeps_its_name_over_an_external_one() {
        let mut update = sample();
        update.external_services = vec![ExternalServiceView {
            namespace: "default".into(),
            ..external("api", "10.96.0.9", "api.example.com", 443, false)
        }];
        let view = MeshView::from_update(&update).unwrap();
        assert_eq!(
            view.lookup("api.default.mesh"),
            NameLookup::Service("10.96.0.1".parse().unwrap())
        );
        assert_eq!(
            view.lookup("api.example.com"),
            NameLookup::Service("10.96.0.9".parse().unwrap())
        );
    }

    #[test]
    fn bad_external_services_are_refused_with_their_field() {
        let cases = [
            (
                external("stripe", "10.96.0.1", "api.stripe.com", 443, false),
                "external_services[0].virtual_ip",
            ),
            (
                external("stripe", "", "api.stripe.com", 443, false),
                "external_services[0].virtual_ip",
            ),
            (
                external("stripe", "10.96.0.9", "not a host", 443, false),
                "external_services[0].host",
            ),
            (
                external("stripe", "10.96.0.9", "api.stripe.com", 0, false),
                "external_services[0].port.port",
            ),
            (
                external("Stripe", "10.96.0.9", "api.stripe.com", 443, false),
                "external_services[0].name",
            ),
        ];
        for (bad, field) in cases {
            let mut update = sample();
            update.external_services = vec![bad];
            let error = MeshView::from_update(&update).expect_err("refused");
            assert_eq!(error.field, field, "{error}");
        }
    }

    #[test]
    fn undeclared_service_ports_are_detected_and_routed_by_the_verdict() {
        use crate::detect::Detected;
        let mut u = sample();
        u.services[0].ports.push(Port {
            port: 8081,
            protocol: 2,
        });
        let view = MeshView::from_update(&u).unwrap();
        let declared: SocketAddr = "10.96.0.1:8080".parse().unwrap();
        let undeclared: SocketAddr = "10.96.0.1:8081".parse().unwrap();
        assert!(!view.detects(declared));
        assert!(view.detects(undeclared));
        // A workload's own address is left to the agent in front of it.
        assert!(!view.detects("10.0.0.1:8081".parse().unwrap()));
        assert!(matches!(
            view.route_detected(
                undeclared,
                "web",
                &Locality::default(),
                None,
                Detected::Http
            ),
            Route::Http { port: 8081, .. }
        ));
        assert!(matches!(
            view.route_detected(undeclared, "web", &Locality::default(), None, Detected::Tcp),
            Route::Tunnel { .. }
        ));
        // On a port declared tcp the verdict changes nothing.
        assert!(matches!(
            view.route_detected(declared, "web", &Locality::default(), None, Detected::Http),
            Route::Tunnel { .. }
        ));
    }
}
