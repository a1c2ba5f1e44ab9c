//! A simulated agent: enrols with a token (fresh keys, CSRs), then holds a
//! config stream over mTLS with its control-plane certificate, as the real
//! agent does, and acks every update once its last chunk is in.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_agent::grpc;
use weft_api::proto::agent::v1 as pb;
use weft_pki::WorkloadKey;

/// How long one connection step may take.
const STEP: Duration = Duration::from_secs(60);

/// The zone as agents reach it.
#[derive(Clone)]
pub struct Target {
    /// The agent gRPC address.
    pub grpc: SocketAddr,
    /// The zone CA's SHA-256 (the pin).
    pub pin: [u8; 32],
}

/// An enrolled agent, ready to open its stream.
pub struct Enrolled {
    /// Its name (also its workload's).
    pub name: String,
    workload: pb::Workload,
    tls: Arc<rustls::ClientConfig>,
}

/// The workload of agent number `i`: `<name>`, in service
/// `sim-svc-<i mod services>`, on a distinct 10.x address.
pub fn workload(name: &str, i: u32, services: u32) -> pb::Workload {
    let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i);
    pb::Workload {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        service: format!("sim-svc-{}", i % services.max(1)),
        service_account: "sim".to_owned(),
        address: address.to_string(),
        ports: vec![pb::Port {
            port: 8080,
            protocol: pb::Protocol::Http as i32,
        }],
        labels: Default::default(),
        hbone_address: String::new(),
    }
}

/// Enrols agent `name` fronting `workload` with `token`.
pub async fn enrol(
    target: &Target,
    token: &str,
    name: &str,
    workload: pb::Workload,
) -> anyhow::Result<Enrolled> {
    let agent_key = WorkloadKey::generate()?;
    let workload_key = WorkloadKey::generate()?;
    let request = pb::EnrollRequest {
        token: token.to_owned(),
        agent_name: name.to_owned(),
        workloads: vec![workload.clone()],
        certificates: vec![pb::CertificateRequest {
            workload: workload.name.clone(),
            csr_pem: workload_key.bare_csr()?,
        }],
        host: None,
        agent_csr_pem: agent_key.bare_csr()?,
        hbone_address: format!("{}:15008", workload.address),
    };
    let mut client = grpc::connect(
        &target.grpc.to_string(),
        "weft-zone",
        grpc::pinned_config(target.pin)?,
        STEP,
    )
    .await?;
    let response = client
        .enroll(request)
        .await
        .with_context(|| format!("enrolling {name}"))?
        .into_inner();
    let ca = CertificateDer::from_pem_slice(response.controller_ca_pem.as_bytes())
        .context("controller_ca_pem")?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(response.agent_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .context("agent_chain_pem")?;
    let key = PrivateKeyDer::from_pem_slice(agent_key.key_pem().as_bytes()).context("agent key")?;
    Ok(Enrolled {
        name: name.to_owned(),
        workload,
        tls: grpc::mtls_config(ca, chain, key)?,
    })
}

/// What every stream reports to the run.
#[derive(Default)]
pub struct Counters {
    /// Updates (whole versions) acked, all streams together.
    pub acks: AtomicU64,
    /// Streams that acked their first update.
    pub ready: AtomicU64,
    /// When the last update arrived, in ms since `epoch`.
    pub last_update_ms: AtomicU64,
    /// Config messages (chunks) received.
    pub chunks: AtomicU64,
    /// Largest message seen, bytes.
    pub largest: AtomicU64,
    /// Streams that ended.
    pub ended: AtomicU64,
}

/// What a stream looks for: the marker service with the marker port.
#[derive(Clone)]
pub struct Marker {
    /// The service's name.
    pub service: String,
    /// The port the change adds.
    pub port: u32,
}

impl Marker {
    /// Whether a chunk carries the marker service with the marker port,
    /// sent whole or as a patch (whose service holds the ports as they are
    /// now, whatever its endpoints).
    fn in_update(&self, update: &pb::ConfigUpdate) -> bool {
        let patched = update
            .patched_services
            .iter()
            .filter_map(|p| p.service.as_ref());
        update
            .services
            .iter()
            .chain(patched)
            .any(|s| s.name == self.service && s.ports.iter().any(|p| p.port == self.port))
    }
}

/// The stream's share of the run.
pub struct Shared {
    /// The run's counters.
    pub counters: Counters,
    /// The run's time origin.
    pub epoch: Instant,
    /// The marker to look for.
    pub marker: Marker,
}

/// Connects as `agent` (mTLS), opens its config stream and sends its
/// Hello: the client (which holds the connection), the sender for acks and
/// the incoming updates.
async fn hello(
    target: &Target,
    agent: Enrolled,
) -> anyhow::Result<(
    grpc::ZoneClient,
    mpsc::Sender<pb::AgentMessage>,
    tonic::Streaming<pb::ZoneMessage>,
)> {
    let mut client = grpc::connect(&target.grpc.to_string(), "weft-zone", agent.tls, STEP).await?;
    let (send, outgoing) = mpsc::channel(4);
    send.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(pb::Hello {
            agent_id: agent.name.clone(),
            applied_version: String::new(),
            workloads: vec![agent.workload],
            host: None,
            hbone_address: String::new(),
            features: vec![
                weft_api::proto::agent::ENDPOINT_PATCHES.to_owned(),
                weft_api::proto::agent::SERVICE_PARTS.to_owned(),
            ],
        })),
    })
    .await
    .context("queueing the Hello")?;
    let incoming = client
        .stream(ReceiverStream::new(outgoing))
        .await
        .with_context(|| format!("opening the stream of {}", agent.name))?
        .into_inner();
    Ok((client, send, incoming))
}

/// Opens the stream of `agent` and returns once its first update is
/// acked; the stream then lives on in a task that acks every update and
/// sends to `seen` (once) when the acked version carries the marker.
pub async fn open_stream(
    target: &Target,
    agent: Enrolled,
    shared: Arc<Shared>,
    seen: mpsc::UnboundedSender<Instant>,
) -> anyhow::Result<()> {
    let (client, send, mut incoming) = hello(target, agent).await?;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut first = Some(first_tx);
        let mut carries_marker = false;
        let mut reported = false;
        // Keep the client (its connection) for the life of the stream.
        let _client = client;
        while let Ok(Some(message)) = incoming.message().await {
            let Some(pb::zone_message::Message::Config(chunk)) = message.message else {
                continue;
            };
            let c = &shared.counters;
            c.chunks.fetch_add(1, Ordering::Relaxed);
            c.largest
                .fetch_max(prost_len(&chunk) as u64, Ordering::Relaxed);
            carries_marker |= shared.marker.in_update(&chunk);
            if chunk.more {
                continue;
            }
            let ack = pb::AgentMessage {
                message: Some(pb::agent_message::Message::Ack(pb::Ack {
                    version: chunk.version.clone(),
                })),
            };
            if send.send(ack).await.is_err() {
                break;
            }
            let now = Instant::now();
            c.acks.fetch_add(1, Ordering::Relaxed);
            c.last_update_ms.fetch_max(
                now.duration_since(shared.epoch).as_millis() as u64,
                Ordering::Relaxed,
            );
            if let Some(first) = first.take() {
                c.ready.fetch_add(1, Ordering::Relaxed);
                let _ = first.send(());
            }
            if carries_marker && !reported {
                reported = true;
                let _ = seen.send(now);
            }
            carries_marker = false;
        }
        shared.counters.ended.fetch_add(1, Ordering::Relaxed);
    });
    tokio::time::timeout(STEP, first_rx)
        .await
        .context("no first update in time")?
        .context("the stream ended before its first update")?;
    Ok(())
}

fn prost_len(update: &pb::ConfigUpdate) -> usize {
    use prost::Message;
    update.encoded_len()
}

/// One enrolment as an operator sees it: Enroll RPC, stream opened with
/// the new certificate, first update received and acked.
pub async fn enrol_and_first_config(
    target: &Target,
    token: &str,
    name: &str,
    workload: pb::Workload,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let agent = enrol(target, token, name, workload).await?;
    let (_client, _send, mut incoming) = hello(target, agent).await?;
    loop {
        let message = tokio::time::timeout(STEP, incoming.message())
            .await
            .context("no first update in time")??
            .context("the stream ended before its first update")?;
        if let Some(pb::zone_message::Message::Config(chunk)) = message.message {
            if !chunk.more {
                return Ok(start.elapsed());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(ports: &[u32]) -> pb::ServiceView {
        pb::ServiceView {
            name: "bench-target".into(),
            ports: ports
                .iter()
                .map(|&port| pb::Port { port, protocol: 0 })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_marker_is_seen_whole_or_patched() {
        let marker = Marker {
            service: "bench-target".into(),
            port: 9001,
        };
        let whole = pb::ConfigUpdate {
            services: vec![target(&[80, 9001])],
            ..Default::default()
        };
        assert!(marker.in_update(&whole));
        let patched = pb::ConfigUpdate {
            patched_services: vec![pb::ServicePatch {
                service: Some(target(&[80, 9001])),
                removed_endpoints: Vec::new(),
            }],
            ..Default::default()
        };
        assert!(marker.in_update(&patched));
        let without = pb::ConfigUpdate {
            services: vec![target(&[80])],
            patched_services: vec![pb::ServicePatch {
                service: Some(target(&[80])),
                removed_endpoints: Vec::new(),
            }],
            ..Default::default()
        };
        assert!(!marker.in_update(&without));
    }
}
