//! Log lines on stderr, as text or JSON, under a filter that
//! `PUT /v1/logging` changes while the zone runs: turning on debug for one
//! module should not need a restart, which would end every agent's stream.

use serde_json::{Map, Value};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};
use weft_api::validation::{DocumentErrors, FieldError, FieldPath};
use weft_api::InputErrors;

use crate::settings::LogFormat;

/// The filter in force, and the way to replace it.
#[derive(Clone)]
pub struct LogFilter(reload::Handle<EnvFilter, Registry>);

impl LogFilter {
    /// The filter's directives, e.g. `info,weft_zone::hub=debug`.
    pub fn current(&self) -> String {
        self.0.with_current(|f| f.to_string()).unwrap_or_default()
    }

    /// Replaces the filter with the one a `PUT /v1/logging` body names
    /// (`{"filter": "..."}`); on refusal the filter in force stays.
    pub fn set_from(&self, body: &[u8]) -> Result<String, InputErrors> {
        let filter = parse(body)?;
        let directives = filter.to_string();
        self.0
            .reload(filter)
            .map_err(|e| refused(&[], format!("cannot replace the filter: {e}")))?;
        Ok(directives)
    }
}

fn parse(body: &[u8]) -> Result<EnvFilter, InputErrors> {
    let object: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err(refused(&[], "the body must be a JSON object")),
        Err(e) => return Err(refused(&[], format!("the body is not JSON: {e}"))),
    };
    if let Some(unknown) = object.keys().find(|k| *k != "filter") {
        return Err(refused(&[unknown], "unknown field; expected only `filter`"));
    }
    let directives = match object.get("filter") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(Value::String(_)) => return Err(refused(&["filter"], "must not be empty")),
        Some(_) => return Err(refused(&["filter"], "must be a string")),
        None => {
            return Err(refused(
                &["filter"],
                "required, e.g. \"info,weft_zone::hub=debug\"",
            ))
        }
    };
    EnvFilter::builder()
        .with_regex(false)
        .parse(directives)
        .map_err(|e| refused(&["filter"], format!("not a filter ({e}): {directives:?}")))
}

fn refused(path: &[&str], reason: impl Into<String>) -> InputErrors {
    InputErrors {
        documents: vec![DocumentErrors {
            document: 1,
            line: None,
            kind: None,
            name: None,
            errors: vec![FieldError::new(FieldPath::of(path), reason)],
        }],
    }
}

/// Installs the global subscriber: RUST_LOG's filter (default `info`), on
/// stderr, as text or JSON.
pub fn init(format: LogFormat) -> LogFilter {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => registry.with(fmt.json()).try_init(),
        LogFormat::Human => registry
            .with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging was already initialised: {e}");
    }
    LogFilter(handle)
}

#[cfg(test)]
mod tests {
    use super::parse;

    fn reason(body: &str) -> String {
        let errors = parse(body.as_bytes()).expect_err("refused");
        errors.to_string()
    }

    #[test]
    fn a_filter_is_read_from_its_field() {
        let filter = parse(br#"{"filter": "warn,weft_zone::hub=debug"}"#).expect("valid");
        // Shown most specific first.
        assert_eq!(filter.to_string(), "weft_zone::hub=debug,warn");
    }

    #[test]
    fn bad_bodies_name_the_field_and_why() {
        assert!(reason(r#"{"filter": "weft_zone=loud"}"#).contains("filter"));
        assert!(reason(r#"{"filter": ""}"#).contains("must not be empty"));
        assert!(reason(r#"{"filter": 3}"#).contains("must be a string"));
        assert!(reason(r#"{}"#).contains("required"));
        assert!(reason(r#"{"filter": "info", "level": "debug"}"#).contains("level"));
        assert!(reason("[1]").contains("JSON object"));
        assert!(reason("{").contains("not JSON"));
    }
}
