//! SPIFFE identities in the form Istio uses
//! (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`), so that
//! HBONE peers of other meshes can interoperate with Weft's.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a Weft workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("identity {0:?} has an empty or invalid trust domain (lowercase letters, digits, '.', '-', '_')")]
    TrustDomain(String),
    #[error("identity {0:?} must have the path /ns/<namespace>/sa/<service-account>")]
    Path(String),
    #[error("identity {0:?} has an invalid {1} segment (letters, digits, '.', '-', '_')")]
    Segment(String, &'static str),
}

/// A workload's SPIFFE identity. Parsing is strict so that a certificate
/// cannot smuggle path tricks into an authorization decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_end: usize,
    ns: (usize, usize),
    sa: (usize, usize),
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain (the mesh's root of trust).
    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.td_end]
    }

    /// The workload's namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[self.ns.0..self.ns.1]
    }

    /// The workload's service account.
    pub fn service_account(&self) -> &str {
        &self.uri[self.sa.0..self.sa.1]
    }

    /// The whole URI, as it appears in a certificate's URI SAN.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

pub(crate) fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(uri.to_owned()))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_trust_domain(td) {
            return Err(IdentityError::TrustDomain(uri.to_owned()));
        }
        let parts: Vec<&str> = path.split('/').collect();
        let [ns_key, ns, sa_key, sa] = parts.as_slice() else {
            return Err(IdentityError::Path(uri.to_owned()));
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(IdentityError::Path(uri.to_owned()));
        }
        if !valid_segment(ns) {
            return Err(IdentityError::Segment(uri.to_owned(), "namespace"));
        }
        if !valid_segment(sa) {
            return Err(IdentityError::Segment(uri.to_owned(), "service account"));
        }
        let td_end = "spiffe://".len() + td.len();
        let ns_start = td_end + "/ns/".len();
        let sa_start = ns_start + ns.len() + "/sa/".len();
        Ok(SpiffeId {
            uri: uri.to_owned(),
            td_end,
            ns: (ns_start, ns_start + ns.len()),
            sa: (sa_start, sa_start + sa.len()),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_form() {
        let id: SpiffeId = "spiffe://cluster.local/ns/payments/sa/api".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "payments");
        assert_eq!(id.service_account(), "api");
        assert_eq!(
            id,
            SpiffeId::new("cluster.local", "payments", "api").unwrap()
        );
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://Cluster/ns/a/sa/b",
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a/sa/",
            "spiffe://td/xx/a/sa/b",
            "spiffe://td/ns/a b/sa/c",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be refused");
        }
    }
}
