//! The application servers the scenarios put behind agents: a TCP echo
//! server and a tiny HTTP/1.1 server whose answers carry a marker.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Serves TCP echo on `listener` forever: every byte comes back, and the
/// server half-closes once the client has.
pub fn serve_echo(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || echo(conn));
    }
}

/// What a client sends first to ask an echo server which one it is (for
/// tests of how connections are spread between services).
pub const WHO: &[u8] = b"WEFT-WHO?\n";

/// Serves TCP echo like [`serve_echo`], except that a connection whose
/// first bytes are [`WHO`] is answered `marker=<marker>\n` instead of the
/// echo of those bytes (everything after them is echoed).
pub fn serve_echo_marked(listener: TcpListener, marker: String) {
    let answer: Arc<[u8]> = format!("marker={marker}\n").into_bytes().into();
    for conn in listener.incoming().flatten() {
        let answer = answer.clone();
        std::thread::spawn(move || echo_with(conn, Some(&answer)));
    }
}

/// Serves a server-first protocol on `listener` forever (as SMTP or MySQL
/// do): each connection gets `greeting` at once, before the client sends
/// anything, then everything the client sends is echoed.
pub fn serve_greeting(listener: TcpListener, greeting: String) {
    let greeting: Arc<[u8]> = greeting.into_bytes().into();
    for mut conn in listener.incoming().flatten() {
        let greeting = greeting.clone();
        std::thread::spawn(move || {
            if conn.write_all(&greeting).is_ok() {
                echo(conn);
            }
        });
    }
}

fn echo(conn: TcpStream) {
    echo_with(conn, None)
}

fn echo_with(mut conn: TcpStream, who: Option<&[u8]>) {
    let _ = conn.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    if let Some(answer) = who {
        // The first read decides; a shorter prefix of WHO is plain data.
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) if buf[..n].starts_with(WHO) => {
                if conn.write_all(answer).is_err() || conn.write_all(&buf[WHO.len()..n]).is_err() {
                    return;
                }
            }
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
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

/// The longest a sink waits for its stall file before reading anyway.
pub const MAX_STALL: Duration = Duration::from_secs(300);

/// Serves a checking sink on `listener` forever. Each connection is left
/// unread until `stall_until` exists (when given; at most [`MAX_STALL`]),
/// then read to EOF while comparing every byte with [`crate::pattern`]; the
/// answer is one line, `received N bytes, first difference: none` (or `at
/// K`), then the sink closes.
pub fn serve_sink(listener: TcpListener, stall_until: Option<PathBuf>) {
    for conn in listener.incoming().flatten() {
        let stall_until = stall_until.clone();
        std::thread::spawn(move || {
            if let Some(path) = &stall_until {
                wait_for_file(path);
            }
            let _ = sink(conn);
        });
    }
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + MAX_STALL;
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sink(mut conn: TcpStream) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    let mut first_diff = None;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if first_diff.is_none() {
            first_diff = crate::pattern::first_difference(received, &buf[..n])
                .map(|at| received + at as u64);
        }
        received += n as u64;
    }
    let diff = first_diff.map_or("none".to_owned(), |at| format!("at {at}"));
    conn.write_all(format!("received {received} bytes, first difference: {diff}\n").as_bytes())?;
    let _ = conn.shutdown(Shutdown::Write);
    Ok(())
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
/// naming the server, its marker, the path, the caller and a request count,
/// followed by the request's headers (one per line, as received). Two paths
/// misbehave on purpose, for retry and routing tests: `/status/<code>`
/// answers `<code>`, `/delay/<ms>` waits that long first, and `/flaky...`
/// answers 503 to every odd-numbered
/// request it gets, and `/fail-unless/<marker>` answers 503 unless
/// `<marker>` is this server's.
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
    let headers: String = head
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| format!("header {l}\n"))
        .collect();
    let body = format!(
        "hello from {} (request #{n} for {path}, caller {peer}) marker={}\n{headers}",
        who.name, who.marker
    );
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|ms| ms.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let status = if let Some(code) = path.strip_prefix("/status/") {
        code.parse::<u16>().unwrap_or(200)
    } else if path.starts_with("/flaky") && n % 2 == 1 {
        503
    } else if let Some(wanted) = path.strip_prefix("/fail-unless/") {
        // Tells instances of one service apart: only the one whose marker
        // is `wanted` answers 200.
        if who.marker == wanted {
            200
        } else {
            503
        }
    } else {
        200
    };
    let resp = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
