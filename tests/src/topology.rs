//! The usual scenario layout: a client host and a server host joined by a
//! veth pair, one CA, the server's application, and agent configs that
//! point at each other.
//!
//! ```text
//!  client ns (10.210.0.2)                      server ns (10.210.0.3)
//!  app -> 127.0.0.1:9000/9001 -> agent ==mTLS:15008==> agent -> 10.210.0.3:8080 echo
//!                                                             -> 10.210.0.3:8081 http
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Result;

use crate::agent::{Agent, AgentSpec};
use crate::apps::{self, AppAddrs};
use crate::netns::{self, Host};
use crate::pki::{spiffe_id, Ca, IdentityFiles};
use crate::process::Proc;
use crate::tempdir::TempDir;

/// The client workload's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
/// The server workload's address.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 3);
/// The server's TCP echo port.
pub const ECHO_PORT: u16 = 8080;
/// The server's HTTP port.
pub const HTTP_PORT: u16 = 8081;
/// The client agent's explicit listener that tunnels to the echo port.
pub const ECHO_LISTENER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9000);
/// The client agent's explicit listener that tunnels to the HTTP port.
pub const HTTP_LISTENER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9001);
/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// `SERVER_IP:port`.
pub fn server(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SERVER_IP), port)
}

/// Two linked hosts, a CA, and a scratch directory. Dropping it kills what
/// runs in the hosts, deletes them, then removes the files.
pub struct Pair {
    /// The client host (10.210.0.2).
    pub client: Host,
    /// The server host (10.210.0.3).
    pub server: Host,
    /// The veth end in the client host.
    pub client_if: String,
    /// The veth end in the server host.
    pub server_if: String,
    /// The mesh's CA.
    pub ca: Ca,
    /// Configs, keys and logs.
    pub dir: TempDir,
    echo_bin: PathBuf,
}

impl Pair {
    /// Creates the hosts, the link and the CA. `echo_bin` is this package's
    /// `weft-echo` (see [`crate::echo_bin!`]).
    pub fn new(echo_bin: PathBuf) -> Result<Pair> {
        crate::require_root()?;
        let dir = TempDir::new("weft-e2e")?;
        let client = Host::new()?;
        let server = Host::new()?;
        let (client_if, server_if) = netns::link(
            &client,
            &format!("{CLIENT_IP}/24"),
            &server,
            &format!("{SERVER_IP}/24"),
        )?;
        Ok(Pair {
            client,
            server,
            client_if,
            server_if,
            ca: Ca::new("weft e2e CA")?,
            dir,
            echo_bin,
        })
    }

    /// Issues a valid leaf for service account `sa` and writes it as `<sa>.*`.
    pub fn identity(&self, sa: &str) -> Result<IdentityFiles> {
        self.ca
            .leaf(&spiffe_id(sa))?
            .write(self.dir.path(), sa, &[&self.ca])
    }

    /// Starts the server application (echo on 8080, HTTP on 8081) whose
    /// HTTP answers carry `marker`.
    pub fn start_server_app(&self, marker: &str) -> Result<Proc> {
        let addrs = AppAddrs {
            echo: server(ECHO_PORT),
            http: server(HTTP_PORT),
        };
        apps::start_app(
            &self.server,
            &self.echo_bin,
            self.dir.path(),
            "server-app",
            addrs,
            marker,
        )
    }

    /// The server agent's config: serves 8080 (tcp) and 8081 (http),
    /// allows the `client` identity.
    pub fn server_spec(&self, identity: &IdentityFiles) -> AgentSpec {
        let mut spec = AgentSpec::new(
            identity,
            IpAddr::V4(SERVER_IP),
            &[(ECHO_PORT, "tcp"), (HTTP_PORT, "http")],
        );
        spec.allow(&spiffe_id("client"));
        spec
    }

    /// The client agent's config: the server as an endpoint, and explicit
    /// listeners 127.0.0.1:9000 -> echo and 127.0.0.1:9001 -> HTTP.
    pub fn client_spec(&self, identity: &IdentityFiles) -> AgentSpec {
        let mut spec = AgentSpec::new(identity, IpAddr::V4(CLIENT_IP), &[(ECHO_PORT, "tcp")]);
        spec.endpoint(IpAddr::V4(SERVER_IP), &spiffe_id("server"))
            .listener(ECHO_LISTENER, server(ECHO_PORT))
            .listener(HTTP_LISTENER, server(HTTP_PORT));
        spec
    }

    /// Starts an agent in the client host.
    pub fn start_client_agent(&self, spec: &AgentSpec, uid: Option<u32>) -> Result<Agent> {
        Agent::start(&self.client, "client-agent", spec, &self.dir, uid)
    }

    /// Starts an agent in the server host.
    pub fn start_server_agent(&self, spec: &AgentSpec, uid: Option<u32>) -> Result<Agent> {
        Agent::start(&self.server, "server-agent", spec, &self.dir, uid)
    }
}
