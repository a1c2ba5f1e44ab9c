//! Node mode: one agent for every workload of its host. Each workload lives
//! in its own network namespace (as a pod or a container does) and is
//! enrolled without a restart: the agent opens that workload's listeners
//! inside its namespace, gets a key and certificate made for it alone, and
//! installs there the rules that send its traffic to those listeners. The
//! socket that accepted a connection says whose it is. Unenrolling removes
//! the rules and closes the sockets, leaving the namespace as it was.
//!
//! The enrolled set is persisted, so a restarted agent captures the same
//! workloads again from its state directory, with or without its zone.

pub mod spec;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::AbortHandle;
use tracing::{error, info, warn};
use weft_api::proto::agent::v1::{CertificateRequest, PlacedWorkload, RegisterRequest, Workload};

use crate::config::{AgentConfig, IdentityFiles};
use crate::controller::{self, Controller, LocalWorkloads};
use crate::credentials::Credentials;
use crate::local_workload::LocalWorkload;
use crate::netns::{Netns, NetnsError};
use crate::state::{self, key_and_chain, StateDir};
use crate::workload_proxy::{Listeners, Shared, WorkloadProxy};
use spec::{NodeWorkload, SpecError};

/// The persisted enrolled set.
const ENROLLED: &str = "node-workloads.json";

/// Why a workload could not be enrolled or unenrolled.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Invalid(#[from] SpecError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("workload {0:?} is already enrolled with another spec; unenrol it first")]
    Conflict(String),
    #[error("workload {0:?} is not enrolled")]
    NotEnrolled(String),
    #[error("this agent serves {0} workloads already (node.max_workloads)")]
    Full(usize),
    #[error("its listeners: {0}")]
    Listen(#[from] crate::listen::BindError),
    #[error("its capture rules: {0}")]
    Capture(#[from] crate::redirect::RedirectError),
    #[error("the zone refused it: {0}")]
    Refused(String),
    #[error("the zone could not be asked: {0}")]
    Zone(String),
    #[error("its identity: {0}")]
    Identity(String),
}

impl NodeError {
    /// The admin endpoint's status for the error.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            NodeError::Invalid(_) | NodeError::Netns(_) => S::BAD_REQUEST,
            NodeError::Conflict(_) => S::CONFLICT,
            NodeError::NotEnrolled(_) => S::NOT_FOUND,
            NodeError::Full(_) => S::TOO_MANY_REQUESTS,
            NodeError::Refused(_) => S::FORBIDDEN,
            NodeError::Zone(_) => S::BAD_GATEWAY,
            NodeError::Listen(_) | NodeError::Capture(_) | NodeError::Identity(_) => {
                S::INTERNAL_SERVER_ERROR
            }
        }
    }
}

/// Who asked for a workload: a placement by the zone is undone by the
/// zone, a local enrolment by the local command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Local,
    Zone,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: NodeWorkload,
    origin: Origin,
}

struct Enrolled {
    record: Record,
    proxy: WorkloadProxy,
    netns: Arc<Netns>,
    renewal: AbortHandle,
}

/// What `GET /workloads` shows of one enrolled workload.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub spec: NodeWorkload,
    pub origin: Origin,
    pub spiffe_id: String,
    pub not_after_unix: i64,
    pub in_flight: usize,
}

/// The node agent's workloads.
pub struct Node {
    shared: Shared,
    state: StateDir,
    controller: OnceLock<Arc<Controller>>,
    workloads: Mutex<BTreeMap<String, Enrolled>>,
    /// One enrolment change at a time: each reads and writes the set, and
    /// tells the zone the result.
    changes: tokio::sync::Mutex<()>,
    /// Records that could not be started again after a restart, kept in
    /// the persisted set for the next start.
    kept: Mutex<Vec<Record>>,
    /// Itself, for the tasks the controller's callbacks start.
    me: OnceLock<std::sync::Weak<Node>>,
}

impl Node {
    /// A node with nothing enrolled yet; see [`Node::restore`].
    pub fn new(shared: Shared, state: StateDir) -> Arc<Self> {
        // Every workload proxy runs with the per-workload limits.
        let shared = Shared {
            config: Arc::new(shared.config.per_workload()),
            ..shared
        };
        Arc::new_cyclic(|me| Node {
            shared,
            state,
            controller: OnceLock::new(),
            workloads: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
            kept: Mutex::new(Vec::new()),
            me: OnceLock::from(me.clone()),
        })
    }

    /// The controller client, once it exists (it needs the node first).
    pub fn set_controller(&self, controller: Arc<Controller>) {
        let _ = self.controller.set(controller);
    }

    fn config(&self) -> &AgentConfig {
        &self.shared.config
    }

    fn set(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Enrolled>> {
        self.workloads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every enrolled workload, for the admin endpoint.
    pub fn list(&self) -> Vec<Summary> {
        self.set()
            .values()
            .map(|e| {
                let current = e.proxy.credentials.current();
                Summary {
                    spec: e.record.spec.clone(),
                    origin: e.record.origin,
                    spiffe_id: current.identity.id.as_str().to_owned(),
                    not_after_unix: current.identity.not_after,
                    in_flight: e.proxy.drain.active(),
                }
            })
            .collect()
    }

    /// Captures again what was enrolled before a restart. A workload whose
    /// namespace is gone is dropped from the set (its pod or container
    /// ended while the agent was away); any other failure leaves it in the
    /// set, to be tried at the next start.
    pub async fn restore(self: &Arc<Self>) {
        let records: Vec<Record> = match self.state.read(ENROLLED) {
            Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
                Ok(records) => records,
                Err(e) => {
                    // Not overwritten: an operator can repair the file.
                    error!(file = ENROLLED, error = %e, "the enrolled set is unreadable; starting with none");
                    return;
                }
            },
            Ok(None) => return,
            Err(e) => {
                error!(error = %e, "cannot read the enrolled set; starting with none");
                return;
            }
        };
        self.start_again(Some(records)).await;
        if !self.kept().is_empty() {
            tokio::spawn(self.clone().retry_kept());
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Record>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `records` (or, with `None`, those kept from an earlier try);
    /// a failure other than a vanished namespace keeps the record, in the
    /// persisted set too, for the next try.
    async fn start_again(self: &Arc<Self>, records: Option<Vec<Record>>) {
        let _change = self.changes.lock().await;
        let records = records.unwrap_or_else(|| std::mem::take(&mut *self.kept()));
        for record in records {
            let name = record.spec.name.clone();
            if self.set().contains_key(&name) {
                continue;
            }
            match self.start(record.clone(), None).await {
                Ok(()) => info!(workload = %name, "workload captured again after restart"),
                Err(NodeError::Netns(e)) => {
                    warn!(workload = %name, error = %e, "the workload's namespace is gone; unenrolled")
                }
                Err(e) => {
                    error!(workload = %name, error = %e, "cannot capture the workload again yet; retrying");
                    self.kept().push(record);
                }
            }
        }
        self.persist();
        self.tell_zone();
    }

    /// Retries what could not be captured again after a restart (e.g. its
    /// certificate expired while the zone was away), with backoff, until
    /// none is left.
    async fn retry_kept(self: Arc<Self>) {
        let mut backoff = controller::Backoff::default();
        while !self.kept().is_empty() {
            tokio::time::sleep(backoff.next_delay()).await;
            self.start_again(None).await;
        }
    }

    /// Enrols `spec` (idempotent for an identical spec): registers it with
    /// the zone and gets its certificate, opens its listeners in its
    /// namespace, then installs its capture rules. On error nothing is
    /// left behind.
    pub async fn enrol(
        self: &Arc<Self>,
        spec: NodeWorkload,
        origin: Origin,
    ) -> Result<(), NodeError> {
        let name = spec.name.clone();
        let result = self.enrol_inner(spec, origin).await;
        let outcome = match &result {
            Ok(()) => "ok",
            Err(
                NodeError::Invalid(_)
                | NodeError::Refused(_)
                | NodeError::Conflict(_)
                | NodeError::Full(_),
            ) => "refused",
            Err(_) => "failed",
        };
        self.shared.metrics.node_enrolment(outcome);
        if let Err(e) = &result {
            warn!(workload = %name, error = %e, "enrolment failed, nothing changed");
        }
        result
    }

    async fn enrol_inner(
        self: &Arc<Self>,
        spec: NodeWorkload,
        origin: Origin,
    ) -> Result<(), NodeError> {
        spec.validate()?;
        let _change = self.changes.lock().await;
        if let Some(e) = self.set().get(&spec.name) {
            return if e.record.spec == spec {
                Ok(())
            } else {
                Err(NodeError::Conflict(spec.name))
            };
        }
        let max = self.config().node.max_workloads;
        if self.set().len() >= max {
            return Err(NodeError::Full(max));
        }
        // A namespace that cannot be entered is refused before the zone
        // hears of the workload.
        Netns::open(&spec.netns)?;
        let issued = self.register(&spec).await?;
        let file = spec.identity_file();
        let record = Record { spec, origin };
        if let Err(e) = self.start(record, Some(issued)).await {
            // The zone has it registered: take that back, and its key.
            let _ = std::fs::remove_file(self.state.path(&file));
            self.tell_zone();
            return Err(e);
        }
        self.persist();
        self.tell_zone();
        Ok(())
    }

    /// Unenrols `name`: its capture rules go first (its traffic flows
    /// directly again), then its listeners close; connections in flight
    /// drain in the background.
    pub async fn unenrol(self: &Arc<Self>, name: &str) -> Result<(), NodeError> {
        let _change = self.changes.lock().await;
        let Some(mut enrolled) = self.set().remove(name) else {
            // One still waiting to be captured again goes from the set.
            let before = self.kept().len();
            self.kept().retain(|r| r.spec.name != name);
            if self.kept().len() == before {
                return Err(NodeError::NotEnrolled(name.to_owned()));
            }
            self.persist();
            return Ok(());
        };
        enrolled.renewal.abort();
        let removed = remove_rules(enrolled.netns.clone()).await;
        enrolled.proxy.close_listeners().await;
        let drain = enrolled.proxy.drain.clone();
        let deadline = self.config().drain_timeout;
        tokio::spawn(async move { drain.drain(deadline).await });
        let _ = std::fs::remove_file(self.state.path(&enrolled.record.spec.identity_file()));
        self.persist();
        self.tell_zone();
        self.shared.metrics.node_enrolment("unenrolled");
        info!(workload = %name, "workload unenrolled");
        removed
    }

    /// Asks the zone to register `spec` with the others and sign a CSR
    /// for it; returns its key and chain.
    async fn register(&self, spec: &NodeWorkload) -> Result<String, NodeError> {
        let key = controller::new_key().map_err(|e| NodeError::Identity(e.to_string()))?;
        let csr =
            controller::csr_pem(&key, None).map_err(|e| NodeError::Identity(e.to_string()))?;
        // The whole set, with this one (new, or renewed) as it is now.
        let mut workloads: Vec<Workload> = self
            .registrations()
            .into_iter()
            .filter(|w| w.name != spec.name)
            .collect();
        workloads.push(spec.registration(self.hbone_port()));
        let request = RegisterRequest {
            workloads,
            certificates: vec![CertificateRequest {
                workload: spec.name.clone(),
                csr_pem: csr,
            }],
        };
        let mut client = controller::agent_client(self.config(), &self.state)
            .await
            .map_err(|e| NodeError::Zone(e.to_string()))?;
        let call = tokio::time::timeout(controller::UNARY_TIMEOUT, client.register(request));
        let response = match call.await {
            Err(_) => return Err(NodeError::Zone("Register took too long".to_owned())),
            Ok(Err(status)) => return Err(refusal(status)),
            Ok(Ok(r)) => r.into_inner(),
        };
        let issued =
            controller::issued_for(&response.certificates, &spec.name).map_err(NodeError::Zone)?;
        info!(workload = %spec.name, identity = %issued.spiffe_id, not_after_unix = issued.not_after_unix, "workload certificate issued");
        Ok(key_and_chain(&key.serialize_pem(), &issued.chain_pem))
    }

    /// Brings a workload up: its identity (new, or from the state
    /// directory), its listeners in its namespace, its proxy, then its
    /// capture rules.
    async fn start(
        self: &Arc<Self>,
        record: Record,
        issued: Option<String>,
    ) -> Result<(), NodeError> {
        let spec = &record.spec;
        let netns = Arc::new(Netns::open(&spec.netns)?);
        let file = spec.identity_file();
        if let Some(issued) = &issued {
            controller::install_workload_as(&self.state, &file, issued, None)
                .map_err(NodeError::Identity)?;
        } else if !self.state.validity(&file).is_ok_and(|v| v.usable()) {
            let issued = self.register(spec).await?;
            controller::install_workload_as(&self.state, &file, &issued, None)
                .map_err(NodeError::Identity)?;
        }
        let files = self.identity_files(spec);
        let credentials =
            Arc::new(Credentials::load(&files).map_err(|e| NodeError::Identity(e.to_string()))?);
        let config = self.shared.config.clone();
        let dns = self.shared.dns.is_some();
        let listeners = netns.run(|| Listeners::bind(&config, dns))??;
        let local = Arc::new(LocalWorkload {
            name: spec.name.as_str().into(),
            address: spec.address,
            ports: spec.ports.clone(),
            netns: Some(netns.clone()),
            locality: weft_api::Locality::from_labels(&spec.labels),
        });
        let mut proxy = WorkloadProxy::start(
            &self.shared,
            local,
            credentials.clone(),
            listeners,
            crate::drain::Drain::new(),
        )
        .map_err(|e| NodeError::Identity(e.to_string()))?;
        let script = crate::redirect::render_workload(&config, &spec.port_set())?;
        let ns = netns.clone();
        let installed =
            tokio::task::spawn_blocking(move || ns.run(|| crate::redirect::apply(&script)))
                .await
                .map_err(|e| NodeError::Identity(format!("capture task: {e}")))?;
        if let Err(e) = installed
            .map_err(NodeError::from)
            .and_then(|r| r.map_err(NodeError::from))
        {
            proxy.close_listeners().await;
            return Err(e);
        }
        let renewal =
            tokio::spawn(self.clone().renew_forever(spec.clone(), credentials)).abort_handle();
        info!(
            workload = %spec.name,
            netns = %spec.netns.display(),
            identity = %proxy.credentials.id(),
            origin = ?record.origin,
            "workload enrolled: listening and captured in its namespace"
        );
        let name = spec.name.clone();
        self.set().insert(
            name,
            Enrolled {
                record,
                proxy,
                netns,
                renewal,
            },
        );
        Ok(())
    }

    fn identity_files(&self, spec: &NodeWorkload) -> IdentityFiles {
        IdentityFiles {
            cert: self.state.path(&spec.identity_file()),
            key: self.state.path(&spec.identity_file()),
            trust_bundle: self.state.path(state::BUNDLE),
        }
    }

    fn hbone_port(&self) -> u16 {
        self.config().inbound.listen.port()
    }

    /// Renews one workload's certificate at 50-80% of its life, for as
    /// long as it is enrolled; new tunnels present the new one.
    async fn renew_forever(self: Arc<Self>, spec: NodeWorkload, credentials: Arc<Credentials>) {
        let mut backoff = controller::Backoff::default();
        loop {
            let wait = match self.state.validity(&spec.identity_file()) {
                Ok(v) => {
                    let at = weft_pki::renewal_at(v.not_before, v.not_after, fastrand::f64());
                    Duration::from_secs((at - state::now_unix()).max(0) as u64)
                }
                Err(_) => Duration::ZERO,
            };
            tokio::time::sleep(wait).await;
            loop {
                let renewed = async {
                    let issued = self.register(&spec).await?;
                    controller::install_workload_as(
                        &self.state,
                        &spec.identity_file(),
                        &issued,
                        None,
                    )
                    .map_err(NodeError::Identity)?;
                    credentials
                        .reload()
                        .map_err(|e| NodeError::Identity(e.to_string()))
                };
                match renewed.await {
                    Ok(current) => {
                        self.shared.metrics.certificate_renewal(true);
                        info!(workload = %spec.name, not_after_unix = current.identity.not_after, "workload certificate renewed");
                        backoff.reset();
                        break;
                    }
                    Err(e) => {
                        self.shared.metrics.certificate_renewal(false);
                        let delay = backoff.next_delay();
                        warn!(workload = %spec.name, error = %e, retry_in = ?delay, "workload certificate renewal failed, keeping the current one");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }

    fn persist(&self) {
        self.shared.metrics.node_workloads(self.set().len());
        let mut records: Vec<Record> = self.set().values().map(|e| e.record.clone()).collect();
        records.extend(self.kept().iter().cloned());
        let written = serde_json::to_vec_pretty(&records)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                self.state
                    .write(ENROLLED, &bytes)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            error!(error = %e, "cannot persist the enrolled set; a restart may not capture them all");
        }
    }

    fn tell_zone(&self) {
        if let Some(controller) = self.controller.get() {
            controller.workloads_changed();
        }
    }

    /// Drains every workload's proxy at once; the connections left at the
    /// deadline. Their capture rules stay: while the agent is away their
    /// traffic is refused rather than let out unencrypted.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let drains: Vec<crate::drain::Drain> =
            self.set().values().map(|e| e.proxy.drain.clone()).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for drain in drains {
            tasks.spawn(async move { drain.drain(deadline).await });
        }
        tasks.join_all().await.into_iter().sum()
    }

    /// Every workload's outbound proxy, for the agent's health checks.
    pub fn outbounds(&self) -> Vec<Arc<crate::outbound::Outbound>> {
        self.set()
            .values()
            .map(|e| e.proxy.outbound.clone())
            .collect()
    }

    /// Connections in flight across every workload.
    pub fn in_flight(&self) -> usize {
        self.set().values().map(|e| e.proxy.drain.active()).sum()
    }

    async fn reconcile(self: Arc<Self>, placed: Vec<PlacedWorkload>) {
        let mut wanted = BTreeMap::new();
        for (i, p) in placed.iter().enumerate() {
            match NodeWorkload::from_placed(p) {
                Ok(spec) => {
                    wanted.insert(spec.name.clone(), spec);
                }
                Err(e) => {
                    warn!(field = %format!("placed[{i}].{}", e.field), reason = %e.reason, "placed workload ignored")
                }
            }
        }
        let gone: Vec<String> = self
            .set()
            .values()
            .filter(|e| {
                e.record.origin == Origin::Zone && !wanted.contains_key(&e.record.spec.name)
            })
            .map(|e| e.record.spec.name.clone())
            .collect();
        for name in gone {
            if let Err(e) = self.unenrol(&name).await {
                warn!(workload = %name, error = %e, "unenrolling a workload the zone no longer places failed");
            }
        }
        for (name, spec) in wanted {
            let current = self.set().get(&name).map(|e| e.record.spec.clone());
            if current.as_ref() == Some(&spec) {
                continue;
            }
            if current.is_some() {
                // Placed anew with another spec: enrol it again.
                let _ = self.unenrol(&name).await;
            }
            match self.enrol(spec, Origin::Zone).await {
                Ok(()) => info!(workload = %name, "placed workload enrolled"),
                Err(e) => {
                    warn!(workload = %name, error = %e, "placed workload could not be enrolled")
                }
            }
        }
    }
}

impl LocalWorkloads for Node {
    fn registrations(&self) -> Vec<Workload> {
        let port = self.hbone_port();
        self.set()
            .values()
            .map(|e| e.record.spec.registration(port))
            .collect()
    }

    fn reload(&self, why: &'static str) {
        for (name, e) in self.set().iter() {
            if let Err(err) = e.proxy.credentials.reload() {
                error!(workload = %name, why, error = %err, "credentials reload failed, keeping the ones in force");
            }
        }
    }

    fn placed(&self, placed: Vec<PlacedWorkload>) {
        // Held by the controller, so the node is alive; enrolment awaits
        // the zone, so it runs on its own task.
        let Some(node) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        tokio::spawn(node.reconcile(placed));
    }
}

fn refusal(status: tonic::Status) -> NodeError {
    use tonic::Code;
    match status.code() {
        Code::PermissionDenied
        | Code::AlreadyExists
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::Unauthenticated => {
            NodeError::Refused(format!("{}: {}", status.code(), status.message()))
        }
        _ => NodeError::Zone(format!("{}: {}", status.code(), status.message())),
    }
}

async fn remove_rules(netns: Arc<Netns>) -> Result<(), NodeError> {
    tokio::task::spawn_blocking(move || netns.run(crate::redirect::remove))
        .await
        .map_err(|e| NodeError::Identity(format!("capture task: {e}")))??
        .map(|_| ())
        .map_err(NodeError::from)
}
