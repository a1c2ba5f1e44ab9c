//! A workload this agent carries traffic for: a sidecar's one, or each of
//! a node agent's. Inbound checks tunnels against it and connects to it;
//! outbound names it as the source.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use weft_api::WorkloadPort;

use crate::metrics::Label;
use crate::netns::Netns;

/// One local workload: where it is and what it serves.
#[derive(Debug)]
pub struct LocalWorkload {
    /// Its name in the zone: the key of its policies and inbound rules,
    /// and the destination label of inbound L7 metrics.
    pub name: Label,
    /// Its IP: tunnels may only target this address.
    pub address: IpAddr,
    /// The only ports tunnels may reach.
    pub ports: Vec<WorkloadPort>,
    /// Node mode: its own network namespace. `None`: the agent's.
    pub netns: Option<std::sync::Arc<Netns>>,
    /// Where it runs (from its labels): locality-aware load balancing
    /// prefers endpoints near it.
    pub locality: weft_api::Locality,
}

impl LocalWorkload {
    /// Whether tunnels may reach `port`.
    pub fn serves_port(&self, port: u16) -> bool {
        self.ports.iter().any(|p| p.port == port)
    }

    /// Whether `port` is declared HTTP (served by the L7 proxy).
    pub fn is_http_port(&self, port: u16) -> bool {
        self.ports
            .iter()
            .any(|p| p.port == port && p.protocol == weft_api::Protocol::Http)
    }

    /// The protocol declared for `port` (`Detect` when none was).
    pub fn protocol(&self, port: u16) -> Option<weft_api::Protocol> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.protocol)
    }

    /// Connects to the workload at `target`, from inside its namespace in
    /// node mode, within `timeout`.
    pub async fn connect(
        &self,
        target: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        let connect = async {
            match &self.netns {
                None => TcpStream::connect(target).await,
                Some(ns) => ns.tcp_socket(target.is_ipv4())?.connect(target).await,
            }
        };
        tokio::time::timeout(timeout, connect).await.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting to the workload timed out",
            )
        })?
    }
}
