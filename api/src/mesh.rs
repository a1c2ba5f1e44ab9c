//! The mesh view an agent works from: where peer workloads are, which agent
//! fronts them and what identity that agent must prove. A static agent config
//! spells it out today; the zone controller will push the same types.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, SpiffeId};

/// The application protocol spoken on a workload port; HTTP ports are the
/// ones that get L7 policy. A port that declares none is detected, so that
/// HTTP gets L7 policy without every port having to be spelled out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: L4 policy only, never parsed. The explicit opt-out from
    /// detection, and the right choice for server-first protocols (MySQL,
    /// SMTP), which would otherwise wait out the detection timeout.
    Tcp,
    /// HTTP/1.1, HTTP/2 or gRPC: parsed by the agent for L7 policy.
    Http,
    /// Not declared (the default): the agent looks at the first bytes the
    /// client sends and carries the connection as HTTP when they start an
    /// HTTP/1.x request or the HTTP/2 preface, as TCP otherwise (or when the
    /// client sends nothing within the agent's `detect.timeout`).
    #[default]
    Detect,
}

/// One port a workload serves. Only these ports can be reached through the
/// workload's agent: the agent is never an open relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadPort {
    /// The port number (1-65535).
    pub port: u16,
    /// The application protocol on this port: `http` to get L7 policy,
    /// `tcp` never to parse it; omitted (`detect`), the agent tells HTTP
    /// from other protocols by the first bytes of each connection.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A remote workload address and the agent (HBONE listener) that fronts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// The workload's IP, the destination that applications dial.
    pub address: IpAddr,
    /// The HBONE address (`ip:15008`) of the agent in front of it.
    pub agent: SocketAddr,
    /// The identity the agent must present for this workload.
    pub identity: SpiffeId,
}

/// The workload label naming its region (the Kubernetes well-known label,
/// so that Kubernetes workloads carry it without configuration).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The workload label naming its zone inside the region (a failure domain
/// such as a cloud availability zone or a rack row, not a Weft zone).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The workload label naming its subzone inside the zone (e.g. a rack):
/// Kubernetes has no well-known label for it, so Weft names its own.
pub const SUBZONE_LABEL: &str = "topology.weft.io/subzone";

/// A workload's failure domain inside its Weft zone, from its labels
/// ([`REGION_LABEL`], [`ZONE_LABEL`], [`SUBZONE_LABEL`]), which
/// locality-aware load balancing compares with the caller's. Empty parts
/// are unknown and match only empty parts: an unlabelled endpoint is never
/// "nearer" than a labelled one that matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    /// The region (`topology.kubernetes.io/region`).
    pub region: String,
    /// The zone inside the region (`topology.kubernetes.io/zone`).
    pub zone: String,
    /// The subzone inside the zone (`topology.weft.io/subzone`).
    pub subzone: String,
}

impl Locality {
    /// The locality a workload's labels give (missing labels: empty parts).
    pub fn from_labels<'a, I>(labels: I) -> Self
    where
        I: IntoIterator<Item = (&'a String, &'a String)>,
    {
        let mut locality = Locality::default();
        for (key, value) in labels {
            match key.as_str() {
                REGION_LABEL => locality.region.clone_from(value),
                ZONE_LABEL => locality.zone.clone_from(value),
                SUBZONE_LABEL => locality.subzone.clone_from(value),
                _ => {}
            }
        }
        locality
    }

    /// Whether no label was set.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }
}

/// `region/zone/subzone`, without trailing empty parts (`eu/eu-1a`).
impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = format!("{}/{}/{}", self.region, self.zone, self.subzone);
        f.write_str(full.trim_end_matches('/'))
    }
}

/// Why a peer matcher is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerMatchError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("prefix {0:?} must start with spiffe://<trust-domain>/ and end with '*'")]
    Prefix(String),
}

/// Matches a caller's SPIFFE ID exactly, or by prefix when written with a
/// trailing `*` (e.g. `spiffe://prod.example/ns/payments/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    Exact(SpiffeId),
    Prefix(String),
}

impl PeerMatch {
    /// Whether the caller's identity is matched.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            PeerMatch::Exact(want) => want == id,
            PeerMatch::Prefix(prefix) => id.as_str().starts_with(prefix.as_str()),
        }
    }
}

impl FromStr for PeerMatch {
    type Err = PeerMatchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_suffix('*') {
            None => Ok(PeerMatch::Exact(s.parse()?)),
            Some(prefix) => {
                let td = prefix
                    .strip_prefix("spiffe://")
                    .and_then(|rest| rest.split_once('/'))
                    .map(|(td, _)| td);
                match td {
                    Some(td) if !td.is_empty() && !prefix.contains('*') => {
                        Ok(PeerMatch::Prefix(prefix.to_owned()))
                    }
                    _ => Err(PeerMatchError::Prefix(s.to_owned())),
                }
            }
        }
    }
}

impl fmt::Display for PeerMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerMatch::Exact(id) => write!(f, "{id}"),
            PeerMatch::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

impl Serialize for PeerMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PeerMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_prefix() {
        let id: SpiffeId = "spiffe://td/ns/pay/sa/api".parse().unwrap();
        assert!("spiffe://td/ns/pay/sa/api"
            .parse::<PeerMatch>()
            .unwrap()
            .matches(&id));
        assert!("spiffe://td/ns/pay/*"
            .parse::<PeerMatch>()
            .unwrap()
            .matches(&id));
        assert!(!"spiffe://td/ns/other/*"
            .parse::<PeerMatch>()
            .unwrap()
            .matches(&id));
        assert!(!"spiffe://td/ns/pay/sa/web"
            .parse::<PeerMatch>()
            .unwrap()
            .matches(&id));
        assert!("*".parse::<PeerMatch>().is_err());
        assert!("spiffe://*".parse::<PeerMatch>().is_err());
    }

    #[test]
    fn locality_comes_from_the_well_known_labels_only() {
        let labels: std::collections::BTreeMap<String, String> = [
            ("topology.kubernetes.io/region", "eu"),
            ("topology.kubernetes.io/zone", "eu-1a"),
            ("topology.weft.io/subzone", "rack-3"),
            ("app", "web"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let l = Locality::from_labels(&labels);
        assert_eq!(
            (l.region.as_str(), l.zone.as_str(), l.subzone.as_str()),
            ("eu", "eu-1a", "rack-3")
        );
        assert_eq!(l.to_string(), "eu/eu-1a/rack-3");
        let l = Locality {
            subzone: String::new(),
            ..l
        };
        assert_eq!(l.to_string(), "eu/eu-1a");
        assert!(Locality::from_labels(&std::collections::BTreeMap::new()).is_empty());
    }

    #[test]
    fn endpoint_refuses_unknown_fields() {
        let bad = r#"{"address":"10.0.0.1","agent":"10.0.0.1:15008","identity":"spiffe://td/ns/a/sa/b","x":1}"#;
        assert!(serde_json::from_str::<Endpoint>(bad).is_err());
    }
}
