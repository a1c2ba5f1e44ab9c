//! Controller mode: enrol with a bootstrap token, then follow the zone's
//! config stream and renew certificates, keeping everything learnt in the
//! state directory so that the agent restarts and serves while the zone is
//! away.
//!
//! Start-up ([`prepare`]): with a usable persisted certificate the agent
//! serves at once from the persisted view and connects in the background;
//! with none it enrols first. Afterwards ([`Controller::run`]) two loops run
//! for the life of the agent: the config stream (reconnecting with backoff
//! forever) and certificate renewal (at 50-80% of each certificate's life).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::Code;
use tracing::{debug, error, info, warn};
use weft_api::proto::agent::v1::{
    agent_message, zone_message, Ack, AgentMessage, CertificateRequest, ConfigUpdate,
    EnrollRequest, Hello, HostFacts, IssuedCertificate, Nack, PlacedWorkload, Port, RenewRequest,
    Workload, WorkloadUpdate,
};
use weft_api::SpiffeId;

use crate::config::{parse_ca_pin, AgentConfig, ControllerConfig, IdentityFiles};
use crate::credentials::Credentials;
use crate::drain::Drain;
use crate::grpc::{self, ChannelError, ZoneClient};
use crate::metrics::Metrics;
use crate::state::{self, key_and_chain, Enrolment, StateDir, StateError};
use crate::tls::{self, Identity};
use crate::view::{resolve, Chunks, MeshView, SharedView};

/// How long connecting to the zone may take, each stage.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one unary call (Enroll, Renew) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Messages to the zone waiting to be sent (acks are small and rare).
const OUTGOING: usize = 16;
/// How long the zone gets to close its side after the agent said goodbye.
const GOODBYE: Duration = Duration::from_secs(1);
/// The largest message accepted from the zone: a whole view of a big mesh.
const MAX_MESSAGE: usize = 64 << 20;

const CANDIDATE_WORKLOAD: &str = ".candidate-workload.pem";
const CANDIDATE_AGENT: &str = ".candidate-agent.pem";
const CANDIDATE_BUNDLE: &str = ".candidate-bundle.pem";

/// Why the agent could not get or keep its place in the zone.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The zone said no for good: a bad token, a workload outside the
    /// token's scope, a bad request, a missing mesh, or a CA that does not
    /// match the pin.
    #[error("enrolment refused: {0}")]
    Refused(String),
    #[error("controller mode: {0}")]
    Setup(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("the zone answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the zone's answer is unusable: {0}")]
    Answer(String),
}

impl ControllerError {
    fn permanent(&self) -> bool {
        match self {
            ControllerError::Refused(_) | ControllerError::Setup(_) => true,
            ControllerError::Status(s) => matches!(
                s.code(),
                Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::InvalidArgument
                    | Code::FailedPrecondition
            ),
            ControllerError::Channel(ChannelError::Tls { source, .. }) => pin_mismatch(source),
            _ => false,
        }
    }
}

fn pin_mismatch(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| e.to_string().contains("controller.ca_pin"))
}

/// Exponential backoff with jitter, so agents that lost their zone together
/// do not come back together.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The next delay: between the current base and half as much again
    /// (never past the maximum); the base then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self
            .base
            .mul_f64(1.0 + fastrand::f64() * 0.5)
            .min(BACKOFF_MAX);
        self.base = (self.base * 2).min(BACKOFF_MAX);
        delay
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.base = BACKOFF_MIN;
    }
}

/// What the agent starts with in controller mode.
pub struct Startup {
    pub state: StateDir,
    /// A sidecar's workload identity; `None` for a node agent, whose
    /// workloads get theirs as they are enrolled.
    pub files: Option<IdentityFiles>,
    pub view: MeshView,
}

/// What the controller client needs from the workloads the agent carries:
/// a sidecar's one, or a node agent's enrolled ones.
pub trait LocalWorkloads: Send + Sync {
    /// Their registrations, for Hello and WorkloadUpdate.
    fn registrations(&self) -> Vec<Workload>;
    /// The trust bundle (or a certificate) changed on disk: reload them.
    fn reload(&self, why: &'static str);
    /// The workloads the zone placed on this agent (node mode).
    fn placed(&self, placed: Vec<PlacedWorkload>);
}

/// A sidecar's single workload, from its config.
pub struct Sidecar {
    pub config: Arc<AgentConfig>,
    pub credentials: Arc<Credentials>,
    pub metrics: Arc<Metrics>,
}

impl LocalWorkloads for Sidecar {
    fn registrations(&self) -> Vec<Workload> {
        self.config
            .workload
            .as_ref()
            .map(|w| workload_proto(w, String::new()))
            .into_iter()
            .collect()
    }

    fn reload(&self, why: &'static str) {
        match self.credentials.reload() {
            Ok(current) => {
                self.metrics.certificate_expires(current.identity.not_after);
                info!(
                    why,
                    generation = current.generation,
                    not_after_unix = current.identity.not_after,
                    "credentials reloaded"
                );
            }
            Err(e) => {
                error!(why, error = %e, "credentials reload failed, keeping the ones in force")
            }
        }
    }

    fn placed(&self, placed: Vec<PlacedWorkload>) {
        if !placed.is_empty() {
            warn!(
                placed = placed.len(),
                "the zone placed workloads on this agent, but a sidecar serves only its own; run it with mode: node"
            );
        }
    }
}

fn controller_config(config: &AgentConfig) -> Result<&ControllerConfig, ControllerError> {
    config
        .controller
        .as_ref()
        .ok_or_else(|| ControllerError::Setup("no `controller` section".to_owned()))
}

fn workload_name(config: &AgentConfig) -> String {
    config
        .workload
        .as_ref()
        .and_then(|w| w.name.clone())
        .unwrap_or_default()
}

fn sidecar(config: &AgentConfig) -> bool {
    config.mode == crate::config::Mode::Sidecar
}

fn hbone_of(config: &AgentConfig) -> String {
    config
        .hbone_address()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// Gets the agent ready to serve: from the state directory when its
/// certificate is usable, else by renewing (agent certificate still valid)
/// or enrolling (nothing usable: a token is needed).
pub async fn prepare(config: &AgentConfig) -> Result<Startup, ControllerError> {
    let c = controller_config(config)?;
    let state = StateDir::open(&c.state_dir)?;
    match state.enrolment()? {
        None => {
            info!(zone = ?c.address, agent = %config.agent_name(), "no enrolment in the state directory, enrolling");
            enrol(config, &state).await?;
        }
        Some(enrolment) if !sidecar(config) => {
            if state.validity(state::AGENT)?.usable() {
                info!(agent_id = %enrolment.agent_id, "serving from the persisted state");
            } else {
                info!(agent_id = %enrolment.agent_id, "the persisted agent certificate expired, enrolling again");
                enrol(config, &state).await?;
            }
        }
        Some(enrolment) => {
            let workload = state.validity(state::WORKLOAD)?;
            let agent = state.validity(state::AGENT)?;
            if workload.usable() {
                Identity::load_files(&state.workload_files())
                    .map_err(|e| state.corrupt(state::WORKLOAD, e.to_string()))?;
                info!(agent_id = %enrolment.agent_id, not_after_unix = workload.not_after, "serving from the persisted state");
            } else if agent.usable() {
                info!(agent_id = %enrolment.agent_id, "the persisted workload certificate expired, renewing before serving");
                renew_until_done(config, &state).await?;
            } else {
                info!(agent_id = %enrolment.agent_id, "the persisted certificates expired, enrolling again");
                enrol(config, &state).await?;
            }
        }
    }
    let view = match state.config()? {
        Some(update) => MeshView::from_update(&update)
            .map_err(|e| state.corrupt(state::CONFIG, e.to_string()))?,
        None => MeshView::default(),
    };
    Ok(Startup {
        files: sidecar(config).then(|| state.workload_files()),
        view,
        state,
    })
}

async fn renew_until_done(config: &AgentConfig, state: &StateDir) -> Result<(), ControllerError> {
    let mut backoff = Backoff::default();
    loop {
        match renew(config, state).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "certificate renewal failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The workload as the zone registers it; `hbone_address` is set for a
/// node agent's workload (its own listener).
pub fn workload_proto(w: &crate::config::WorkloadConfig, hbone_address: String) -> Workload {
    Workload {
        name: w.name.clone().unwrap_or_default(),
        namespace: w.namespace.clone(),
        service: w.service.clone().unwrap_or_default(),
        service_account: w.service_account.clone(),
        address: w.address.to_string(),
        ports: w
            .ports
            .iter()
            .map(|p| Port {
                port: u32::from(p.port),
                protocol: match p.protocol {
                    weft_api::Protocol::Tcp => 0,
                    weft_api::Protocol::Http => 1,
                    weft_api::Protocol::Detect => 2,
                },
            })
            .collect(),
        labels: w.labels.clone().into_iter().collect(),
        hbone_address,
    }
}

/// What `weftctl inspect agents` shows about this host.
pub fn host_facts() -> HostFacts {
    use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System};
    let mut sys = System::new();
    sys.refresh_memory();
    let pid = sysinfo::get_current_pid().ok();
    let (rss, cpu) = match pid {
        Some(pid) => {
            sys.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                true,
                ProcessRefreshKind::nothing().with_memory().with_cpu(),
            );
            sys.process(pid)
                .map(|p| (p.memory(), p.accumulated_cpu_time() as f64 / 1000.0))
                .unwrap_or_default()
        }
        None => (0, 0.0),
    };
    HostFacts {
        hostname: System::host_name().unwrap_or_default(),
        os: System::long_os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: sys.total_memory(),
        agent_rss_bytes: rss,
        agent_cpu_seconds: cpu,
    }
}

pub(crate) fn new_key() -> Result<KeyPair, ControllerError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ControllerError::Setup(format!("cannot generate a key: {e}")))
}

/// A CSR for `key`; with `id` as its only URI SAN when the identity is
/// known (renewal), with none at enrolment, where the CA decides.
pub fn csr_pem(key: &KeyPair, id: Option<&SpiffeId>) -> Result<String, ControllerError> {
    let fail = |e: rcgen::Error| ControllerError::Setup(format!("cannot make a CSR: {e}"));
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = id {
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().map_err(fail)?)];
    }
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(fail)
}

async fn pinned_client(c: &ControllerConfig) -> Result<ZoneClient, ControllerError> {
    let pin = c.ca_pin.as_deref().ok_or_else(|| {
        ControllerError::Setup(
            "controller.ca_pin is needed to enrol (the state directory holds no usable identity)"
                .to_owned(),
        )
    })?;
    let pin =
        parse_ca_pin(pin).map_err(|e| ControllerError::Setup(format!("controller.ca_pin: {e}")))?;
    let tls = grpc::pinned_config(pin)?;
    Ok(limits(
        grpc::connect_any(&c.address, &c.server_name, tls, CONNECT_TIMEOUT).await?,
    ))
}

fn limits(client: ZoneClient) -> ZoneClient {
    client
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn read_token(c: &ControllerConfig) -> Result<String, ControllerError> {
    let path = c.token_file.as_ref().ok_or_else(|| {
        ControllerError::Setup(
            "controller.token_file is needed to enrol (the state directory holds no usable identity)"
                .to_owned(),
        )
    })?;
    let token = std::fs::read_to_string(path).map_err(|e| {
        ControllerError::Setup(format!(
            "controller.token_file: cannot read {}: {e}",
            path.display()
        ))
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(ControllerError::Setup(format!(
            "controller.token_file: {} is empty",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

/// Enrols with the token: the zone signs the CSRs; the keys stay here. A
/// refusal is final; an unreachable zone is retried with backoff.
pub async fn enrol(config: &AgentConfig, state: &StateDir) -> Result<Enrolment, ControllerError> {
    let c = controller_config(config)?;
    let token = read_token(c)?;
    let pin = c
        .ca_pin
        .as_deref()
        .map(parse_ca_pin)
        .transpose()
        .map_err(|e| ControllerError::Setup(format!("controller.ca_pin: {e}")))?;
    let name = workload_name(config);
    let workload_key = new_key()?;
    let agent_key = new_key()?;
    // A node agent enrols with no workload: each gets its certificate as
    // it is enrolled (Register).
    let (workloads, certificates) = match &config.workload {
        Some(w) if sidecar(config) => (
            vec![workload_proto(w, String::new())],
            vec![CertificateRequest {
                workload: name.clone(),
                csr_pem: csr_pem(&workload_key, None)?,
            }],
        ),
        _ => (Vec::new(), Vec::new()),
    };
    let request = EnrollRequest {
        token,
        agent_name: config.agent_name(),
        workloads,
        certificates,
        host: Some(host_facts()),
        agent_csr_pem: csr_pem(&agent_key, None)?,
        hbone_address: hbone_of(config),
    };
    let mut backoff = Backoff::default();
    let response = loop {
        let attempt = async {
            let mut client = pinned_client(c).await?;
            let call = tokio::time::timeout(CALL_TIMEOUT, client.enroll(request.clone()));
            match call.await {
                Ok(r) => Ok(r?.into_inner()),
                Err(_) => Err(ControllerError::Status(tonic::Status::deadline_exceeded(
                    "Enroll took too long",
                ))),
            }
        };
        match attempt.await {
            Ok(response) => break response,
            // At enrolment, a name or workload that another agent holds is
            // for the operator to sort out, not for retries.
            Err(ControllerError::Status(s))
                if s.code() == Code::AlreadyExists
                    || ControllerError::Status(s.clone()).permanent() =>
            {
                return Err(ControllerError::Refused(format!(
                    "{}: {}",
                    s.code(),
                    s.message()
                )))
            }
            Err(e) if e.permanent() => {
                return Err(match e {
                    ControllerError::Channel(c) => ControllerError::Refused(c.to_string()),
                    other => other,
                })
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(zone = ?c.address, error = %e, retry_in = ?delay, "enrolment failed, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    };

    // The zone's CA is the one pinned.
    let ca = first_cert(&response.controller_ca_pem)
        .map_err(|e| ControllerError::Refused(format!("controller_ca_pem: {e}")))?;
    if let Some(pin) = pin {
        if grpc::fingerprint(ca.as_ref()) != pin {
            return Err(ControllerError::Refused(format!(
                "the zone's control-plane CA ({}) does not match controller.ca_pin",
                grpc::pin_string(&grpc::fingerprint(ca.as_ref()))
            )));
        }
    }
    state.write(state::CONTROLLER_CA, response.controller_ca_pem.as_bytes())?;
    let identity = if sidecar(config) {
        let issued = issued_for(&response.certificates, &name).map_err(ControllerError::Refused)?;
        install_workload(
            state,
            &key_and_chain(&workload_key.serialize_pem(), &issued.chain_pem),
            Some(&response.trust_bundle_pem),
        )
        .map_err(ControllerError::Refused)?;
        issued.spiffe_id.clone()
    } else {
        crate::view::check_bundle(&response.trust_bundle_pem)
            .map_err(|e| ControllerError::Refused(e.to_string()))?;
        state.write(state::BUNDLE, response.trust_bundle_pem.as_bytes())?;
        String::new()
    };
    install_agent(
        state,
        &key_and_chain(&agent_key.serialize_pem(), &response.agent_chain_pem),
    )
    .map_err(ControllerError::Refused)?;
    let enrolment = Enrolment {
        agent_id: response.agent_id.clone(),
        mesh: response.mesh.clone(),
        zone: response.zone.clone(),
        enrolled_at_unix: state::now_unix(),
    };
    state.save_enrolment(&enrolment)?;
    info!(
        agent_id = %enrolment.agent_id,
        mesh = %enrolment.mesh,
        zone = %enrolment.zone,
        identity = %identity,
        "enrolled"
    );
    Ok(enrolment)
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or("holds no PEM certificate")?
        .map_err(|e| format!("not PEM: {e}"))
}

pub(crate) fn issued_for<'a>(
    certificates: &'a [IssuedCertificate],
    workload: &str,
) -> Result<&'a IssuedCertificate, String> {
    certificates
        .iter()
        .find(|c| c.workload == workload)
        .ok_or_else(|| format!("the zone issued no certificate for workload {workload:?}"))
}

/// Checks a new workload key and chain (and bundle, if given) together and
/// only then puts them in place, so the state never holds a pair that does
/// not load.
fn install_workload(
    state: &StateDir,
    key_and_chain: &str,
    bundle: Option<&str>,
) -> Result<(), String> {
    install_workload_as(state, state::WORKLOAD, key_and_chain, bundle)
}

/// [`install_workload`] into state file `target` (a node agent keeps one
/// per workload).
pub(crate) fn install_workload_as(
    state: &StateDir,
    target: &str,
    key_and_chain: &str,
    bundle: Option<&str>,
) -> Result<(), String> {
    let io = |e: StateError| e.to_string();
    state
        .write(CANDIDATE_WORKLOAD, key_and_chain.as_bytes())
        .map_err(io)?;
    let bundle_name = match bundle.filter(|b| !b.trim().is_empty()) {
        Some(b) => {
            state.write(CANDIDATE_BUNDLE, b.as_bytes()).map_err(io)?;
            CANDIDATE_BUNDLE
        }
        None => state::BUNDLE,
    };
    let files = IdentityFiles {
        cert: state.path(CANDIDATE_WORKLOAD),
        key: state.path(CANDIDATE_WORKLOAD),
        trust_bundle: state.path(bundle_name),
    };
    Identity::load_files(&files)
        .map_err(|e| format!("the workload certificate is unusable: {e}"))?;
    if bundle_name == CANDIDATE_BUNDLE {
        state.promote(CANDIDATE_BUNDLE, state::BUNDLE).map_err(io)?;
    }
    state.promote(CANDIDATE_WORKLOAD, target).map_err(io)
}

fn install_agent(state: &StateDir, key_and_chain: &str) -> Result<(), String> {
    let io = |e: StateError| e.to_string();
    state
        .write(CANDIDATE_AGENT, key_and_chain.as_bytes())
        .map_err(io)?;
    let files = IdentityFiles {
        cert: state.path(CANDIDATE_AGENT),
        key: state.path(CANDIDATE_AGENT),
        trust_bundle: state.path(state::CONTROLLER_CA),
    };
    Identity::load_files(&files)
        .map_err(|e| format!("the agent's control-plane certificate is unusable: {e}"))?;
    state.promote(CANDIDATE_AGENT, state::AGENT).map_err(io)
}

/// How long one unary call to the zone may take.
pub(crate) const UNARY_TIMEOUT: Duration = CALL_TIMEOUT;

/// The mTLS client configuration of the agent's control-plane identity.
fn agent_tls(state: &StateDir) -> Result<Arc<rustls::ClientConfig>, ControllerError> {
    let agent = Identity::load_files(&state.agent_files())
        .map_err(|e| state.corrupt(state::AGENT, e.to_string()))?;
    let ca = first_cert(&String::from_utf8_lossy(
        &state.read_required(state::CONTROLLER_CA)?,
    ))
    .map_err(|e| state.corrupt(state::CONTROLLER_CA, e))?;
    Ok(grpc::mtls_config(ca, agent.chain().to_vec(), agent.key())?)
}

pub(crate) async fn agent_client(
    config: &AgentConfig,
    state: &StateDir,
) -> Result<ZoneClient, ControllerError> {
    let c = controller_config(config)?;
    let tls = agent_tls(state)?;
    Ok(limits(
        grpc::connect_any(&c.address, &c.server_name, tls, CONNECT_TIMEOUT).await?,
    ))
}

pub(crate) fn leaf_id(state: &StateDir, name: &str) -> Result<SpiffeId, ControllerError> {
    let pem = state.read_required(name)?;
    let leaf = first_cert(&String::from_utf8_lossy(&pem)).map_err(|e| state.corrupt(name, e))?;
    tls::spiffe_id_of(&leaf).map_err(|e| ControllerError::State(state.corrupt(name, e)))
}

/// New certificates from the zone, not yet in place.
pub struct Renewed {
    /// A sidecar's workload key and chain, its identity and expiry.
    workload: Option<(String, SpiffeId, i64)>,
    bundle: String,
    agent: Option<String>,
}

/// Asks for new certificates with fresh keys (mTLS with the agent's current
/// certificate).
pub async fn fetch_renewal(
    config: &AgentConfig,
    state: &StateDir,
) -> Result<Renewed, ControllerError> {
    let name = workload_name(config);
    let agent_id = leaf_id(state, state::AGENT)?;
    let workload_key = new_key()?;
    let agent_key = new_key()?;
    let workload_id = if sidecar(config) {
        Some(leaf_id(state, state::WORKLOAD)?)
    } else {
        None
    };
    let certificates = match &workload_id {
        Some(id) => vec![CertificateRequest {
            workload: name.clone(),
            csr_pem: csr_pem(&workload_key, Some(id))?,
        }],
        None => Vec::new(),
    };
    let request = RenewRequest {
        certificates,
        agent_csr_pem: csr_pem(&agent_key, Some(&agent_id))?,
    };
    let mut client = agent_client(config, state).await?;
    let response = tokio::time::timeout(CALL_TIMEOUT, client.renew(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("Renew took too long"))??
        .into_inner();
    let workload = match workload_id {
        Some(id) => {
            let issued =
                issued_for(&response.certificates, &name).map_err(ControllerError::Answer)?;
            Some((
                key_and_chain(&workload_key.serialize_pem(), &issued.chain_pem),
                id,
                issued.not_after_unix,
            ))
        }
        None => None,
    };
    Ok(Renewed {
        workload,
        bundle: response.trust_bundle_pem,
        agent: (!response.agent_chain_pem.trim().is_empty())
            .then(|| key_and_chain(&agent_key.serialize_pem(), &response.agent_chain_pem)),
    })
}

/// Checks renewed certificates and puts them in place; the caller reloads
/// the credentials.
pub fn install_renewal(state: &StateDir, renewed: &Renewed) -> Result<(), ControllerError> {
    match &renewed.workload {
        Some((key_and_chain, identity, not_after)) => {
            install_workload(state, key_and_chain, Some(&renewed.bundle))
                .map_err(ControllerError::Answer)?;
            info!(identity = %identity, not_after_unix = not_after, "workload certificate renewed");
        }
        None => {
            crate::view::check_bundle(&renewed.bundle)
                .map_err(|e| ControllerError::Answer(e.to_string()))?;
            state.write(state::BUNDLE, renewed.bundle.as_bytes())?;
        }
    }
    if let Some(agent) = &renewed.agent {
        install_agent(state, agent).map_err(ControllerError::Answer)?;
        info!("agent certificate renewed");
    }
    Ok(())
}

/// Renews and installs, for start-up (nothing is serving yet).
pub async fn renew(config: &AgentConfig, state: &StateDir) -> Result<(), ControllerError> {
    let renewed = fetch_renewal(config, state).await?;
    install_renewal(state, &renewed)
}

/// The last update the agent refused, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub version: String,
    pub reason: String,
}

/// What `/config_dump` shows about the controller.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub address: String,
    pub connected: bool,
    pub applied_version: String,
    pub last_nack: Option<Refusal>,
    pub last_error: Option<String>,
    pub agent_id: String,
    pub mesh: String,
    pub zone: String,
    pub workload_certificate_not_after_unix: i64,
    pub agent_certificate_not_after_unix: i64,
    pub renewals: u64,
    pub last_renewal_error: Option<String>,
}

/// The running controller client: config stream and renewal.
pub struct Controller {
    config: Arc<AgentConfig>,
    state: StateDir,
    locals: Arc<dyn LocalWorkloads>,
    /// The open stream's sender, for WorkloadUpdates between Hellos; weak,
    /// so that dropping the session's sender still ends the stream.
    outgoing: Mutex<Option<mpsc::WeakSender<AgentMessage>>>,
    view: SharedView,
    metrics: Arc<Metrics>,
    status: Mutex<Status>,
    /// Serializes changes to the state files and the credentials built
    /// from them (an update's bundle and a renewal's certificate).
    files: Mutex<()>,
    /// Set once the config stream is closed for good (draining).
    closed: tokio::sync::watch::Sender<bool>,
}

impl Controller {
    /// The controller client over an agent that is already serving.
    pub fn new(
        config: Arc<AgentConfig>,
        state: StateDir,
        locals: Arc<dyn LocalWorkloads>,
        view: SharedView,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let mut status = Status {
            address: config
                .controller
                .as_ref()
                .map(|c| c.address.join(","))
                .unwrap_or_default(),
            applied_version: view.load().version.clone(),
            ..Status::default()
        };
        if let Ok(Some(e)) = state.enrolment() {
            status.agent_id = e.agent_id;
            status.mesh = e.mesh;
            status.zone = e.zone;
        }
        let this = Arc::new(Controller {
            config,
            state,
            locals,
            outgoing: Mutex::new(None),
            view,
            metrics,
            status: Mutex::new(status),
            files: Mutex::new(()),
            closed: tokio::sync::watch::Sender::new(false),
        });
        this.refresh_expiry();
        this
    }

    fn status_mut(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot for the admin endpoint.
    pub fn status(&self) -> Status {
        self.status_mut().clone()
    }

    /// Waits until the config stream is closed for good after draining
    /// began (bounded by the caller), so the goodbye reaches the zone
    /// before the process exits.
    pub async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    fn set_connected(&self) {
        let mut s = self.status_mut();
        s.connected = true;
        s.last_error = None;
        info!(zone = %s.address, "config stream connected");
        self.metrics.controller_connected(true);
    }

    fn set_disconnected(&self, error: String) {
        let mut s = self.status_mut();
        s.connected = false;
        s.last_error = Some(error);
    }

    fn renewed(&self, error: Option<String>) {
        let mut s = self.status_mut();
        if error.is_none() {
            s.renewals += 1;
        }
        s.last_renewal_error = error;
    }

    fn refresh_expiry(&self) {
        let workload = self.state.validity(state::WORKLOAD).ok();
        let agent = self.state.validity(state::AGENT).ok();
        let mut s = self.status_mut();
        if let Some(w) = workload {
            s.workload_certificate_not_after_unix = w.not_after;
        }
        if let Some(a) = agent {
            s.agent_certificate_not_after_unix = a.not_after;
        }
    }

    /// Runs the config stream and renewal for the life of the agent. When
    /// draining begins the stream is closed (cleanly, so the zone takes this
    /// agent's workloads out of service at once) and not reopened.
    pub async fn run(self: Arc<Self>, drain: Drain) {
        tokio::join!(self.clone().stream_forever(drain), self.renew_forever());
    }

    async fn stream_forever(self: Arc<Self>, drain: Drain) {
        let mut backoff = Backoff::default();
        loop {
            let result = self.session(&mut backoff, &drain).await;
            if drain.is_draining() {
                self.metrics.controller_connected(false);
                self.set_disconnected("draining".to_owned());
                info!("draining: config stream closed");
                self.closed.send_replace(true);
                return;
            }
            self.metrics.controller_connected(false);
            let delay = backoff.next_delay();
            let error = match result {
                Ok(()) => {
                    info!(retry_in = ?delay, "config stream closed by the zone, reconnecting");
                    "stream closed by the zone".to_owned()
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?delay, "config stream failed, reconnecting");
                    e.to_string()
                }
            };
            self.set_disconnected(error);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = drain.signaled() => {
                    self.closed.send_replace(true);
                    return;
                }
            }
        }
    }

    /// The name the zone knows this agent by: the one in its control-plane
    /// certificate (a renamed host keeps the name it enrolled with).
    fn agent_name(&self) -> String {
        leaf_id(&self.state, state::AGENT)
            .map(|id| id.service_account().to_owned())
            .unwrap_or_else(|_| self.config.agent_name())
    }

    fn hello(&self) -> AgentMessage {
        AgentMessage {
            message: Some(agent_message::Message::Hello(Hello {
                agent_id: self.agent_name(),
                applied_version: self.view.load().version.clone(),
                workloads: self.locals.registrations(),
                host: Some(host_facts()),
                hbone_address: hbone_of(&self.config),
                features: vec![
                    weft_api::proto::agent::ENDPOINT_PATCHES.to_owned(),
                    weft_api::proto::agent::SERVICE_PARTS.to_owned(),
                ],
            })),
        }
    }

    /// One connection's worth of config stream: Hello, then an answer to
    /// every update, until the stream ends.
    async fn session(
        self: &Arc<Self>,
        backoff: &mut Backoff,
        drain: &Drain,
    ) -> Result<(), ControllerError> {
        let mut client = agent_client(&self.config, &self.state).await?;
        let (tx, rx) = mpsc::channel::<AgentMessage>(OUTGOING);
        // The receiver is only dropped with the request stream, which ends
        // this session anyway.
        let _ = tx.send(self.hello()).await;
        *self.outgoing.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.downgrade());
        let outgoing = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let mut incoming = client.stream(outgoing).await?.into_inner();
        self.set_connected();
        backoff.reset();
        let drained = drain.signaled();
        tokio::pin!(drained);
        let mut chunks = Chunks::default();
        let period = self
            .config
            .controller
            .as_ref()
            .map_or(Duration::from_secs(60), |c| c.host_facts_period);
        let mut facts = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        facts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                m = incoming.message() => m?,
                _ = facts.tick() => {
                    // Reading /proc is blocking work, however small.
                    if let Ok(host) = tokio::task::spawn_blocking(host_facts).await {
                        let report = AgentMessage { message: Some(agent_message::Message::Host(host)) };
                        if tx.try_send(report).is_err() {
                            debug!("the config stream is busy; host facts go with the next report");
                        }
                    }
                    continue;
                }
                _ = &mut drained => {
                    // Ending our side is the clean goodbye; give the zone a
                    // moment to end its own.
                    drop(tx);
                    let _ = tokio::time::timeout(GOODBYE, async {
                        while let Ok(Some(_)) = incoming.message().await {}
                    })
                    .await;
                    return Ok(());
                }
            };
            let Some(message) = message else {
                return Ok(());
            };
            match message.message {
                Some(zone_message::Message::Config(chunk)) => {
                    let version = chunk.version.clone();
                    // Only the last chunk of a version is applied and answered.
                    let answer = match chunks.push(chunk) {
                        Ok(None) => continue,
                        // Checking, persisting (fsync) and compiling a
                        // view is blocking work: off the runtime thread,
                        // which carries every workload's traffic.
                        Ok(Some(update)) => {
                            let this = self.clone();
                            match tokio::task::spawn_blocking(move || this.answer(update)).await {
                                Ok(answer) => answer,
                                Err(e) => {
                                    self.refuse(version, format!("applying the update failed: {e}"))
                                }
                            }
                        }
                        Err(error) => self.refuse(version, error.to_string()),
                    };
                    if tx.send(answer).await.is_err() {
                        return Ok(());
                    }
                }
                None => debug!("empty message from the zone, ignored"),
            }
        }
    }

    /// Tells the zone the agent's workloads changed (node mode: one was
    /// enrolled or unenrolled), on the open stream; a stream opened later
    /// says it in its Hello.
    pub fn workloads_changed(&self) {
        let tx = self
            .outgoing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(tx) = tx.and_then(|tx| tx.upgrade()) else {
            return;
        };
        let update = AgentMessage {
            message: Some(agent_message::Message::Workloads(WorkloadUpdate {
                workloads: self.locals.registrations(),
            })),
        };
        if tx.try_send(update).is_err() {
            warn!("the config stream is busy or closed; the zone learns the workloads at the next Hello");
        }
    }

    /// Applies an update (whole, or a delta on the view in force) and says
    /// how it went, for the zone.
    fn answer(&self, update: ConfigUpdate) -> AgentMessage {
        let version = update.version.clone();
        let services = update.services.len();
        let patched = update.patched_services.len();
        let delta = !update.base_version.is_empty();
        match self.apply(update) {
            Ok(()) => {
                self.metrics.config_update(true);
                info!(version = %version, services, patched, delta, "config applied");
                self.status_mut().applied_version = version.clone();
                AgentMessage {
                    message: Some(agent_message::Message::Ack(Ack { version })),
                }
            }
            Err(reason) => self.refuse(version, reason),
        }
    }

    /// The Nack for an update that is not applied, recorded for the admin.
    fn refuse(&self, version: String, reason: String) -> AgentMessage {
        self.metrics.config_update(false);
        warn!(version = %version, reason = %reason, "config refused, keeping the last good one");
        self.status_mut().last_nack = Some(Refusal {
            version: version.clone(),
            reason: reason.clone(),
        });
        AgentMessage {
            message: Some(agent_message::Message::Nack(Nack { version, reason })),
        }
    }

    /// Checks an update whole (a delta once applied on the persisted view,
    /// which must be its base), persists the resulting whole view, then
    /// puts it in force: the view and, when the bundle changed, the
    /// credentials. On error nothing changed, and the reason names the
    /// field.
    pub fn apply(&self, update: ConfigUpdate) -> Result<(), String> {
        let _files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let update = if update.base_version.is_empty() {
            update
        } else {
            let current = self.state.config().map_err(|e| e.to_string())?;
            let serving = self.view.load();
            // The persisted view is the base only if it is the one in force.
            let current = current.filter(|c| c.version == serving.version);
            resolve(current.as_ref(), update).map_err(|e| e.to_string())?
        };
        let view = MeshView::from_update(&update).map_err(|e| e.to_string())?;
        // A delta that left the bundle out (unchanged) carries the current
        // one once resolved, so it does not count as a change here.
        let current = self.state.read(state::BUNDLE).map_err(|e| e.to_string())?;
        let bundle_changed = current.as_deref() != Some(update.trust_bundle_pem.as_bytes());
        // A sidecar checks its own certificate against the new bundle; a
        // node agent's view was already checked to hold one.
        if bundle_changed && sidecar(&self.config) {
            self.state
                .write(CANDIDATE_BUNDLE, update.trust_bundle_pem.as_bytes())
                .map_err(|e| e.to_string())?;
            let files = IdentityFiles {
                trust_bundle: self.state.path(CANDIDATE_BUNDLE),
                ..self.state.workload_files()
            };
            Identity::load_files(&files).map_err(|e| {
                format!("trust_bundle_pem: the agent's own workload certificate does not verify with it: {e}")
            })?;
        }
        self.state
            .save_config(&update)
            .map_err(|e| format!("persisting the update: {e}"))?;
        if bundle_changed {
            if !sidecar(&self.config) {
                self.state
                    .write(CANDIDATE_BUNDLE, update.trust_bundle_pem.as_bytes())
                    .map_err(|e| e.to_string())?;
            }
            self.state
                .promote(CANDIDATE_BUNDLE, state::BUNDLE)
                .map_err(|e| format!("persisting the trust bundle: {e}"))?;
            self.locals.reload("trust bundle changed");
        }
        self.view.store(Arc::new(view));
        self.locals.placed(update.placed);
        Ok(())
    }

    /// When the next renewal is due: the earlier of the two certificates'
    /// renewal times, with fresh jitter.
    fn next_renewal(&self) -> Result<i64, StateError> {
        let agent = self.state.validity(state::AGENT)?;
        let jitter = fastrand::f64();
        let at = weft_pki::renewal_at(agent.not_before, agent.not_after, jitter);
        if !sidecar(&self.config) {
            // A node agent's workloads renew on their own schedules.
            return Ok(at);
        }
        let workload = self.state.validity(state::WORKLOAD)?;
        Ok(weft_pki::renewal_at(workload.not_before, workload.not_after, jitter).min(at))
    }

    /// The backoff delay, but never more than a quarter of the workload
    /// certificate's remaining life: a short-lived certificate gets several
    /// more tries before it expires.
    fn renewal_retry(&self, backoff: &mut Backoff) -> Duration {
        let delay = backoff.next_delay();
        let which = if sidecar(&self.config) {
            state::WORKLOAD
        } else {
            state::AGENT
        };
        let left = self
            .state
            .validity(which)
            .map(|v| (v.not_after - state::now_unix()).max(0) as u64)
            .unwrap_or(0);
        delay.min(Duration::from_secs(left / 4).max(BACKOFF_MIN))
    }

    async fn renew_forever(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        loop {
            let due = match self.next_renewal() {
                Ok(at) => at,
                Err(e) => {
                    error!(error = %e, "cannot tell when to renew; retrying");
                    tokio::time::sleep(BACKOFF_MAX).await;
                    continue;
                }
            };
            let wait = (due - state::now_unix()).max(0) as u64;
            debug!(
                due_unix = due,
                in_seconds = wait,
                "next certificate renewal"
            );
            tokio::time::sleep(Duration::from_secs(wait)).await;
            loop {
                let result = match fetch_renewal(&self.config, &self.state).await {
                    Ok(renewed) => {
                        let _files = self.files.lock().unwrap_or_else(|p| p.into_inner());
                        let installed = install_renewal(&self.state, &renewed);
                        if installed.is_ok() {
                            self.locals.reload("certificate renewed");
                        }
                        installed
                    }
                    Err(e) => Err(e),
                };
                self.metrics.certificate_renewal(result.is_ok());
                match result {
                    Ok(()) => {
                        self.refresh_expiry();
                        self.renewed(None);
                        backoff.reset();
                        break;
                    }
                    Err(e) => {
                        let delay = self.renewal_retry(&mut backoff);
                        warn!(error = %e, retry_in = ?delay, "certificate renewal failed, keeping the current certificate");
                        self.renewed(Some(e.to_string()));
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }
}
