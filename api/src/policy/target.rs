//! What a policy applies to: `spec.targetRef` (whose agents enforce it),
//! `spec.to[].targetRef` (which destination, outbound) and
//! `spec.rules[].from` (which callers, inbound).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The namespace a reference means when it leaves `namespace` out.
pub const DEFAULT_NAMESPACE: &str = "default";

pub(crate) fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

/// The workloads whose agents enforce a policy. From least to most
/// specific: `Mesh`, `Labels`, `Service`, `Workload`; when several
/// policies of a kind select a workload, the more specific one's fields
/// win (see docs/policies.md, "Which policy applies").
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum TargetRef {
    /// Every workload of the mesh (the default when `targetRef` is left out).
    #[default]
    Mesh,
    /// The workloads whose labels include all of these.
    Labels {
        /// Label keys and values, all of which must match.
        labels: BTreeMap<String, String>,
    },
    /// The workloads of one service.
    Service {
        /// The service's name.
        name: String,
        /// The service's namespace.
        #[serde(default = "default_namespace")]
        namespace: String,
    },
    /// One workload, by name.
    Workload {
        /// The Workload's name.
        name: String,
        /// The Workload's namespace.
        #[serde(default = "default_namespace")]
        namespace: String,
    },
}

impl TargetRef {
    /// How specific the selection is: the order in which matching policies
    /// are merged (least specific first, so the most specific is applied
    /// last and wins). Labels count by their number, so `{app, version}`
    /// is more specific than `{app}`.
    pub fn specificity(&self) -> (u8, usize) {
        match self {
            TargetRef::Mesh => (0, 0),
            TargetRef::Labels { labels } => (1, labels.len()),
            TargetRef::Service { .. } => (2, 0),
            TargetRef::Workload { .. } => (3, 0),
        }
    }
}

impl std::fmt::Display for TargetRef {
    /// The short form that tables show: `Mesh`, `Labels app=web`,
    /// `Service shop/web`, `Workload shop/web-1`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetRef::Mesh => f.write_str("Mesh"),
            TargetRef::Labels { labels } => {
                let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "Labels {}", pairs.join(","))
            }
            TargetRef::Service { name, namespace } => write!(f, "Service {namespace}/{name}"),
            TargetRef::Workload { name, namespace } => write!(f, "Workload {namespace}/{name}"),
        }
    }
}

/// The destination a `to[]` entry configures: calls to every service, to
/// one service, or to one external service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum DestinationRef {
    /// Calls to any destination in the mesh.
    #[default]
    Mesh,
    /// Calls to one service (through its virtual IP or DNS name).
    Service {
        /// The service's name.
        name: String,
        /// The service's namespace.
        #[serde(default = "default_namespace")]
        namespace: String,
    },
    /// Calls to one ExternalService.
    ExternalService {
        /// The ExternalService's name.
        name: String,
        /// The ExternalService's namespace.
        #[serde(default = "default_namespace")]
        namespace: String,
    },
}

impl DestinationRef {
    /// `Mesh` is less specific than a named destination.
    pub fn specificity(&self) -> u8 {
        match self {
            DestinationRef::Mesh => 0,
            DestinationRef::Service { .. } | DestinationRef::ExternalService { .. } => 1,
        }
    }
}

/// The callers a `rules[]` entry applies to, matched on the identity the
/// caller proved with its certificate. The controller turns `Service`,
/// `Labels` and `Zone` into the SPIFFE IDs of the workloads they select;
/// the SPIFFE ID names a service account, so two services sharing one
/// service account cannot be told apart (give each its own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum PeerRef {
    /// Any caller of the mesh.
    #[default]
    Mesh,
    /// One identity, exactly (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
    SpiffeId {
        /// The SPIFFE ID.
        value: String,
    },
    /// Every identity starting with this prefix, e.g.
    /// `spiffe://prod.example/ns/payments/`.
    SpiffeIdPrefix {
        /// The prefix, starting with `spiffe://<trust-domain>/`.
        value: String,
    },
    /// The workloads of one service.
    Service {
        /// The service's name.
        name: String,
        /// The service's namespace.
        #[serde(default = "default_namespace")]
        namespace: String,
    },
    /// The workloads whose labels include all of these.
    Labels {
        /// Label keys and values, all of which must match.
        labels: BTreeMap<String, String>,
    },
    /// The workloads of one zone.
    Zone {
        /// The zone's name.
        name: String,
    },
}
