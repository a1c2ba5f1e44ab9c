//! CircuitBreaker and HealthCheck on the caller's side: what this agent has
//! open to each destination service (connections, requests in flight,
//! requests waiting), and the health of each endpoint (passive outlier
//! ejection, active checks).
//!
//! The state outlives views: it lives in a registry keyed by destination
//! (`<namespace>/<name>`) and endpoint address, and each view's services
//! hold it by `Arc`. A new view therefore finds the counts and ejections of
//! the one before, and state nobody holds any more goes with the last view
//! that had it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{debug, info, warn};
use weft_api::policy::conf::{CircuitBreakerConf, HealthCheckConf};
use weft_api::Endpoint;

use crate::outbound::Outbound;
use crate::view::{MeshView, Service, SharedView};

/// The longest ejection, whatever the number of ejections (Envoy's
/// default `max_ejection_time`): an endpoint always gets another chance.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// The most active health check tasks an agent runs: each is a timer and
/// a tunnel stream every interval, so a huge mesh must not make them
/// unbounded.
pub const MAX_HEALTH_CHECKS: usize = 1024;

/// How often the health check supervisor looks for a new view.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds since the agent's first use of this module: one clock for
/// ejection deadlines stored in atomics.
pub fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The health of one endpoint of one destination, as this agent sees it.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Ejected until this instant ([`now_ms`]); 0: never ejected.
    ejected_until: AtomicU64,
    /// Ejections so far, the multiplier of the next ejection's length.
    ejections: AtomicU32,
    /// Failed by active health checks.
    unhealthy: AtomicBool,
    /// TCP connections this agent has open to the endpoint through the
    /// tunnel, which LoadBalancing `LeastRequest` compares at L4. Kept here
    /// rather than in the view because a connection outlives the view it
    /// was routed by: the next view must see it, and its close must count
    /// down the same number.
    connections: AtomicU32,
    /// HTTP requests in flight to the endpoint, which `LeastRequest`
    /// compares at L7: here for the same reason, so that a config update
    /// does not start the counts from zero under requests still running.
    requests: AtomicU32,
}

impl EndpointHealth {
    /// Whether the endpoint may be picked at `now`: not ejected and not
    /// failing its health checks.
    pub fn available(&self, now: u64) -> bool {
        !self.unhealthy.load(Ordering::Relaxed) && !self.ejected(now)
    }

    /// Whether outlier detection has the endpoint ejected at `now`.
    pub fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Whether active health checks have marked the endpoint unhealthy.
    pub fn unhealthy(&self) -> bool {
        self.unhealthy.load(Ordering::Relaxed)
    }

    /// TCP connections open to the endpoint (see [`OpenConnection`]).
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// HTTP requests in flight to the endpoint (see [`InFlight`]).
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Counts an HTTP request in flight to the endpoint until the guard
    /// drops.
    pub fn start_request(&self) -> InFlight<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.requests)
    }

    /// Counts a TCP connection to the endpoint until the guard drops.
    pub fn open_connection(self: &Arc<Self>) -> OpenConnection {
        self.connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }
}

/// One HTTP request in flight to an endpoint, counted in its
/// [`EndpointHealth`] while it runs (borrowed from the view the request
/// holds, so no reference count moves per request).
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One TCP connection open to an endpoint, counted in its
/// [`EndpointHealth`] while it lives. It holds the endpoint's state by
/// `Arc` (no allocation: the state exists already), so the count stays
/// right across view swaps and goes down exactly once, when the connection
/// ends.
#[derive(Debug)]
pub struct OpenConnection(Arc<EndpointHealth>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What this agent has open to one destination service, shared by every
/// view that has the service.
#[derive(Debug, Default)]
pub struct Destination {
    connections: AtomicU32,
    requests: AtomicU32,
    pending: AtomicU32,
    /// Woken when a request slot frees, for the pending requests.
    released: Notify,
    endpoints: Mutex<HashMap<IpAddr, Weak<EndpointHealth>>>,
}

static DESTINATIONS: LazyLock<Mutex<HashMap<String, Weak<Destination>>>> =
    LazyLock::new(Default::default);

/// The state of destination `key` (`<namespace>/<name>`): the one the
/// current views share, or a new one.
pub fn destination(key: &str) -> Arc<Destination> {
    let mut all = DESTINATIONS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(live) = all.get(key).and_then(Weak::upgrade) {
        return live;
    }
    // Only when one is added: what no view holds any more goes.
    all.retain(|_, d| d.strong_count() > 0);
    let fresh = Arc::new(Destination::default());
    all.insert(key.to_owned(), Arc::downgrade(&fresh));
    fresh
}

impl Destination {
    /// The health of the endpoint at `address`, the one the current views
    /// share or a new (healthy) one.
    pub fn endpoint(&self, address: IpAddr) -> Arc<EndpointHealth> {
        let mut all = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(live) = all.get(&address).and_then(Weak::upgrade) {
            return live;
        }
        all.retain(|_, e| e.strong_count() > 0);
        let fresh = Arc::new(EndpointHealth::default());
        all.insert(address, Arc::downgrade(&fresh));
        fresh
    }

    /// Connections open to the destination, for tests and the admin page.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Requests in flight to the destination.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A CircuitBreaker compiled for the data path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breaker {
    /// Connections at most; `None`: no limit.
    pub max_connections: Option<u32>,
    /// Requests in flight at most; `None`: no limit.
    pub max_requests: Option<u32>,
    /// Requests that may wait for a slot.
    pub max_pending: u32,
    /// Outlier detection, if on.
    pub outlier: Option<Outlier>,
}

/// Outlier detection settings, in the units the data path uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    /// 5xx in a row that eject.
    pub consecutive_5xx: u32,
    /// 502-504 in a row that eject, if counted apart.
    pub consecutive_gateway: Option<u32>,
    /// Milliseconds without ejection after which the count restarts.
    pub interval_ms: u64,
    /// Milliseconds of the first ejection.
    pub base_ms: u64,
    /// Percentage of endpoints ejected at most.
    pub max_percent: u32,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Breaker {
    /// From the merged `circuitBreaker` block.
    pub fn from_conf(c: &CircuitBreakerConf) -> Self {
        Breaker {
            max_connections: c.max_connections,
            max_requests: c.max_requests,
            max_pending: c.max_pending_requests.unwrap_or(0),
            outlier: c.outlier_detection.as_ref().map(|o| Outlier {
                consecutive_5xx: o.consecutive_5xx.max(1),
                consecutive_gateway: o.consecutive_gateway_errors.map(|n| n.max(1)),
                interval_ms: millis(o.interval.as_std()),
                base_ms: millis(o.base_ejection_time.as_std()).max(1),
                max_percent: o.max_ejection_percent.min(100),
            }),
        }
    }
}

/// A connection counted against `maxConnections` until dropped.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<Destination>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one more connection to `dest`; `None` when that would exceed
/// the breaker's `maxConnections` (the caller refuses it).
pub fn connection_slot(dest: &Arc<Destination>, breaker: &Breaker) -> Option<ConnectionSlot> {
    let n = dest.connections.fetch_add(1, Ordering::Relaxed) + 1;
    let slot = ConnectionSlot(dest.clone());
    match breaker.max_connections {
        Some(max) if n > max => None, // dropping `slot` undoes the count
        _ => Some(slot),
    }
}

/// A request counted against `maxRequests` until dropped.
#[derive(Debug)]
pub struct RequestSlot<'a>(&'a Destination);

impl Drop for RequestSlot<'_> {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
        self.0.released.notify_one();
    }
}

struct Pending<'a>(&'a Destination);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes a request slot of `dest`, waiting (as one of at most
/// `maxPendingRequests`) while `maxRequests` are in flight; `None`: over
/// the limits, answered `503 overflow`. The caller bounds the wait with
/// the request's timeout.
pub async fn request_slot<'a>(dest: &'a Destination, breaker: &Breaker) -> Option<RequestSlot<'a>> {
    let mut waiting: Option<Pending<'a>> = None;
    loop {
        let n = dest.requests.fetch_add(1, Ordering::Relaxed) + 1;
        match breaker.max_requests {
            // Undone without a wake-up: no slot was freed.
            Some(max) if n > max => {
                dest.requests.fetch_sub(1, Ordering::Relaxed);
            }
            _ => return Some(RequestSlot(dest)),
        }
        if waiting.is_none() {
            let before = dest.pending.fetch_add(1, Ordering::Relaxed);
            let pending = Pending(dest);
            if before >= breaker.max_pending {
                return None;
            }
            waiting = Some(pending);
        }
        // Registered before the re-check, so a release in between is not
        // missed.
        let released = dest.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if breaker
            .max_requests
            .is_some_and(|max| dest.requests.load(Ordering::Relaxed) >= max)
        {
            released.await;
        }
    }
}

/// What one attempt on an endpoint came to, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// An answer below 500.
    Success,
    /// A 5xx other than 502-504.
    ServerError,
    /// 502, 503, 504, a reset or a failed connection.
    GatewayError,
}

impl Attempt {
    /// The kind of an HTTP status.
    pub fn of_status(status: u16) -> Self {
        match status {
            502..=504 => Attempt::GatewayError,
            500..=599 => Attempt::ServerError,
            _ => Attempt::Success,
        }
    }
}

/// Counts an attempt on endpoint `i` of `all` (a service's endpoints) and
/// ejects it when it has failed too often in a row. Returns whether this
/// attempt ejected it.
pub fn record(all: &[Arc<EndpointHealth>], i: usize, attempt: Attempt, o: &Outlier) -> bool {
    record_at(all, i, attempt, o, now_ms())
}

fn record_at(
    all: &[Arc<EndpointHealth>],
    i: usize,
    attempt: Attempt,
    o: &Outlier,
    now: u64,
) -> bool {
    let Some(h) = all.get(i) else {
        return false;
    };
    let (fives, gateway) = match attempt {
        Attempt::Success => {
            h.consecutive_5xx.store(0, Ordering::Relaxed);
            h.consecutive_gateway.store(0, Ordering::Relaxed);
            return false;
        }
        Attempt::ServerError => {
            h.consecutive_gateway.store(0, Ordering::Relaxed);
            (h.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1, 0)
        }
        Attempt::GatewayError => (
            h.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1,
            h.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1,
        ),
    };
    let tripped = fives >= o.consecutive_5xx || o.consecutive_gateway.is_some_and(|g| gateway >= g);
    tripped && eject(all, h, o, now)
}

fn eject(all: &[Arc<EndpointHealth>], h: &EndpointHealth, o: &Outlier, now: u64) -> bool {
    let until = h.ejected_until.load(Ordering::Relaxed);
    if until > now {
        return false;
    }
    let ejected = all.iter().filter(|e| e.ejected(now)).count();
    let percent = usize::try_from(o.max_percent).unwrap_or(100);
    if ejected >= (all.len() * percent / 100).max(1) {
        return false;
    }
    // Back for `interval` without a new ejection: start again from one.
    if until > 0 && now.saturating_sub(until) >= o.interval_ms {
        h.ejections.store(0, Ordering::Relaxed);
    }
    let n = h.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let length = o
        .base_ms
        .saturating_mul(u64::from(n))
        .min(millis(MAX_EJECTION).max(o.base_ms));
    h.ejected_until.store(now + length, Ordering::Relaxed);
    h.consecutive_5xx.store(0, Ordering::Relaxed);
    h.consecutive_gateway.store(0, Ordering::Relaxed);
    true
}

/// An active health check compiled for the data path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Between two checks.
    pub interval: Duration,
    /// A check's limit.
    pub timeout: Duration,
    /// Failures in a row that mark unhealthy.
    pub unhealthy_threshold: u32,
    /// Passes in a row that mark healthy again.
    pub healthy_threshold: u32,
    /// `GET` this path (and expect these statuses, empty: 2xx); `None`: a
    /// TCP check.
    pub http: Option<(http::uri::PathAndQuery, Vec<u16>)>,
}

impl HealthCheck {
    /// From the merged `healthCheck` block; `None` when no HealthCheck
    /// applies. A path that does not parse (validation refuses it) falls
    /// back to `/`.
    pub fn from_conf(c: &HealthCheckConf) -> Option<Self> {
        if *c == HealthCheckConf::default() {
            return None;
        }
        Some(HealthCheck {
            interval: c
                .interval
                .map_or(Duration::from_secs(10), |d| d.as_std())
                .max(Duration::from_millis(100)),
            timeout: c.timeout.map_or(Duration::from_secs(1), |d| d.as_std()),
            unhealthy_threshold: c.unhealthy_threshold.unwrap_or(3).max(1),
            healthy_threshold: c.healthy_threshold.unwrap_or(1).max(1),
            http: c.http.as_ref().map(|h| {
                (
                    h.path
                        .parse()
                        .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/")),
                    h.expected_statuses.clone(),
                )
            }),
        })
    }

    fn passes(&self, status: u16) -> bool {
        match &self.http {
            Some((_, expected)) if !expected.is_empty() => expected.contains(&status),
            _ => (200..300).contains(&status),
        }
    }
}

/// One check task: what it checks, so a change restarts it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Task {
    service: String,
    address: IpAddr,
}

struct Running {
    check: HealthCheck,
    target: SocketAddr,
    agent: SocketAddr,
    /// The local workload whose tunnels carry the probes.
    workload: crate::metrics::Label,
    handle: tokio::task::AbortHandle,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// The outbound proxies whose policies ask for health checks: a
/// sidecar's one, or every workload's of a node agent. Health state is
/// per endpoint, shared by every workload, so each endpoint is checked
/// once by the agent, not once per workload.
pub type Outbounds = Box<dyn Fn() -> Vec<Arc<Outbound>> + Send + Sync>;

/// Runs the active health checks the view in force asks for: one task per
/// (destination, endpoint) with a HealthCheck, started and stopped as views
/// and workloads change, until the agent drains.
pub async fn supervise(view: SharedView, outbounds: Outbounds, drain: crate::drain::Drain) {
    let mut tasks: HashMap<Task, Running> = HashMap::new();
    let mut seen: Option<(Arc<MeshView>, Vec<crate::metrics::Label>)> = None;
    loop {
        let current = view.load_full();
        let proxies = outbounds();
        let names: Vec<_> = proxies.iter().map(|o| o.workload.clone()).collect();
        let changed = !seen
            .as_ref()
            .is_some_and(|(v, n)| Arc::ptr_eq(v, &current) && *n == names);
        if changed {
            reconcile(&proxies, &current, &mut tasks);
            seen = Some((current, names));
        }
        tokio::select! {
            () = tokio::time::sleep(SUPERVISE_EVERY) => {}
            () = drain.signaled() => break,
        }
    }
    // Dropping the tasks aborts them.
    tasks.clear();
}

type Wanted = (
    HealthCheck,
    SocketAddr,
    Endpoint,
    Arc<EndpointHealth>,
    Arc<Outbound>,
);

fn reconcile(proxies: &[Arc<Outbound>], view: &MeshView, tasks: &mut HashMap<Task, Running>) {
    let mut wanted: HashMap<Task, Wanted> = HashMap::new();
    // The first workload whose policy asks for a check of an endpoint
    // probes it for all.
    for outbound in proxies {
        wanted_by(outbound, view, &mut wanted);
    }
    tasks.retain(|task, running| {
        wanted
            .get(task)
            .is_some_and(|(check, target, endpoint, _, outbound)| {
                running.check == *check
                    && running.target == *target
                    && running.agent == endpoint.agent
                    && running.workload == outbound.workload
            })
    });
    for (task, (check, target, endpoint, health, outbound)) in wanted {
        if tasks.contains_key(&task) {
            continue;
        }
        if tasks.len() >= MAX_HEALTH_CHECKS {
            warn!(
                limit = MAX_HEALTH_CHECKS,
                destination = task.service,
                "too many health checks, some endpoints go unchecked"
            );
            break;
        }
        let handle = tokio::spawn(check_loop(
            outbound.clone(),
            task.service.clone(),
            endpoint.clone(),
            target,
            check.clone(),
            health,
        ))
        .abort_handle();
        tasks.insert(
            task,
            Running {
                check,
                target,
                agent: endpoint.agent,
                workload: outbound.workload.clone(),
                handle,
            },
        );
    }
}

/// The checks `outbound`'s policy asks for that no earlier workload's did.
fn wanted_by(outbound: &Arc<Outbound>, view: &MeshView, wanted: &mut HashMap<Task, Wanted>) {
    let policy = outbound.policy(view);
    for service in view.services() {
        let Some(check) = policy.outbound(service.key.as_str()).health_check.clone() else {
            continue;
        };
        let port = if check.http.is_some() {
            service.http_ports.first().or(service.ports.first())
        } else {
            service.ports.first()
        };
        let Some(&port) = port else {
            debug!(
                destination = service.key.as_str(),
                "no port to health check"
            );
            continue;
        };
        for (e, health) in service.endpoints.iter().zip(service.health()) {
            let task = Task {
                service: service.key.as_str().to_owned(),
                address: e.endpoint.address,
            };
            let target = SocketAddr::new(e.endpoint.address, port);
            wanted.entry(task).or_insert_with(|| {
                (
                    check.clone(),
                    target,
                    e.endpoint.clone(),
                    health.clone(),
                    outbound.clone(),
                )
            });
        }
    }
}

/// Marks the endpoint healthy again when its checks stop: a check that no
/// longer applies must not keep it out.
struct Unmark(Arc<EndpointHealth>);

impl Drop for Unmark {
    fn drop(&mut self) {
        self.0.unhealthy.store(false, Ordering::Relaxed);
    }
}

async fn check_loop(
    o: Arc<Outbound>,
    service: String,
    endpoint: Endpoint,
    target: SocketAddr,
    check: HealthCheck,
    health: Arc<EndpointHealth>,
) {
    let unmark = Unmark(health);
    // Spread the checks of many endpoints over the interval.
    tokio::time::sleep(check.interval.mul_f64(fastrand::f64() * 0.1)).await;
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut failed, mut passed) = (0u32, 0u32);
    loop {
        ticker.tick().await;
        let ok = match tokio::time::timeout(check.timeout, probe(&o, &endpoint, target, &check))
            .await
        {
            Ok(Ok(())) => true,
            Ok(Err(reason)) => {
                debug!(destination = service, endpoint = %target, reason, "health check failed");
                false
            }
            Err(_) => {
                debug!(destination = service, endpoint = %target, "health check timed out");
                false
            }
        };
        let h = &unmark.0;
        if ok {
            failed = 0;
            passed = passed.saturating_add(1);
            if h.unhealthy() && passed >= check.healthy_threshold {
                h.unhealthy.store(false, Ordering::Relaxed);
                info!(destination = service, endpoint = %target, "endpoint passes its health checks again");
            }
        } else {
            passed = 0;
            failed = failed.saturating_add(1);
            if !h.unhealthy() && failed >= check.unhealthy_threshold {
                h.unhealthy.store(true, Ordering::Relaxed);
                info!(destination = service, endpoint = %target, failed, "endpoint fails its health checks, not picked");
            }
        }
    }
}

async fn probe(
    o: &Arc<Outbound>,
    endpoint: &Endpoint,
    target: SocketAddr,
    check: &HealthCheck,
) -> Result<(), String> {
    match &check.http {
        None => {
            // Marked as a probe: the destination's agent answers 200 only
            // once the workload's port accepted a connection, also on HTTP
            // and detected ports, where an ordinary CONNECT is answered
            // before the workload is dialled.
            let status = o
                .probe_tcp(target, endpoint)
                .await
                .map_err(|e| e.to_string())?;
            if status == http::StatusCode::OK {
                Ok(())
            } else {
                Err(format!("tunnel answered {status}"))
            }
        }
        Some((path, _)) => {
            let status = crate::l7::outbound::probe(o, endpoint, target.port(), path).await?;
            if check.passes(status) {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        }
    }
}

/// The slot of a TCP connection captured to `dst` when `dst` is a
/// service's virtual IP: `Err(())` when the destination's CircuitBreaker
/// has no room (the connection is reset), `Ok(None)` for a workload
/// address.
#[allow(clippy::result_unit_err)]
pub fn l4_connection(
    view: &MeshView,
    policy: &crate::l7::policy::Policy,
    dst: SocketAddr,
) -> Result<Option<ConnectionSlot>, ()> {
    let Some(service) = view.service_at(dst.ip()) else {
        return Ok(None);
    };
    service_connection(policy, service).map(Some)
}

/// The slot of a connection to `service` (L4, or an application's HTTP
/// connection for it); `Err(())` when over `maxConnections`.
#[allow(clippy::result_unit_err)]
pub fn service_connection(
    policy: &crate::l7::policy::Policy,
    service: &Service,
) -> Result<ConnectionSlot, ()> {
    let breaker = &policy.outbound(service.key.as_str()).breaker;
    connection_slot(service.destination(), breaker).ok_or(())
}

/// Feeds a tunnelled TCP connection's fate to the outlier detection of
/// the service whose virtual IP `dst` is: a stream that could not be
/// opened counts as a gateway error, one that was opened as a success. A
/// refusal by the destination's TrafficPermission is not the endpoint's
/// failure and is not counted.
pub fn record_l4(
    outbound: &Outbound,
    dst: SocketAddr,
    endpoint: &Endpoint,
    result: &Result<(), crate::outbound::TunnelError>,
) {
    let view = outbound.view.load();
    let Some(service) = view.service_at(dst.ip()) else {
        return;
    };
    let policy = outbound.policy(&view);
    let Some(outlier) = &policy.outbound(service.key.as_str()).breaker.outlier else {
        return;
    };
    let attempt = match result {
        Ok(()) => Attempt::Success,
        Err(crate::outbound::TunnelError::Refused(http::StatusCode::FORBIDDEN)) => return,
        Err(_) => Attempt::GatewayError,
    };
    service.record(endpoint, attempt, outlier);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier(n: u32, percent: u32) -> Outlier {
        Outlier {
            consecutive_5xx: n,
            consecutive_gateway: None,
            interval_ms: 10_000,
            base_ms: 1_000,
            max_percent: percent,
        }
    }

    #[test]
    fn consecutive_failures_eject_and_successes_reset() {
        let all: Vec<Arc<EndpointHealth>> = (0..2).map(|_| Arc::default()).collect();
        let o = outlier(3, 50);
        let now = 100_000;
        let at = |attempt| record_at(&all, 0, attempt, &o, now);
        assert!(!at(Attempt::ServerError));
        assert!(!at(Attempt::GatewayError));
        assert!(!at(Attempt::Success));
        assert!(!at(Attempt::ServerError));
        assert!(!at(Attempt::ServerError));
        assert!(at(Attempt::ServerError));
        assert!(!all[0].available(now) && all[1].available(now));
        assert!(all[0].available(now + 1_000));
        // Failing again soon after: the second ejection lasts twice as long.
        let later = now + 2_000;
        for _ in 0..3 {
            record_at(&all, 0, Attempt::ServerError, &o, later);
        }
        assert_eq!(all[0].ejected_until.load(Ordering::Relaxed), later + 2_000);
        // Back for longer than `interval`: one base length again.
        let much_later = later + 2_000 + 10_000;
        for _ in 0..3 {
            record_at(&all, 0, Attempt::ServerError, &o, much_later);
        }
        assert_eq!(
            all[0].ejected_until.load(Ordering::Relaxed),
            much_later + 1_000
        );
    }

    #[test]
    fn ejections_stop_at_the_percentage_but_one_always_may() {
        let all: Vec<Arc<EndpointHealth>> = (0..2).map(|_| Arc::default()).collect();
        let o = outlier(1, 10);
        assert!(record(&all, 0, Attempt::ServerError, &o));
        assert!(!record(&all, 1, Attempt::ServerError, &o));
        assert!(all[1].available(now_ms()));
    }

    #[test]
    fn gateway_errors_count_apart() {
        let all: Vec<Arc<EndpointHealth>> = vec![Arc::default(), Arc::default()];
        let mut o = outlier(10, 100);
        o.consecutive_gateway = Some(2);
        assert!(!record(&all, 1, Attempt::GatewayError, &o));
        assert!(record(&all, 1, Attempt::GatewayError, &o));
    }

    #[test]
    fn destinations_are_shared_while_held() {
        let a = destination("test/shared");
        let b = destination("test/shared");
        assert!(Arc::ptr_eq(&a, &b));
        let e = a.endpoint(IpAddr::from([10, 0, 0, 1]));
        assert!(Arc::ptr_eq(&e, &b.endpoint(IpAddr::from([10, 0, 0, 1]))));
        drop((a, b, e));
        let c = destination("test/shared");
        assert_eq!(c.connections(), 0);
    }

    #[test]
    fn connections_over_the_limit_are_refused_and_uncounted() {
        let dest = destination("test/connections");
        let breaker = Breaker {
            max_connections: Some(1),
            ..Breaker::default()
        };
        let first = connection_slot(&dest, &breaker);
        assert!(first.is_some());
        assert!(connection_slot(&dest, &breaker).is_none());
        assert_eq!(dest.connections(), 1);
        drop(first);
        assert!(connection_slot(&dest, &breaker).is_some());
    }

    #[tokio::test]
    async fn requests_wait_as_pending_then_overflow() {
        let dest = destination("test/requests");
        let breaker = Breaker {
            max_requests: Some(1),
            max_pending: 1,
            ..Breaker::default()
        };
        let first = request_slot(&dest, &breaker).await;
        assert!(first.is_some());
        let waiter = request_slot(&dest, &breaker);
        tokio::pin!(waiter);
        // The second waits; a third overflows at once.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), waiter.as_mut())
                .await
                .is_err()
        );
        assert!(request_slot(&dest, &breaker).await.is_none());
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .ok()
            .flatten();
        assert!(second.is_some());
        assert_eq!(dest.requests(), 1);
    }
}
