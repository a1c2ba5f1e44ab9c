//! The agent API: Enroll (token), Renew, Register and Stream (mTLS with the
//! agent's control-plane certificate). Every refusal says why in its status
//! message, since the agent shows it to the operator.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use weft_api::proto::agent::v1 as pb;
use weft_api::proto::agent::v1::agent_service_server::AgentService;
use weft_api::{Kind, Mesh, ObjectMeta, Protocol, Resource, Workload, WorkloadPort, WorkloadSpec};
use weft_pki::{IssueError, IssuedCert, MeshCa};
use weft_store::{
    AgentEnrollment, Expect, ResourceKey, Store, StoreError, TokenError, WorkloadScope,
};

use crate::cutoff::{workload_key, CutReceiver, Cutoff};
use crate::grpc::PeerInfo;
use crate::hub::Hub;
use crate::mesh_ca::{MeshCaError, MeshCas};
use crate::views::AGENT_LABEL;
use crate::zone_ca::ZoneCa;

/// How often a stream marks its agent seen, at most (a short agent grace
/// makes it shorter: see [`heartbeat_period`]).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long an agent gets to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages queued towards one agent: one, so that a stream holds at most
/// one chunk waiting for its encoder (the hub keeps only the newest view).
const OUTBOUND_QUEUE: usize = 1;
/// What a config stream's task queues for its agent, boxed so that the
/// channel's slots are a pointer wide: a tokio channel allocates its slots
/// 32 at a time, which unboxed cost 6 KiB per stream.
type Queued = Box<Result<pb::ZoneMessage, Status>>;

/// The sending half of a config stream.
type Outbound = mpsc::Sender<Queued>;

/// The receiving half of a config stream, boxed (see `stream`).
type Inbound = Box<Streaming<pb::AgentMessage>>;

/// The response half of a config stream, as tonic polls it.
pub struct Outgoing(mpsc::Receiver<Queued>);

impl tokio_stream::Stream for Outgoing {
    type Item = Result<pb::ZoneMessage, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0
            .poll_recv(cx)
            .map(|queued| queued.map(|boxed| *boxed))
    }
}

/// How long a stream waits for the answer to a push before it sends a
/// newer view anyway.
const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// Versions sent on one stream whose CAs are kept for the acks.
const SENT_KEPT: usize = 8;

/// The fingerprints of the CAs in a trust bundle (PEM), in order.
/// The heartbeat period for an agent grace: at most [`HEARTBEAT`], and at
/// least three heartbeats per grace, so that a live agent is never taken
/// for a vanished one.
pub fn heartbeat_period(agent_grace: Duration) -> Duration {
    HEARTBEAT
        .min(agent_grace / 3)
        .max(Duration::from_millis(100))
}

/// How a config stream ended, for the inventory.
enum StreamEnd {
    /// The agent closed its side cleanly: it is stopping, its workloads
    /// leave the endpoint lists at once.
    Goodbye,
    /// The connection broke, this replica stops, or the stream was
    /// replaced: the agent is shown not ready until it returns or the
    /// grace runs out.
    Dropped,
}

/// What the handlers share.
#[derive(Clone)]
pub struct AgentApi {
    /// The store.
    pub store: Store,
    /// This zone.
    pub zone: String,
    /// This replica's id (recorded as the agent's connected replica).
    pub replica: String,
    /// The zone's control-plane CA.
    pub zone_ca: Arc<ZoneCa>,
    /// The mesh CAs.
    pub cas: Arc<MeshCas>,
    /// The stream registry.
    pub hub: Arc<Hub>,
    /// The streams to cut when their agent is revoked or loses a workload.
    pub cutoff: Arc<Cutoff>,
    /// Turns true at shutdown: streams end.
    pub stop: watch::Receiver<bool>,
    /// Streams, pushes, answers and enrolments, for `GET /metrics`.
    pub metrics: Arc<crate::metrics::ZoneMetrics>,
}

fn store_status(error: StoreError) -> Status {
    tracing::error!(%error, "store failure in the agent API");
    Status::unavailable(format!("the zone's store is unavailable: {error}"))
}

fn ca_status(error: MeshCaError) -> Status {
    match error {
        MeshCaError::Store(error) => store_status(error),
        other => {
            tracing::error!(error = %other, "mesh CA unusable");
            Status::failed_precondition(other.to_string())
        }
    }
}

/// The token refusal as the agent sees it: the cause, named.
fn token_status(error: TokenError) -> Status {
    let message = match &error {
        TokenError::Unknown => "bootstrap token refused: unknown token".to_owned(),
        TokenError::WrongZone {
            token_zone,
            presented,
            ..
        } => format!(
            "bootstrap token refused: wrong zone (issued for zone {token_zone:?}, presented to {presented:?})"
        ),
        TokenError::Revoked { .. } => "bootstrap token refused: revoked".to_owned(),
        TokenError::Expired { .. } => "bootstrap token refused: expired".to_owned(),
        TokenError::Exhausted { max_uses, .. } => {
            format!("bootstrap token refused: used up (all {max_uses} use(s) taken)")
        }
        TokenError::Store(_) => {
            return Status::unavailable(format!("cannot check the token: {error}"))
        }
    };
    let id = match &error {
        TokenError::WrongZone { id, .. }
        | TokenError::Revoked { id }
        | TokenError::Expired { id }
        | TokenError::Exhausted { id, .. } => id.as_str(),
        _ => "-",
    };
    tracing::warn!(token = %id, reason = %error, "enrolment refused");
    Status::unauthenticated(message)
}

/// `spec.ports[1].port` -> `ports[1].port`, `metadata.name` -> `name`,
/// camelCase -> snake_case: a resource path as the proto field path.
fn proto_path(path: &str) -> String {
    let path = path
        .strip_prefix("spec.")
        .or_else(|| path.strip_prefix("metadata."))
        .unwrap_or(path);
    let mut out = String::with_capacity(path.len() + 4);
    for c in path.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The Workload resource an agent registers, or INVALID_ARGUMENT naming
/// the field (`workloads[0].address`).
fn to_resource(
    w: &pb::Workload,
    index: usize,
    mesh: &str,
    agent: &str,
    field: &str,
) -> Result<Workload, Status> {
    let at = |rest: &str| format!("{field}[{index}].{rest}");
    let address: IpAddr = w.address.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "{}: {:?} is not an IP address",
            at("address"),
            w.address
        ))
    })?;
    // Empty: a sidecar, reached through its agent's listener.
    let hbone_address = if w.hbone_address.is_empty() {
        None
    } else {
        Some(w.hbone_address.parse::<SocketAddr>().map_err(|_| {
            Status::invalid_argument(format!(
                "{}: {:?} is not an ip:port address",
                at("hbone_address"),
                w.hbone_address
            ))
        })?)
    };
    let mut ports = Vec::with_capacity(w.ports.len());
    for (i, p) in w.ports.iter().enumerate() {
        let port = u16::try_from(p.port).map_err(|_| {
            Status::invalid_argument(format!(
                "{}: {} is not 1-65535",
                at(&format!("ports[{i}].port")),
                p.port
            ))
        })?;
        let protocol = match pb::Protocol::try_from(p.protocol) {
            Ok(pb::Protocol::Tcp) => Protocol::Tcp,
            Ok(pb::Protocol::Http) => Protocol::Http,
            Ok(pb::Protocol::Detect) => Protocol::Detect,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "{}: unknown protocol {}",
                    at(&format!("ports[{i}].protocol")),
                    p.protocol
                )))
            }
        };
        ports.push(WorkloadPort { port, protocol });
    }
    let namespace = if w.namespace.is_empty() {
        "default"
    } else {
        &w.namespace
    };
    let mut metadata = ObjectMeta::namespaced(mesh, namespace, &w.name);
    metadata.labels = w
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata
        .labels
        .insert(AGENT_LABEL.to_owned(), agent.to_owned());
    let workload = Workload::new(
        metadata,
        WorkloadSpec {
            address,
            service: w.service.clone(),
            service_account: if w.service_account.is_empty() {
                "default".to_owned()
            } else {
                w.service_account.clone()
            },
            ports,
            hbone_address,
            // The operator's alone: merged from the stored resource
            // (`check_owners`).
            node: None,
        },
    );
    if let Err(errors) = workload.validate() {
        let first = errors
            .errors()
            .iter()
            .map(|e| format!("{}: {}", at(&proto_path(&e.path.to_string())), e.reason))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Status::invalid_argument(first));
    }
    Ok(workload)
}

/// Checks an agent's workloads against its token's scope and the resource
/// rules; returns the resources to store.
fn check_workloads(
    workloads: &[pb::Workload],
    scope: &WorkloadScope,
    mesh: &str,
    agent: &str,
    field: &str,
) -> Result<Vec<Workload>, Status> {
    let mut seen = BTreeMap::new();
    let mut resources = Vec::with_capacity(workloads.len());
    for (i, w) in workloads.iter().enumerate() {
        if !scope.allows(&w.name) {
            return Err(Status::permission_denied(format!(
                "{field}[{i}]: workload {:?} is not allowed by the bootstrap token",
                w.name
            )));
        }
        let resource = to_resource(w, i, mesh, agent, field)?;
        let key = ResourceKey::of(&Resource::Workload(resource.clone()));
        if let Some(first) = seen.insert(key.clone(), i) {
            return Err(Status::invalid_argument(format!(
                "{field}[{i}]: {key} is already registered by {field}[{first}]"
            )));
        }
        resources.push(resource);
    }
    Ok(resources)
}

fn owner_of(resource: &Resource) -> Option<&str> {
    resource
        .metadata()
        .labels
        .get(AGENT_LABEL)
        .map(String::as_str)
}

/// The node agent the operator placed a stored workload on, if any.
fn placement_of(resource: &Resource) -> Option<&weft_api::NodePlacement> {
    match resource {
        Resource::Workload(w) => w.spec.node.as_ref(),
        _ => None,
    }
}

/// The keys a config stream records for the cut-off: the workloads an
/// operator's deletion must cut it for. Placed workloads are left out: the
/// agent learns of their deletion from its next ConfigUpdate (`placed`), and
/// a node agent's other workloads stay served.
fn cut_keys(workloads: &[Workload]) -> BTreeSet<String> {
    workloads
        .iter()
        .filter(|w| w.spec.node.is_none())
        .map(|w| workload_key(&ResourceKey::of(&Resource::Workload(w.clone()))))
        .collect()
}

impl AgentApi {
    /// Refuses workloads another agent registered, or that the operator
    /// placed on another agent; returns them with their placement kept
    /// (an agent's registration does not carry it).
    async fn check_owners(
        &self,
        agent: &str,
        mut workloads: Vec<Workload>,
    ) -> Result<Vec<Workload>, Status> {
        for w in &mut workloads {
            let key = ResourceKey::of(&Resource::Workload(w.clone()));
            let Some(stored) = self.store.get(&key).await.map_err(store_status)? else {
                continue;
            };
            if let Some(node) = placement_of(&stored.resource) {
                if node.agent != agent {
                    tracing::warn!(%agent, workload = %key, placed_on = %node.agent, "registration refused: the workload is placed on another agent");
                    return Err(Status::permission_denied(format!(
                        "{key} is placed on agent {:?} (spec.node.agent); only that agent may register it",
                        node.agent
                    )));
                }
                w.spec.node = Some(node.clone());
            }
            if let Some(owner) = owner_of(&stored.resource).filter(|o| *o != agent) {
                return Err(Status::already_exists(format!(
                    "{key} is registered by agent {owner:?}; delete it first"
                )));
            }
        }
        Ok(workloads)
    }

    /// Makes `workloads` the agent's whole set: writes the changed ones and
    /// removes those it no longer fronts (in any mesh).
    async fn store_workloads(&self, agent: &str, workloads: Vec<Workload>) -> Result<(), Status> {
        // Only this agent's workloads are read, not the zone's: an agent's
        // (re)connection costs the same in a mesh of 10 or 10,000.
        let mut owned = Vec::new();
        for key in self
            .store
            .labelled_workloads(AGENT_LABEL, agent)
            .await
            .map_err(store_status)?
        {
            if let Some(stored) = self.store.get(&key).await.map_err(store_status)? {
                if owner_of(&stored.resource) == Some(agent) {
                    owned.push(stored);
                }
            }
        }
        let mut wanted = Vec::with_capacity(workloads.len());
        let mut writes = Vec::new();
        for w in workloads {
            let resource = Resource::Workload(w);
            let key = ResourceKey::of(&resource);
            match self.store.get(&key).await.map_err(store_status)? {
                Some(stored) if stored.resource == resource => {}
                Some(stored) => writes.push((resource, Expect::Version(stored.version))),
                None => writes.push((resource, Expect::Absent)),
            }
            wanted.push(key);
        }
        if !writes.is_empty() {
            self.store.put_many(&writes).await.map_err(|e| match e {
                StoreError::Conflict { .. } => Status::aborted(format!("{e}; retry")),
                StoreError::Invalid { .. } => Status::invalid_argument(e.to_string()),
                other => store_status(other),
            })?;
        }
        for stored in owned {
            let key = ResourceKey::of(&stored.resource);
            if !wanted.contains(&key) {
                self.release(agent, &key, stored).await?;
            }
        }
        Ok(())
    }

    /// Lets go of a workload the agent no longer fronts: removed, unless
    /// the operator placed it, which only the operator deletes; a placed
    /// one loses the agent's label (no agent serves it) and keeps its
    /// placement.
    async fn release(
        &self,
        agent: &str,
        key: &ResourceKey,
        stored: weft_store::StoredResource,
    ) -> Result<(), Status> {
        let outcome = match stored.resource {
            Resource::Workload(mut w) if w.spec.node.is_some() => {
                w.metadata.labels.remove(AGENT_LABEL);
                let write = [(Resource::Workload(w), Expect::Version(stored.version))];
                self.store
                    .put_many(&write)
                    .await
                    .map(|_| "unregistered, placement kept")
            }
            _ => self
                .store
                .delete(key, Expect::Version(stored.version))
                .await
                .map(|_| "removed"),
        };
        match outcome {
            Ok(outcome) => {
                tracing::info!(%agent, workload = %key, outcome, "workload no longer fronted")
            }
            // Changed meanwhile: whoever changed it owns it now.
            Err(StoreError::Conflict { .. }) => {}
            Err(error) => return Err(store_status(error)),
        }
        Ok(())
    }

    /// The Mesh resource, or FAILED_PRECONDITION.
    async fn mesh(&self, name: &str) -> Result<Mesh, Status> {
        match self
            .store
            .get(&ResourceKey::global(Kind::Mesh, name))
            .await
            .map_err(store_status)?
        {
            Some(stored) => match stored.resource {
                Resource::Mesh(mesh) => Ok(mesh),
                _ => Err(Status::internal("stored Mesh is not a Mesh")),
            },
            None => Err(Status::failed_precondition(format!(
                "mesh {name:?} does not exist (any more); ask the operator to create it"
            ))),
        }
    }

    /// Signs each CSR for its workload (one of `workloads`) with the mesh
    /// CA.
    fn sign_workloads(
        &self,
        requests: &[pb::CertificateRequest],
        workloads: &[Workload],
        mesh: &Mesh,
        ca: &MeshCa,
    ) -> Result<Vec<pb::IssuedCertificate>, Status> {
        let lifetime = mesh.spec.workload_certificate_lifetime.as_std();
        let mut issued = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            let workload = workloads
                .iter()
                .find(|w| w.metadata.name == request.workload)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "certificates[{i}].workload: {:?} is not one of this agent's workloads",
                        request.workload
                    ))
                })?;
            let id = workload
                .identity(&mesh.spec)
                .map_err(|e| Status::invalid_argument(format!("certificates[{i}]: {e}")))?;
            let cert = ca
                .sign_csr(&request.csr_pem, &id, lifetime)
                .map_err(|e| issue_status(&format!("certificates[{i}].csr_pem"), e))?;
            issued.push(to_issued(&request.workload, cert));
        }
        Ok(issued)
    }

    /// Signs the agent's control-plane CSR.
    fn sign_agent(&self, agent: &str, csr: &str, mesh: &Mesh) -> Result<IssuedCert, Status> {
        let id = self
            .zone_ca
            .agent_id(agent)
            .map_err(|e| Status::invalid_argument(format!("agent_name: {e}")))?;
        self.zone_ca
            .sign_agent(csr, &id, mesh.spec.workload_certificate_lifetime.as_std())
            .map_err(|e| issue_status("agent_csr_pem", e))
    }

    /// The agent named by the connection's verified client certificate.
    fn authenticated<T>(request: &Request<T>) -> Result<String, Status> {
        request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.agent.clone())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "a client certificate of this zone's agent identity is required (enrol first)",
                )
            })
    }

    /// The enrolled agent's mesh and token scope; refuses an agent that is
    /// unknown or whose token was revoked.
    /// Enrols an agent: checks its token, name, workloads and CSRs, then
    /// spends a use of the token and signs.
    async fn enrol(&self, request: pb::EnrollRequest) -> Result<pb::EnrollResponse, Status> {
        let agent = request.agent_name.as_str();
        check_agent_name(agent)?;
        // Check everything before spending a use of the token.
        let grant = self
            .store
            .peek_token(&request.token, &self.zone)
            .await
            .map_err(token_status)?;
        let mesh = self.mesh(&grant.mesh).await?;
        self.refuse_name_in_use(agent).await?;
        let workloads = check_workloads(
            &request.workloads,
            &grant.workloads,
            &grant.mesh,
            agent,
            "workloads",
        )?;
        let workloads = self.check_owners(agent, workloads).await?;
        if request.agent_csr_pem.is_empty() {
            return Err(Status::invalid_argument(
                "agent_csr_pem: required (a CSR for the agent's control-plane identity)",
            ));
        }
        let cas = self.cas.get(&mesh).await.map_err(ca_status)?;
        let certificates =
            self.sign_workloads(&request.certificates, &workloads, &mesh, &cas.signing)?;
        let agent_cert = self.sign_agent(agent, &request.agent_csr_pem, &mesh)?;
        let grant = self
            .store
            .consume_token(&request.token, &self.zone)
            .await
            .map_err(token_status)?;
        self.store_workloads(agent, workloads).await?;
        self.store
            .enroll_agent(&AgentEnrollment {
                name: agent.to_owned(),
                zone: self.zone.clone(),
                mesh: grant.mesh.clone(),
                hbone_address: request.hbone_address.clone(),
                host_facts: host_json(request.host.as_ref()),
                token_id: grant.id.clone(),
            })
            .await
            .map_err(store_status)?;
        tracing::info!(%agent, mesh = %grant.mesh, token = %grant.id, workloads = request.workloads.len(), "agent enrolled");
        Ok(pb::EnrollResponse {
            agent_id: agent_cert.id.as_str().to_owned(),
            mesh: grant.mesh,
            zone: self.zone.clone(),
            certificates,
            trust_bundle_pem: cas.bundle_pem,
            agent_chain_pem: agent_cert.chain_pem,
            controller_ca_pem: self.zone_ca.pem.clone(),
        })
    }

    /// Refuses to enrol under the name of an agent that is online: two
    /// hosts given one name (a cloned VM, an inventory default) would
    /// otherwise take each other's place. An offline agent's name may be
    /// taken again: that is an agent enrolling anew after losing its state.
    /// Checked only once the caller proved a token, so that names cannot
    /// be probed.
    async fn refuse_name_in_use(&self, agent: &str) -> Result<(), Status> {
        let Some(record) = self
            .store
            .get_agent(&self.zone, agent)
            .await
            .map_err(store_status)?
        else {
            return Ok(());
        };
        let now = weft_store::now_ms();
        if record.left.is_some() || !crate::views::online(&record, now) {
            return Ok(());
        }
        tracing::warn!(%agent, "enrolment refused: an online agent has the name");
        Err(Status::already_exists(format!(
            "agent_name: {agent:?} is in use by an online agent (seen {} s ago); give this one another name (`controller.agent_name`), or stop the other one first",
            (now - record.last_seen_ms).max(0) / 1000
        )))
    }

    async fn enrolled(
        &self,
        agent: &str,
    ) -> Result<(weft_store::AgentRecord, WorkloadScope), Status> {
        let record = self
            .store
            .get_agent(&self.zone, agent)
            .await
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "agent {agent:?} is not enrolled in zone {:?}",
                    self.zone
                ))
            })?;
        let token = self
            .store
            .token_info(&record.enrollment.token_id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::permission_denied("the agent's bootstrap token no longer exists")
            })?;
        if token.revoked {
            return Err(Status::permission_denied(format!(
                "the bootstrap token {} this agent enrolled with was revoked",
                token.id
            )));
        }
        Ok((record, token.spec.workloads))
    }
}

/// Whether the operator deleted a workload of this name from the agent
/// (in its mesh, any namespace).
fn withdrawn(record: &weft_store::AgentRecord, workload: &str) -> bool {
    let mesh = format!("{}/", record.enrollment.mesh);
    record
        .withdrawn
        .iter()
        .any(|key| key.starts_with(&mesh) && key.rsplit('/').next() == Some(workload))
}

/// Refuses a certificate for a workload the operator deleted from the agent
/// (and that it does not front again): the agent must stop serving it, so
/// it is told why rather than that the name is unknown.
fn refuse_withdrawn(
    agent: &str,
    record: &weft_store::AgentRecord,
    requests: &[pb::CertificateRequest],
    workloads: &[Workload],
) -> Result<(), Status> {
    for (i, request) in requests.iter().enumerate() {
        let registered = workloads
            .iter()
            .any(|w| w.metadata.name == request.workload);
        if !registered && withdrawn(record, &request.workload) {
            tracing::warn!(%agent, workload = %request.workload, "certificate refused: the workload was deleted by the operator");
            return Err(Status::permission_denied(format!(
                "certificates[{i}].workload: {:?} was deleted by the operator; no certificate is issued for it",
                request.workload
            )));
        }
    }
    Ok(())
}

/// Where a registration came from, for the cut-off bookkeeping.
#[derive(Clone, Copy)]
enum Registrar {
    /// A config stream's Hello or WorkloadUpdate: its entry in the cut-off.
    Stream(u64),
    /// A unary Register: every local stream of the agent.
    Call,
}

/// Who a config stream is for, after its Hello.
struct Stream<'a> {
    agent: &'a str,
    mesh: &'a str,
    scope: &'a WorkloadScope,
    /// Its entry in the cut-off registry.
    cut_id: u64,
    /// Whether the agent applies endpoint patches (Hello.features).
    patches: bool,
    /// Whether the agent joins a service sent in parts (Hello.features).
    parts: bool,
}

fn issue_status(field: &str, error: IssueError) -> Status {
    match error {
        IssueError::CaExpired { .. } | IssueError::Random | IssueError::Sign(_) => {
            tracing::error!(%error, "cannot issue a certificate");
            Status::internal(format!("{field}: {error}"))
        }
        other => Status::invalid_argument(format!("{field}: {other}")),
    }
}

fn to_issued(workload: &str, cert: IssuedCert) -> pb::IssuedCertificate {
    pb::IssuedCertificate {
        workload: workload.to_owned(),
        spiffe_id: cert.id.as_str().to_owned(),
        chain_pem: cert.chain_pem,
        not_before_unix: cert.not_before,
        not_after_unix: cert.not_after,
    }
}

/// Host facts as JSON for the inventory.
fn host_json(host: Option<&pb::HostFacts>) -> serde_json::Value {
    let Some(h) = host else {
        return serde_json::json!({});
    };
    serde_json::json!({
        "hostname": h.hostname,
        "os": h.os,
        "kernel": h.kernel,
        "cpus": h.cpus,
        "memoryBytes": h.memory_bytes,
        "agentRssBytes": h.agent_rss_bytes,
        "agentCpuSeconds": h.agent_cpu_seconds,
        // When this replica heard them: facts older than the report
        // period mean a stream that went quiet.
        "reportedAtUnix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// Agent names: DNS-1123 subdomains that also fit a label value (they
/// label the Workloads the agent registers).
fn check_agent_name(name: &str) -> Result<(), Status> {
    weft_api::validation::dns1123_subdomain(name)
        .and_then(|()| weft_api::validation::label_value(name))
        .map_err(|reason| Status::invalid_argument(format!("agent_name: {reason}")))
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let result = self.enrol(request.into_inner()).await;
        self.metrics.enrolment(result.is_ok());
        result.map(Response::new)
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let agent = Self::authenticated(&request)?;
        let request = request.into_inner();
        let (record, _) = self.enrolled(&agent).await?;
        let mesh = self.mesh(&record.enrollment.mesh).await?;
        let workloads: Vec<Workload> = self
            .store
            .list(Kind::Workload, Some(&record.enrollment.mesh), None)
            .await
            .map_err(store_status)?
            .into_iter()
            .filter_map(|s| match s.resource {
                Resource::Workload(w)
                    if w.metadata.labels.get(AGENT_LABEL).map(String::as_str)
                        == Some(agent.as_str()) =>
                {
                    Some(w)
                }
                _ => None,
            })
            .collect();
        refuse_withdrawn(&agent, &record, &request.certificates, &workloads)?;
        let cas = self.cas.get(&mesh).await.map_err(ca_status)?;
        let certificates =
            self.sign_workloads(&request.certificates, &workloads, &mesh, &cas.signing)?;
        let agent_chain_pem = if request.agent_csr_pem.is_empty() {
            String::new()
        } else {
            self.sign_agent(&agent, &request.agent_csr_pem, &mesh)?
                .chain_pem
        };
        tracing::info!(%agent, certificates = certificates.len(), "certificates renewed");
        Ok(Response::new(pb::RenewResponse {
            certificates,
            trust_bundle_pem: cas.bundle_pem,
            agent_chain_pem,
        }))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let agent = Self::authenticated(&request)?;
        let request = request.into_inner();
        let (record, scope) = self.enrolled(&agent).await?;
        let mesh = self.mesh(&record.enrollment.mesh).await?;
        // Everything is checked, and every certificate signed, before
        // anything is stored.
        let workloads = check_workloads(
            &request.workloads,
            &scope,
            &record.enrollment.mesh,
            &agent,
            "workloads",
        )?;
        let workloads = Self::without_withdrawn(&agent, &record, workloads);
        let workloads = self.check_owners(&agent, workloads).await?;
        refuse_withdrawn(&agent, &record, &request.certificates, &workloads)?;
        let cas = self.cas.get(&mesh).await.map_err(ca_status)?;
        let certificates =
            self.sign_workloads(&request.certificates, &workloads, &mesh, &cas.signing)?;
        let count = workloads.len();
        self.commit_workloads(&agent, Registrar::Call, workloads)
            .await?;
        tracing::info!(%agent, mesh = %record.enrollment.mesh, workloads = count, certificates = certificates.len(), "workloads registered");
        Ok(Response::new(pb::RenewResponse {
            certificates,
            trust_bundle_pem: cas.bundle_pem,
            agent_chain_pem: String::new(),
        }))
    }

    type StreamStream = Outgoing;

    async fn stream(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let agent = Self::authenticated(&request)?;
        let remote = request.extensions().get::<PeerInfo>().map(|p| p.remote);
        tracing::debug!(%agent, ?remote, "config stream opened");
        // Boxed once here: passed by value down the stream's nested async
        // functions, it would take its room in each of their states.
        let inbound = Box::new(request.into_inner());
        let (outbound, receiver) = mpsc::channel(OUTBOUND_QUEUE);
        let api = self.clone();
        // Registered before the answer goes out (and before the checks, so
        // that a revocation racing the Hello still cuts the stream): an
        // agent that sees its new stream open may end its old one, and that
        // end must find this stream newer.
        let registered = self.cutoff.register(&agent);
        let task = async move {
            if let Err(status) = api.run_stream(&agent, registered, inbound, &outbound).await {
                tracing::info!(%agent, code = ?status.code(), reason = status.message(), "config stream ended with an error");
                // The agent may be gone already.
                let _ = outbound.send(Box::new(Err(status))).await;
            }
        };
        tokio::spawn(task);
        Ok(Response::new(Outgoing(receiver)))
    }
}

impl AgentApi {
    /// One agent's config stream, from its Hello until it, the network or
    /// this replica ends it, or it is cut off. Disconnection is recorded
    /// however it ends.
    async fn run_stream(
        &self,
        agent: &str,
        (cut_id, cut): (u64, CutReceiver),
        inbound: Inbound,
        outbound: &Outbound,
    ) -> Result<(), Status> {
        let outcome = self
            .hello_and_follow(agent, cut_id, cut, inbound, outbound)
            .await;
        self.cutoff.unregister(cut_id);
        outcome
    }

    /// Drops the workloads the operator deleted from a registration (the
    /// agent may still list them), logging each.
    fn without_withdrawn(
        agent: &str,
        record: &weft_store::AgentRecord,
        workloads: Vec<Workload>,
    ) -> Vec<Workload> {
        workloads
            .into_iter()
            .filter(|w| {
                let key = workload_key(&ResourceKey::of(&Resource::Workload(w.clone())));
                let withdrawn = record.withdrawn.contains(&key);
                if withdrawn {
                    tracing::warn!(%agent, workload = %key, "workload deleted by the operator is not registered again (enrol again to serve it)");
                }
                !withdrawn
            })
            .collect()
    }

    /// Checks the owners of a stream's workloads, then records and stores
    /// them as the agent's whole set.
    async fn register_workloads(
        &self,
        agent: &str,
        cut_id: u64,
        workloads: Vec<Workload>,
    ) -> Result<(), Status> {
        let workloads = self.check_owners(agent, workloads).await?;
        self.commit_workloads(agent, Registrar::Stream(cut_id), workloads)
            .await
    }

    /// Records checked workloads for the cut-off, before they are written
    /// (so that the agent's own removals never look like the operator's),
    /// and stores them as the agent's whole set.
    async fn commit_workloads(
        &self,
        agent: &str,
        registrar: Registrar,
        workloads: Vec<Workload>,
    ) -> Result<(), Status> {
        let keys = cut_keys(&workloads);
        match registrar {
            Registrar::Stream(cut_id) => self.cutoff.set_workloads(cut_id, keys),
            // The agent's streams on other replicas learn the new set from
            // the WorkloadUpdate an agent sends on its stream after each
            // Register (node-agent does); until then, a workload this call
            // removed may read there as the operator's deletion.
            Registrar::Call => self.cutoff.set_agent_workloads(agent, keys),
        }
        self.store_workloads(agent, workloads).await
    }

    /// Checks a Hello against the agent's enrolment, registers its
    /// workloads and records the connection: the stream's mesh, workload
    /// scope and own workloads (namespace, name).
    async fn admit(
        &self,
        agent: &str,
        cut_id: u64,
        hello: &pb::Hello,
    ) -> Result<(String, WorkloadScope, Vec<(String, String)>), Status> {
        let (record, scope) = self.enrolled(agent).await?;
        let mesh = record.enrollment.mesh.clone();
        let workloads = check_workloads(&hello.workloads, &scope, &mesh, agent, "hello.workloads")?;
        let workloads = Self::without_withdrawn(agent, &record, workloads);
        let own: Vec<(String, String)> = workloads
            .iter()
            .map(|w| {
                (
                    w.metadata.namespace.clone().unwrap_or_default(),
                    w.metadata.name.clone(),
                )
            })
            .collect();
        self.register_workloads(agent, cut_id, workloads).await?;
        // What the agent does not repeat in its Hello is kept.
        let host = match hello.host.as_ref() {
            Some(host) => host_json(Some(host)),
            None => record.enrollment.host_facts.clone(),
        };
        let hbone = if hello.hbone_address.is_empty() {
            record.enrollment.hbone_address.clone()
        } else {
            hello.hbone_address.clone()
        };
        self.store
            .connect_agent(&self.zone, agent, &self.replica, &hbone, &host)
            .await
            .map_err(store_status)?;
        if record.left.is_some() {
            tracing::info!(%agent, %mesh, "agent returned: back in the endpoint lists");
        }
        tracing::info!(%agent, %mesh, applied = %hello.applied_version, "agent connected");
        Ok((mesh, scope, own))
    }

    async fn hello_and_follow(
        &self,
        agent: &str,
        cut_id: u64,
        cut: CutReceiver,
        mut inbound: Inbound,
        outbound: &Outbound,
    ) -> Result<(), Status> {
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 30 s"))??;
        let hello = match first.and_then(|m| m.message) {
            Some(pb::agent_message::Message::Hello(hello)) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on the stream must be a Hello",
                ))
            }
        };
        if hello.agent_id != agent {
            return Err(Status::permission_denied(format!(
                "hello.agent_id {:?} is not the agent of the client certificate ({agent:?})",
                hello.agent_id
            )));
        }
        // Boxed, as are the other store calls of a stream's task: the task
        // lives as long as the stream, and its size is that of its largest
        // await point (docs/benchmarks.md, memory per agent).
        let (mesh, scope, own) = Box::pin(self.admit(agent, cut_id, &hello)).await?;
        let (id, views) = self.hub.register(agent, &mesh, &own);
        let stream = Stream {
            agent,
            mesh: &mesh,
            scope: &scope,
            cut_id,
            patches: hello
                .features
                .iter()
                .any(|f| f == weft_api::proto::agent::ENDPOINT_PATCHES),
            parts: hello
                .features
                .iter()
                .any(|f| f == weft_api::proto::agent::SERVICE_PARTS),
        };
        // Moved out of a temporary, so that the rest of the Hello is
        // dropped here rather than kept in the task's state for the
        // stream's life.
        let applied = { hello }.applied_version;
        let outcome = self
            .follow(&stream, applied, inbound, outbound, views, cut)
            .await;
        self.hub.unregister(id);
        if self.cutoff.newer_stream(agent, cut_id) {
            // A restart without downtime (the new process connects before
            // the old one leaves) or a reconnection that beat the old
            // stream's end: the agent carries on on its newer stream.
            tracing::info!(%agent, "an older config stream ended; the agent's newer stream carries on");
            return outcome.map(|_| ());
        }
        Box::pin(self.record_end(agent, &outcome)).await;
        outcome.map(|_| ())
    }

    /// Records how a stream ended: the agent left (goodbye, or a
    /// revocation that raced its Hello) or is disconnected.
    async fn record_end(&self, agent: &str, outcome: &Result<StreamEnd, Status>) {
        // A revocation that raced the Hello was undone by its connection:
        // the agent leaves again, with the revocation's reason.
        let revoked = match outcome {
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                Cutoff::refusal(&self.store, &self.zone, agent)
                    .await
                    .ok()
                    .flatten()
            }
            _ => None,
        };
        let recorded = match (outcome, revoked) {
            (Ok(StreamEnd::Goodbye), _) => {
                self.store
                    .leave_agent(
                        &self.zone,
                        agent,
                        &self.replica,
                        "goodbye: the agent closed its stream",
                    )
                    .await
            }
            (_, Some(reason)) => {
                self.store
                    .leave_agent(&self.zone, agent, &self.replica, &reason)
                    .await
            }
            _ => {
                self.store
                    .disconnect_agent(&self.zone, agent, &self.replica)
                    .await
            }
        };
        match (outcome, recorded) {
            (Ok(StreamEnd::Goodbye), Ok(_)) => {
                tracing::info!(%agent, "agent said goodbye: its workloads left the endpoint lists")
            }
            (_, Ok(_)) => tracing::info!(%agent, "agent disconnected"),
            (_, Err(error)) => tracing::warn!(%agent, %error, "cannot record the disconnection"),
        }
    }

    /// The stream after Hello: push views, record acks, nacks and workload
    /// updates, heartbeat; end when cut off.
    async fn follow(
        &self,
        stream: &Stream<'_>,
        applied: String,
        mut inbound: Inbound,
        outbound: &Outbound,
        mut views: crate::hub::ViewReceiver,
        mut cut: CutReceiver,
    ) -> Result<StreamEnd, Status> {
        let agent = stream.agent;
        // No re-check of the token is needed here: the stream was in the
        // cut-off registry before the Hello's checks, so a revocation
        // committed after them reaches `cut`.
        let mut last_sent = applied;
        // When `last_sent` went out, until its answer (the ack latency).
        let mut pushed_at: Option<tokio::time::Instant> = None;
        let _open = self.metrics.stream_opened();
        // The view the agent was last sent and is taken to hold: the base
        // of the next delta (`None`: send the whole view).
        let mut base: Option<crate::views::Sent> = None;
        // The CAs in the bundle of each recently sent version, so that an
        // ack records what the agent trusts now (bounded: acks follow
        // pushes closely).
        let mut sent: VecDeque<(String, Arc<[String]>)> = VecDeque::with_capacity(SENT_KEPT);
        // Whether the version the agent said it had was recorded as acked.
        let mut hello_recorded = false;
        // Until when the answer to the last push is awaited before the next
        // one goes out: one push in flight per stream, so a slow agent gets
        // fewer, coalesced updates (the hub keeps only the newest view)
        // instead of a queue of them in this replica's memory.
        let mut awaiting: Option<tokio::time::Instant> = None;
        let mut stop = self.stop.clone();
        loop {
            if let Some(cut) = cut.borrow_and_update().clone() {
                return Err(cut.status());
            }
            tokio::select! {
                message = inbound.message() => {
                    let message = match message {
                        Ok(Some(message)) => message,
                        Ok(None) => return Ok(StreamEnd::Goodbye),
                        Err(status) => {
                            tracing::debug!(%agent, %status, "agent stream broke");
                            return Ok(StreamEnd::Dropped);
                        }
                    };
                    let answered = match &message.message {
                        Some(pb::agent_message::Message::Ack(ack)) if ack.version == last_sent => Some(true),
                        Some(pb::agent_message::Message::Nack(nack)) if nack.version == last_sent => Some(false),
                        _ => None,
                    };
                    if let Some(acked) = answered {
                        awaiting = None;
                        self.metrics.answered(acked, pushed_at.take().map(|at| at.elapsed()));
                    }
                    let resend = match &message.message {
                        Some(pb::agent_message::Message::Nack(nack)) if nack.version == last_sent => {
                            // What the agent holds is uncertain now: the next
                            // push is whole. A refused delta is answered with
                            // the whole view at once.
                            let was_delta = base.is_some();
                            base = None;
                            was_delta
                        }
                        _ => false,
                    };
                    Box::pin(self.on_message(stream, message, &sent)).await?;
                    if resend {
                        let Some(view) = views.borrow().clone() else { continue };
                        tracing::info!(%agent, version = %view.version, "delta refused; sending the whole view");
                        if !Box::pin(self.push(stream, &view, None, &mut sent, outbound)).await {
                            return Ok(StreamEnd::Dropped);
                        }
                        base = Some(view.sent());
                        last_sent = view.version.clone();
                        pushed_at = Some(tokio::time::Instant::now());
                        awaiting = Some(tokio::time::Instant::now() + ANSWER_WAIT);
                    }
                }
                changed = cut.changed() => {
                    if changed.is_err() {
                        return Ok(StreamEnd::Dropped);
                    }
                }
                () = tokio::time::sleep_until(awaiting.unwrap_or_else(tokio::time::Instant::now)), if awaiting.is_some() => {
                    // No answer in time: push the newest view anyway.
                    awaiting = None;
                }
                changed = views.changed(), if awaiting.is_none() => {
                    if changed.is_err() {
                        return Ok(StreamEnd::Dropped);
                    }
                    let Some(view) = views.borrow_and_update().clone() else { continue };
                    if view.version == last_sent {
                        // It already has this version (from before a
                        // reconnection): record what it trusts once.
                        if !hello_recorded {
                            hello_recorded = true;
                            self.hub.record_ack(agent, &view.version, view.trusted_cas.clone());
                            base = Some(view.sent());
                        }
                        continue;
                    }
                    hello_recorded = true;
                    if !Box::pin(self.push(stream, &view, base.as_ref(), &mut sent, outbound)).await {
                        return Ok(StreamEnd::Dropped);
                    }
                    base = Some(view.sent());
                    last_sent = view.version.clone();
                    pushed_at = Some(tokio::time::Instant::now());
                    awaiting = Some(tokio::time::Instant::now() + ANSWER_WAIT);
                }
                () = outbound.closed() => return Ok(StreamEnd::Dropped),
                _ = stop.changed() => return Ok(StreamEnd::Dropped),
            }
        }
    }

    /// Sends `view` as a delta from `base` (whole without one), in chunks
    /// of bounded size; false once the agent is gone.
    async fn push(
        &self,
        stream: &Stream<'_>,
        view: &crate::views::AgentView,
        base: Option<&crate::views::Sent>,
        sent: &mut VecDeque<(String, Arc<[String]>)>,
        outbound: &Outbound,
    ) -> bool {
        if sent.len() == SENT_KEPT {
            sent.pop_front();
        }
        sent.push_back((view.version.clone(), view.trusted_cas.clone()));
        let agent = stream.agent;
        let mut chunks = 0;
        let mut delta = false;
        let mut updates = view.messages(base, stream.patches).in_parts(stream.parts);
        loop {
            // A chunk is built only once the queue has room for it: while
            // every stream takes a push at once, each holds one chunk
            // queued, not one more waiting for the queue.
            let Ok(slot) = outbound.reserve().await else {
                return false;
            };
            let Some(update) = updates.next() else { break };
            chunks += 1;
            // The first chunk says what was sent: a base no longer kept
            // makes it whole.
            delta |= chunks == 1 && !update.base_version.is_empty();
            slot.send(Box::new(Ok(pb::ZoneMessage {
                message: Some(pb::zone_message::Message::Config(update)),
            })));
        }
        self.metrics.pushed(delta);
        tracing::debug!(%agent, version = %view.version, delta, chunks, "config pushed");
        true
    }

    async fn on_message(
        &self,
        stream: &Stream<'_>,
        message: pb::AgentMessage,
        sent: &VecDeque<(String, Arc<[String]>)>,
    ) -> Result<(), Status> {
        let agent = stream.agent;
        match message.message {
            Some(pb::agent_message::Message::Ack(ack)) => {
                tracing::debug!(%agent, version = %ack.version, "config acked");
                let trusted = sent
                    .iter()
                    .find(|(version, _)| *version == ack.version)
                    .map(|(_, cas)| cas.clone())
                    .unwrap_or_default();
                // Written in batches with other agents' acks.
                self.hub.record_ack(agent, &ack.version, trusted);
                Ok(())
            }
            Some(pb::agent_message::Message::Nack(nack)) => {
                tracing::warn!(%agent, version = %nack.version, reason = %nack.reason, "config refused by the agent");
                self.store
                    .record_nack(&self.zone, agent, &nack.version, &nack.reason)
                    .await
                    .map_err(store_status)
            }
            Some(pb::agent_message::Message::Workloads(update)) => {
                let workloads = check_workloads(
                    &update.workloads,
                    stream.scope,
                    stream.mesh,
                    agent,
                    "workloads.workloads",
                )?;
                let record = self
                    .store
                    .get_agent(&self.zone, agent)
                    .await
                    .map_err(store_status)?
                    .ok_or_else(|| {
                        Status::permission_denied(format!("agent {agent:?} is not enrolled"))
                    })?;
                let workloads = Self::without_withdrawn(agent, &record, workloads);
                self.register_workloads(agent, stream.cut_id, workloads)
                    .await?;
                tracing::info!(%agent, count = update.workloads.len(), "workloads re-registered");
                Ok(())
            }
            Some(pb::agent_message::Message::Host(host)) => self
                .store
                .update_host_facts(&self.zone, agent, &host_json(Some(&host)))
                .await
                .map(|_| ())
                .map_err(store_status),
            Some(pb::agent_message::Message::Hello(_)) => {
                tracing::debug!(%agent, "second Hello ignored");
                Ok(())
            }
            None => Err(Status::invalid_argument("empty agent message")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_paths_become_proto_paths() {
        assert_eq!(proto_path("spec.address"), "address");
        assert_eq!(proto_path("spec.serviceAccount"), "service_account");
        assert_eq!(proto_path("spec.ports[1].port"), "ports[1].port");
        assert_eq!(proto_path("metadata.name"), "name");
    }

    #[test]
    fn bad_workloads_name_their_field() {
        let w = pb::Workload {
            name: "web-1".into(),
            namespace: "default".into(),
            service: "web".into(),
            address: "nope".into(),
            ..Default::default()
        };
        let err = to_resource(&w, 0, "default", "vm-1", "workloads").unwrap_err();
        assert!(
            err.message().starts_with("workloads[0].address"),
            "{}",
            err.message()
        );
        let w = pb::Workload {
            address: "10.0.0.1".into(),
            service: "Not_A_Label".into(),
            ..w
        };
        let err = to_resource(&w, 2, "default", "vm-1", "workloads").unwrap_err();
        assert!(
            err.message().starts_with("workloads[2].service"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn hbone_addresses_are_parsed_and_checked() {
        let w = pb::Workload {
            name: "web-1".into(),
            service: "web".into(),
            address: "10.0.0.1".into(),
            ..Default::default()
        };
        let sidecar = to_resource(&w, 0, "default", "node-1", "workloads").unwrap();
        assert_eq!(sidecar.spec.hbone_address, None);
        let own = pb::Workload {
            hbone_address: "10.0.0.1:15008".into(),
            ..w.clone()
        };
        let own = to_resource(&own, 0, "default", "node-1", "workloads").unwrap();
        assert_eq!(own.spec.hbone_address, "10.0.0.1:15008".parse().ok());
        for (bad, why) in [("10.0.0.1", "is not an ip:port"), ("10.0.0.1:0", "port 0")] {
            let w = pb::Workload {
                hbone_address: bad.into(),
                ..w.clone()
            };
            let err = to_resource(&w, 1, "default", "node-1", "workloads").unwrap_err();
            assert!(
                err.message().starts_with("workloads[1].hbone_address: ")
                    && err.message().contains(why),
                "{}",
                err.message()
            );
        }
    }
}
