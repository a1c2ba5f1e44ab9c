//! An HBONE stream (one HTTP/2 CONNECT stream of a tunnel connection) as a
//! byte stream, so that hyper can speak HTTP over it: the L7 client on the
//! caller's side and the L7 server on the destination's side.
//!
//! Flow control stays end to end: window is returned to the peer only once
//! hyper has consumed the bytes, and writes wait for window granted.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes larger than this are split, so one write never asks for more
/// window than a stream usually has.
const MAX_WRITE: usize = 64 * 1024;

/// The two halves of a CONNECT stream, read and written as bytes.
pub struct TunnelIo {
    recv: RecvStream,
    send: SendStream<Bytes>,
    /// What the last DATA frame held beyond what the reader took.
    pending: Bytes,
    /// The reader saw the end of the peer's half.
    eof: bool,
    /// The pooled tunnel connection's stream slot, released with the stream.
    _slot: Option<crate::pool::Checkout>,
}

impl TunnelIo {
    /// Wraps an established stream (the CONNECT was answered 200).
    pub fn new(recv: RecvStream, send: SendStream<Bytes>) -> Self {
        TunnelIo {
            recv,
            send,
            pending: Bytes::new(),
            eof: false,
            _slot: None,
        }
    }

    /// Wraps an established stream whose first bytes were already read off
    /// it (protocol detection): `replay` is read first, and its flow-control
    /// window is released as it is handed over, like any other frame's.
    pub fn replaying(recv: RecvStream, send: SendStream<Bytes>, replay: Bytes) -> Self {
        TunnelIo {
            pending: replay,
            ..TunnelIo::new(recv, send)
        }
    }

    /// Keeps the tunnel connection's stream slot for as long as the stream
    /// lives.
    pub fn holding(mut self, slot: crate::pool::Checkout) -> Self {
        self._slot = Some(slot);
        self
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("tunnel stream I/O"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                // Window goes back as bytes are handed over, not when the
                // frame arrived: a slow reader slows the sender.
                if let Err(e) = self.recv.flow_control().release_capacity(n) {
                    return Poll::Ready(Err(h2_to_io(e)));
                }
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.eof = true,
            }
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(MAX_WRITE);
        if self.send.capacity() == 0 {
            self.send.reserve_capacity(want);
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "tunnel stream closed",
                    )))
                }
            }
        }
        let n = self.send.capacity().min(want);
        if n == 0 {
            // Capacity was granted and taken back (a SETTINGS change):
            // ask again on the next poll.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes out queued frames on its connection task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // Already closed: the half-close has nothing left to say.
            Err(e) if !e.is_io() => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }
}
