//! What the mesh CA tests share: the CA view of
//! `GET /v1/meshes/default/ca` as plain values, checks on bundles and
//! chains, and one enrolled agent whose acks drive a rotation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use weft_api::proto::agent::v1 as pb;

use super::agent::{
    certificate_request, connect, enroll_with_token, hello, verify_chain, workload, ConfigStream,
    Identity, Pinned,
};
use super::Zone;

/// Longer than [`super::DEADLINE`]: a retired CA stays as long as the
/// certificates it signed (20 s in these tests).
pub const LONG: Duration = Duration::from_secs(45);

/// One CA of a mesh as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ca {
    /// `sha256:<hex>` of the certificate.
    pub fingerprint: String,
    /// `signing`, `pending` or `trusted-until`.
    pub role: String,
    /// `builtin` or `provided`.
    pub source: String,
    /// The CA certificate.
    pub pem: String,
}

impl Ca {
    fn of(entry: &Value) -> Ca {
        let field = |name: &str| entry[name].as_str().unwrap_or_default().to_owned();
        Ca {
            fingerprint: field("fingerprint"),
            role: field("role"),
            source: field("source"),
            pem: field("certificatePem"),
        }
    }
}

/// `GET /v1/meshes/default/ca`.
pub async fn ca_view(zone: &Zone) -> Value {
    zone.get_json("/v1/meshes/default/ca").await
}

/// The CAs of a view, oldest first.
pub fn cas(view: &Value) -> Vec<Ca> {
    view["cas"]
        .as_array()
        .expect("a cas array")
        .iter()
        .map(Ca::of)
        .collect()
}

/// (fingerprint, role) of each CA of a view, oldest first.
pub fn roles(view: &Value) -> Vec<(String, String)> {
    cas(view)
        .into_iter()
        .map(|ca| (ca.fingerprint, ca.role))
        .collect()
}

/// The CA whose certificate is `pem` in the view, if any.
pub fn find(view: &Value, pem: &str) -> Option<Ca> {
    let der = der_of(pem);
    cas(view).into_iter().find(|ca| der_of(&ca.pem) == der)
}

/// The CA with `fingerprint` in the view.
pub fn by_fingerprint(view: &Value, fingerprint: &str) -> Ca {
    cas(view)
        .into_iter()
        .find(|ca| ca.fingerprint == fingerprint)
        .unwrap_or_else(|| panic!("no CA {fingerprint} in {view:#}"))
}

/// The CA that signs.
pub fn signing(view: &Value) -> Ca {
    cas(view)
        .into_iter()
        .find(|ca| ca.role == "signing")
        .unwrap_or_else(|| panic!("no signing CA in {view:#}"))
}

/// The DER of the first certificate in `pem` (empty if there is none).
pub fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .unwrap_or_default()
}

/// How many certificates a bundle holds.
pub fn bundle_len(pem: &str) -> usize {
    CertificateDer::pem_slice_iter(pem.as_bytes()).count()
}

/// Whether the bundle holds the CA certificate `ca_pem`.
pub fn bundle_holds(bundle_pem: &str, ca_pem: &str) -> bool {
    let wanted = der_of(ca_pem);
    CertificateDer::pem_slice_iter(bundle_pem.as_bytes())
        .filter_map(Result::ok)
        .any(|c| c.as_ref() == wanted.as_slice())
}

/// Whether `chain_pem` verifies with the certificates of `ca_pem` as the
/// only trust anchors.
pub fn signed_by(chain_pem: &str, ca_pem: &str) -> bool {
    verify_chain(chain_pem, ca_pem).is_ok()
}

/// An enrolled agent `vm-1` (workload `web-1`) with a config stream that
/// acks only the updates the test waits for, since what it acks drives
/// the rotation.
pub struct Agent {
    pinned: Pinned,
    identity: Identity,
    /// The enrolment's answer.
    pub enrolled: pb::EnrollResponse,
    stream: ConfigStream,
}

impl Agent {
    /// Enrols `vm-1` with a token for `web-1` and opens its stream.
    pub async fn enrol(zone: &Zone, pinned: &Pinned) -> Agent {
        let secret = zone.issue_token(&["--workload", "web-1"]).await;
        let web = workload("web-1", "web", "10.0.0.1", 8080);
        let (enrolled, identity) =
            enroll_with_token(zone.grpc, pinned, &secret, "vm-1", vec![web.clone()]).await;
        let stream =
            ConfigStream::open(zone.grpc, pinned, &identity, hello("vm-1", vec![web])).await;
        Agent {
            pinned: pinned.clone(),
            identity,
            enrolled,
            stream,
        }
    }

    /// Waits (up to [`LONG`]) for the next update whose bundle satisfies
    /// `wanted` (which `what` describes), and acks it (and only it).
    pub async fn ack_bundle(
        &mut self,
        what: &str,
        wanted: impl Fn(&str) -> bool,
    ) -> pb::ConfigUpdate {
        // The outer deadline comes first, so that a failure names `what`.
        let matching = self
            .stream
            .first_matching(LONG + Duration::from_secs(1), |u| {
                wanted(&u.trust_bundle_pem)
            });
        let update = tokio::time::timeout(LONG, matching)
            .await
            .unwrap_or_else(|_| panic!("no update with a bundle that {what} in time"));
        self.stream.ack(&update.version).await;
        update
    }

    /// A fresh workload certificate for web-1 (leaf first, then its CA).
    pub async fn renew(&self, zone: &Zone) -> pb::RenewResponse {
        connect(zone.grpc, &self.pinned, Some(&self.identity))
            .await
            .renew(pb::RenewRequest {
                certificates: vec![certificate_request("web-1")],
                agent_csr_pem: String::new(),
            })
            .await
            .expect("renewed")
            .into_inner()
    }

    /// Asserts that a renewal now signs with `ca_pem`.
    pub async fn assert_signs_with(&self, zone: &Zone, ca_pem: &str, what: &str) {
        let renewed = self.renew(zone).await;
        assert!(
            signed_by(&renewed.certificates[0].chain_pem, ca_pem),
            "a renewal is not signed by {what}"
        );
    }
}

/// Seconds since the Unix epoch, to compare with the view's
/// `trustedUntilUnix` and a CA's `notAfter`.
pub fn now_secs() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(since.as_secs()).expect("a sane clock")
}
