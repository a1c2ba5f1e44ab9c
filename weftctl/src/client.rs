//! A small HTTP/1 client for the zone controller's API: one connection per
//! request, plain TCP (no TLS yet), a deadline on every request.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Error;

/// The largest answer read.
const MAX_ANSWER: usize = 64 * 1024 * 1024;
/// How long one request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where the controller's API is: `http://host:port`.
#[derive(Debug, Clone)]
pub struct Client {
    authority: String,
}

/// An answer: its status and body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body, as sent.
    pub body: Bytes,
}

impl Client {
    /// A client for `server` (`http://host[:port]`, port 80 if left out).
    pub fn new(server: &str) -> Result<Client, Error> {
        let bad = |reason: &str| Error::Server {
            server: server.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = server
            .parse()
            .map_err(|_| bad("not a URL; expected http://host:port"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(bad("https is not supported yet; use http://")),
            _ => return Err(bad("expected http://host:port")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| bad("no host; expected http://host:port"))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Client {
            authority: format!("{}:{port}", authority.host()),
        })
    }

    /// Sends one request and reads the whole answer.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Answer, Error> {
        tokio::time::timeout(TIMEOUT, self.send(method, path_and_query, body))
            .await
            .map_err(|_| Error::Http {
                server: self.authority.clone(),
                reason: format!("no answer within {} s", TIMEOUT.as_secs()),
            })?
    }

    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Answer, Error> {
        let http_error = |reason: String| Error::Http {
            server: self.authority.clone(),
            reason,
        };
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| http_error(format!("cannot connect: {e}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_error(format!("HTTP handshake failed: {e}")))?;
        let driver = tokio::spawn(connection);
        let mut builder = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        let payload = match body {
            Some((content_type, bytes)) => {
                builder = builder.header(header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(payload))
            .map_err(|e| http_error(format!("cannot build the request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http_error(format!("request failed: {e}")))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| http_error(format!("cannot read the answer: {e}")))?
            .to_bytes();
        drop(sender);
        driver.abort();
        Ok(Answer { status, body })
    }
}
