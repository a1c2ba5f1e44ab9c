//! Socket operations the proxies share: where a captured connection was
//! going, and how to refuse one so the application sees a refusal.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// The destination an nftables `redirect` rewrote.
pub fn original_dst(tcp: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match tcp.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// Closes with RST so the application sees a refusal, not a clean end.
pub fn reset(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}
