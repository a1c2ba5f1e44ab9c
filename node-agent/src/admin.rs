//! The admin endpoint (loopback only: readiness, liveness, the config in
//! force, log level) and the Prometheus endpoint, both small HTTP/1.1
//! servers that stay up while the agent drains so the drain can be watched.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::config::AgentConfig;
use crate::controller::Controller;
use crate::credentials::Credentials;
use crate::drain::Drain;
use crate::logging::LogHandle;
use crate::metrics::Metrics;
use crate::node::spec::NodeWorkload;
use crate::node::{Node, Origin};
use crate::view::SharedView;

/// What the admin endpoints report on.
pub struct AdminState {
    pub config: Arc<AgentConfig>,
    /// A sidecar's identity.
    pub credentials: Option<Arc<Credentials>>,
    /// A node agent's workloads.
    pub node: Option<Arc<Node>>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    pub log: LogHandle,
    pub view: SharedView,
    /// Present in controller mode.
    pub controller: Option<Arc<Controller>>,
    /// Set once every listener is bound and serving.
    pub ready: AtomicBool,
}

type Reply = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// The largest enrolment request body accepted.
const MAX_BODY: usize = 64 << 10;

fn json(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    let mut r = text(status, serde_json::to_vec_pretty(value).unwrap_or_default());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

impl AdminState {
    async fn admin(&self, req: Request<Incoming>) -> Reply {
        if req.uri().path() == "/workloads" || req.uri().path().starts_with("/workloads/") {
            if req.method() != Method::GET {
                return text(
                    StatusCode::FORBIDDEN,
                    "enrolment goes through the control socket (node.control_socket), which only the agent's user can reach\n",
                );
            }
            return self.workloads(req).await;
        }
        self.admin_sync(&req)
    }

    /// Node mode: list, enrol (`POST /workloads` with a JSON spec) and
    /// unenrol (`DELETE /workloads/<name>`) workloads.
    async fn workloads(&self, req: Request<Incoming>) -> Reply {
        let Some(node) = &self.node else {
            return text(
                StatusCode::NOT_FOUND,
                "workloads are enrolled only in node mode (mode: node)\n",
            );
        };
        let path = req.uri().path().to_owned();
        match (req.method().clone(), path.strip_prefix("/workloads")) {
            (Method::GET, Some("" | "/")) => json(StatusCode::OK, &node.list()),
            (Method::POST, Some("" | "/")) => {
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("request body: {e}\n")),
                };
                let spec: NodeWorkload = match serde_json::from_slice(&body) {
                    Ok(spec) => spec,
                    Err(e) => {
                        return text(StatusCode::BAD_REQUEST, format!("workload spec: {e}\n"))
                    }
                };
                let name = spec.name.clone();
                match node.enrol(spec, Origin::Local).await {
                    Ok(()) => json(
                        StatusCode::OK,
                        &node.list().into_iter().find(|w| w.spec.name == name),
                    ),
                    Err(e) => text(e.status(), format!("enrolling {name}: {e}\n")),
                }
            }
            (Method::DELETE, Some(rest)) if rest.len() > 1 => {
                let name = &rest[1..];
                match node.unenrol(name).await {
                    Ok(()) => text(StatusCode::OK, format!("{name} unenrolled\n")),
                    Err(e) => text(e.status(), format!("unenrolling {name}: {e}\n")),
                }
            }
            _ => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET /workloads, POST /workloads (JSON spec), DELETE /workloads/<name>\n",
            ),
        }
    }

    fn admin_sync(&self, req: &Request<Incoming>) -> Reply {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/ready") => {
                if self.drain.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if self.ready.load(Ordering::Acquire) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                }
            }
            (&Method::GET, "/config_dump") => self.config_dump(),
            (&Method::GET, "/logging") => text(StatusCode::OK, format!("{}\n", self.log.current())),
            (&Method::POST, "/logging") => self.set_log_level(req),
            (_, "/healthz" | "/ready" | "/config_dump" | "/logging") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "endpoints: GET /ready /healthz /config_dump /logging, POST /logging?level=<filter>\n",
            ),
        }
    }

    fn config_dump(&self) -> Reply {
        let identity = self.credentials.as_ref().map(|c| {
            let current = c.current();
            serde_json::json!({
                "spiffe_id": current.identity.id.as_str(),
                "not_after_unix": current.identity.not_after,
                "reloads": current.generation,
            })
        });
        let dump = serde_json::json!({
            "identity": identity,
            "workloads": self.node.as_ref().map(|n| n.list()),
            "draining": self.drain.is_draining(),
            "in_flight": self.drain.active() + self.node.as_ref().map_or(0, |n| n.in_flight()),
            "controller": self.controller.as_ref().map(|c| c.status()),
            "view": self.view.load().summary(),
            "config": &*self.config,
        });
        let mut r = text(
            StatusCode::OK,
            serde_json::to_vec_pretty(&dump).unwrap_or_default(),
        );
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }

    fn set_log_level(&self, req: &Request<Incoming>) -> Reply {
        let level = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
        let Some(level) = level else {
            return text(
                StatusCode::BAD_REQUEST,
                "missing ?level=<filter>, e.g. ?level=debug\n",
            );
        };
        let level = level.replace("%2C", ",").replace("%3D", "=");
        match self.log.set(&level) {
            Ok(()) => text(StatusCode::OK, format!("log level set to {level}\n")),
            Err(e) => text(
                StatusCode::BAD_REQUEST,
                format!("invalid level {level:?}: {e}\n"),
            ),
        }
    }

    fn metrics(&self, req: &Request<Incoming>) -> Reply {
        if req.uri().path() != "/metrics" {
            return text(StatusCode::NOT_FOUND, "see /metrics\n");
        }
        let mut r = text(StatusCode::OK, self.metrics.encode());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        r
    }
}

/// Which of the servers a listener runs.
#[derive(Clone, Copy)]
pub enum Endpoint {
    Admin,
    Metrics,
    /// Node mode's enrolment, on the owner-only Unix socket.
    Control,
}

/// Serves one endpoint until the process exits.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, endpoint: Endpoint) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(connection(tcp, remote.to_string(), state.clone(), endpoint));
    }
}

/// Node mode: serves enrolment on the control socket until the process
/// exits.
pub async fn serve_control(listener: tokio::net::UnixListener, state: Arc<AdminState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(connection(
            stream,
            "control socket".to_owned(),
            state.clone(),
            Endpoint::Control,
        ));
    }
}

/// Binds the control socket owner-only, replacing a stale one.
pub fn bind_control(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("node.control_socket: creating {}", parent.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => debug!(path = %path.display(), "stale control socket removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("node.control_socket: {}", path.display()))
        }
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("node.control_socket: cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("node.control_socket: chmod 0600 {}", path.display()))?;
    Ok(listener)
}

async fn connection<IO>(io: IO, remote: String, state: Arc<AdminState>, endpoint: Endpoint)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move {
            let reply = match endpoint {
                Endpoint::Admin => state.admin(req).await,
                Endpoint::Metrics => state.metrics(&req),
                Endpoint::Control => state.workloads(req).await,
            };
            Ok::<_, Infallible>(reply)
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        debug!(%remote, error = %e, "admin connection failed");
    }
}
