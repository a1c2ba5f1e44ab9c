//! The application servers the scenarios put behind agents: a TCP echo
//! server and a tiny HTTP/1.1 server whose answers carry a marker.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

/// Serves TCP echo on `listener` forever: every byte comes back, and the
/// server half-closes once the client has.
pub fn serve_echo(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || echo(conn));
    }
}

fn echo(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// What an HTTP server says about itself in every answer.
#[derive(Debug, Clone)]
pub struct HttpIdentity {
    /// A name, e.g. `server` or `demo service`.
    pub name: String,
    /// A marker string that tests look for in bodies and on the wire.
    pub marker: String,
}

/// Serves HTTP/1.1 on `listener` forever; each answer is `200` with a body
/// naming the server, its marker, the path, the caller and a request count.
pub fn serve_http(listener: TcpListener, who: HttpIdentity) {
    let who = Arc::new(who);
    let count = Arc::new(AtomicU64::new(0));
    for conn in listener.incoming().flatten() {
        let (who, count) = (who.clone(), count.clone());
        std::thread::spawn(move || {
            let _ = answer(conn, &who, &count);
        });
    }
}

fn answer(mut conn: TcpStream, who: &HttpIdentity, count: &AtomicU64) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let n = count.fetch_add(1, Ordering::Relaxed) + 1;
    let body = format!(
        "hello from {} (request #{n} for {path}, caller {peer}) marker={}\n",
        who.name, who.marker
    );
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes())?;
    let _ = conn.shutdown(Shutdown::Write);
    Ok(())
}

/// Binds `addr` (with a clear error) for one of the servers above.
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("binding {addr}"))
}
