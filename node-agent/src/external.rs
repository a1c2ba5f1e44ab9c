//! ExternalServices: destinations outside the mesh that the operator
//! declared, which local workloads reach at a virtual IP (or by the host's
//! own name, which the DNS proxy answers with that address) and which the
//! agent dials itself, in plaintext, under the outbound policies that name
//! them. Anything else outside the mesh goes by
//! `outbound.unknown_destination`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderValue;
use tokio::net::TcpStream;

/// Where an ExternalService is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct External {
    /// The host as declared: a DNS name (resolved at each new connection,
    /// so a changed record is followed) or an IP address.
    pub host: Host,
    /// The port dialled on the host.
    pub port: u16,
    /// The `Host` header (and HTTP/2 authority) for requests to it: what a
    /// server at that name expects, not the mesh name the caller used.
    pub authority: HeaderValue,
    /// The same as an HTTP/2 `:authority`, parsed once.
    pub uri_authority: http::uri::Authority,
}

/// A declared host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// Resolved through the host's resolver.
    Name(String),
    /// Dialled as is.
    Ip(IpAddr),
}

/// Why no connection to an ExternalService was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("resolving {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    /// The agent's own DNS queries were answered by a mesh DNS proxy (its
    /// queries are captured): dialling the answer would loop back in.
    #[error(
        "{host} resolves to mesh address {address}: the agent's own DNS queries must not be captured"
    )]
    ResolvesToMesh { host: String, address: IpAddr },
    #[error("connecting to {address}: {source}")]
    Connect {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("no connection to {host} within {timeout:?}")]
    Timeout { host: String, timeout: Duration },
}

impl External {
    /// An ExternalService at `host` (a DNS name or an IP address) and
    /// `port`; `None` if `host` cannot be a `Host` header or an authority.
    pub fn new(host: &str, port: u16) -> Option<Self> {
        let parsed = match host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(host.to_ascii_lowercase()),
        };
        let authority = match (&parsed, port) {
            (Host::Name(name), 80) => name.clone(),
            (Host::Name(name), port) => format!("{name}:{port}"),
            (Host::Ip(ip), port) => SocketAddr::new(*ip, port).to_string(),
        };
        Some(External {
            host: parsed,
            port,
            uri_authority: authority.parse().ok()?,
            authority: HeaderValue::from_str(&authority).ok()?,
        })
    }

    /// The host as text, for logs and errors.
    pub fn host_text(&self) -> String {
        match &self.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }

    /// Connects to the host within `timeout`, trying each address the name
    /// resolves to in turn. `is_mesh` tells mesh addresses, which are never
    /// dialled.
    pub async fn connect(
        &self,
        timeout: Duration,
        is_mesh: impl Fn(IpAddr) -> bool,
    ) -> Result<TcpStream, ConnectError> {
        let host = self.host_text();
        let attempt = async {
            let addresses: Vec<SocketAddr> = match &self.host {
                Host::Ip(ip) => vec![SocketAddr::new(*ip, self.port)],
                Host::Name(name) => tokio::net::lookup_host((name.as_str(), self.port))
                    .await
                    .map_err(|source| ConnectError::Resolve {
                        host: host.clone(),
                        source,
                    })?
                    .collect(),
            };
            if let Some(address) = addresses.iter().find(|a| is_mesh(a.ip())) {
                return Err(ConnectError::ResolvesToMesh {
                    host: host.clone(),
                    address: address.ip(),
                });
            }
            let mut last = ConnectError::NoAddress { host: host.clone() };
            for address in addresses {
                match TcpStream::connect(address).await {
                    Ok(tcp) => {
                        let _ = tcp.set_nodelay(true);
                        return Ok(tcp);
                    }
                    Err(source) => last = ConnectError::Connect { address, source },
                }
            }
            Err(last)
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| ConnectError::Timeout { host, timeout })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_names_the_host_and_a_port_other_than_80() {
        let named = External::new("API.Example.com", 80).unwrap();
        assert_eq!(named.host, Host::Name("api.example.com".into()));
        assert_eq!(named.authority, "api.example.com");
        assert_eq!(
            External::new("api.example.com", 8443).unwrap().authority,
            "api.example.com:8443"
        );
        assert_eq!(External::new("::1", 80).unwrap().authority, "[::1]:80");
    }

    #[tokio::test]
    async fn a_name_resolving_to_a_mesh_address_is_not_dialled() {
        let external = External::new("localhost", 9).unwrap();
        let error = external
            .connect(Duration::from_secs(5), |ip| ip.is_loopback())
            .await
            .unwrap_err();
        assert!(
            matches!(error, ConnectError::ResolvesToMesh { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn connects_to_a_listening_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let external = External::new("127.0.0.1", port).unwrap();
        external
            .connect(Duration::from_secs(5), |_| false)
            .await
            .unwrap();
    }
}
