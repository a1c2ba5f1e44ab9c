//! A stand-in zone controller for the agent's tests: the real gRPC service
//! (generated server over hyper HTTP/2 and rustls, like the zone's) with a
//! control-plane CA, a mesh CA that signs CSRs, a single-use token, and a
//! script of config updates. Every message the agent sends is handed to the
//! test, which waits on them with deadlines.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer, DnType,
    IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tonic::codegen::async_trait;
use tonic::{Code, Request, Response, Status, Streaming};
use weft_api::proto::agent::v1::agent_service_server::{AgentService, AgentServiceServer};
use weft_api::proto::agent::v1::{
    zone_message, AgentMessage, ConfigUpdate, Endpoint, EnrollRequest, EnrollResponse, InboundRule,
    IssuedCertificate, Port, RenewRequest, RenewResponse, ServiceView, ZoneMessage,
};

pub const TRUST_DOMAIN: &str = "mesh.test";
pub const ZONE: &str = "zone-a";

/// Whether the TLS client presented a certificate (mTLS).
#[derive(Clone, Copy)]
struct ClientCert(bool);

pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.as_ref().pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.as_ref().der().clone()
    }

    pub fn pin(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.der().as_ref());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }

    /// Signs a CSR for `uri`, whatever SAN the CSR asked for (the CA
    /// decides), valid for `life`.
    pub fn sign(&self, csr_pem: &str, uri: &str, life: Duration) -> String {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let now = time_now();
        csr.params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        csr.params.not_before = now - time::Duration::seconds(1);
        csr.params.not_after = now + life;
        let leaf = csr.signed_by(&self.issuer).unwrap();
        format!("{}{}", leaf.pem(), self.pem())
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// What the test tells the zone to do.
pub struct Script {
    pub token: String,
    /// Enroll answers this many UNAVAILABLE before it works.
    pub unavailable_first: usize,
    /// Enroll refuses with this code and message.
    pub refuse: Option<(Code, String)>,
    pub lifetime: Duration,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            token: "token-1".into(),
            unavailable_first: 0,
            refuse: None,
            lifetime: Duration::from_secs(3600),
        }
    }
}

pub struct ZoneState {
    script: Script,
    pub control: Ca,
    pub mesh: Ca,
    pub enroll_calls: AtomicUsize,
    pub enrolled: AtomicUsize,
    pub renewals: AtomicUsize,
    pub streams: AtomicUsize,
    /// Streams the agent ended cleanly (its goodbye).
    pub clean_ends: AtomicUsize,
    token_used: Mutex<bool>,
    /// Updates sent to each new stream, then whatever is broadcast.
    pub initial: Mutex<Vec<ConfigUpdate>>,
    pub push: broadcast::Sender<ConfigUpdate>,
    received: mpsc::UnboundedSender<AgentMessage>,
}

pub struct Zone {
    pub addr: SocketAddr,
    pub state: Arc<ZoneState>,
    pub received: mpsc::UnboundedReceiver<AgentMessage>,
}

struct Service(Arc<ZoneState>);

fn mtls(request_ext: &http::Extensions) -> Result<(), Status> {
    match request_ext.get::<ClientCert>() {
        Some(ClientCert(true)) => Ok(()),
        _ => Err(Status::unauthenticated("a client certificate is required")),
    }
}

#[async_trait]
impl AgentService for Service {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let z = &self.0;
        let call = z.enroll_calls.fetch_add(1, Ordering::SeqCst);
        if call < z.script.unavailable_first {
            return Err(Status::unavailable("starting up"));
        }
        if let Some((code, message)) = &z.script.refuse {
            return Err(Status::new(*code, message.clone()));
        }
        let r = request.into_inner();
        if r.token != z.script.token {
            return Err(Status::unauthenticated("unknown token"));
        }
        {
            let mut used = z.token_used.lock().unwrap();
            if *used {
                return Err(Status::unauthenticated("token already used"));
            }
            *used = true;
        }
        let w = r
            .workloads
            .first()
            .ok_or_else(|| Status::invalid_argument("no workload"))?;
        let workload_id = format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            w.namespace, w.service_account
        );
        let agent_uri = format!(
            "spiffe://{ZONE}.zone.weft/ns/weft-system/sa/{}",
            r.agent_name
        );
        let certificates = r
            .certificates
            .iter()
            .map(|c| IssuedCertificate {
                workload: c.workload.clone(),
                spiffe_id: workload_id.clone(),
                chain_pem: z.mesh.sign(&c.csr_pem, &workload_id, z.script.lifetime),
                not_before_unix: 0,
                not_after_unix: 0,
            })
            .collect();
        z.enrolled.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(EnrollResponse {
            agent_id: r.agent_name.clone(),
            mesh: "default".into(),
            zone: ZONE.into(),
            certificates,
            trust_bundle_pem: z.mesh.pem(),
            agent_chain_pem: z
                .control
                .sign(&r.agent_csr_pem, &agent_uri, z.script.lifetime),
            controller_ca_pem: z.control.pem(),
        }))
    }

    async fn register(
        &self,
        _request: Request<weft_api::proto::agent::v1::RegisterRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        // Node mode is tested against the real zone (tests/tests/node_*.rs).
        Err(Status::unimplemented(
            "the scripted zone serves sidecars only",
        ))
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        mtls(request.extensions())?;
        let z = &self.0;
        let r = request.into_inner();
        let certificates = r
            .certificates
            .iter()
            .map(|c| {
                let id = requested_uri(&c.csr_pem);
                IssuedCertificate {
                    workload: c.workload.clone(),
                    spiffe_id: id.clone(),
                    chain_pem: z.mesh.sign(&c.csr_pem, &id, z.script.lifetime),
                    not_before_unix: 0,
                    not_after_unix: 0,
                }
            })
            .collect();
        let agent_chain_pem = if r.agent_csr_pem.is_empty() {
            String::new()
        } else {
            let id = requested_uri(&r.agent_csr_pem);
            z.control.sign(&r.agent_csr_pem, &id, z.script.lifetime)
        };
        z.renewals.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(RenewResponse {
            certificates,
            trust_bundle_pem: z.mesh.pem(),
            agent_chain_pem,
        }))
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<ZoneMessage, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        mtls(request.extensions())?;
        let z = self.0.clone();
        z.streams.fetch_add(1, Ordering::SeqCst);
        let mut incoming = request.into_inner();
        let received = z.received.clone();
        let zone = z.clone();
        tokio::spawn(async move {
            loop {
                match incoming.message().await {
                    Ok(Some(m)) => {
                        let _ = received.send(m);
                    }
                    Ok(None) => {
                        zone.clean_ends.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
        let initial = z.initial.lock().unwrap().clone();
        let mut pushes = z.push.subscribe();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for u in initial {
                if tx.send(Ok(config(u))).await.is_err() {
                    return;
                }
            }
            while let Ok(u) = pushes.recv().await {
                if tx.send(Ok(config(u))).await.is_err() {
                    return;
                }
            }
        });
        let out =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        Ok(Response::new(Box::pin(out)))
    }
}

fn config(u: ConfigUpdate) -> ZoneMessage {
    ZoneMessage {
        message: Some(zone_message::Message::Config(u)),
    }
}

fn requested_uri(csr_pem: &str) -> String {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
    match csr.params.subject_alt_names.first() {
        Some(SanType::URI(u)) => u.as_str().to_owned(),
        other => panic!("renewal CSR must carry its SPIFFE ID, got {other:?}"),
    }
}

impl Zone {
    pub async fn start(script: Script) -> Zone {
        let control = Ca::new("zone-a control plane");
        let mesh = Ca::new("mesh.test CA");
        // The server certificate: DNS SAN weft-zone, chained to the
        // control-plane CA, sent with the CA (as the pin requires).
        let server_key = KeyPair::generate().unwrap();
        let server_params = CertificateParams::new(vec!["weft-zone".to_owned()]).unwrap();
        let server_cert = server_params
            .signed_by(&server_key, &control.issuer)
            .unwrap();
        let chain = vec![server_cert.der().clone(), control.der()];
        let key = PrivateKeyDer::from_pem_slice(server_key.serialize_pem().as_bytes()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(control.der()).unwrap();
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()
            .unwrap();
        let mut tls = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let (received_tx, received) = mpsc::unbounded_channel();
        let (push, _) = broadcast::channel(16);
        let state = Arc::new(ZoneState {
            script,
            control,
            mesh,
            enroll_calls: AtomicUsize::new(0),
            enrolled: AtomicUsize::new(0),
            renewals: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            clean_ends: AtomicUsize::new(0),
            token_used: Mutex::new(false),
            initial: Mutex::new(Vec::new()),
            push,
            received: received_tx,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = AgentServiceServer::from_arc(Arc::new(Service(state.clone())));
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let svc = svc.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let has_cert = tls.get_ref().1.peer_certificates().is_some();
                    let service = hyper::service::service_fn(
                        move |mut req: http::Request<hyper::body::Incoming>| {
                            let mut svc = svc.clone();
                            req.extensions_mut().insert(ClientCert(has_cert));
                            async move {
                                let resp = tonic::codegen::Service::call(&mut svc, req).await;
                                Ok::<_, Infallible>(resp.unwrap_or_else(|e| match e {}))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Zone {
            addr,
            state,
            received,
        }
    }

    /// Queues `version`, with the mesh CA as its bundle, as the first
    /// update of every stream.
    pub fn serve_initially(&self, version: &str) {
        let bundle = self.state.mesh.pem();
        self.state
            .initial
            .lock()
            .unwrap()
            .push(update(version, &bundle));
    }

    /// Writes, in `dir`, the config of agent vm-1 enrolling here (pinning
    /// this zone's CA) with token `token-1`; returns its path.
    pub fn agent_config(&self, dir: &Path) -> PathBuf {
        agent_config(dir, self.addr, &self.state.control.pin(), "token-1")
    }

    /// The next message from an agent, within a deadline.
    pub async fn next_message(&mut self) -> AgentMessage {
        tokio::time::timeout(Duration::from_secs(10), self.received.recv())
            .await
            .expect("a message from the agent within 10 s")
            .expect("zone channel open")
    }
}

/// A view with one service and one endpoint, at `version`.
pub fn update(version: &str, bundle: &str) -> ConfigUpdate {
    ConfigUpdate {
        version: version.into(),
        trust_bundle_pem: bundle.into(),
        services: vec![ServiceView {
            name: "api".into(),
            namespace: "default".into(),
            zone: ZONE.into(),
            virtual_ip: "10.96.0.10".into(),
            ports: vec![Port {
                port: 8080,
                protocol: 1,
            }],
            endpoints: vec![Endpoint {
                address: "10.0.0.3".into(),
                agent: "10.0.0.3:15008".into(),
                spiffe_id: format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/api"),
                ready: true,
                ..Default::default()
            }],
        }],
        inbound: vec![InboundRule {
            workload: "web".into(),
            allow: vec![format!("spiffe://{TRUST_DOMAIN}/ns/default/*")],
        }],
        mesh: "default".into(),
        zone: ZONE.into(),
        ..Default::default()
    }
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "weft-agent-{}-{name}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An agent config in controller mode against `zone`, written to `dir`.
pub fn agent_config(dir: &Path, zone: SocketAddr, pin: &str, token: &str) -> PathBuf {
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let path = dir.join("agent.yaml");
    let yaml = format!(
        "controller:\n  address: {zone}\n  ca_pin: {pin}\n  token_file: {}\n  state_dir: {}\n  agent_name: vm-1\n\
         workload:\n  name: web\n  service: web\n  address: 127.0.0.1\n  ports: [{{ port: 8080 }}]\n",
        token_file.display(),
        dir.join("state").display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}
