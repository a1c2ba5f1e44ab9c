//! An HTTP/2 (cleartext, prior knowledge) application server and client,
//! speaking the way gRPC does: POST bodies in, a body and trailers
//! (`grpc-status`) out. They show that the agents' L7 proxies carry
//! HTTP/2 end to end, trailers included.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http::{HeaderMap, Request, Response};

/// Serves HTTP/2 on `addr` forever: each request gets `200`, a body made of
/// `marker`, the path and the request body, and trailers `grpc-status: 0`
/// and `x-marker: <marker>`; a path ending in `/Unavailable` gets a
/// trailers-only answer with `grpc-status: 14`.
pub fn serve(addr: SocketAddr, marker: String) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        loop {
            let (tcp, _) = listener.accept().await?;
            let marker = marker.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, respond))) = conn.accept().await {
                    let marker = marker.clone();
                    tokio::spawn(async move {
                        let _ = answer(req, respond, &marker).await;
                    });
                }
            });
        }
    })
}

async fn answer(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    marker: &str,
) -> Result<()> {
    let path = req.uri().path().to_owned();
    let mut body = req.into_body();
    let mut received = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        received.extend_from_slice(&chunk);
    }
    if path.ends_with("/Unavailable") {
        // A trailers-only answer: how gRPC servers return most errors.
        let response = Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "14")
            .body(())?;
        respond.send_response(response, true)?;
        return Ok(());
    }
    let response = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())?;
    let mut send = respond.send_response(response, false)?;
    let text = format!("{marker} {path} {}", String::from_utf8_lossy(&received));
    send.send_data(Bytes::from(text), false)?;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse()?);
    trailers.insert("x-marker", marker.parse()?);
    send.send_trailers(trailers)?;
    Ok(())
}

/// What a call got back.
#[derive(Debug)]
pub struct Answer {
    /// The response status.
    pub status: u16,
    /// The whole body.
    pub body: String,
    /// The trailers, if any came.
    pub trailers: Option<HeaderMap>,
}

/// One gRPC-style call over HTTP/2 prior knowledge: POST `path` with
/// `body` to `addr`, reading the answer and its trailers.
pub fn call(addr: SocketAddr, path: &str, body: &str, timeout: Duration) -> Result<Answer> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async { tokio::time::timeout(timeout, call_async(addr, path, body)).await })
        .map_err(|_| anyhow!("HTTP/2 call to {addr}{path} timed out"))?
}

async fn call_async(addr: SocketAddr, path: &str, body: &str) -> Result<Answer> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (client, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await?;
    let request = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let (response, mut send) = client.send_request(request, false)?;
    send.send_data(Bytes::copy_from_slice(body.as_bytes()), true)?;
    let response = response.await?;
    let status = response.status().as_u16();
    let mut recv = response.into_body();
    let mut received = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        recv.flow_control().release_capacity(chunk.len())?;
        received.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await?;
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&received).into_owned(),
        trailers,
    })
}
