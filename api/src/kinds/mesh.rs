//! `Mesh`: a trust domain with its own certificate authority; every
//! workload, service and policy belongs to one.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::identity::valid_trust_domain;
use crate::resource::{Kind, NoStatus, Object, ObjectMeta, Resource, Spec};
use crate::validation::{FieldPath, Problems};

/// Workload certificate lifetime when the Mesh does not set one.
pub const DEFAULT_WORKLOAD_CERT_LIFETIME: Duration = Duration::from_hours(24);
/// Shortest workload certificate lifetime accepted: short enough to test
/// rotation, long enough that renewals (at 50-80% of life) stay rare.
pub const MIN_WORKLOAD_CERT_LIFETIME: Duration = Duration::from_secs(10);
/// Longest workload certificate lifetime accepted (90 days): longer-lived
/// keys defeat the point of short-lived certificates.
pub const MAX_WORKLOAD_CERT_LIFETIME: Duration = Duration::from_hours(90 * 24);

/// A mesh: the trust domain of its workloads' identities, the CA that signs
/// their certificates, and how long those certificates live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSpec {
    /// The SPIFFE trust domain of the mesh's identities
    /// (`spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`):
    /// lowercase letters, digits, `.`, `-` and `_`.
    pub trust_domain: String,
    /// The certificate authority that signs workload certificates: exactly
    /// one of `builtin` and `provided`.
    #[serde(default)]
    pub ca: CaSpec,
    /// How long a workload certificate is valid; agents renew it at 50-80% of
    /// its life. From 10s to 2160h (90 days).
    #[serde(default = "default_lifetime")]
    pub workload_certificate_lifetime: Duration,
}

fn default_lifetime() -> Duration {
    DEFAULT_WORKLOAD_CERT_LIFETIME
}

/// Which CA signs the mesh's workload certificates: set exactly one field
/// (a one-of, as in Kubernetes volume sources).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaSpec {
    /// A CA generated and stored by the controller (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinCa>,
    /// An operator-supplied CA certificate and private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provided: Option<ProvidedCa>,
}

impl Default for CaSpec {
    fn default() -> Self {
        CaSpec {
            builtin: Some(BuiltinCa {}),
            provided: None,
        }
    }
}

/// The builtin CA: no settings yet; written `builtin: {}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuiltinCa {}

/// An operator-supplied CA: its certificate and private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvidedCa {
    /// The CA certificate (PEM).
    pub certificate: PemSource,
    /// The CA's private key (PEM).
    pub key: PemSource,
}

/// Where PEM data comes from: set exactly one of `file` and `inline`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PemSource {
    /// An absolute path to a PEM file on the controller's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The PEM text itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
}

/// The CA a valid [`CaSpec`] chose, for code that acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaChoice<'a> {
    /// Generated and stored by the controller.
    Builtin(&'a BuiltinCa),
    /// Supplied by the operator.
    Provided(&'a ProvidedCa),
}

/// The source a valid [`PemSource`] chose, for code that loads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemChoice<'a> {
    /// Read this file.
    File(&'a str),
    /// Use this text.
    Inline(&'a str),
}

impl CaSpec {
    /// The chosen CA; `None` unless exactly one field is set (which
    /// validation guarantees).
    pub fn choice(&self) -> Option<CaChoice<'_>> {
        match (&self.builtin, &self.provided) {
            (Some(builtin), None) => Some(CaChoice::Builtin(builtin)),
            (None, Some(provided)) => Some(CaChoice::Provided(provided)),
            _ => None,
        }
    }
}

impl PemSource {
    /// The chosen source; `None` unless exactly one field is set (which
    /// validation guarantees).
    pub fn choice(&self) -> Option<PemChoice<'_>> {
        match (&self.file, &self.inline) {
            (Some(file), None) => Some(PemChoice::File(file)),
            (None, Some(inline)) => Some(PemChoice::Inline(inline)),
            _ => None,
        }
    }

    fn validate(&self, what: PemKind, path: &FieldPath, problems: &mut Problems) {
        match (&self.file, &self.inline) {
            (None, None) | (Some(_), Some(_)) => {
                problems.add(path.clone(), "set exactly one of file, inline");
            }
            (Some(file), None) => {
                if !file.starts_with('/') || file.contains('\0') {
                    problems.add(
                        path.field("file"),
                        format!("{file:?} must be an absolute path"),
                    );
                }
            }
            (None, Some(pem)) => {
                if !what.matches(pem) {
                    problems.add(
                        path.field("inline"),
                        format!("must be PEM text containing {}", what.expected()),
                    );
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum PemKind {
    Certificate,
    PrivateKey,
}

impl PemKind {
    fn matches(self, pem: &str) -> bool {
        match self {
            PemKind::Certificate => pem.contains("-----BEGIN CERTIFICATE-----"),
            PemKind::PrivateKey => pem
                .lines()
                .any(|line| line.starts_with("-----BEGIN ") && line.ends_with("PRIVATE KEY-----")),
        }
    }

    fn expected(self) -> &'static str {
        match self {
            PemKind::Certificate => "a '-----BEGIN CERTIFICATE-----' block",
            PemKind::PrivateKey => "a '-----BEGIN ... PRIVATE KEY-----' block",
        }
    }
}

impl Spec for MeshSpec {
    const KIND: Kind = Kind::Mesh;
    type Status = NoStatus;

    fn validate(&self, _: &ObjectMeta, path: &FieldPath, problems: &mut Problems) {
        if !valid_trust_domain(&self.trust_domain) {
            problems.add(
                path.field("trustDomain"),
                format!(
                    "{:?} must be 1-255 lowercase letters, digits, '.', '-' or '_'",
                    self.trust_domain
                ),
            );
        }
        let ca = path.field("ca");
        match (&self.ca.builtin, &self.ca.provided) {
            (Some(_), None) => {}
            (None, Some(provided)) => {
                let provided_path = ca.field("provided");
                provided.certificate.validate(
                    PemKind::Certificate,
                    &provided_path.field("certificate"),
                    problems,
                );
                provided
                    .key
                    .validate(PemKind::PrivateKey, &provided_path.field("key"), problems);
            }
            _ => problems.add(ca, "set exactly one of builtin, provided"),
        }
        let lifetime = self.workload_certificate_lifetime;
        if lifetime < MIN_WORKLOAD_CERT_LIFETIME || lifetime > MAX_WORKLOAD_CERT_LIFETIME {
            problems.add(
                path.field("workloadCertificateLifetime"),
                format!(
                    "{lifetime} is out of range; must be from {MIN_WORKLOAD_CERT_LIFETIME} to {MAX_WORKLOAD_CERT_LIFETIME}"
                ),
            );
        }
    }

    fn into_resource(object: Object<Self>) -> Resource {
        Resource::Mesh(object)
    }
}
