//! The HBONE connection pool: TLS + HTTP/2 connections to peer agents, one
//! set per (source identity, destination agent), each carrying many streams.
//! A new connection is opened only when every pooled one is at its stream
//! limit, up to a per-peer cap; past it, HTTP/2 itself queues the stream.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};
use weft_api::{Endpoint, SpiffeId};

use crate::config::TunnelConfig;
use crate::credentials::Credentials;
use crate::metrics::{Direction, Metrics, PeerCounters, Transport};
use crate::tls::{self, HandshakeFailure};

/// Why a tunnel to a peer agent could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to agent {agent}: {source}")]
    Tcp {
        agent: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with agent {agent} failed ({reason}): {source}")]
    Tls {
        agent: SocketAddr,
        reason: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("agent {agent} did not negotiate ALPN h2")]
    Alpn { agent: SocketAddr },
    #[error("HTTP/2 handshake with agent {agent}: {source}")]
    H2 {
        agent: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("agent {agent} timed out during {stage}")]
    Timeout {
        agent: SocketAddr,
        stage: &'static str,
    },
    #[error("no tunnel stream to agent {agent} came free within the connect timeout (up to {connections} connections of {streams} streams each)")]
    Busy {
        agent: SocketAddr,
        connections: usize,
        streams: u32,
    },
    #[error("agent {agent} is unreachable: {reason}")]
    Unreachable { agent: SocketAddr, reason: String },
    #[error("TLS configuration for {peer}: {source}")]
    Config {
        peer: SpiffeId,
        #[source]
        source: Box<rustls::Error>,
    },
}

/// The pool, shared by all outbound connections.
pub struct Pool {
    credentials: Arc<Credentials>,
    /// The workload's own SPIFFE ID, for metrics labels.
    local_id: SpiffeId,
    tunnel: TunnelConfig,
    metrics: Arc<Metrics>,
    peers: Mutex<HashMap<SocketAddr, PeerConns>>,
    changed: Notify,
    epoch: Instant,
}

struct PeerConns {
    expected: SpiffeId,
    connector: TlsConnector,
    /// The credentials generation the connector was built from.
    generation: u64,
    conns: Vec<Arc<Conn>>,
    /// One connection is opened at a time per peer: a burst of streams waits
    /// for it (and fills it) instead of opening one connection each.
    connecting: bool,
    /// Failed connection attempts so far, and the last reason: streams that
    /// waited on a failed attempt fail with it rather than retry in turn.
    failures: u64,
    last_failure: String,
}

/// One pooled HTTP/2 connection.
pub struct Conn {
    send: SendRequest<Bytes>,
    streams: AtomicUsize,
    closed: AtomicBool,
    /// Milliseconds since the pool epoch when the last stream ended.
    idle_since: AtomicU64,
    /// Counters for traffic through this connection.
    pub counters: PeerCounters,
}

/// A stream slot on a pooled connection, released on drop.
pub struct Checkout {
    conn: Arc<Conn>,
    pool: Arc<Pool>,
}

impl Checkout {
    /// A handle to open the stream with.
    pub fn sender(&self) -> SendRequest<Bytes> {
        self.conn.send.clone()
    }

    /// Takes the connection out of the pool after it failed under us.
    pub fn discard(&self) {
        self.conn.closed.store(true, Ordering::Release);
    }

    /// The connection's traffic counters.
    pub fn counters(&self) -> &PeerCounters {
        &self.conn.counters
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let before = self.conn.streams.fetch_sub(1, Ordering::AcqRel);
        if before == 1 {
            self.conn
                .idle_since
                .store(self.pool.now_ms(), Ordering::Release);
        }
        // A full connection has a free slot: streams waiting at the
        // connection cap can take it.
        if before >= self.pool.tunnel.max_streams_per_connection as usize {
            self.pool.changed.notify_waiters();
        }
    }
}

enum Next {
    Connect(TlsConnector, SpiffeId),
    /// Wait for the connection being opened; carries the failure count seen.
    Wait(u64),
}

/// Marks a peer's connection attempt over, even if the stream that made it
/// is dropped mid-way, and wakes the streams waiting for it.
struct Connecting<'a> {
    pool: &'a Pool,
    agent: SocketAddr,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pool.lock().get_mut(&self.agent) {
            p.connecting = false;
        }
        self.pool.changed.notify_waiters();
    }
}

impl Pool {
    /// An empty pool; connections are opened on first use.
    pub fn new(
        credentials: Arc<Credentials>,
        tunnel: TunnelConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Pool {
            local_id: credentials.id(),
            credentials,
            tunnel,
            metrics,
            peers: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, PeerConns>> {
        // A panic elsewhere cannot leave the map inconsistent (every update
        // is a single push, remove or counter change), so keep going.
        self.peers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A stream slot towards the agent fronting `endpoint`. Waiting for a
    /// slot is bounded by the connect timeout.
    pub async fn checkout(self: &Arc<Self>, endpoint: &Endpoint) -> Result<Checkout, ConnectError> {
        let mut seen_failures = None;
        let deadline = tokio::time::Instant::now() + self.tunnel.connect_timeout;
        loop {
            let changed = self.changed.notified();
            match self.pick(endpoint, seen_failures)? {
                Ok(conn) => {
                    return Ok(Checkout {
                        conn,
                        pool: self.clone(),
                    })
                }
                Err(Next::Wait(failures)) => {
                    seen_failures = Some(failures);
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        return Err(ConnectError::Busy {
                            agent: endpoint.agent,
                            connections: self.tunnel.max_connections_per_peer,
                            streams: self.tunnel.max_streams_per_connection,
                        });
                    }
                }
                Err(Next::Connect(connector, expected)) => {
                    let guard = Connecting {
                        pool: self,
                        agent: endpoint.agent,
                    };
                    let result = self.connect(endpoint.agent, connector, expected).await;
                    let mut peers = self.lock();
                    if let Some(p) = peers.get_mut(&endpoint.agent) {
                        match &result {
                            Ok(conn) => {
                                conn.streams.fetch_add(1, Ordering::AcqRel);
                                p.conns.push(conn.clone());
                            }
                            Err(e) => {
                                p.failures += 1;
                                p.last_failure = e.to_string();
                            }
                        }
                    }
                    drop(peers);
                    drop(guard);
                    return result.map(|conn| Checkout {
                        conn,
                        pool: self.clone(),
                    });
                }
            }
        }
    }

    /// Under the lock: a connection with a free stream slot, or what to do.
    fn pick(
        &self,
        endpoint: &Endpoint,
        seen_failures: Option<u64>,
    ) -> Result<Result<Arc<Conn>, Next>, ConnectError> {
        let credentials = self.credentials.current();
        let connector = || -> Result<TlsConnector, ConnectError> {
            let cfg = credentials
                .identity
                .client_config(endpoint.identity.clone())
                .map_err(|source| ConnectError::Config {
                    peer: endpoint.identity.clone(),
                    source: Box::new(source),
                })?;
            Ok(TlsConnector::from(Arc::new(cfg)))
        };
        let mut peers = self.lock();
        // The agent now fronts another identity: start over.
        if peers
            .get(&endpoint.agent)
            .is_some_and(|p| p.expected != endpoint.identity)
        {
            peers.remove(&endpoint.agent);
        }
        let peer = match peers.entry(endpoint.agent) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert(PeerConns {
                expected: endpoint.identity.clone(),
                connector: connector()?,
                generation: credentials.generation,
                conns: Vec::new(),
                connecting: false,
                failures: 0,
                last_failure: String::new(),
            }),
        };
        // Reloaded credentials: new connections present the new certificate;
        // pooled ones carry on with the one they were opened with.
        if peer.generation != credentials.generation {
            peer.connector = connector()?;
            peer.generation = credentials.generation;
        }
        if seen_failures.is_some_and(|seen| peer.failures > seen) {
            return Err(ConnectError::Unreachable {
                agent: endpoint.agent,
                reason: peer.last_failure.clone(),
            });
        }
        peer.conns.retain(|c| !c.closed.load(Ordering::Acquire));
        let max_streams = self.tunnel.max_streams_per_connection as usize;
        let least = peer
            .conns
            .iter()
            .min_by_key(|c| c.streams.load(Ordering::Acquire));
        if let Some(c) = least.filter(|c| c.streams.load(Ordering::Acquire) < max_streams) {
            c.streams.fetch_add(1, Ordering::AcqRel);
            return Ok(Ok(c.clone()));
        }
        if peer.conns.len() < self.tunnel.max_connections_per_peer && !peer.connecting {
            peer.connecting = true;
            return Ok(Err(Next::Connect(
                peer.connector.clone(),
                peer.expected.clone(),
            )));
        }
        // A connection is on its way, or every one is full at the cap: wait
        // for a slot rather than overshoot the peer's stream limit, which it
        // would answer with REFUSED_STREAM.
        Ok(Err(Next::Wait(peer.failures)))
    }

    async fn connect(
        self: &Arc<Self>,
        agent: SocketAddr,
        connector: TlsConnector,
        expected: SpiffeId,
    ) -> Result<Arc<Conn>, ConnectError> {
        let timeout = self.tunnel.connect_timeout;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(agent))
            .await
            .map_err(|_| ConnectError::Timeout {
                agent,
                stage: "TCP connect",
            })?
            .map_err(|source| ConnectError::Tcp { agent, source })?;
        let _ = tcp.set_nodelay(true);
        let handshake =
            connector.connect(ServerName::IpAddress(agent.ip().into()), tls::tls_io(tcp));
        let tls = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(source)) => {
                let reason = HandshakeFailure::classify(&source);
                self.metrics.handshake_failed(Direction::Outbound, reason);
                return Err(ConnectError::Tls {
                    agent,
                    reason: reason.as_str(),
                    source,
                });
            }
            Err(_) => {
                self.metrics
                    .handshake_failed(Direction::Outbound, HandshakeFailure::Timeout);
                return Err(ConnectError::Timeout {
                    agent,
                    stage: "TLS handshake",
                });
            }
        };
        if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
            self.metrics
                .handshake_failed(Direction::Outbound, HandshakeFailure::Protocol);
            return Err(ConnectError::Alpn { agent });
        }
        self.metrics.handshake_ok(Direction::Outbound);
        let t = &self.tunnel;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(t.stream_window)
            .initial_connection_window_size(t.connection_window)
            .max_concurrent_streams(0)
            .enable_push(false)
            .max_header_list_size(16 * 1024)
            .max_frame_size(crate::tls::MAX_FRAME_SIZE)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| ConnectError::H2 { agent, source })?;
        let counters = self.metrics.peer(
            Direction::Outbound,
            self.local_id.as_str(),
            expected.as_str(),
            Transport::Mtls,
        );
        let conn = Arc::new(Conn {
            send,
            streams: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            idle_since: AtomicU64::new(self.now_ms()),
            counters,
        });
        info!(%agent, peer = %expected, "tunnel connection opened");
        tokio::spawn(self.clone().drive(agent, conn.clone(), connection));
        Ok(conn)
    }

    /// Runs one connection's I/O until it fails, the peer goes away, or it
    /// has carried no stream for the idle timeout.
    async fn drive(
        self: Arc<Self>,
        agent: SocketAddr,
        conn: Arc<Conn>,
        mut connection: h2::client::Connection<tokio_rustls::client::TlsStream<tls::TlsIo>, Bytes>,
    ) {
        let gauge = self.metrics.tunnel_gauge(Direction::Outbound);
        gauge.inc();
        let idle = self.tunnel.idle_timeout;
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
        loop {
            tokio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        debug!(%agent, error = %e, "tunnel connection failed");
                    }
                    break;
                }
                _ = tick.tick() => {
                    if self.close_if_idle(&conn, idle) {
                        debug!(%agent, "closing idle tunnel connection");
                        break;
                    }
                }
            }
        }
        conn.closed.store(true, Ordering::Release);
        gauge.dec();
        self.changed.notify_waiters();
    }

    /// Marks `conn` closed if it carried nothing for `idle`; under the lock,
    /// so that no checkout can race with the decision.
    fn close_if_idle(&self, conn: &Conn, idle: Duration) -> bool {
        let _peers = self.lock();
        let since = conn.idle_since.load(Ordering::Acquire);
        let idle_ms = idle.as_millis() as u64;
        if conn.streams.load(Ordering::Acquire) == 0
            && self.now_ms().saturating_sub(since) >= idle_ms
        {
            conn.closed.store(true, Ordering::Release);
            return true;
        }
        false
    }
}
