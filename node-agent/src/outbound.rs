//! Outbound: application connections, taken from explicit listeners or from
//! transparent capture, sent through an HBONE tunnel to the agent in front
//! of the destination, dialled by the agent for an ExternalService, or
//! passed through when it is outside the mesh.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode, Uri};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};
use weft_api::Endpoint;

use crate::config::{AgentConfig, UnknownDestination};
use crate::detect::{Detected, HINT_HEADER};
use crate::drain::Drain;
use crate::l7::outbound::Dialled;
use crate::l7::policy::Policy;
use crate::l7::upstream::Upstreams;
use crate::listen::accept_next;
use crate::metrics::{ConnectionGuard, Direction, Label, Metrics, PeerCounters, Transport};
use crate::pool::{Checkout, ConnectError, Pool};
use crate::socket::{original_dst, reset};
use crate::splice::{copy_plain, splice, SpliceCounters};
use crate::view::{Route, SharedView};

/// Why an outbound connection could not be tunnelled.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("tunnel stream: {0}")]
    Stream(#[from] h2::Error),
    #[error("{0} cannot be sent as a CONNECT authority")]
    Authority(SocketAddr),
    #[error("the peer agent did not answer CONNECT in time")]
    AnswerTimeout,
    #[error("the peer agent refused the stream with {0}")]
    Refused(StatusCode),
}

/// Where an accepted connection goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// An explicit listener's fixed destination.
    Fixed(SocketAddr),
    /// A static HTTP listener: the service (`<namespace>/<name>`) and port
    /// its requests go to, through the L7 proxy.
    Service { key: Arc<str>, port: u16 },
    /// A static listener of no declared protocol: its connections are
    /// classified first, then served by the L7 proxy (with the outbound
    /// policies of `service`, when it names one) or tunnelled to `target`.
    Detect {
        target: SocketAddr,
        service: Option<Arc<str>>,
    },
    /// The destination the application dialled, recovered from nftables.
    Captured,
}

/// What an accepted connection turns into, decided from the view.
enum Next {
    /// With what detection found, if the port was classified, and the
    /// connection's count on the endpoint, held while it lasts.
    Tunnel(
        Endpoint,
        SocketAddr,
        Option<Detected>,
        Option<crate::resilience::OpenConnection>,
    ),
    Http(Dialled),
    External {
        key: Label,
        external: crate::external::External,
        connect_timeout: std::time::Duration,
    },
    Refuse(&'static str),
    Outside,
}

/// What every outbound connection shares.
pub struct Outbound {
    config: Arc<AgentConfig>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) drain: Drain,
    pool: Arc<Pool>,
    pub(crate) view: SharedView,
    passthrough: PeerCounters,
    limit: Arc<Semaphore>,
    /// The local workload's identity, the source in L7 metrics and logs.
    pub(crate) local_id: Label,
    /// The local workload's name: the key of its policies in the view.
    pub(crate) workload: Label,
    /// The local workload's locality, which locality-aware picks prefer.
    pub(crate) locality: weft_api::Locality,
    /// L7 connections to peer workloads, through tunnels.
    pub(crate) upstreams: Arc<Upstreams>,
    /// Outbound settings when no policy is known.
    pub(crate) unconfigured: Arc<Policy>,
}

impl Outbound {
    /// Routes by whatever mesh view is in force when a connection arrives;
    /// `unconfigured` is what HTTP calls get when no policy is known. The
    /// local workload is named by its identity (`source`, for metrics) and
    /// its name (`workload`, the key of its policies); `locality` is where
    /// it runs.
    pub fn new(
        config: Arc<AgentConfig>,
        metrics: Arc<Metrics>,
        drain: Drain,
        pool: Arc<Pool>,
        view: SharedView,
        (source, workload, locality): (&str, Label, weft_api::Locality),
        unconfigured: Policy,
    ) -> Self {
        let passthrough =
            metrics.peer(Direction::Outbound, source, "unknown", Transport::Plaintext);
        let limit = Arc::new(Semaphore::new(config.tunnel.max_outbound_connections));
        Outbound {
            config,
            metrics,
            drain,
            pool,
            view,
            passthrough,
            limit,
            local_id: source.into(),
            workload,
            locality,
            upstreams: Arc::default(),
            unconfigured: Arc::new(unconfigured),
        }
    }

    /// The local workload's policy in `view`, or the defaults when none is
    /// known.
    pub(crate) fn policy<'v>(&'v self, view: &'v crate::view::MeshView) -> &'v Policy {
        view.policy(self.workload.as_str())
            .unwrap_or(&self.unconfigured)
    }

    /// Accepts connections until draining begins.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, target: Target) {
        while let Some((tcp, remote)) = accept_next(&listener, &self.drain).await {
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                warn!(%remote, workload = self.workload.as_str(), "outbound connection limit reached, refusing");
                self.metrics
                    .connection_refused(Direction::Outbound, "limit");
                reset(&tcp);
                continue;
            };
            let this = self.clone();
            let tracked = self.drain.track();
            let target = target.clone();
            tokio::spawn(async move {
                this.connection(tcp, remote, target, permit).await;
                drop(tracked);
            });
        }
    }

    async fn connection(
        self: Arc<Self>,
        mut tcp: TcpStream,
        client: SocketAddr,
        target: Target,
        _permit: OwnedSemaphorePermit,
    ) {
        let _ = tcp.set_nodelay(true);
        let mut detected = None;
        let dst = match target {
            Target::Fixed(dst) => dst,
            Target::Detect { target, service } => {
                let protocol = self.detect(&tcp, target).await;
                if let (Detected::Http, Some(key)) = (protocol, service) {
                    let dialled = Dialled {
                        key: crate::metrics::Label(key),
                        port: target.port(),
                        client,
                    };
                    return crate::l7::outbound::serve(self, tcp, dialled).await;
                }
                detected = Some(protocol);
                target
            }
            Target::Service { key, port } => {
                let dialled = Dialled {
                    key: crate::metrics::Label(key),
                    port,
                    client,
                };
                return crate::l7::outbound::serve(self, tcp, dialled).await;
            }
            Target::Captured => match original_dst(&tcp) {
                Ok(dst) => dst,
                Err(e) => {
                    info!(error = %e, "captured connection without an original destination, refusing");
                    return reset(&tcp);
                }
            },
        };
        // A service port of no declared protocol: classified by the first
        // bytes (peeked, so the connection is carried from its first byte
        // either way) before the view is read for the route.
        if detected.is_none() && self.view.load().detects(dst) {
            detected = Some(self.detect(&tcp, dst).await);
        }
        // The view is read once; the connection keeps the endpoint it got
        // even if a new view arrives meanwhile (an HTTP connection instead
        // reads the view in force at each request).
        let (next, _slot) = {
            let view = self.view.load();
            // CircuitBreaker maxConnections of a service's virtual IP,
            // held while the connection lasts.
            let slot = crate::resilience::l4_connection(&view, self.policy(&view), dst);
            let route = match detected {
                Some(protocol) => view.route_detected(
                    dst,
                    self.workload.as_str(),
                    &self.locality,
                    Some(client.ip()),
                    protocol,
                ),
                None => view.route_from(
                    dst,
                    self.workload.as_str(),
                    &self.locality,
                    Some(client.ip()),
                ),
            };
            let next = match route {
                Route::Http { service, port } => Next::Http(Dialled {
                    key: service.key.clone(),
                    port,
                    client,
                }),
                Route::Tunnel {
                    endpoint,
                    authority,
                    open,
                } => Next::Tunnel(endpoint.clone(), authority, detected, open),
                Route::External { service, external } => Next::External {
                    key: service.key.clone(),
                    external: external.clone(),
                    connect_timeout: self
                        .policy(&view)
                        .outbound(service.key.as_str())
                        .connect_timeout,
                },
                Route::Refuse(reason) => Next::Refuse(reason),
                Route::Outside => Next::Outside,
            };
            match slot {
                // An HTTP connection takes its slot in the L7 proxy.
                Ok(slot) if !matches!(next, Next::Http(_)) => (next, slot),
                Ok(_) => (next, None),
                Err(()) => (Next::Refuse("overflow"), None),
            }
        };
        match next {
            Next::Tunnel(endpoint, authority, detected, _open) => {
                let result = self.tunnel(&mut tcp, authority, &endpoint, detected).await;
                crate::resilience::record_l4(&self, dst, &endpoint, &result);
                if let Err(e) = result {
                    info!(%dst, %authority, agent = %endpoint.agent, error = %e, "outbound tunnel failed");
                    reset(&tcp);
                }
            }
            Next::Http(dialled) => crate::l7::outbound::serve(self, tcp, dialled).await,
            Next::External {
                key,
                external,
                connect_timeout,
            } => {
                self.external(&mut tcp, &key, &external, connect_timeout)
                    .await
            }
            Next::Refuse(reason) => {
                info!(%dst, reason, "mesh destination cannot be served, refusing");
                self.metrics.connection_refused(Direction::Outbound, reason);
                reset(&tcp);
            }
            Next::Outside => self.outside_mesh(&mut tcp, dst).await,
        }
    }

    /// Classifies a connection to a port of no declared protocol, counted
    /// and logged.
    async fn detect(&self, tcp: &TcpStream, dst: SocketAddr) -> Detected {
        let outcome = crate::detect::peek(tcp, self.config.detect.timeout).await;
        self.metrics.protocol_detected(Direction::Outbound, outcome);
        debug!(%dst, protocol = outcome.protocol.as_str(), reason = outcome.reason, "outbound protocol detected");
        outcome.protocol
    }

    async fn tunnel(
        &self,
        tcp: &mut TcpStream,
        dst: SocketAddr,
        endpoint: &Endpoint,
        detected: Option<Detected>,
    ) -> Result<(), TunnelError> {
        let (checkout, response, tx) = self.open_stream_as(dst, endpoint, detected).await?;
        if response.status() != StatusCode::OK {
            return Err(TunnelError::Refused(response.status()));
        }
        let counters = checkout.counters();
        let _open = ConnectionGuard::open(counters);
        let io = SpliceCounters {
            up: &counters.sent,
            down: &counters.received,
        };
        if let Err(e) = splice(tcp, response.into_body(), tx, io).await {
            debug!(%dst, error = %e, "outbound stream ended abnormally");
        }
        Ok(())
    }

    /// One TCP health check of `dst` through the tunnel to `endpoint`'s
    /// agent: the CONNECT is marked as a probe
    /// ([`crate::inbound::PROBE_HEADER`]), so the answer says whether the
    /// workload's port accepted a connection, whatever its protocol.
    pub(crate) async fn probe_tcp(
        &self,
        dst: SocketAddr,
        endpoint: &Endpoint,
    ) -> Result<StatusCode, TunnelError> {
        let mark = (crate::inbound::PROBE_HEADER, crate::inbound::PROBE_TCP);
        let (_checkout, response, _tx) = self.open_stream_with(dst, endpoint, Some(mark)).await?;
        Ok(response.status())
    }

    /// Sends the CONNECT, telling the destination's agent how the stream's
    /// bytes are to be carried (`HINT_HEADER`) when this agent knows: what
    /// it detected, or HTTP from its L7 proxy. The destination uses it only
    /// on ports of no declared protocol, to skip its own detection.
    pub(crate) async fn open_stream_as(
        &self,
        dst: SocketAddr,
        endpoint: &Endpoint,
        hint: Option<Detected>,
    ) -> Result<(Checkout, Response<RecvStream>, SendStream<Bytes>), TunnelError> {
        let header = hint.map(|hint| (HINT_HEADER, hint.as_str()));
        self.open_stream_with(dst, endpoint, header).await
    }

    /// Sends the CONNECT with `header` (a static name and value, so
    /// nothing is allocated for it) and waits for its answer. Nothing has
    /// been read from the application yet, so two failures are retried: a
    /// pooled connection that died or got GOAWAY since checkout (retried on
    /// another connection), and REFUSED_STREAM, which the peer sends only
    /// for streams it did not process.
    async fn open_stream_with(
        &self,
        dst: SocketAddr,
        endpoint: &Endpoint,
        header: Option<(&'static str, &'static str)>,
    ) -> Result<(Checkout, Response<RecvStream>, SendStream<Bytes>), TunnelError> {
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            let checkout = self.pool.checkout(endpoint).await?;
            let sent = async {
                let mut sender = checkout.sender().ready().await?;
                let mut request = Request::new(());
                *request.method_mut() = Method::CONNECT;
                *request.uri_mut() =
                    Uri::try_from(dst.to_string()).map_err(|_| TunnelError::Authority(dst))?;
                if let Some((name, value)) = header {
                    request
                        .headers_mut()
                        .insert(name, http::HeaderValue::from_static(value));
                }
                Ok::<_, TunnelError>(sender.send_request(request, false)?)
            };
            let (response, tx) = match sent.await {
                Ok(sent) => sent,
                Err(TunnelError::Stream(e)) if attempt < ATTEMPTS => {
                    debug!(%dst, error = %e, "pooled tunnel connection unusable, retrying");
                    checkout.discard();
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let answer = tokio::time::timeout(self.config.tunnel.connect_timeout, response)
                .await
                .map_err(|_| TunnelError::AnswerTimeout)?;
            match answer {
                Ok(response) => return Ok((checkout, response, tx)),
                Err(e) if e.reason() == Some(Reason::REFUSED_STREAM) && attempt < ATTEMPTS => {
                    debug!(%dst, "peer refused the stream unprocessed, retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Dials an ExternalService's host (L4 and L7 alike), never a mesh
    /// address its name may resolve to.
    pub(crate) async fn dial_external(
        &self,
        external: &crate::external::External,
        connect_timeout: std::time::Duration,
    ) -> Result<TcpStream, crate::external::ConnectError> {
        external
            .connect(connect_timeout, |ip| self.view.load().knows(ip))
            .await
    }

    /// Carries a connection to an ExternalService's TCP port: the agent
    /// dials the host itself and copies bytes both ways.
    async fn external(
        &self,
        tcp: &mut TcpStream,
        key: &Label,
        external: &crate::external::External,
        connect_timeout: std::time::Duration,
    ) {
        let mut upstream = match self.dial_external(external, connect_timeout).await {
            Ok(upstream) => upstream,
            Err(e) => {
                info!(destination = key.as_str(), error = %e, "ExternalService connect failed");
                self.metrics
                    .connection_refused(Direction::Outbound, "external_connect_failed");
                return reset(tcp);
            }
        };
        let counters = self.metrics.peer(
            Direction::Outbound,
            self.local_id.as_str(),
            key.as_str(),
            Transport::Plaintext,
        );
        let _open = ConnectionGuard::open(&counters);
        if let Err(e) = copy_plain(tcp, &mut upstream, &counters.sent, &counters.received).await {
            debug!(destination = key.as_str(), error = %e, "ExternalService connection ended abnormally");
        }
    }

    async fn outside_mesh(&self, tcp: &mut TcpStream, dst: SocketAddr) {
        if self.config.outbound.unknown_destination == UnknownDestination::Deny || self.is_self(dst)
        {
            info!(%dst, "destination is not in the mesh, refusing");
            return reset(tcp);
        }
        let connect =
            tokio::time::timeout(self.config.tunnel.connect_timeout, TcpStream::connect(dst));
        let mut upstream = match connect.await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(e)) => return debug!(%dst, error = %e, "passthrough connect failed"),
            Err(_) => return debug!(%dst, "passthrough connect timed out"),
        };
        let _ = upstream.set_nodelay(true);
        let _open = ConnectionGuard::open(&self.passthrough);
        if let Err(e) = copy_plain(
            tcp,
            &mut upstream,
            &self.passthrough.sent,
            &self.passthrough.received,
        )
        .await
        {
            debug!(%dst, error = %e, "passthrough ended abnormally");
        }
    }

    /// A connection straight to the capture port would loop back into it.
    fn is_self(&self, dst: SocketAddr) -> bool {
        dst == self.config.outbound.capture_listen
            || (dst.ip().is_loopback() && dst.port() == self.config.outbound.capture_listen.port())
    }
}
