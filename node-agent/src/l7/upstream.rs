//! Connections the L7 proxy sends requests on, pooled per destination and
//! HTTP version: HTTP/2 connections are shared by concurrent requests,
//! HTTP/1.1 ones are reused one request at a time. The caller's version is
//! kept end to end (what crosses the tunnel is the application's own
//! protocol, as HBONE peers expect).
//!
//! An HTTP/1.1 connection goes back to the pool only once its response
//! body has been read to the end ([`PooledBody`]); one dropped half-way is
//! closed, since what is left of the response would be read as the next
//! one.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::Body;

/// Idle HTTP/1.1 connections kept per destination. Each concurrent request
/// holds one, so this is the concurrency a destination sees reused rather
/// than reconnected: a burst above it closes the extra connections as
/// their requests end, and the next burst opens new ones (a tunnel stream,
/// or a TCP connection to the workload, each). It matches Envoy's default
/// connection limit per cluster.
const MAX_IDLE_PER_KEY: usize = 1024;
/// An idle HTTP/1.1 connection older than this is not reused: the other
/// side may be about to close it.
const IDLE_REUSE: Duration = Duration::from_secs(50);

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: safe to retry anywhere.
    #[error("connect: {0}")]
    Connect(String),
    /// The destination's agent refused the tunnel stream (e.g. `403`: no
    /// TrafficPermission lets this workload connect at all).
    #[error("the destination's agent refused the stream with {0}")]
    Refused(http::StatusCode),
    /// The connection failed during the exchange (reset, closed).
    #[error("upstream: {0}")]
    Upstream(#[from] hyper::Error),
}

/// Where a pooled connection goes: the address requests are for, and the
/// agent tunnel they go through (none: straight to a local workload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// The workload's `ip:port`.
    pub authority: SocketAddr,
    /// The peer agent's HBONE address.
    pub agent: Option<SocketAddr>,
    /// HTTP/2 or not.
    pub h2: bool,
}

#[derive(Default)]
struct Idle {
    h1: HashMap<Key, Vec<(http1::SendRequest<Body>, Instant)>>,
    h2: HashMap<Key, http2::SendRequest<Body>>,
}

/// The pool.
#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<Idle>,
}

/// A response body that returns its HTTP/1.1 connection to the pool once
/// read to the end.
pub struct PooledBody {
    inner: Incoming,
    give_back: Option<(http1::SendRequest<Body>, Key, Weak<Upstreams>)>,
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if self.inner.is_end_stream() || matches!(polled, Poll::Ready(None)) {
            if let Some((sender, key, pool)) = self.give_back.take() {
                if let Some(pool) = pool.upgrade() {
                    pool.put_h1(key, sender);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Upstreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put_h1(&self, key: Key, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.h1.entry(key).or_default();
        if list.len() >= MAX_IDLE_PER_KEY {
            // Closed and expired ones sink to the bottom of a list used
            // newest first; they make room before a live one is dropped.
            list.retain(|(s, since)| !s.is_closed() && since.elapsed() < IDLE_REUSE);
        }
        if list.len() < MAX_IDLE_PER_KEY {
            list.push((sender, Instant::now()));
        }
    }

    /// An idle connection for `key`, newest first. It may still be
    /// finishing the last exchange (a response body just read to its end
    /// returns it here before its task has noticed): the caller waits for
    /// it to be ready.
    fn take_h1(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.lock();
        let list = idle.h1.get_mut(key)?;
        while let Some((sender, since)) = list.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_REUSE {
                return Some(sender);
            }
        }
        None
    }

    fn h2(&self, key: &Key) -> Option<http2::SendRequest<Body>> {
        let mut idle = self.lock();
        match idle.h2.get(key) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                idle.h2.remove(key);
                None
            }
            None => None,
        }
    }

    /// Sends `req` to `key`, on a pooled connection or on a new one made by
    /// `connect` (which must give a byte stream to the destination).
    pub async fn send<C, F, IO>(
        self: &Arc<Self>,
        key: Key,
        req: Request<Body>,
        connect: C,
    ) -> Result<Response<PooledBody>, SendError>
    where
        C: FnOnce() -> F,
        F: Future<Output = Result<IO, SendError>>,
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        if key.h2 {
            let mut sender = match self.h2(&key) {
                Some(s) => s,
                None => {
                    let io = connect().await?;
                    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(|e| SendError::Connect(e.to_string()))?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(error = %e, "upstream HTTP/2 connection ended");
                        }
                    });
                    // Another request may have raced us here; either
                    // connection works, the later one is kept.
                    self.lock().h2.insert(key, sender.clone());
                    sender
                }
            };
            let response = sender.send_request(req).await?;
            return Ok(response.map(|inner| PooledBody {
                inner,
                give_back: None,
            }));
        }
        let reused = match self.take_h1(&key) {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut sender = match reused {
            Some(s) => s,
            None => {
                let io = connect().await?;
                let (sender, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| SendError::Connect(e.to_string()))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "upstream HTTP/1.1 connection ended");
                    }
                });
                sender
            }
        };
        let response = sender.send_request(req).await?;
        let pool = Arc::downgrade(self);
        Ok(response.map(|inner| PooledBody {
            inner,
            give_back: Some((sender, key, pool)),
        }))
    }
}

/// Whether a request goes as HTTP/2 on the next hop.
pub fn is_h2(version: Version) -> bool {
    version == Version::HTTP_2
}
