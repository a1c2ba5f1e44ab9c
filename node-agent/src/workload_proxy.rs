//! One workload's share of the agent: its identity, its listeners, and the
//! inbound, outbound and plaintext proxies behind them. A sidecar runs one,
//! on the host's sockets; a node agent runs one per enrolled workload, on
//! sockets opened inside that workload's network namespace. Each has its
//! own connection limits and its own drain, so one workload's flood or
//! unenrolment does not touch the others.

use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};

use crate::config::AgentConfig;
use crate::credentials::Credentials;
use crate::dns::Dns;
use crate::drain::Drain;
use crate::inbound::Inbound;
use crate::listen::{bind, bind_udp, BindError};
use crate::local_workload::LocalWorkload;
use crate::metrics::Metrics;
use crate::outbound::{Outbound, Target};
use crate::plaintext::Plaintext;
use crate::pool::Pool;
use crate::view::SharedView;

/// What every workload proxy of the agent shares.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<AgentConfig>,
    pub metrics: Arc<Metrics>,
    pub view: SharedView,
    /// The DNS proxy, when enabled; each workload gets its own sockets.
    pub dns: Option<Arc<Dns>>,
}

/// The sockets one workload's traffic arrives on.
pub struct Listeners {
    pub hbone: TcpListener,
    pub plaintext: TcpListener,
    pub capture: TcpListener,
    pub explicit: Vec<(TcpListener, Target)>,
    pub dns: Option<(UdpSocket, TcpListener)>,
}

impl Listeners {
    /// Binds every listener of `config` in the current network namespace;
    /// a port in use fails, naming its field.
    pub fn bind(config: &AgentConfig, dns: bool) -> Result<Self, BindError> {
        let mut explicit = Vec::new();
        for (i, l) in config.outbound.listeners.iter().enumerate() {
            let target = match (&l.service, l.protocol) {
                (Some(key), weft_api::Protocol::Http) if config.controller.is_none() => {
                    Target::Service {
                        key: key.clone().into(),
                        port: l.target.port(),
                    }
                }
                // Under a zone, the service's ports say whether to
                // detect (the view), as for captured connections.
                (service, weft_api::Protocol::Detect) if config.controller.is_none() => {
                    Target::Detect {
                        target: l.target,
                        service: service.as_deref().map(Arc::from),
                    }
                }
                _ => Target::Fixed(l.target),
            };
            explicit.push((
                bind(format!("outbound.listeners[{i}].listen"), l.listen)?,
                target,
            ));
        }
        let dns = if dns {
            Some((
                bind_udp("dns.listen", config.dns.listen)?,
                bind("dns.listen", config.dns.listen)?,
            ))
        } else {
            None
        };
        Ok(Listeners {
            hbone: bind("inbound.listen", config.inbound.listen)?,
            plaintext: bind("inbound.plaintext_listen", config.inbound.plaintext_listen)?,
            capture: bind("outbound.capture_listen", config.outbound.capture_listen)?,
            explicit,
            dns,
        })
    }
}

impl Listeners {
    /// Every socket with the config field it was bound for, to hand over
    /// to a new agent process (see [`crate::handoff`]).
    pub fn sockets(&self, config: &AgentConfig) -> Vec<crate::handoff::Socket> {
        use std::os::fd::AsRawFd;
        let mut sockets = vec![
            ("inbound.listen".to_owned(), self.hbone.as_raw_fd()),
            (
                "inbound.plaintext_listen".to_owned(),
                self.plaintext.as_raw_fd(),
            ),
            (
                "outbound.capture_listen".to_owned(),
                self.capture.as_raw_fd(),
            ),
        ];
        for (i, (listener, _)) in self.explicit.iter().enumerate() {
            sockets.push((
                format!("outbound.listeners[{i}].listen"),
                listener.as_raw_fd(),
            ));
        }
        if let Some((udp, tcp)) = &self.dns {
            sockets.push(("dns.listen".to_owned(), tcp.as_raw_fd()));
            sockets.push((
                format!("dns.listen{}", crate::handoff::UDP_SUFFIX),
                udp.as_raw_fd(),
            ));
        }
        debug_assert!(config.outbound.listeners.len() == self.explicit.len());
        sockets
    }
}

/// A running workload proxy.
pub struct WorkloadProxy {
    pub local: Arc<LocalWorkload>,
    pub credentials: Arc<Credentials>,
    /// Its connections: signalled, its listeners close and what is in
    /// flight runs to its end.
    pub drain: Drain,
    /// Its outbound proxy, whose policy the agent's health checks follow.
    pub outbound: Arc<Outbound>,
    /// The accept loops, which end (closing their sockets) once the drain
    /// is signalled.
    accepting: Vec<tokio::task::JoinHandle<()>>,
}

impl WorkloadProxy {
    /// Starts serving `listeners` for `local` with `credentials`; its
    /// connections are tracked by `drain` (a sidecar's is the agent's, a
    /// node agent's workloads each have their own).
    pub fn start(
        shared: &Shared,
        local: Arc<LocalWorkload>,
        credentials: Arc<Credentials>,
        listeners: Listeners,
        drain: Drain,
    ) -> anyhow::Result<Self> {
        let (config, metrics, view) = (&shared.config, &shared.metrics, &shared.view);
        let source = credentials.id();
        let inbound = Arc::new(Inbound::new(
            config.clone(),
            credentials.clone(),
            metrics.clone(),
            drain.clone(),
            view.clone(),
            local.clone(),
        ));
        let pool = Pool::new(credentials.clone(), config.tunnel.clone(), metrics.clone());
        let outbound = Arc::new(Outbound::new(
            config.clone(),
            metrics.clone(),
            drain.clone(),
            pool,
            view.clone(),
            (source.as_str(), local.name.clone(), local.locality.clone()),
            crate::l7::policy::Policy::unconfigured()
                .map_err(|e| anyhow::anyhow!("compiling the default outbound policy: {e}"))?,
        ));
        let plain = Arc::new(Plaintext::new(
            config.clone(),
            metrics.clone(),
            drain.clone(),
            source.as_str(),
            local.clone(),
        ));
        let mut accepting = vec![
            tokio::spawn(inbound.serve(listeners.hbone)),
            tokio::spawn(plain.serve(listeners.plaintext)),
            tokio::spawn(outbound.clone().serve(listeners.capture, Target::Captured)),
        ];
        for (listener, target) in listeners.explicit {
            accepting.push(tokio::spawn(outbound.clone().serve(listener, target)));
        }
        if let (Some(dns), Some((udp, tcp))) = (&shared.dns, listeners.dns) {
            accepting.push(tokio::spawn(dns.clone().serve_until(
                udp,
                tcp,
                drain.clone(),
            )));
        }
        Ok(WorkloadProxy {
            local,
            credentials,
            drain,
            outbound,
            accepting,
        })
    }

    /// Signals the drain and waits until every listener is closed; the
    /// connections in flight run on, tracked by the drain.
    pub async fn close_listeners(&mut self) {
        self.drain.begin();
        for task in self.accepting.drain(..) {
            let _ = task.await;
        }
    }
}
