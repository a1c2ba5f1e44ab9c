//! Listening sockets: bound up front so that a busy port fails the start
//! with its config field, and accepted from until the drain begins.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::warn;

use crate::drain::Drain;

/// A port that could not be bound, with the config field that names it.
#[derive(Debug, thiserror::Error)]
#[error("config field `{field}`: cannot listen on {addr}: {source}")]
pub struct BindError {
    pub field: String,
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// Binds a UDP socket (the DNS proxy's), naming its field on failure.
pub fn bind_udp(
    field: impl Into<String>,
    addr: SocketAddr,
) -> Result<tokio::net::UdpSocket, BindError> {
    let field = field.into();
    let err = |source| BindError {
        field: field.clone(),
        addr,
        source,
    };
    let socket = match crate::handoff::take_udp(&field, addr) {
        Some(socket) => socket,
        None => std::net::UdpSocket::bind(addr).map_err(err)?,
    };
    socket.set_nonblocking(true).map_err(err)?;
    tokio::net::UdpSocket::from_std(socket).map_err(err)
}

/// Binds `addr` with address reuse and a deep accept backlog, or takes
/// the socket the previous agent process handed over for `field`.
pub fn bind(field: impl Into<String>, addr: SocketAddr) -> Result<TcpListener, BindError> {
    let field = field.into();
    let err = |source| BindError {
        field: field.clone(),
        addr,
        source,
    };
    if let Some(listener) = crate::handoff::take_tcp(&field, addr) {
        listener.set_nonblocking(true).map_err(err)?;
        return TcpListener::from_std(listener).map_err(err);
    }
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// The next accepted connection, or `None` once draining begins. Accept
/// errors (e.g. out of file descriptors) are logged and retried after a
/// short pause rather than spinning.
pub async fn accept_next(listener: &TcpListener, drain: &Drain) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            biased;
            _ = drain.signaled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}
