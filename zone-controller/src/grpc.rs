//! The agent gRPC endpoint (default :5678): our own rustls acceptor in
//! front of tonic, so that each connection carries the agent named by its
//! verified client certificate (if any) to the handlers, as [`PeerInfo`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use weft_api::proto::agent::v1::agent_service_server::AgentServiceServer;

use crate::agent_service::AgentApi;
use crate::zone_ca::ZoneCa;

/// How long a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for tonic to pick them up.
const ACCEPT_QUEUE: usize = 128;
/// The largest message accepted from an agent.
const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// Each agent connection's HTTP/2 buffers (third_party/h2/WEFT-PATCH.md).
/// A config stream mostly reads acks and writes small deltas, yet h2's own
/// 28 KiB per connection were a third of a 10,000-agent zone's memory. Each
/// grows when a larger frame needs it; data frames of a few hundred bytes
/// and more are written from their own buffer, not copied into this one.
const CONNECTION_BUFFERS: h2::CodecBuffers = h2::CodecBuffers {
    read: 1024,
    write: 1024,
    hpack_scratch: 0,
};

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The agent its verified client certificate names, if it sent one.
    pub agent: Option<String>,
}

/// A TLS connection that tells tonic who the peer is.
pub struct AgentIo {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for AgentIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for AgentIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections and hands them to tonic once their TLS
/// handshake is done; stops when `stop` turns true. Handshakes run in their
/// own tasks, so a slow client never holds up the others.
async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    zone_ca: Arc<ZoneCa>,
    queue: mpsc::Sender<io::Result<AgentIo>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let zone_ca = zone_ca.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%remote, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let agent = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| zone_ca.agent_of(leaf));
            let io = AgentIo {
                inner: tls,
                info: PeerInfo { remote, agent },
            };
            // The server is stopping if nobody receives: drop the connection.
            let _ = queue.send(Ok(io)).await;
        });
    }
}

/// Serves the agent API on `listener` until `stop` turns true; then stops
/// accepting, lets the streams end (the handlers watch `stop` too) and
/// returns.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    zone_ca: Arc<ZoneCa>,
    api: AgentApi,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    h2::set_codec_buffers(CONNECTION_BUFFERS);
    let (queue, incoming) = mpsc::channel(ACCEPT_QUEUE);
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let accepting = tokio::spawn(accept(listener, acceptor, zone_ca, queue, stop.clone()));
    let service = AgentServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE);
    let shutdown = stopped(stop.clone());
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service)
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
        .await;
    accepting.abort();
    result.map_err(|e| anyhow::anyhow!("gRPC server failed: {e}"))
}

/// A future that completes when `stop` turns true.
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            break;
        }
    }
}
