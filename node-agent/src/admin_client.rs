//! The local commands' side of the agent's control socket (`weft-agent
//! workload ...`): one HTTP/1.1 request over the owner-only Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AdminCallError {
    #[error("cannot reach the agent's control socket {} (is a node agent running, and are you its user or root?): {source}", .socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {}: {source}", .socket.display())]
    Http {
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("admin request: {0}")]
    Request(#[from] http::Error),
}

/// Sends one request and returns the status and body.
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, String), AdminCallError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| AdminCallError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
    let http = |source| AdminCallError::Http {
        socket: socket.to_owned(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "weft-agent")
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
