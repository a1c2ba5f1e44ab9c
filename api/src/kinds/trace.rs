//! `Trace`: distributed tracing of the HTTP requests of the selected
//! workloads: W3C Trace Context propagated by their agents, and spans sent
//! to an OpenTelemetry (OTLP) collector.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::check::Check;
use crate::policy::conf::Merge;
use crate::policy::target::TargetRef;
use crate::resource::{Kind, NoStatus, Object, ObjectMeta, Resource, Spec};
use crate::validation::{FieldPath, Problems};

/// Traces the HTTP requests the selected workloads make and receive: their
/// agents keep the trace of an incoming `traceparent` (or start one,
/// sampled at `sampling` percent), add a span per hop (client span on the
/// caller's agent, server span on the destination's), forward the W3C
/// headers to the application, and send sampled spans to the backend.
/// Tracing is a property of the workload, not of a destination or caller,
/// so the kind has a single `default` block (no `to` or `rules`); blocks
/// merge field by field like the other kinds'.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceSpec {
    /// The workloads whose agents trace (default: the whole mesh).
    #[serde(default)]
    pub target_ref: TargetRef,
    /// The settings.
    pub default: TraceConf,
}

/// A Trace's `default` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceConf {
    /// The percentage (0-100) of new traces that are sampled, when a
    /// request comes without a `traceparent`; an incoming one's sampled
    /// flag is kept. Default 100. With 0, headers are still propagated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<u8>,
    /// Where sampled spans are sent; none: headers are propagated, no span
    /// is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<TraceBackend>,
}

impl Merge for TraceConf {
    fn merge(&mut self, over: &Self) {
        if over.sampling.is_some() {
            self.sampling = over.sampling;
        }
        if over.backend.is_some() {
            self.backend.clone_from(&over.backend);
        }
    }
}

impl TraceConf {
    /// Whether no Trace applies (the agent then leaves requests alone).
    pub fn is_empty(&self) -> bool {
        self.sampling.is_none() && self.backend.is_none()
    }
}

/// Where spans are sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum TraceBackend {
    /// An OpenTelemetry collector's OTLP/HTTP receiver: spans are POSTed
    /// as OTLP JSON to `<endpoint>/v1/traces`.
    Otlp {
        /// The receiver's base URL, `http://host:port` (usually port 4318).
        endpoint: String,
    },
}

impl Check for TraceConf {
    fn check(&self, path: &FieldPath, problems: &mut Problems) {
        if let Some(s) = self.sampling {
            if s > 100 {
                problems.add(
                    path.field("sampling"),
                    format!("{s} is not a percentage; must be 0-100"),
                );
            }
        }
        if let Some(TraceBackend::Otlp { endpoint }) = &self.backend {
            problems.check(
                path.field("backend").field("endpoint"),
                otlp_endpoint(endpoint),
            );
        }
    }
}

/// An OTLP endpoint the agent can POST to: `http://` with a host and port
/// (or the default 80), no query.
fn otlp_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{endpoint:?} must start with http:// (the agent sends OTLP over plain HTTP)"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{endpoint:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("{endpoint:?} must not have a query"));
    }
    Ok(())
}

impl Spec for TraceSpec {
    const KIND: Kind = Kind::Trace;
    type Status = NoStatus;

    fn validate(&self, _: &ObjectMeta, path: &FieldPath, problems: &mut Problems) {
        self.target_ref.check(&path.field("targetRef"), problems);
        self.default.check(&path.field("default"), problems);
    }

    fn into_resource(object: Object<Self>) -> Resource {
        Resource::Trace(object)
    }
}
