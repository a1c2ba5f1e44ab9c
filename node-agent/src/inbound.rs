//! HBONE inbound: mTLS connections from peer agents, each carrying HTTP/2
//! CONNECT streams that are spliced to the local workload. Every stream is
//! authorized against the allow list in force and checked against the
//! workload's own address and ports, so the agent is never an open relay.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::Reason;
use http::{Method, Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};
use weft_api::SpiffeId;

use crate::config::{AgentConfig, MtlsMode};
use crate::credentials::Credentials;
use crate::detect::{Detected, Outcome, HINT_HEADER};
use crate::drain::Drain;
use crate::l7::tunnel_io::TunnelIo;
use crate::l7::upstream::Upstreams;
use crate::listen::accept_next;
use crate::local_workload::LocalWorkload;
use crate::metrics::{ConnectionGuard, Direction, Label, Metrics, PeerCounters, Transport};
use crate::socket::reset;
use crate::splice::{splice, SpliceCounters};
use crate::tls::{self, HandshakeFailure};
use crate::view::SharedView;

/// What every inbound connection shares.
pub struct Inbound {
    config: Arc<AgentConfig>,
    credentials: Arc<Credentials>,
    metrics: Arc<Metrics>,
    pub(crate) drain: Drain,
    view: SharedView,
    /// The workload's own SPIFFE ID, for metrics labels.
    local_id: SpiffeId,
    /// The workload the tunnels reach.
    local: Arc<LocalWorkload>,
    /// Pooled L7 connections to the workload.
    upstreams: Arc<Upstreams>,
    /// Streams into the workload at once, across every tunnel.
    streams: Arc<Semaphore>,
}

/// The CONNECT request header by which a caller's agent marks a stream as
/// an active TCP health check (value [`PROBE_TCP`]). On a port declared
/// `tcp` the workload is dialled before the CONNECT is answered anyway, but
/// on an `http` or `detect` port the stream is answered first (the L7 proxy
/// or detection needs the caller's bytes before it dials), so without the
/// mark a dead workload behind a live agent would pass its checks. A marked
/// stream is answered `200` only once the workload's port accepted a
/// connection, which is closed at once: no bytes are carried. An agent that
/// does not know the header ignores it and answers as before.
pub const PROBE_HEADER: &str = "x-weft-probe";

/// The value of [`PROBE_HEADER`] for a TCP check; anything else is not a
/// probe, so that other kinds can be added without old agents mistaking
/// them for this one.
pub const PROBE_TCP: &str = "tcp";

/// Whether a CONNECT's headers mark it a TCP health check probe (see
/// [`PROBE_HEADER`]).
fn is_probe(headers: &http::HeaderMap) -> bool {
    headers
        .get(PROBE_HEADER)
        .is_some_and(|v| v.as_bytes() == PROBE_TCP.as_bytes())
}

/// How an admitted stream's bytes are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carry {
    /// Spliced to the workload: a port declared `tcp`.
    Tcp,
    /// Served by the L7 proxy: a port declared `http`.
    Http,
    /// A port of no declared protocol: classified by its first bytes.
    Detect,
    /// A port of no declared protocol whose caller's agent said how
    /// (`HINT_HEADER`): carried so without waiting for bytes.
    Hinted(Detected),
}

impl Carry {
    /// Whether admission is decided for L7: per request later, so a
    /// connection only L7 rules allow gets in (and is checked again as TCP
    /// if it turns out not to be HTTP).
    fn l7(self) -> bool {
        !matches!(self, Carry::Tcp | Carry::Hinted(Detected::Tcp))
    }
}

/// One authenticated peer connection, shared by its streams.
struct Peer {
    id: SpiffeId,
    counters: PeerCounters,
    /// Streams in flight on this connection, for the idle timeout.
    active: AtomicUsize,
}

impl Inbound {
    /// Serves with whatever identity `credentials` holds at each accept.
    pub fn new(
        config: Arc<AgentConfig>,
        credentials: Arc<Credentials>,
        metrics: Arc<Metrics>,
        drain: Drain,
        view: SharedView,
        local: Arc<LocalWorkload>,
    ) -> Self {
        let local_id = credentials.id();
        let streams = Arc::new(Semaphore::new(config.tunnel.max_inbound_streams));
        Inbound {
            config,
            credentials,
            metrics,
            drain,
            view,
            local_id,
            streams,
            local,
            upstreams: Arc::default(),
        }
    }

    /// The view in force.
    pub(crate) fn view(&self) -> &SharedView {
        &self.view
    }

    /// The agent's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The local workload's name, as a metrics label.
    pub(crate) fn workload_label(&self) -> &Label {
        &self.local.name
    }

    /// The workload the tunnels reach.
    pub(crate) fn local(&self) -> &LocalWorkload {
        &self.local
    }

    /// How long connecting to the workload may take.
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.config.tunnel.connect_timeout
    }

    /// Pooled L7 connections to the workload.
    pub(crate) fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// Accepts connections until draining begins.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = Arc::new(Semaphore::new(self.config.tunnel.max_inbound_connections));
        while let Some((tcp, remote)) = accept_next(&listener, &self.drain).await {
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                warn!(%remote, workload = self.local.name.as_str(), "inbound connection limit reached, refusing");
                self.metrics.connection_refused(Direction::Inbound, "limit");
                reset(&tcp);
                continue;
            };
            let this = self.clone();
            let tracked = self.drain.track();
            tokio::spawn(async move {
                this.connection(tcp, remote, permit).await;
                drop(tracked);
            });
        }
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        _permit: OwnedSemaphorePermit,
    ) {
        let _ = tcp.set_nodelay(true);
        let timeout = self.config.tunnel.connect_timeout;
        let tls = match tokio::time::timeout(
            timeout,
            self.credentials.current().acceptor.accept(tls::tls_io(tcp)),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = HandshakeFailure::classify(&e);
                self.metrics.handshake_failed(Direction::Inbound, reason);
                info!(%remote, reason = reason.as_str(), error = %e, "inbound handshake refused");
                return;
            }
            Err(_) => {
                self.metrics
                    .handshake_failed(Direction::Inbound, HandshakeFailure::Timeout);
                info!(%remote, "inbound handshake timed out");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(tls::ALPN_H2) {
            self.metrics
                .handshake_failed(Direction::Inbound, HandshakeFailure::Protocol);
            info!(%remote, "inbound peer did not negotiate ALPN h2");
            return;
        }
        // The verifier already required exactly one valid SPIFFE ID.
        let Some(id) = session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| tls::spiffe_id_of(c).ok())
        else {
            self.metrics
                .handshake_failed(Direction::Inbound, HandshakeFailure::BadIdentity);
            return;
        };
        self.metrics.handshake_ok(Direction::Inbound);
        let counters = self.metrics.peer(
            Direction::Inbound,
            id.as_str(),
            self.local_id.as_str(),
            Transport::Mtls,
        );
        debug!(%remote, peer = %id, "inbound tunnel established");
        let peer = Arc::new(Peer {
            id,
            counters,
            active: AtomicUsize::new(0),
        });
        self.serve_streams(tls, remote, peer).await;
    }

    async fn serve_streams(
        self: &Arc<Self>,
        tls: tokio_rustls::server::TlsStream<tls::TlsIo>,
        remote: SocketAddr,
        peer: Arc<Peer>,
    ) {
        let t = &self.config.tunnel;
        let handshake = h2::server::Builder::new()
            .initial_window_size(t.stream_window)
            .initial_connection_window_size(t.connection_window)
            .max_concurrent_streams(t.max_streams_per_connection)
            .max_header_list_size(16 * 1024)
            .max_frame_size(crate::tls::MAX_FRAME_SIZE)
            .handshake::<_, Bytes>(tls);
        let mut conn = match tokio::time::timeout(t.connect_timeout, handshake).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                self.metrics
                    .connection_refused(Direction::Inbound, "not_http2");
                return debug!(%remote, error = %e, "inbound HTTP/2 handshake failed");
            }
            Err(_) => {
                self.metrics
                    .connection_refused(Direction::Inbound, "not_http2");
                return debug!(%remote, "inbound HTTP/2 handshake timed out");
            }
        };
        let gauge = self.metrics.tunnel_gauge(Direction::Inbound);
        gauge.inc();
        let mut draining = false;
        // The connection is idle once it has carried no stream for
        // IDLE_TICKS ticks in a row; the peer's pool would close it too, but
        // an abandoned connection must not hold a slot forever.
        const IDLE_TICKS: u32 = 4;
        let mut tick =
            tokio::time::interval((t.idle_timeout / IDLE_TICKS).max(Duration::from_millis(100)));
        let mut idle_ticks = 0;
        // One drain subscription for the connection's life, not one per
        // accepted stream.
        let drained = self.drain.signaled();
        tokio::pin!(drained);
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                _ = &mut drained, if !draining => {
                    // GOAWAY: the peer opens no new streams here; the ones
                    // in flight run to completion.
                    conn.graceful_shutdown();
                    draining = true;
                    continue;
                }
                _ = tick.tick(), if !draining => {
                    idle_ticks = if peer.active.load(Ordering::Acquire) == 0 { idle_ticks + 1 } else { 0 };
                    if idle_ticks > IDLE_TICKS {
                        debug!(%remote, "closing idle inbound tunnel connection");
                        conn.graceful_shutdown();
                        draining = true;
                    }
                    continue;
                }
            };
            match next {
                Some(Ok((request, respond))) => {
                    idle_ticks = 0;
                    let this = self.clone();
                    let peer = peer.clone();
                    let tracked = self.drain.track();
                    peer.active.fetch_add(1, Ordering::AcqRel);
                    tokio::spawn(async move {
                        this.stream(request, respond, &peer).await;
                        peer.active.fetch_sub(1, Ordering::AcqRel);
                        drop(tracked);
                    });
                }
                Some(Err(e)) => {
                    debug!(%remote, error = %e, "inbound tunnel ended with an error");
                    break;
                }
                None => break,
            }
        }
        gauge.dec();
    }

    /// Whether a caller may reach the workload's `port`. With policies
    /// (from the zone, or `policy` in a static config) TrafficPermission
    /// decides: deny wins, and what nothing allows is refused; on an HTTP
    /// port each request is decided again. Without, strict mode denies by
    /// default and permissive mode, which already lets plaintext in, admits
    /// any authenticated peer unless an allow-list is given.
    /// The rules are the ones in force when the stream arrives, so a
    /// caller removed from them gets no new stream on an old connection.
    fn admits(&self, id: &SpiffeId, l7: bool) -> Result<(), String> {
        let view = self.view.load();
        if let Some(policy) = view.policy(self.local.name.as_str()) {
            let verdict = policy.inbound.connection(id, l7);
            if verdict.allowed() {
                return Ok(());
            }
            return Err(verdict.policy().to_owned());
        }
        let allow = view.allow(self.local.name.as_str());
        let allowed = if allow.is_empty() {
            self.config.inbound.mtls == MtlsMode::Permissive
        } else {
            allow.iter().any(|m| m.matches(id))
        };
        if allowed {
            Ok(())
        } else {
            Err(String::new())
        }
    }

    /// How a stream to the workload's `port` is carried: as the port
    /// declares, or for an undeclared one as the caller's agent says, or
    /// detected here.
    fn carry(&self, request: &Request<h2::RecvStream>, port: u16) -> Carry {
        match self.local.protocol(port) {
            Some(weft_api::Protocol::Http) => Carry::Http,
            Some(weft_api::Protocol::Detect) => match request
                .headers()
                .get(HINT_HEADER)
                .and_then(|v| Detected::from_hint(v.as_bytes()))
            {
                Some(hint) => Carry::Hinted(hint),
                None => Carry::Detect,
            },
            _ => Carry::Tcp,
        }
    }

    /// Decides whether a CONNECT may proceed: the status to refuse it with,
    /// the metric reason, and the target and how to carry it otherwise.
    fn admit(
        &self,
        request: &Request<h2::RecvStream>,
        peer: &Peer,
    ) -> Result<(SocketAddr, Carry), (StatusCode, &'static str)> {
        if request.method() != Method::CONNECT {
            return Err((StatusCode::METHOD_NOT_ALLOWED, "not_connect"));
        }
        let target: SocketAddr = request
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .ok_or((StatusCode::BAD_REQUEST, "bad_authority"))?;
        if target.ip() != self.local.address {
            return Err((StatusCode::FORBIDDEN, "address_not_local"));
        }
        if !self.local.serves_port(target.port()) {
            return Err((StatusCode::FORBIDDEN, "port_not_served"));
        }
        let carry = self.carry(request, target.port());
        if let Err(policy) = self.admits(&peer.id, carry.l7()) {
            info!(peer = %peer.id, port = target.port(), policy, "connection denied by TrafficPermission");
            return Err((StatusCode::FORBIDDEN, "not_allowed"));
        }
        Ok((target, carry))
    }

    async fn stream(
        self: &Arc<Self>,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: &Peer,
    ) {
        let Ok(_slot) = self.streams.clone().try_acquire_owned() else {
            self.metrics.stream_denied(peer.id.as_str(), "limit");
            info!(peer = %peer.id, workload = self.local.name.as_str(), "inbound stream limit reached, refusing");
            return reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        };
        let (target, carry) = match self.admit(&request, peer) {
            Ok(admitted) => admitted,
            Err((status, reason)) => {
                self.metrics.stream_denied(peer.id.as_str(), reason);
                info!(peer = %peer.id, authority = ?request.uri().authority(), reason, "inbound stream refused");
                return reply(&mut respond, status);
            }
        };
        // Before the carry: an HTTP or detected port would answer the
        // CONNECT before dialling the workload, which a probe must reach.
        if is_probe(request.headers()) {
            return self.probe(respond, peer, target).await;
        }
        if let Carry::Hinted(hint) = carry {
            self.metrics
                .protocol_detected(Direction::Inbound, Outcome::hinted(hint));
        }
        match carry {
            Carry::Http | Carry::Hinted(Detected::Http) => {
                return self.http_stream(request, respond, peer, target).await
            }
            Carry::Detect => return self.detect_stream(request, respond, peer, target).await,
            Carry::Tcp | Carry::Hinted(Detected::Tcp) => {}
        }
        let mut app = match self.dial(peer, target).await {
            Ok(app) => app,
            Err(status) => return reply(&mut respond, status),
        };
        let _ = app.set_nodelay(true);
        let tx = match respond.send_response(Response::new(()), false) {
            Ok(tx) => tx,
            Err(e) => {
                return debug!(peer = %peer.id, error = %e, "stream reset before it was answered")
            }
        };
        let _open = ConnectionGuard::open(&peer.counters);
        let counters = SpliceCounters {
            // The socket is the workload's: what it sends goes back to
            // the caller (received), what the tunnel brings is the
            // caller's (sent).
            up: &peer.counters.received,
            down: &peer.counters.sent,
        };
        if let Err(e) = splice(&mut app, request.into_body(), tx, counters).await {
            debug!(peer = %peer.id, %target, error = %e, "inbound stream ended abnormally");
        }
    }
}

impl Inbound {
    /// Connects to the workload's `target` for a stream; the status to
    /// refuse the CONNECT with when it cannot be reached.
    async fn dial(&self, peer: &Peer, target: SocketAddr) -> Result<TcpStream, StatusCode> {
        match self
            .local
            .connect(target, self.config.tunnel.connect_timeout)
            .await
        {
            Ok(app) => Ok(app),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                info!(peer = %peer.id, %target, "connecting to the workload timed out");
                Err(StatusCode::GATEWAY_TIMEOUT)
            }
            Err(e) => {
                info!(peer = %peer.id, %target, error = %e, "workload refused the connection");
                Err(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }

    /// A TCP health check probe (see [`PROBE_HEADER`]), whatever the
    /// port's protocol: answered `200` once the workload accepted a
    /// connection, which is closed unused, or refused as a stream to a
    /// `tcp` port would be.
    async fn probe(&self, mut respond: SendResponse<Bytes>, peer: &Peer, target: SocketAddr) {
        let status = match self.dial(peer, target).await {
            // Dropped unused: the workload sees a connection open and close,
            // as it would from a plain TCP check.
            Ok(_app) => StatusCode::OK,
            Err(status) => status,
        };
        debug!(peer = %peer.id, %target, status = status.as_u16(), "health check probe answered");
        reply(&mut respond, status);
    }

    /// An HTTP port: the stream is accepted at once and its requests are
    /// served one by one, each authorized on its own.
    async fn http_stream(
        self: &Arc<Self>,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: &Peer,
        target: SocketAddr,
    ) {
        let tx = match respond.send_response(Response::new(()), false) {
            Ok(tx) => tx,
            Err(e) => {
                return debug!(peer = %peer.id, error = %e, "stream reset before it was answered")
            }
        };
        let _open = ConnectionGuard::open(&peer.counters);
        let io = TunnelIo::new(request.into_body(), tx);
        crate::l7::inbound::serve(self.clone(), io, peer.id.clone(), target).await;
    }
}

impl Inbound {
    /// A port of no declared protocol: the stream is answered (the caller's
    /// agent sends the client's bytes only then), its first bytes are read
    /// to classify it, and they are replayed first to whoever carries it:
    /// the L7 proxy, or the workload's socket before splicing.
    async fn detect_stream(
        self: &Arc<Self>,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: &Peer,
        target: SocketAddr,
    ) {
        let mut tx = match respond.send_response(Response::new(()), false) {
            Ok(tx) => tx,
            Err(e) => {
                return debug!(peer = %peer.id, error = %e, "stream reset before it was answered")
            }
        };
        let _open = ConnectionGuard::open(&peer.counters);
        let mut rx = request.into_body();
        let (outcome, held) = match crate::detect::read(&mut rx, self.config.detect.timeout).await {
            Ok(read) => read,
            Err(e) => {
                return debug!(peer = %peer.id, %target, error = %e, "inbound stream ended during protocol detection")
            }
        };
        self.metrics.protocol_detected(Direction::Inbound, outcome);
        debug!(peer = %peer.id, %target, protocol = outcome.protocol.as_str(), reason = outcome.reason, "inbound protocol detected");
        if outcome.protocol == Detected::Http {
            let io = TunnelIo::replaying(rx, tx, held);
            return crate::l7::inbound::serve(self.clone(), io, peer.id.clone(), target).await;
        }
        // Admitted as L7 could be, where each request is decided; as TCP
        // the connection must pass L4 authorization, which refuses one that
        // only L7 rules allow. The stream was answered already: reset it.
        if let Err(policy) = self.admits(&peer.id, false) {
            info!(peer = %peer.id, port = target.port(), policy, "connection denied by TrafficPermission (detected as TCP)");
            self.metrics.stream_denied(peer.id.as_str(), "not_allowed");
            return tx.send_reset(Reason::REFUSED_STREAM);
        }
        let mut app = match self
            .local
            .connect(target, self.config.tunnel.connect_timeout)
            .await
        {
            Ok(app) => app,
            Err(e) => {
                info!(peer = %peer.id, %target, error = %e, "connecting to the workload failed");
                return tx.send_reset(Reason::CONNECT_ERROR);
            }
        };
        let _ = app.set_nodelay(true);
        if !held.is_empty() {
            if let Err(e) = app.write_all(&held).await {
                debug!(peer = %peer.id, %target, error = %e, "workload closed before the first bytes");
                crate::socket::reset(&app);
                return tx.send_reset(Reason::CONNECT_ERROR);
            }
            peer.counters.sent.inc_by(held.len() as u64);
            // The window of the bytes detection held goes back only now
            // that they reached the workload.
            if rx.flow_control().release_capacity(held.len()).is_err() {
                return;
            }
        }
        let counters = SpliceCounters {
            // The socket is the workload's: what it sends goes back to
            // the caller (received), what the tunnel brings is the
            // caller's (sent).
            up: &peer.counters.received,
            down: &peer.counters.sent,
        };
        if let Err(e) = splice(&mut app, rx, tx, counters).await {
            debug!(peer = %peer.id, %target, error = %e, "inbound stream ended abnormally");
        }
    }
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    let _ = respond.send_response(response, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_tcp_probe_value_marks_a_probe() {
        let mut headers = http::HeaderMap::new();
        assert!(!is_probe(&headers), "an ordinary CONNECT");
        headers.insert(PROBE_HEADER, http::HeaderValue::from_static(PROBE_TCP));
        assert!(is_probe(&headers));
        headers.insert(PROBE_HEADER, http::HeaderValue::from_static("http"));
        assert!(!is_probe(&headers), "another kind of probe");
    }
}
