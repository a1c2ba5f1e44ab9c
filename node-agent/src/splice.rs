//! Joins a TCP connection to an HTTP/2 stream in both directions, with
//! end-to-end backpressure (TCP is read only as fast as the peer grants
//! HTTP/2 window, and window is returned only once bytes reached the socket),
//! half-close carried across, and a reset answered with a reset.

use std::future::poll_fn;
use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use h2::{RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Bytes read from a socket at most per HTTP/2 send.
const CHUNK: usize = 64 * 1024;

/// Why a spliced connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("tunnel stream: {0}")]
    H2(#[from] h2::Error),
    #[error("tunnel stream closed by the peer")]
    StreamClosed,
}

/// Byte counters of one spliced connection: `up` counts socket -> stream.
pub struct SpliceCounters<'a> {
    pub up: &'a Counter,
    pub down: &'a Counter,
}

/// Runs both directions to completion. On error the socket is reset (so the
/// application sees the failure, not a clean end) and dropping the stream
/// handles resets the HTTP/2 stream.
pub async fn splice(
    tcp: &mut TcpStream,
    rx: RecvStream,
    tx: SendStream<Bytes>,
    counters: SpliceCounters<'_>,
) -> Result<(), SpliceError> {
    let (rd, wr) = tcp.split();
    let result = tokio::try_join!(
        socket_to_stream(rd, tx, counters.up),
        stream_to_socket(rx, wr, counters.down)
    );
    if result.is_err() {
        crate::socket::reset(tcp);
    }
    result.map(|_| ())
}

async fn socket_to_stream(
    mut rd: ReadHalf<'_>,
    mut tx: SendStream<Bytes>,
    counter: &Counter,
) -> Result<(), SpliceError> {
    let mut buf = BytesMut::new();
    loop {
        if rd.readable().now_or_never().is_none() {
            // Idle connections hold no buffer: its memory returns once
            // HTTP/2 has written the last chunk out.
            buf = BytesMut::new();
            rd.readable().await?;
        }
        buf.reserve(CHUNK);
        // `read_buf` (not `try_read_buf`): a short read clears readiness, so
        // the next wait costs no extra EAGAIN syscall.
        let n = rd.read_buf(&mut buf).await?;
        if n == 0 {
            tx.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        counter.inc_by(n as u64);
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            tx.reserve_capacity(data.len());
            let granted = poll_fn(|cx| tx.poll_capacity(cx))
                .await
                .ok_or(SpliceError::StreamClosed)??;
            if granted > 0 {
                tx.send_data(data.split_to(granted.min(data.len())), false)?;
            }
        }
    }
}

async fn stream_to_socket(
    mut rx: RecvStream,
    mut wr: WriteHalf<'_>,
    counter: &Counter,
) -> Result<(), SpliceError> {
    while let Some(chunk) = rx.data().await {
        let chunk = chunk?;
        wr.write_all(&chunk).await?;
        counter.inc_by(chunk.len() as u64);
        rx.flow_control().release_capacity(chunk.len())?;
    }
    // The peer half-closed: pass the FIN on, keep reading the other way.
    match wr.shutdown().await {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e.into()),
        _ => Ok(()),
    }
}

/// Copies between two plain sockets (permissive inbound, passthrough), with
/// half-close carried across; used where no tunnel is involved.
pub async fn copy_plain(
    a: &mut TcpStream,
    b: &mut TcpStream,
    up: &Counter,
    down: &Counter,
) -> io::Result<()> {
    let (to_b, to_a) = tokio::io::copy_bidirectional(a, b).await?;
    up.inc_by(to_b);
    down.inc_by(to_a);
    Ok(())
}
