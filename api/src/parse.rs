//! Reading resources from user input: YAML (one or many documents, as
//! `weftctl apply -f` gets them) and JSON (as the HTTP API gets them), with
//! every error naming the field path and, where the input text tells, the
//! line and column.
//!
//! Each document is read in three passes over its own text: a syntax check,
//! a lenient read of `apiVersion` and `kind` (so that an unknown kind is
//! reported as such, listing the known ones, wherever `kind:` appears in the
//! document), then the typed read of that kind, which refuses unknown fields.
//! Decoded resources get their defaults and are validated; the first pass
//! that fails stops that document, but the other documents are still read,
//! so one run reports the problems of the whole file.

use std::fmt;

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::kinds::{
    AccessLogSpec, CircuitBreakerSpec, ExternalServiceSpec, FaultInjectionSpec, HealthCheckSpec,
    HttpRouteSpec, LoadBalancingSpec, MeshSpec, RateLimitSpec, RetrySpec, ServiceSpec,
    TcpRouteSpec, TimeoutSpec, TraceSpec, TrafficPermissionSpec, WorkloadSpec, ZoneSpec,
};
use crate::resource::{Kind, Object, Resource, Spec, API_VERSION};
use crate::validation::{
    DocumentErrors, FieldError, FieldPath, InputErrors, PathSegment, Position,
};

/// Reads every resource of a YAML stream (documents separated by `---`),
/// applies defaults and validates each. Empty documents are skipped.
/// Either every document is good, or the error lists the problems of every
/// bad one.
pub fn parse_yaml(input: &str) -> Result<Vec<Resource>, InputErrors> {
    let mut resources = Vec::new();
    let mut failed = Vec::new();
    let mut number = 0;
    for chunk in split_documents(input) {
        let document = YamlDocument {
            text: chunk.text,
            first_line: chunk.first_line,
        };
        match read_document(&document) {
            Ok(None) => {}
            Ok(Some(resource)) => {
                number += 1;
                resources.push(resource);
            }
            Err((kind, errors)) => {
                number += 1;
                failed.push(DocumentErrors {
                    document: number,
                    line: Some(chunk.first_line + 1),
                    kind,
                    name: None,
                    errors,
                });
            }
        }
    }
    if failed.is_empty() {
        Ok(resources)
    } else {
        Err(InputErrors { documents: failed })
    }
}

/// Reads one resource from a JSON object, applies defaults and validates
/// it.
pub fn parse_json(input: &str) -> Result<Resource, InputErrors> {
    let document = JsonDocument { text: input };
    let failed = |kind, errors| InputErrors {
        documents: vec![DocumentErrors {
            document: 1,
            line: None,
            kind,
            name: None,
            errors,
        }],
    };
    match read_document(&document) {
        Ok(Some(resource)) => Ok(resource),
        Ok(None) => Err(failed(
            None,
            vec![FieldError::new(
                FieldPath::root(),
                "expected a resource, found null",
            )],
        )),
        Err((kind, errors)) => Err(failed(kind, errors)),
    }
}

/// Why resources could not be written out.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode resources: {0}")]
pub struct EncodeError(String);

/// Writes resources as one YAML stream, `---` between documents, in the
/// form [`parse_yaml`] reads back to the same values.
pub fn to_yaml(resources: &[Resource]) -> Result<String, EncodeError> {
    let mut out = String::new();
    for (i, resource) in resources.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&yaml_serde::to_string(resource).map_err(|e| EncodeError(e.to_string()))?);
    }
    Ok(out)
}

/// Problems of one document, with the kind when it could be read.
type DocumentFailure = (Option<Kind>, Vec<FieldError>);

/// Reads, defaults and validates one document; `Ok(None)` for an empty one.
fn read_document<F: Format>(document: &F) -> Result<Option<Resource>, DocumentFailure> {
    document
        .decode::<IgnoredAny>()
        .map_err(|e| (None, vec![e]))?;
    let Some(header) = document
        .decode::<Option<Header>>()
        .map_err(|e| (None, vec![e]))?
    else {
        return Ok(None);
    };
    let kind = header.check()?;
    let mut resource = decode_kind(document, kind).map_err(|e| (Some(kind), vec![e]))?;
    let mut errors = Vec::new();
    if resource.has_status() {
        errors.push(FieldError::new(
            FieldPath::of(&["status"]),
            "is set by the controller and cannot be applied; remove it",
        ));
    }
    resource.apply_defaults();
    if let Err(invalid) = resource.validate() {
        errors.extend(invalid.0);
    }
    if errors.is_empty() {
        Ok(Some(resource))
    } else {
        Err((Some(kind), errors))
    }
}

fn decode_kind<F: Format>(document: &F, kind: Kind) -> Result<Resource, FieldError> {
    fn typed<S: Spec, F: Format>(document: &F) -> Result<Resource, FieldError> {
        document.decode::<Object<S>>().map(S::into_resource)
    }
    match kind {
        Kind::Mesh => typed::<MeshSpec, F>(document),
        Kind::Zone => typed::<ZoneSpec, F>(document),
        Kind::Workload => typed::<WorkloadSpec, F>(document),
        Kind::Service => typed::<ServiceSpec, F>(document),
        Kind::ExternalService => typed::<ExternalServiceSpec, F>(document),
        Kind::TrafficPermission => typed::<TrafficPermissionSpec, F>(document),
        Kind::HttpRoute => typed::<HttpRouteSpec, F>(document),
        Kind::Timeout => typed::<TimeoutSpec, F>(document),
        Kind::Retry => typed::<RetrySpec, F>(document),
        Kind::RateLimit => typed::<RateLimitSpec, F>(document),
        Kind::FaultInjection => typed::<FaultInjectionSpec, F>(document),
        Kind::LoadBalancing => typed::<LoadBalancingSpec, F>(document),
        Kind::AccessLog => typed::<AccessLogSpec, F>(document),
        Kind::TcpRoute => typed::<TcpRouteSpec, F>(document),
        Kind::Trace => typed::<TraceSpec, F>(document),
        Kind::CircuitBreaker => typed::<CircuitBreakerSpec, F>(document),
        Kind::HealthCheck => typed::<HealthCheckSpec, F>(document),
    }
}

/// One document's text in some format, decodable more than once.
trait Format {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, FieldError>;
}

struct YamlDocument<'a> {
    text: &'a str,
    /// Lines before this document in the whole input.
    first_line: usize,
}

impl Format for YamlDocument<'_> {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, FieldError> {
        serde_path_to_error::deserialize(yaml_serde::Deserializer::from_str(self.text)).map_err(
            |e| {
                let position = e.inner().location().map(|l| Position {
                    line: l.line() + self.first_line,
                    column: l.column(),
                });
                decoding_error(e.path(), &e.inner().to_string(), position)
            },
        )
    }
}

struct JsonDocument<'a> {
    text: &'a str,
}

impl Format for JsonDocument<'_> {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, FieldError> {
        let json_position = |e: &serde_json::Error| {
            (e.line() > 0).then(|| Position {
                line: e.line(),
                column: e.column(),
            })
        };
        let mut de = serde_json::Deserializer::from_str(self.text);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            decoding_error(e.path(), &e.inner().to_string(), json_position(e.inner()))
        })?;
        de.end().map_err(|e| FieldError {
            path: FieldPath::root(),
            reason: strip_positions(&e.to_string()),
            position: json_position(&e),
        })?;
        Ok(value)
    }
}

/// Turns a decoder's error into a [`FieldError`]: our path, the decoder's
/// reason without the path and position it embeds (the position of the
/// whole input is given separately).
fn decoding_error(
    path: &serde_path_to_error::Path,
    message: &str,
    position: Option<Position>,
) -> FieldError {
    // YAML messages start with the decoder's own idea of the path, which is
    // the field's or one of its parents'.
    let reason = decoder_paths(path)
        .iter()
        .find_map(|p| message.strip_prefix(&format!("{p}: ")))
        .unwrap_or(message);
    refine(FieldError {
        path: field_path(path),
        reason: strip_positions(reason),
        position,
    })
}

/// A decoder path and its ancestors, spelled as the YAML decoder spells
/// them (`spec.ports[1].port`, `spec.ports[1]`, `spec.ports`, `spec`).
fn decoder_paths(path: &serde_path_to_error::Path) -> Vec<String> {
    let mut spelled = String::new();
    let mut out = Vec::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => {
                spelled.push_str(&format!("[{index}]"));
            }
            serde_path_to_error::Segment::Map { key } => {
                if !spelled.is_empty() {
                    spelled.push('.');
                }
                spelled.push_str(key);
            }
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {
                continue
            }
        }
        out.push(spelled.clone());
    }
    out.reverse();
    out
}

/// Converts a decoder path into ours: map keys under `labels` are data
/// (`labels["app"]`), every other map key is a field.
pub(crate) fn field_path(path: &serde_path_to_error::Path) -> FieldPath {
    let mut out = FieldPath::root();
    for segment in path.iter() {
        let under_map = matches!(
            out.segments().last(),
            Some(PathSegment::Field(field)) if MAP_FIELDS.contains(&field.as_str())
        );
        out.push(match segment {
            serde_path_to_error::Segment::Seq { index } => PathSegment::Index(*index),
            serde_path_to_error::Segment::Map { key } if under_map => PathSegment::Key(key.clone()),
            serde_path_to_error::Segment::Map { key } => PathSegment::Field(key.clone()),
            serde_path_to_error::Segment::Enum { variant } => PathSegment::Field(variant.clone()),
            serde_path_to_error::Segment::Unknown => PathSegment::Field("?".to_owned()),
        });
    }
    out
}

/// Fields whose values are maps keyed by data rather than by field names.
const MAP_FIELDS: &[&str] = &["labels"];

/// Moves the field named in a "missing field" or "duplicate field" reason
/// into the path, so that the path points at the field itself.
pub(crate) fn refine(mut error: FieldError) -> FieldError {
    for (prefix, reason) in [
        ("missing field `", "is required"),
        ("duplicate field `", "is given more than once"),
    ] {
        if let Some(field) = error
            .reason
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix('`'))
        {
            error.path.push(PathSegment::Field(field.to_owned()));
            error.reason = reason.to_owned();
            return error;
        }
    }
    // Rust type names mean nothing to the person writing YAML.
    error.reason = error
        .reason
        .replace("expected u16", "expected an integer from 0 to 65535")
        .replace("expected u8", "expected an integer from 0 to 255")
        .replace("expected u32", "expected an integer from 0 to 4294967295");
    error
}

/// Removes " at line L column C" and " at position N" from a decoder's
/// message: positions relative to one document would mislead.
fn strip_positions(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(" at ") {
        out.push_str(&rest[..start]);
        let after = &rest[start + " at ".len()..];
        match position_len(after) {
            Some(len) => rest = &after[len..],
            None => {
                out.push_str(" at ");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The length of a leading "line L column C" or "position N", if any.
fn position_len(s: &str) -> Option<usize> {
    fn number(s: &str) -> usize {
        s.bytes().take_while(u8::is_ascii_digit).count()
    }
    if let Some(rest) = s.strip_prefix("line ") {
        let line = number(rest);
        let rest = rest[line..].strip_prefix(" column ")?;
        let column = number(rest);
        (line > 0 && column > 0).then_some("line ".len() + line + " column ".len() + column)
    } else {
        let rest = s.strip_prefix("position ")?;
        let n = number(rest);
        (n > 0).then_some("position ".len() + n)
    }
}

/// `apiVersion` and `kind` of a document, read leniently: every other field
/// is skipped, whatever its type.
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
}

impl Header {
    /// Checks the API version and the kind, reporting both problems at once.
    fn check(&self) -> Result<Kind, DocumentFailure> {
        let mut errors = Vec::new();
        match self.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => errors.push(FieldError::new(
                FieldPath::of(&["apiVersion"]),
                format!("unsupported apiVersion {other:?}; expected {API_VERSION}"),
            )),
            None => errors.push(FieldError::new(
                FieldPath::of(&["apiVersion"]),
                format!("is required; expected {API_VERSION}"),
            )),
        }
        let kind = match self.kind.as_deref() {
            Some(kind) => match kind.parse::<Kind>() {
                Ok(kind) => Some(kind),
                Err(unknown) => {
                    errors.push(FieldError::new(
                        FieldPath::of(&["kind"]),
                        unknown.to_string(),
                    ));
                    None
                }
            },
            None => {
                errors.push(FieldError::new(
                    FieldPath::of(&["kind"]),
                    format!("is required; known kinds: {}", Kind::known_list()),
                ));
                None
            }
        };
        match kind {
            Some(kind) if errors.is_empty() => Ok(kind),
            _ => Err((kind, errors)),
        }
    }
}

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(HeaderVisitor)
    }
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = Header;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a resource (a mapping with apiVersion, kind, metadata and spec)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
        let mut header = Header {
            api_version: None,
            kind: None,
        };
        while let Some(key) = map.next_key::<AnyKey>()? {
            match key.0.as_deref() {
                Some("apiVersion") if header.api_version.is_some() => {
                    return Err(de::Error::duplicate_field("apiVersion"))
                }
                Some("kind") if header.kind.is_some() => {
                    return Err(de::Error::duplicate_field("kind"))
                }
                Some("apiVersion") => header.api_version = Some(map.next_value()?),
                Some("kind") => header.kind = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(header)
    }
}

/// A mapping key of any type: its text when it is a string.
struct AnyKey(Option<String>);

impl<'de> Deserialize<'de> for AnyKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AnyKeyVisitor)
    }
}

struct AnyKeyVisitor;

impl<'de> Visitor<'de> for AnyKeyVisitor {
    type Value = AnyKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<AnyKey, E> {
        Ok(AnyKey(Some(v.to_owned())))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<AnyKey, E> {
        Ok(AnyKey(None))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<AnyKey, E> {
        Ok(AnyKey(None))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<AnyKey, E> {
        Ok(AnyKey(None))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<AnyKey, E> {
        Ok(AnyKey(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<AnyKey, E> {
        Ok(AnyKey(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyKey, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(AnyKey(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyKey, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(AnyKey(None))
    }
}

/// One document of a YAML stream: its text and how many lines precede it.
#[derive(Debug, PartialEq, Eq)]
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
}

/// Splits a YAML stream into its documents' texts, so that each can be
/// decoded on its own (and more than once) with positions that still refer
/// to the whole input.
///
/// YAML forbids a line starting with `---` or `...` followed by a space or
/// the line's end inside any content (even block and quoted scalars), so
/// such lines always mark documents. A `---` opens a new chunk unless
/// nothing but comments, blank lines and directives came before it in the
/// current one; a `...` ends the current chunk.
fn split_documents(input: &str) -> Vec<Chunk<'_>> {
    fn is_marker(line: &str, marker: &str) -> bool {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    }
    let mut chunks = Vec::new();
    let (mut start, mut start_line) = (0, 0);
    let mut has_content = false;
    let mut offset = 0;
    for (number, line) in input.split_inclusive('\n').enumerate() {
        let line_start = offset;
        offset += line.len();
        if is_marker(line, "---") {
            if has_content {
                chunks.push(Chunk {
                    text: &input[start..line_start],
                    first_line: start_line,
                });
                (start, start_line) = (line_start, number);
            }
            has_content = true;
        } else if is_marker(line, "...") {
            chunks.push(Chunk {
                text: &input[start..offset],
                first_line: start_line,
            });
            (start, start_line) = (offset, number + 1);
            has_content = false;
        } else {
            let trimmed = line.trim_start();
            let ignorable = trimmed.is_empty() || trimmed.starts_with('#') || line.starts_with('%');
            has_content |= !ignorable;
        }
    }
    if start < input.len() {
        chunks.push(Chunk {
            text: &input[start..],
            first_line: start_line,
        });
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_document_markers() {
        let input = "# leading comment\n---\na: 1\n---\nb: 2\n...\n---\nc: |\n  --- not\n";
        let chunks = split_documents(input);
        assert_eq!(
            chunks,
            vec![
                Chunk {
                    text: "# leading comment\n---\na: 1\n",
                    first_line: 0
                },
                Chunk {
                    text: "---\nb: 2\n...\n",
                    first_line: 3
                },
                Chunk {
                    text: "---\nc: |\n  --- not\n",
                    first_line: 6
                },
            ]
        );
        assert_eq!(
            split_documents("a: 1"),
            vec![Chunk {
                text: "a: 1",
                first_line: 0
            }]
        );
        assert_eq!(
            split_documents("a: 1\n---x: 2\n"),
            vec![Chunk {
                text: "a: 1\n---x: 2\n",
                first_line: 0
            }]
        );
        assert!(split_documents("").is_empty());
    }

    #[test]
    fn strips_embedded_positions() {
        assert_eq!(
            strip_positions("did not find expected key at line 3 column 1, while parsing a block mapping at line 1 column 1"),
            "did not find expected key, while parsing a block mapping"
        );
        assert_eq!(strip_positions("look at this"), "look at this");
        assert_eq!(strip_positions("EOF at position 12"), "EOF");
    }
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod input_tests;
