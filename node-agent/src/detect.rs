//! Protocol detection on ports whose protocol is not declared
//! (`Protocol::Detect`): tells HTTP (which gets L7 policy) from everything
//! else (carried as opaque TCP) by the first bytes the client sends.
//!
//! Detection is safe by construction: it only looks at bytes the client
//! sent first, never consumes what it cannot replay (outbound it peeks at
//! the socket, inbound it hands the bytes it read to whoever carries the
//! stream), and it gives up after a bounded wait, so a server-first
//! protocol (the client waits for a greeting: MySQL, SMTP) is carried as TCP
//! once the timeout passes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::RecvStream;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The HTTP/2 client connection preface (RFC 9113 section 3.4): how HTTP/2
/// with prior knowledge, and so gRPC without TLS, starts.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The request methods (with their space) that start an HTTP/1.x request.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// The bytes that always suffice for a verdict: the preface is the longest
/// signature. Detection never looks at (or holds to classify) more.
pub const PREFIX_LEN: usize = H2_PREFACE.len();

/// The first TLS record's content type (handshake): TLS, carried as TCP.
const TLS_HANDSHAKE: u8 = 0x16;

/// While some bytes have arrived but too few to decide, the socket stays
/// readable, so outbound re-peeks on this tick instead of spinning.
const PEEK_TICK: Duration = Duration::from_millis(5);

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An HTTP/1.x request line: a known method and a space.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// A TLS ClientHello: opaque to the agent.
    Tls,
    /// Bytes that cannot start an HTTP request.
    NotHttp,
    /// A strict prefix of an HTTP signature (or nothing yet): more bytes
    /// decide.
    NeedMore,
}

/// Classifies the first bytes a client sent. Looks at `PREFIX_LEN` bytes
/// at most and never allocates.
pub fn classify(bytes: &[u8]) -> Verdict {
    let bytes = &bytes[..bytes.len().min(PREFIX_LEN)];
    let Some(&first) = bytes.first() else {
        return Verdict::NeedMore;
    };
    if first == TLS_HANDSHAKE {
        return Verdict::Tls;
    }
    let mut partial = false;
    for (signature, verdict) in METHODS
        .iter()
        .map(|m| (*m, Verdict::Http1))
        .chain(std::iter::once((H2_PREFACE, Verdict::Http2)))
    {
        if bytes.len() >= signature.len() {
            if bytes.starts_with(signature) {
                return verdict;
            }
        } else if signature.starts_with(bytes) {
            partial = true;
        }
    }
    if partial {
        Verdict::NeedMore
    } else {
        Verdict::NotHttp
    }
}

/// How a connection on an undeclared port is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// By the L7 proxy.
    Http,
    /// Spliced as opaque bytes.
    Tcp,
}

impl Detected {
    /// The metric label and the hint header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Detected::Http => "http",
            Detected::Tcp => "tcp",
        }
    }

    /// The hint a caller's agent sent (`HINT_HEADER`), if it is one.
    pub fn from_hint(value: &[u8]) -> Option<Detected> {
        match value {
            b"http" => Some(Detected::Http),
            b"tcp" => Some(Detected::Tcp),
            _ => None,
        }
    }
}

/// The CONNECT request header in which the caller's agent tells the
/// destination's agent what it detected (or that its L7 proxy is the
/// client), so that a server-first protocol does not wait out detection
/// twice. The destination never trusts it for more than it could see
/// itself: `tcp` still meets L4 authorization, and `http` on bytes that are
/// not HTTP only fails to parse.
pub const HINT_HEADER: &str = "x-weft-protocol";

/// A detection's result and why, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub protocol: Detected,
    /// `http1`, `http2`, `tls`, `not_http`, `timeout`, `closed` or `hint`.
    pub reason: &'static str,
}

impl Outcome {
    fn of(verdict: Verdict) -> Option<Outcome> {
        let (protocol, reason) = match verdict {
            Verdict::Http1 => (Detected::Http, "http1"),
            Verdict::Http2 => (Detected::Http, "http2"),
            Verdict::Tls => (Detected::Tcp, "tls"),
            Verdict::NotHttp => (Detected::Tcp, "not_http"),
            Verdict::NeedMore => return None,
        };
        Some(Outcome { protocol, reason })
    }

    const TIMEOUT: Outcome = Outcome {
        protocol: Detected::Tcp,
        reason: "timeout",
    };
    const CLOSED: Outcome = Outcome {
        protocol: Detected::Tcp,
        reason: "closed",
    };

    /// What the caller's agent said it detected.
    pub fn hinted(protocol: Detected) -> Outcome {
        Outcome {
            protocol,
            reason: "hint",
        }
    }
}

/// Outbound: classifies an application connection by peeking at its first
/// bytes (MSG_PEEK), so nothing is consumed and the connection is carried
/// from its first byte whatever the verdict. Gives up after `timeout`.
pub async fn peek(tcp: &TcpStream, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; PREFIX_LEN];
    let mut seen = 0;
    loop {
        if seen > 0 {
            // Bytes are waiting, so the socket stays readable and a peek
            // would return at once: wait a tick for the rest instead.
            if Instant::now() >= deadline {
                return Outcome::TIMEOUT;
            }
            tokio::time::sleep_until((Instant::now() + PEEK_TICK).min(deadline)).await;
        }
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Err(_) => return Outcome::TIMEOUT,
            // A reset or an error: carried as TCP, which reports it.
            Ok(Err(_)) | Ok(Ok(0)) => return Outcome::CLOSED,
            Ok(Ok(n)) => n,
        };
        if let Some(outcome) = Outcome::of(classify(&buf[..n])) {
            return outcome;
        }
        seen = n;
    }
}

/// Inbound: classifies a tunnel stream by reading its first DATA frames.
/// Returns the outcome and the bytes read, which the caller must replay
/// first (their flow-control window is not released yet). Holds one frame
/// as h2 received it, and joins frames only when the first ones are too
/// short to decide (a client sending a few bytes at a time).
pub async fn read(rx: &mut RecvStream, timeout: Duration) -> Result<(Outcome, Bytes), h2::Error> {
    let deadline = Instant::now() + timeout;
    let mut held = Bytes::new();
    loop {
        if let Some(outcome) = Outcome::of(classify(&held)) {
            return Ok((outcome, held));
        }
        let chunk = match tokio::time::timeout_at(deadline, rx.data()).await {
            Err(_) => return Ok((Outcome::TIMEOUT, held)),
            Ok(None) => return Ok((Outcome::CLOSED, held)),
            Ok(Some(chunk)) => chunk?,
        };
        held = if held.is_empty() {
            chunk
        } else {
            let mut joined = BytesMut::with_capacity(held.len() + chunk.len());
            joined.extend_from_slice(&held);
            joined.extend_from_slice(&chunk);
            joined.freeze()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_http1() {
        for method in METHODS {
            let mut request = method.to_vec();
            request.extend_from_slice(b"/ HTTP/1.1\r\nhost: a\r\n\r\n");
            assert_eq!(classify(&request), Verdict::Http1, "{method:?}");
            // The method and its space alone decide.
            assert_eq!(classify(method), Verdict::Http1, "{method:?}");
            // Every strict prefix waits for more.
            for end in 1..method.len() {
                assert_eq!(
                    classify(&method[..end]),
                    Verdict::NeedMore,
                    "{:?}",
                    &method[..end]
                );
            }
        }
    }

    #[test]
    fn the_preface_is_http2() {
        assert_eq!(classify(H2_PREFACE), Verdict::Http2);
        let mut with_settings = H2_PREFACE.to_vec();
        with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(classify(&with_settings), Verdict::Http2);
        for end in 1..H2_PREFACE.len() {
            assert_eq!(classify(&H2_PREFACE[..end]), Verdict::NeedMore, "{end}");
        }
        // A near miss of the preface is not HTTP.
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
            Verdict::NotHttp
        );
    }

    #[test]
    fn a_method_without_its_space_is_not_http() {
        assert_eq!(classify(b"GET/"), Verdict::NotHttp);
        assert_eq!(classify(b"GETS "), Verdict::NotHttp);
        // Methods are case-sensitive (RFC 9110 section 9.1).
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Verdict::NotHttp);
        assert_eq!(classify(b"PROPFIND / HTTP/1.1\r\n"), Verdict::NotHttp);
    }

    #[test]
    fn tls_is_opaque() {
        // A ClientHello record: handshake, TLS 1.0 record version.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
            Verdict::Tls
        );
        assert_eq!(classify(&[0x16]), Verdict::Tls);
    }

    #[test]
    fn binary_junk_and_other_protocols_are_not_http() {
        assert_eq!(classify(&[0x00, 0xff, 0x13, 0x37]), Verdict::NotHttp);
        assert_eq!(classify(b"hello\n"), Verdict::NotHttp);
        // A PostgreSQL startup message (length first).
        assert_eq!(classify(&[0, 0, 0, 8, 4, 210, 22, 47]), Verdict::NotHttp);
        // Redis inline and RESP commands.
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Verdict::NotHttp);
        // One byte that starts no signature decides at once.
        assert_eq!(classify(b"x"), Verdict::NotHttp);
    }

    #[test]
    fn nothing_yet_waits() {
        assert_eq!(classify(b""), Verdict::NeedMore);
    }

    #[test]
    fn only_the_prefix_is_looked_at() {
        let mut long = vec![b'x'; 64 * 1024];
        long[..4].copy_from_slice(b"PUT ");
        assert_eq!(classify(&long), Verdict::Http1);
    }

    #[test]
    fn hints_are_exact() {
        assert_eq!(Detected::from_hint(b"http"), Some(Detected::Http));
        assert_eq!(Detected::from_hint(b"tcp"), Some(Detected::Tcp));
        assert_eq!(Detected::from_hint(b"HTTP"), None);
        assert_eq!(Detected::from_hint(b""), None);
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn peeking_consumes_nothing() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let outcome = peek(&server, Duration::from_secs(5)).await;
        assert_eq!(outcome.protocol, Detected::Http);
        assert_eq!(outcome.reason, "http1");
        let mut server = server;
        let mut buf = [0u8; 18];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_split_method_is_waited_for() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = pair().await;
        client.write_all(b"GE").await.unwrap();
        // Two bytes that may start a request: no verdict before the deadline.
        assert_eq!(
            peek(&server, Duration::from_millis(30)).await,
            Outcome::TIMEOUT
        );
        client.write_all(b"T / HTTP/1.1\r\n\r\n").await.unwrap();
        let outcome = peek(&server, Duration::from_secs(5)).await;
        assert_eq!(outcome.reason, "http1");
    }

    /// A tunnel stream (h2 over an in-memory pipe) whose client sends
    /// `chunks` as separate DATA frames, then waits.
    async fn stream_of(chunks: &'static [&'static [u8]]) -> (RecvStream, impl Sized) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = tokio::spawn(async move {
            let (send, conn) = h2::client::handshake(a).await.unwrap();
            tokio::spawn(conn);
            let mut send = send.ready().await.unwrap();
            let request = http::Request::post("http://a/").body(()).unwrap();
            let (_response, mut body) = send.send_request(request, false).unwrap();
            for chunk in chunks {
                body.send_data(Bytes::from_static(chunk), false).unwrap();
                tokio::task::yield_now().await;
            }
            // Kept open: the stream must not end while the test reads.
            std::future::pending::<()>().await;
        });
        let mut server = h2::server::handshake(b).await.unwrap();
        let (request, _respond) = server.accept().await.unwrap().unwrap();
        let driver = tokio::spawn(async move { while server.accept().await.is_some() {} });
        (request.into_body(), (client, driver, _respond))
    }

    #[tokio::test]
    async fn inbound_joins_short_frames_and_hands_every_byte_back() {
        let (mut rx, _keep) = stream_of(&[b"PO", b"ST /x HTTP/1.1\r\n\r\n"]).await;
        let (outcome, held) = read(&mut rx, Duration::from_secs(5)).await.unwrap();
        assert_eq!(outcome.reason, "http1");
        assert_eq!(&held[..], b"POST /x HTTP/1.1\r\n\r\n");

        let (mut rx, _keep) = stream_of(&[b"\x00\x01binary"]).await;
        let (outcome, held) = read(&mut rx, Duration::from_secs(5)).await.unwrap();
        assert_eq!(outcome.reason, "not_http");
        assert_eq!(&held[..], b"\x00\x01binary");

        let (mut rx, _keep) = stream_of(&[b"PRI * HT"]).await;
        let (outcome, held) = read(&mut rx, Duration::from_millis(30)).await.unwrap();
        assert_eq!(outcome, Outcome::TIMEOUT);
        assert_eq!(
            &held[..],
            b"PRI * HT",
            "what came before the timeout is replayed"
        );
    }

    #[tokio::test]
    async fn a_silent_client_times_out_as_tcp() {
        let (_client, server) = pair().await;
        let started = Instant::now();
        let outcome = peek(&server, Duration::from_millis(50)).await;
        assert_eq!(outcome, Outcome::TIMEOUT);
        assert!(started.elapsed() < Duration::from_secs(2));
        // A prefix that never completes times out too.
        let (mut client, server) = pair().await;
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PO")
            .await
            .unwrap();
        assert_eq!(
            peek(&server, Duration::from_millis(50)).await,
            Outcome::TIMEOUT
        );
    }

    #[tokio::test]
    async fn a_closed_client_is_tcp() {
        let (client, server) = pair().await;
        drop(client);
        assert_eq!(peek(&server, Duration::from_secs(5)).await, Outcome::CLOSED);
    }
}
