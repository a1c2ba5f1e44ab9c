//! Validation of resources: field paths, the errors that name them, the
//! checks shared by every kind (names, labels, ports, addresses), and the
//! trait through which checks that need other resources ask the store.
//!
//! Validation reports every problem of a document at once, each with the
//! path of the field (`spec.ports[1].port`, `metadata.labels["app"]`) and
//! the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use crate::mesh::WorkloadPort;
use crate::resource::{Kind, Resource};

/// One step of a [`FieldPath`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathSegment {
    /// A field of an object, as spelled in YAML (`serviceAccount`).
    Field(String),
    /// An element of a list.
    Index(usize),
    /// An entry of a map whose keys are data, not field names (labels).
    Key(String),
}

/// Where a field is inside a resource, written the way users read it:
/// `spec.ports[1].port`, `metadata.labels["app"]`. The empty path is the
/// whole document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FieldPath(Vec<PathSegment>);

impl FieldPath {
    /// The whole document.
    pub fn root() -> Self {
        FieldPath(Vec::new())
    }

    /// A path of fields, e.g. `FieldPath::of(&["spec", "ca"])`.
    pub fn of(fields: &[&str]) -> Self {
        FieldPath(
            fields
                .iter()
                .map(|f| PathSegment::Field((*f).to_owned()))
                .collect(),
        )
    }

    /// This path extended by a field.
    pub fn field(&self, name: &str) -> Self {
        self.with(PathSegment::Field(name.to_owned()))
    }

    /// This path extended by a list index.
    pub fn index(&self, index: usize) -> Self {
        self.with(PathSegment::Index(index))
    }

    /// This path extended by a map key.
    pub fn key(&self, key: &str) -> Self {
        self.with(PathSegment::Key(key.to_owned()))
    }

    fn with(&self, segment: PathSegment) -> Self {
        let mut segments = self.0.clone();
        segments.push(segment);
        FieldPath(segments)
    }

    /// Appends a segment in place.
    pub fn push(&mut self, segment: PathSegment) {
        self.0.push(segment);
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> &[PathSegment] {
        &self.0
    }

    /// Whether this is the whole document.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(document)");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                PathSegment::Field(name) if i == 0 => f.write_str(name)?,
                PathSegment::Field(name) => write!(f, ".{name}")?,
                PathSegment::Index(index) => write!(f, "[{index}]")?,
                PathSegment::Key(key) => write!(f, "[{key:?}]")?,
            }
        }
        Ok(())
    }
}

/// A position in the input text, 1-based, so that an editor can jump there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line, counted from 1 in the whole input (not in one document).
    pub line: usize,
    /// Column, counted from 1.
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} column {}", self.line, self.column)
    }
}

/// One problem with one field: the unit of every error this crate reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field at fault.
    pub path: FieldPath,
    /// Why, in words meant for the person who wrote the resource.
    pub reason: String,
    /// Where in the input, when known (decoding errors carry it; checks of
    /// decoded values do not).
    pub position: Option<Position>,
}

impl FieldError {
    /// An error at a path, without a position.
    pub fn new(path: FieldPath, reason: impl Into<String>) -> Self {
        FieldError {
            path,
            reason: reason.into(),
            position: None,
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_root() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.reason)?;
        if let Some(position) = self.position {
            write!(f, " (at {position})")?;
        }
        Ok(())
    }
}

/// All the problems found in one resource. Never empty when returned as an
/// error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    /// The problems, in the order they were found.
    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// `Ok` when nothing was found, so a checker can end with it.
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The problems of one document of an input, with what identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentErrors {
    /// The document's number in the input, from 1, empty documents not
    /// counted (so it matches the index of the parsed resources, plus one).
    pub document: usize,
    /// The line where the document starts in the input, when read from text.
    pub line: Option<usize>,
    /// The document's kind, when it could be read.
    pub kind: Option<Kind>,
    /// The resource's name, when known.
    pub name: Option<String>,
    /// Every problem found, never empty.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for DocumentErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut context = Vec::new();
        match (&self.kind, &self.name) {
            (Some(kind), Some(name)) => context.push(format!("{kind} {name:?}")),
            (Some(kind), None) => context.push(kind.to_string()),
            _ => {}
        }
        if let Some(line) = self.line {
            context.push(format!("from line {line}"));
        }
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "document {}", self.document)?;
            if !context.is_empty() {
                write!(f, " ({})", context.join(", "))?;
            }
            write!(f, ": {error}")?;
        }
        Ok(())
    }
}

/// Why an input (a file for `apply -f`, a request body) was refused: the
/// problems of every bad document. Nothing of such an input is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InputErrors {
    /// The bad documents, in input order.
    pub documents: Vec<DocumentErrors>,
}

impl InputErrors {
    /// Every problem, flattened, for callers that do not group by document.
    pub fn errors(&self) -> impl Iterator<Item = &FieldError> {
        self.documents.iter().flat_map(|d| d.errors.iter())
    }
}

impl fmt::Display for InputErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, document) in self.documents.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{document}")?;
        }
        Ok(())
    }
}

/// Checks the references of a batch of resources (an `apply -f` file), where
/// what the batch itself creates counts as existing: a file may define a
/// Mesh and the Workloads in it. Document numbers are the batch indexes
/// plus one, as [`crate::parse_yaml`] numbers them.
pub fn check_references(
    batch: &[Resource],
    existing: &dyn ExistingResources,
) -> Result<(), InputErrors> {
    let overlay = BatchOverlay { batch, existing };
    let documents: Vec<DocumentErrors> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, resource)| {
            resource
                .check_references(&overlay)
                .err()
                .map(|invalid| DocumentErrors {
                    document: i + 1,
                    line: None,
                    kind: Some(resource.kind()),
                    name: Some(resource.name().to_owned()),
                    errors: invalid.0,
                })
        })
        .collect();
    if documents.is_empty() {
        Ok(())
    } else {
        Err(InputErrors { documents })
    }
}

/// What exists once a batch is applied: the store's resources plus the
/// batch's.
struct BatchOverlay<'a> {
    batch: &'a [Resource],
    existing: &'a dyn ExistingResources,
}

impl BatchOverlay<'_> {
    fn in_batch(&self, kind: Kind, name: &str) -> bool {
        self.batch
            .iter()
            .any(|r| r.kind() == kind && r.name() == name)
    }
}

impl ExistingResources for BatchOverlay<'_> {
    fn mesh_exists(&self, name: &str) -> bool {
        self.in_batch(Kind::Mesh, name) || self.existing.mesh_exists(name)
    }

    fn zone_exists(&self, name: &str) -> bool {
        self.in_batch(Kind::Zone, name) || self.existing.zone_exists(name)
    }

    fn external_service_exists(&self, mesh: &str, namespace: &str, name: &str) -> Option<bool> {
        let in_batch = self.batch.iter().any(|r| {
            r.kind() == Kind::ExternalService
                && r.name() == name
                && r.mesh() == Some(mesh)
                && r.metadata().namespace.as_deref() == Some(namespace)
        });
        if in_batch {
            Some(true)
        } else {
            self.existing.external_service_exists(mesh, namespace, name)
        }
    }
}

/// Collects problems while a resource is checked, so that one pass reports
/// them all (also for checks a store adds).
#[derive(Debug, Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    /// Records a problem at a path.
    pub fn add(&mut self, path: FieldPath, reason: impl Into<String>) {
        self.0.push(FieldError::new(path, reason));
    }

    /// Records the outcome of a check that returns its reason.
    pub fn check(&mut self, path: FieldPath, outcome: Result<(), String>) {
        if let Err(reason) = outcome {
            self.add(path, reason);
        }
    }

    /// `Ok` when nothing was recorded, else every problem.
    pub fn finish(self) -> Result<(), ValidationErrors> {
        ValidationErrors(self.0).into_result()
    }
}

/// What cross-resource checks need to know about resources that already
/// exist. The store implements it; [`KnownNames`] is a plain in-memory one.
pub trait ExistingResources {
    /// Whether a Mesh of this name exists.
    fn mesh_exists(&self, name: &str) -> bool;
    /// Whether a Zone of this name exists.
    fn zone_exists(&self, name: &str) -> bool;
    /// Whether an ExternalService exists, or `None` when this source does
    /// not know (the reference is then not checked). Services and
    /// Workloads have no such check: they are derived from what agents
    /// register, so a policy may name one before it appears.
    fn external_service_exists(&self, _mesh: &str, _namespace: &str, _name: &str) -> Option<bool> {
        None
    }
}

/// A fixed set of names that exist: for tests, and for checking a file
/// offline against names fetched beforehand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownNames {
    /// Names of the Meshes that exist.
    pub meshes: BTreeSet<String>,
    /// Names of the Zones that exist.
    pub zones: BTreeSet<String>,
    /// The ExternalServices that exist, as `<mesh>/<namespace>/<name>`, when
    /// they were fetched; `None`: unknown, so references to them are not
    /// checked.
    pub external_services: Option<BTreeSet<String>>,
}

impl KnownNames {
    /// Nothing exists.
    pub fn new() -> Self {
        KnownNames::default()
    }

    /// Adds a Mesh name.
    pub fn with_mesh(mut self, name: &str) -> Self {
        self.meshes.insert(name.to_owned());
        self
    }

    /// Adds a Zone name.
    pub fn with_zone(mut self, name: &str) -> Self {
        self.zones.insert(name.to_owned());
        self
    }
}

impl ExistingResources for KnownNames {
    fn mesh_exists(&self, name: &str) -> bool {
        self.meshes.contains(name)
    }

    fn zone_exists(&self, name: &str) -> bool {
        self.zones.contains(name)
    }

    fn external_service_exists(&self, mesh: &str, namespace: &str, name: &str) -> Option<bool> {
        self.external_services
            .as_ref()
            .map(|known| known.contains(&format!("{mesh}/{namespace}/{name}")))
    }
}

/// Checks a DNS-1123 label (the form of resource names, namespaces, mesh
/// and service names): 1-63 lowercase letters, digits and `-`, starting and
/// ending with a letter or digit.
pub fn dns1123_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("{s:?} is {} characters long; at most 63", s.len()));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "{s:?} must consist of lowercase letters, digits and '-' (a DNS-1123 label)"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!("{s:?} must start and end with a letter or digit"));
    }
    Ok(())
}

/// Checks a DNS-1123 subdomain (host names, label key prefixes, service
/// accounts): at most 253 characters of dot-separated DNS-1123 labels.
pub fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 253 {
        return Err(format!("{s:?} is {} characters long; at most 253", s.len()));
    }
    for label in s.split('.') {
        if dns1123_label(label).is_err() {
            return Err(format!(
                "{s:?} must be dot-separated parts of lowercase letters, digits and '-', \
                 each starting and ending with a letter or digit (a DNS-1123 subdomain)"
            ));
        }
    }
    Ok(())
}

/// The part of a label key after the prefix and of a label value: at most 63
/// characters of letters, digits, `-`, `_`, `.`, starting and ending with a
/// letter or digit (as in Kubernetes).
fn label_token(s: &str) -> bool {
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            s.len() <= 63
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// Checks a label key: `name` or `prefix/name`, where the prefix is a
/// DNS-1123 subdomain and the name at most 63 letters, digits, `-`, `_`, `.`
/// starting and ending with a letter or digit (as in Kubernetes).
pub fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if dns1123_subdomain(prefix).is_err() {
            return Err(format!(
                "label key {key:?} has an invalid prefix {prefix:?} (must be a DNS-1123 subdomain, e.g. example.com)"
            ));
        }
    }
    if !label_token(name) {
        return Err(format!(
            "label key {key:?} must be at most 63 letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit, optionally after a DNS prefix and '/'"
        ));
    }
    Ok(())
}

/// Checks a label value: empty, or at most 63 letters, digits, `-`, `_`, `.`
/// starting and ending with a letter or digit (as in Kubernetes).
pub fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || label_token(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} must be empty or at most 63 letters, digits, '-', '_' or '.', \
             starting and ending with a letter or digit"
        ))
    }
}

/// Checks a map of labels, each problem at `path["key"]`.
pub(crate) fn check_labels(
    labels: &BTreeMap<String, String>,
    path: &FieldPath,
    problems: &mut Problems,
) {
    for (key, value) in labels {
        let entry = path.key(key);
        problems.check(entry.clone(), label_key(key));
        problems.check(entry, label_value(value));
    }
}

/// Checks a workload or service port list: every port in 1-65535, none
/// listed twice.
pub(crate) fn check_ports(ports: &[WorkloadPort], path: &FieldPath, problems: &mut Problems) {
    let mut seen: BTreeMap<u16, usize> = BTreeMap::new();
    for (i, port) in ports.iter().enumerate() {
        let at = path.index(i).field("port");
        if port.port == 0 {
            problems.add(at, "must be between 1 and 65535 (0 is not a port)");
        } else if let Some(first) = seen.get(&port.port) {
            problems.add(
                at,
                format!("port {} is already listed at index {first}", port.port),
            );
        } else {
            seen.insert(port.port, i);
        }
    }
}

/// Checks that an address can be dialled as one host: not unspecified
/// (`0.0.0.0`, `::`), not multicast, not the IPv4 broadcast address.
pub fn unicast_address(address: IpAddr) -> Result<(), String> {
    let broadcast = matches!(address, IpAddr::V4(v4) if v4.is_broadcast());
    if address.is_unspecified() {
        Err(format!(
            "{address} is the unspecified address; give the host's own address"
        ))
    } else if address.is_multicast() || broadcast {
        Err(format!(
            "{address} is a multicast or broadcast address; give one host's address"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_like_yaml() {
        let path = FieldPath::of(&["spec", "ports"]).index(1).field("port");
        assert_eq!(path.to_string(), "spec.ports[1].port");
        let path = FieldPath::of(&["metadata", "labels"]).key("app");
        assert_eq!(path.to_string(), r#"metadata.labels["app"]"#);
        assert_eq!(FieldPath::root().to_string(), "(document)");
    }

    #[test]
    fn names() {
        for good in ["a", "web-1", "0abc", &"a".repeat(63)] {
            assert!(dns1123_label(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(dns1123_label(bad).is_err(), "{bad}");
        }
        assert!(dns1123_subdomain("api.example.com").is_ok());
        assert!(dns1123_subdomain("api..example").is_err());
        assert!(dns1123_subdomain("Api.example").is_err());
    }

    #[test]
    fn labels_like_kubernetes() {
        for good in ["app", "weft.io/zone", "a.b_c-d", "example.com/Name"] {
            assert!(label_key(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/app",
            "app/",
            "-app",
            "bad key",
            "Bad_/x",
            &"a".repeat(64),
        ] {
            assert!(label_key(bad).is_err(), "{bad}");
        }
        for good in ["", "v1", "1.0", "A_b"] {
            assert!(label_value(good).is_ok(), "{good}");
        }
        for bad in ["-v", "v-", "a b", &"a".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad}");
        }
    }
}
