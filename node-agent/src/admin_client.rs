//! The local commands' side of the admin endpoint (`weft-agent workload
//! ...`): one HTTP/1.1 request to the agent on loopback.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AdminCallError {
    #[error("cannot reach the agent's admin endpoint at {addr} (is the agent running?): {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin endpoint at {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("admin request: {0}")]
    Request(#[from] http::Error),
}

/// Sends one request and returns the status and body.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, String), AdminCallError> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| AdminCallError::Connect { addr, source })?;
    let http = |source| AdminCallError::Http { addr, source };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(http)?;
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
