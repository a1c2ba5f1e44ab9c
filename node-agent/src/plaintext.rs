//! Plaintext inbound (the capture port for connections that did not come
//! through a tunnel). Permissive mode forwards them to the workload and
//! counts them; strict mode refuses them, so nothing reaches the workload
//! without mTLS.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::config::{AgentConfig, MtlsMode};
use crate::drain::Drain;
use crate::listen::accept_next;
use crate::local_workload::LocalWorkload;
use crate::metrics::{ConnectionGuard, Direction, Metrics, PeerCounters, Transport};
use crate::socket::{original_dst, reset};
use crate::splice::copy_plain;

/// What every plaintext inbound connection shares.
pub struct Plaintext {
    config: Arc<AgentConfig>,
    metrics: Arc<Metrics>,
    drain: Drain,
    counters: PeerCounters,
    local: Arc<LocalWorkload>,
}

impl Plaintext {
    /// Looks up the plaintext counters once, for every connection to share.
    pub fn new(
        config: Arc<AgentConfig>,
        metrics: Arc<Metrics>,
        drain: Drain,
        destination: &str,
        local: Arc<LocalWorkload>,
    ) -> Self {
        let counters = metrics.peer(
            Direction::Inbound,
            "unknown",
            destination,
            Transport::Plaintext,
        );
        Plaintext {
            config,
            metrics,
            drain,
            counters,
            local,
        }
    }

    /// Accepts connections until draining begins.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        while let Some((tcp, remote)) = accept_next(&listener, &self.drain).await {
            if self.config.inbound.mtls == MtlsMode::Strict {
                self.metrics.plaintext(false);
                info!(%remote, "plaintext inbound refused (strict mTLS)");
                reset(&tcp);
                continue;
            }
            let this = self.clone();
            let tracked = self.drain.track();
            tokio::spawn(async move {
                this.forward(tcp, remote).await;
                drop(tracked);
            });
        }
    }

    async fn forward(&self, mut tcp: TcpStream, remote: SocketAddr) {
        let dst = match original_dst(&tcp) {
            Ok(dst) if self.local.serves_port(dst.port()) => dst,
            other => {
                self.metrics.plaintext(false);
                info!(%remote, dst = ?other.ok(), "plaintext inbound not for a workload port, refusing");
                return reset(&tcp);
            }
        };
        self.metrics.plaintext(true);
        // The workload's own address, whichever local address was dialled.
        let target = SocketAddr::new(self.local.address, dst.port());
        let connect = self
            .local
            .connect(target, self.config.tunnel.connect_timeout);
        let mut app = match connect.await {
            Ok(app) => app,
            Err(_) => {
                info!(%remote, %target, "workload unreachable for plaintext inbound");
                return reset(&tcp);
            }
        };
        let _open = ConnectionGuard::open(&self.counters);
        if let Err(e) = copy_plain(
            &mut tcp,
            &mut app,
            &self.counters.sent,
            &self.counters.received,
        )
        .await
        {
            debug!(%remote, error = %e, "plaintext inbound ended abnormally");
        }
    }
}
