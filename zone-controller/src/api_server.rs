//! The HTTP API (default :5681): resources under `/v1/resources`,
//! bootstrap tokens under `/v1/tokens` (see [`crate::tokens`]), the zone's
//! identity and CA pin at `/v1/zone`, each mesh's CAs at
//! `/v1/meshes/{mesh}/ca` (and `POST .../ca/rotate`), the inventory under
//! `/v1/inspect/{agents,services,workloads}` (see [`crate::inspect`]), the
//! log filter at `/v1/logging`, and `/healthz` and `/ready` for
//! supervisors. JSON in and out (YAML accepted for apply); errors are
//! `{"error": "..."}`, or for refused input
//! `{"errors": [{"document", "path", "reason", "line", ...}]}` with 422.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinSet;
use weft_api::{InputErrors, Kind, Resource};
use weft_store::{Expect, ResourceKey, Store, StoreError, StoredResource};

use crate::apply::{self, ApplyError};
use crate::ca_rotation::RotateError;
use crate::logging::LogFilter;
use crate::mesh_ca::{MeshCaError, MeshCas};
use crate::metrics::ZoneMetrics;
use crate::tokens::{self, IssueRefusal, Issued, TokenView};

/// The largest request body accepted.
const MAX_BODY: usize = 8 * 1024 * 1024;
/// How long open connections get to finish when the server stops.
const DRAIN: Duration = Duration::from_secs(10);

/// What every request handler shares.
pub struct AppState {
    /// The resource store.
    pub store: Store,
    /// The zone this controller runs.
    pub zone: String,
    /// The zone CA certificate (PEM), which agents pin.
    pub ca_pem: String,
    /// Its pin: `sha256:<hex of the DER>`.
    pub ca_pin: String,
    /// Whether this replica leads now.
    pub leading: Arc<AtomicBool>,
    /// This replica's id, as the agent inventory names it.
    pub replica: String,
    /// The mesh CAs (shown and rotated under `/v1/meshes/{mesh}/ca`).
    pub cas: Arc<MeshCas>,
    /// Serialises applies (validate-then-write) in this process.
    apply_lock: Mutex<()>,
    /// What `GET /metrics` shows (none: 404).
    metrics: Option<Arc<ZoneMetrics>>,
    /// The log filter `/v1/logging` shows and replaces (none: 404).
    log_filter: Option<LogFilter>,
}

impl AppState {
    /// State over an opened store.
    pub fn new(
        store: Store,
        zone: String,
        ca_pem: String,
        ca_pin: String,
        leading: Arc<AtomicBool>,
        replica: String,
        cas: Arc<MeshCas>,
    ) -> Self {
        AppState {
            store,
            zone,
            ca_pem,
            ca_pin,
            leading,
            replica,
            cas,
            apply_lock: Mutex::new(()),
            metrics: None,
            log_filter: None,
        }
    }

    /// Serves `metrics` on `GET /metrics`.
    pub fn with_metrics(self, metrics: Arc<ZoneMetrics>) -> Self {
        AppState {
            metrics: Some(metrics),
            ..self
        }
    }

    /// Shows and replaces `filter` on `/v1/logging`.
    pub fn with_log_filter(self, filter: LogFilter) -> Self {
        AppState {
            log_filter: Some(filter),
            ..self
        }
    }
}

/// Serves HTTP/1 on `listener` until `shutdown` completes, then lets open
/// connections finish their current request (up to [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // E.g. out of file descriptors: back off a little
                        // rather than spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let state = state.clone();
                let mut stop = stop_rx.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    let connection = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(30))
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(connection);
                    let outcome = tokio::select! {
                        outcome = connection.as_mut() => outcome,
                        _ = stop.changed() => {
                            connection.as_mut().graceful_shutdown();
                            connection.await
                        }
                    };
                    if let Err(error) = outcome {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    tracing::info!(open = connections.len(), "stopping: draining connections");
    // Nobody may be listening any more; that is fine.
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the drain period; closing them"
        );
        connections.abort_all();
    }
}

/// An error answer: a status and a message for a person.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let status = match &error {
            StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => {
                tracing::error!(%error, "store failure");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        ApiError::new(status, error.to_string())
    }
}

/// What a handler answers: a JSON body with a status, or an error.
enum Answer {
    Json(StatusCode, Vec<u8>),
    /// Prometheus text exposition.
    Metrics(String),
    Error(ApiError),
    Invalid(InputErrors),
}

impl From<ApiError> for Answer {
    fn from(error: ApiError) -> Self {
        Answer::Error(error)
    }
}

async fn handle(state: &AppState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let answer = route(state, request).await;
    let response = match answer {
        Answer::Json(status, body) => json_response(status, body),
        Answer::Metrics(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        Answer::Error(error) => {
            let body = serde_json::json!({ "error": error.message });
            json_response(error.status, body.to_string().into_bytes())
        }
        Answer::Invalid(errors) => json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            invalid_body(&errors).to_string().into_bytes(),
        ),
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
    response
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// `{"errors": [...]}`: one entry per problem, documents numbered from 1
/// (as `weft_api` numbers them), `line`/`column` where the input tells.
fn invalid_body(errors: &InputErrors) -> serde_json::Value {
    let mut list = Vec::new();
    for document in &errors.documents {
        for error in &document.errors {
            let mut entry = serde_json::Map::new();
            entry.insert("document".into(), document.document.into());
            if let Some(kind) = document.kind {
                entry.insert("kind".into(), kind.as_str().into());
            }
            if let Some(name) = &document.name {
                entry.insert("name".into(), name.as_str().into());
            }
            entry.insert("path".into(), error.path.to_string().into());
            entry.insert("reason".into(), error.reason.as_str().into());
            if let Some(position) = error.position {
                entry.insert("line".into(), position.line.into());
                entry.insert("column".into(), position.column.into());
            }
            if let Some(line) = document.line {
                entry.insert("documentLine".into(), line.into());
            }
            list.push(serde_json::Value::Object(entry));
        }
    }
    serde_json::json!({ "errors": list })
}

fn to_json<T: Serialize>(status: StatusCode, value: &T) -> Answer {
    match serde_json::to_vec(value) {
        Ok(body) => Answer::Json(status, body),
        Err(error) => Answer::Error(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {error}"),
        )),
    }
}

async fn route(state: &AppState, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method().clone();
    match (segments.as_slice(), &method) {
        (["healthz"], &Method::GET) => to_json(
            StatusCode::OK,
            &serde_json::json!({ "status": "ok", "zone": state.zone }),
        ),
        (["metrics"], &Method::GET) => match &state.metrics {
            Some(metrics) => Answer::Metrics(metrics.encode()),
            None => ApiError::new(StatusCode::NOT_FOUND, "no metrics here").into(),
        },
        (["ready"], &Method::GET) => match state.store.current_seq().await {
            Ok(_) => to_json(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
            Err(error) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store unavailable: {error}"),
            )
            .into(),
        },
        (["v1", "resources"], &Method::PUT | &Method::POST) => put_resources(state, request).await,
        (["v1", "resources", kind], &Method::GET) => {
            let query = Query::parse(request.uri().query());
            match parse_kind(kind) {
                Ok(kind) => list(state, kind, &query).await,
                Err(error) => error.into(),
            }
        }
        (["v1", "resources", kind, name], &Method::GET | &Method::DELETE) => {
            let query = Query::parse(request.uri().query());
            match parse_kind(kind) {
                Ok(kind) if method == Method::GET => get_one(state, kind, name, &query).await,
                Ok(kind) => delete_one(state, kind, name, &query).await,
                Err(error) => error.into(),
            }
        }
        (["v1", "zone"], &Method::GET) => to_json(
            StatusCode::OK,
            &serde_json::json!({
                "zone": state.zone,
                "caPin": state.ca_pin,
                "caPem": state.ca_pem,
                "leader": state.leading.load(Ordering::SeqCst),
                "replica": state.replica,
            }),
        ),
        (["v1", "inspect", what], &Method::GET) => inspect(state, what).await,
        (["v1", "inspect", "workloads", mesh, namespace, name, "policies"], &Method::GET) => {
            workload_policies(state, mesh, namespace, name).await
        }
        (["v1", "meshes", mesh, "ca"], &Method::GET) => mesh_ca(state, mesh).await,
        (["v1", "meshes", mesh, "ca", "rotate"], &Method::POST) => rotate_ca(state, mesh).await,
        (["v1", "logging"], &Method::GET | &Method::PUT) => log_filter(state, request).await,
        (["v1", "tokens"], &Method::POST) => issue_token(state, request).await,
        (["v1", "tokens"], &Method::GET) => list_tokens(state).await,
        (["v1", "tokens", id], &Method::DELETE) => revoke_token(state, id).await,
        (["healthz" | "ready"], _)
        | (["v1", "zone"], _)
        | (["v1", "inspect", _], _)
        | (["v1", "inspect", "workloads", _, _, _, "policies"], _)
        | (["v1", "meshes", _, "ca"], _)
        | (["v1", "meshes", _, "ca", "rotate"], _)
        | (["v1", "logging"], _)
        | (["v1", "tokens"], _)
        | (["v1", "tokens", _], _)
        | (["v1", "resources"], _)
        | (["v1", "resources", _], _)
        | (["v1", "resources", _, _], _) => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} is not allowed on {path}"),
        )
        .into(),
        _ => ApiError::not_found(format!(
            "no such endpoint {path}; see /v1/resources/{{kind}}[/{{name}}], /v1/tokens[/{{id}}], /v1/zone, /v1/logging, /v1/meshes/{{mesh}}/ca[/rotate], /v1/inspect/{{agents,services,workloads}} and /v1/inspect/workloads/{{mesh}}/{{namespace}}/{{name}}/policies"
        ))
        .into(),
    }
}

/// A kind as written in a URL: `Workload`, `workload` or `workloads`.
fn parse_kind(text: &str) -> Result<Kind, ApiError> {
    Kind::ALL
        .into_iter()
        .find(|kind| {
            let name = kind.as_str();
            let lower = text.to_ascii_lowercase();
            name.eq_ignore_ascii_case(&lower)
                || [lower.strip_suffix('s'), lower.strip_suffix("es")]
                    .into_iter()
                    .flatten()
                    .any(|singular| name.eq_ignore_ascii_case(singular))
                // `retries`
                || lower
                    .strip_suffix("ies")
                    .is_some_and(|stem| name.eq_ignore_ascii_case(&format!("{stem}y")))
        })
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "unknown kind {text:?}; known kinds: {}",
                Kind::known_list()
            ))
        })
}

/// The `mesh=` and `namespace=` query parameters (names are DNS labels, so
/// no percent-decoding is needed; anything else simply matches nothing).
#[derive(Debug, Default)]
struct Query {
    mesh: Option<String>,
    namespace: Option<String>,
}

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let mut parsed = Query::default();
        for pair in query.unwrap_or("").split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if value.is_empty() {
                continue;
            }
            match key {
                "mesh" => parsed.mesh = Some(value.to_owned()),
                "namespace" => parsed.namespace = Some(value.to_owned()),
                _ => {}
            }
        }
        parsed
    }
}

/// One resource as answered: its version next to it.
#[derive(Serialize)]
struct Item<'a> {
    version: u64,
    resource: &'a Resource,
}

impl<'a> From<&'a StoredResource> for Item<'a> {
    fn from(stored: &'a StoredResource) -> Self {
        Item {
            version: stored.version,
            resource: &stored.resource,
        }
    }
}

async fn put_resources(state: &AppState, request: Request<Incoming>) -> Answer {
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(error) => return error.into(),
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return ApiError::bad_request("the body is not UTF-8 text").into();
    };
    let batch = match apply::parse_body(text, json) {
        Ok(batch) => batch,
        Err(errors) => return Answer::Invalid(errors),
    };
    if batch.is_empty() {
        return ApiError::bad_request("the body holds no resource").into();
    }
    match apply::apply(&state.store, &state.apply_lock, batch).await {
        Ok(applied) => {
            for entry in &applied {
                tracing::info!(
                    kind = entry.kind,
                    name = entry.name,
                    version = entry.version,
                    outcome = entry.outcome,
                    "applied"
                );
            }
            to_json(StatusCode::OK, &serde_json::json!({ "applied": applied }))
        }
        Err(ApplyError::Invalid(errors)) => Answer::Invalid(errors),
        Err(ApplyError::Conflict(error)) => ApiError::new(
            StatusCode::CONFLICT,
            format!("{error}; nothing was applied, retry"),
        )
        .into(),
        Err(ApplyError::Store(error)) => {
            tracing::error!(%error, "apply failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{error}; nothing was applied"),
            )
            .into()
        }
    }
}

/// The whole request body, up to [`MAX_BODY`].
async fn read_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY} bytes"),
        )),
        Err(error) => Err(ApiError::bad_request(format!(
            "cannot read the body: {error}"
        ))),
    }
}

/// `GET /v1/logging`: the log filter in force; `PUT` with
/// `{"filter": "..."}` replaces it (422 naming the field if it is not a
/// filter, and the old one stays).
async fn log_filter(state: &AppState, request: Request<Incoming>) -> Answer {
    let Some(filter) = &state.log_filter else {
        return ApiError::not_found("no log filter here").into();
    };
    if request.method() == Method::PUT {
        let body = match read_body(request).await {
            Ok(body) => body,
            Err(error) => return error.into(),
        };
        let before = filter.current();
        match filter.set_from(&body) {
            Ok(after) => tracing::info!(%before, %after, "log filter replaced"),
            Err(errors) => return Answer::Invalid(errors),
        }
    }
    to_json(
        StatusCode::OK,
        &serde_json::json!({ "filter": filter.current() }),
    )
}

/// `POST /v1/tokens`: issues a token for this zone; 201 with its secret.
async fn issue_token(state: &AppState, request: Request<Incoming>) -> Answer {
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(error) => return error.into(),
    };
    let spec = match tokens::check_issue(&state.store, &state.zone, &body, SystemTime::now()).await
    {
        Ok(spec) => spec,
        Err(IssueRefusal::Invalid(errors)) => return Answer::Invalid(errors),
        Err(IssueRefusal::Store(error)) => return ApiError::from(error).into(),
    };
    match state.store.issue_token(&spec).await {
        Ok((id, secret)) => {
            // Never log the secret.
            tracing::info!(%id, mesh = spec.mesh, max_uses = spec.max_uses, "token issued");
            to_json(
                StatusCode::CREATED,
                &Issued::new(id, secret, spec, state.ca_pin.clone()),
            )
        }
        Err(error) => ApiError::from(error).into(),
    }
}

/// `GET /v1/inspect/{agents,services,workloads}`: JSON arrays.
async fn inspect(state: &AppState, what: &str) -> Answer {
    let answer = match what {
        "agents" => crate::inspect::agents(&state.store, &state.zone)
            .await
            .map(|v| to_json(StatusCode::OK, &v)),
        "services" => crate::inspect::services(&state.store, &state.zone)
            .await
            .map(|v| to_json(StatusCode::OK, &v)),
        "workloads" => crate::inspect::workloads(&state.store, &state.zone)
            .await
            .map(|v| to_json(StatusCode::OK, &v)),
        other => {
            return ApiError::not_found(format!(
                "nothing to inspect as {other:?}; use agents, services or workloads"
            ))
            .into()
        }
    };
    answer.unwrap_or_else(|error| ApiError::from(error).into())
}

/// `GET /v1/inspect/workloads/{mesh}/{namespace}/{name}/policies`: the
/// policies that apply to the workload in merge order, and what its agent
/// is sent for it.
async fn workload_policies(state: &AppState, mesh: &str, namespace: &str, name: &str) -> Answer {
    match crate::inspect::workload_policies(&state.store, &state.zone, mesh, namespace, name).await
    {
        Ok(Some(view)) => to_json(StatusCode::OK, &view),
        Ok(None) => {
            ApiError::not_found(format!("no workload {namespace}/{name} in mesh {mesh:?}")).into()
        }
        Err(error) => ApiError::from(error).into(),
    }
}

/// The Mesh named in a URL, or 404.
async fn mesh_named(state: &AppState, name: &str) -> Result<weft_api::Mesh, ApiError> {
    match state
        .store
        .get(&ResourceKey::global(Kind::Mesh, name))
        .await?
    {
        Some(StoredResource {
            resource: Resource::Mesh(mesh),
            ..
        }) => Ok(mesh),
        _ => Err(ApiError::not_found(format!("mesh {name:?} not found"))),
    }
}

fn ca_error(error: MeshCaError) -> ApiError {
    match error {
        MeshCaError::Store(error) => ApiError::from(error),
        other => ApiError::new(StatusCode::CONFLICT, other.to_string()),
    }
}

/// `GET /v1/meshes/{mesh}/ca`: the mesh's CAs and any rotation underway.
async fn mesh_ca(state: &AppState, name: &str) -> Answer {
    let records = async {
        let mesh = mesh_named(state, name).await?;
        state.cas.records(&mesh).await.map_err(ca_error)
    }
    .await;
    ca_answer(state, name, records).await
}

/// `POST /v1/meshes/{mesh}/ca/rotate`: starts a rotation to a new built-in
/// CA; answers the CAs afterwards (the new one pending). 409 when a
/// rotation is already underway or the mesh uses a provided CA.
async fn rotate_ca(state: &AppState, name: &str) -> Answer {
    let records = async {
        let mesh = mesh_named(state, name).await?;
        match crate::ca_rotation::rotate(&state.cas, &mesh).await {
            Ok(records) => Ok(records),
            Err(RotateError::Refused(reason)) => Err(ApiError::new(StatusCode::CONFLICT, reason)),
            Err(RotateError::Ca(error)) => Err(ca_error(error)),
        }
    }
    .await;
    ca_answer(state, name, records).await
}

/// Answers mesh `name`'s CAs as `GET /v1/meshes/{mesh}/ca` shows them, or
/// the error met while reading or changing them.
async fn ca_answer(
    state: &AppState,
    name: &str,
    records: Result<Vec<weft_store::MeshCaRecord>, ApiError>,
) -> Answer {
    let view = match records {
        Ok(records) => crate::ca_view::view(&state.store, &state.zone, name, &records)
            .await
            .map_err(ApiError::from),
        Err(error) => Err(error),
    };
    match view {
        Ok(view) => to_json(StatusCode::OK, &view),
        Err(error) => error.into(),
    }
}

/// `GET /v1/tokens`: every token, without secrets.
async fn list_tokens(state: &AppState) -> Answer {
    match state.store.list_tokens().await {
        Ok(tokens) => {
            let items: Vec<TokenView> = tokens.into_iter().map(TokenView::from).collect();
            to_json(StatusCode::OK, &serde_json::json!({ "items": items }))
        }
        Err(error) => ApiError::from(error).into(),
    }
}

/// `DELETE /v1/tokens/{id}`: revokes a token (404 if unknown).
async fn revoke_token(state: &AppState, id: &str) -> Answer {
    match state.store.revoke_token(id).await {
        Ok(true) => {
            tracing::info!(%id, "token revoked");
            to_json(
                StatusCode::OK,
                &serde_json::json!({ "revoked": { "id": id } }),
            )
        }
        Ok(false) => ApiError::not_found(format!("token {id:?} not found")).into(),
        Err(error) => ApiError::from(error).into(),
    }
}

async fn list(state: &AppState, kind: Kind, query: &Query) -> Answer {
    let mesh = kind.in_mesh().then_some(query.mesh.as_deref()).flatten();
    let namespace = kind
        .namespaced()
        .then_some(query.namespace.as_deref())
        .flatten();
    match state.store.list(kind, mesh, namespace).await {
        Ok(stored) => {
            let items: Vec<Item<'_>> = stored.iter().map(Item::from).collect();
            to_json(StatusCode::OK, &serde_json::json!({ "items": items }))
        }
        Err(error) => ApiError::from(error).into(),
    }
}

/// Finds the one resource a URL names. For a namespaced kind without
/// `namespace=`, the name must be unique in the mesh.
async fn find(
    state: &AppState,
    kind: Kind,
    name: &str,
    query: &Query,
) -> Result<StoredResource, ApiError> {
    let mesh = query.mesh.as_deref().unwrap_or(weft_api::DEFAULT_MESH);
    let where_ = || match (kind.in_mesh(), &query.namespace) {
        (false, _) => String::new(),
        (true, Some(namespace)) => format!(" in mesh {mesh:?}, namespace {namespace:?}"),
        (true, None) => format!(" in mesh {mesh:?}"),
    };
    let not_found = || ApiError::not_found(format!("{kind} {name:?} not found{}", where_()));
    let key = match (kind.in_mesh(), kind.namespaced(), &query.namespace) {
        (false, _, _) => ResourceKey::global(kind, name),
        (true, true, Some(namespace)) => ResourceKey::namespaced(kind, mesh, namespace, name),
        (true, true, None) => {
            let mut matches: Vec<StoredResource> = state
                .store
                .list(kind, Some(mesh), None)
                .await?
                .into_iter()
                .filter(|s| s.resource.name() == name)
                .collect();
            return match matches.len() {
                0 => Err(not_found()),
                1 => Ok(matches.remove(0)),
                _ => {
                    let namespaces: Vec<&str> = matches
                        .iter()
                        .filter_map(|s| s.resource.metadata().namespace.as_deref())
                        .collect();
                    Err(ApiError::bad_request(format!(
                        "{kind} {name:?} exists in several namespaces ({}); add namespace=",
                        namespaces.join(", ")
                    )))
                }
            };
        }
        (true, false, _) => ResourceKey {
            kind,
            mesh: Some(mesh.to_owned()),
            namespace: None,
            name: name.to_owned(),
        },
    };
    state.store.get(&key).await?.ok_or_else(not_found)
}

async fn get_one(state: &AppState, kind: Kind, name: &str, query: &Query) -> Answer {
    match find(state, kind, name, query).await {
        Ok(stored) => to_json(StatusCode::OK, &Item::from(&stored)),
        Err(error) => error.into(),
    }
}

async fn delete_one(state: &AppState, kind: Kind, name: &str, query: &Query) -> Answer {
    // Deletes go through the apply lock too, so that an apply's reference
    // checks are not undercut by a delete in between.
    let _guard = state.apply_lock.lock().await;
    let stored = match find(state, kind, name, query).await {
        Ok(stored) => stored,
        Err(error) => return error.into(),
    };
    if let Resource::Mesh(_) = &stored.resource {
        match resources_in_mesh(&state.store, name).await {
            Ok(held) if held.is_empty() => {}
            Ok(held) => {
                return ApiError::new(
                    StatusCode::CONFLICT,
                    format!("mesh {name:?} still holds {held}; delete them first (its policies too, such as the allow-all TrafficPermission it was created with)"),
                )
                .into()
            }
            Err(error) => return ApiError::from(error).into(),
        }
    }
    let key = ResourceKey::of(&stored.resource);
    match state
        .store
        .delete(&key, Expect::Version(stored.version))
        .await
    {
        Ok(true) => {
            tracing::info!(%key, "deleted");
            withdraw_from_agent(state, &stored.resource, &key).await;
            to_json(
                StatusCode::OK,
                &serde_json::json!({ "deleted": Item::from(&stored) }),
            )
        }
        Ok(false) => ApiError::not_found(format!("{key} not found")).into(),
        Err(error) => ApiError::from(error).into(),
    }
}

/// After the operator deleted a Workload an agent registered: the agent
/// may not register it again (nor renew its certificate), and its stream
/// is cut (see [`crate::cutoff`]).
async fn withdraw_from_agent(state: &AppState, resource: &Resource, key: &ResourceKey) {
    let Resource::Workload(workload) = resource else {
        return;
    };
    let Some(agent) = workload.metadata.labels.get(crate::views::AGENT_LABEL) else {
        return;
    };
    let withdrawn = crate::cutoff::workload_key(key);
    match state
        .store
        .withdraw_workload(&state.zone, agent, &withdrawn)
        .await
    {
        Ok(_) => {
            tracing::info!(%agent, workload = %withdrawn, "workload withdrawn from its agent: no renewal, no re-registration")
        }
        Err(error) => {
            tracing::error!(%agent, workload = %withdrawn, %error, "cannot record the withdrawal; the agent may register the workload again")
        }
    }
}

/// What a mesh still holds, as `3 Workload, 1 TrafficPermission` (empty
/// when nothing), so that the refusal to delete it says what to delete.
async fn resources_in_mesh(store: &Store, mesh: &str) -> Result<String, StoreError> {
    let mut held = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.in_mesh()) {
        let count = store.list(kind, Some(mesh), None).await?.len();
        if count > 0 {
            held.push(format!("{count} {kind}"));
        }
    }
    Ok(held.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_in_urls() {
        assert_eq!(parse_kind("Workload").ok(), Some(Kind::Workload));
        assert_eq!(parse_kind("workloads").ok(), Some(Kind::Workload));
        assert_eq!(parse_kind("meshes").ok(), Some(Kind::Mesh));
        assert_eq!(parse_kind("mesh").ok(), Some(Kind::Mesh));
        assert_eq!(
            parse_kind("externalservices").ok(),
            Some(Kind::ExternalService)
        );
        assert_eq!(parse_kind("retries").ok(), Some(Kind::Retry));
        assert_eq!(parse_kind("httproutes").ok(), Some(Kind::HttpRoute));
        assert_eq!(
            parse_kind("TrafficPermissions").ok(),
            Some(Kind::TrafficPermission)
        );
        assert!(parse_kind("Gadget").is_err());
    }

    #[test]
    fn queries() {
        let q = Query::parse(Some("mesh=prod&namespace=&x=1&namespace=pay"));
        assert_eq!(q.mesh.as_deref(), Some("prod"));
        assert_eq!(q.namespace.as_deref(), Some("pay"));
        assert!(Query::parse(None).mesh.is_none());
    }
}
