//! What `GET /v1/meshes/{mesh}/ca` answers: each CA of the mesh with its
//! role, and the rotation underway (which online agents do not trust the
//! pending CA yet), so that an operator can follow a rotation.

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use weft_store::{CaRole, MeshCaRecord, Store, StoreError};

use crate::ca_rotation::{waiting_for, with_role, ACK_WAIT};
use crate::tokens::rfc3339;

/// A mesh's CAs, oldest first (the order of its trust bundle).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshCaView {
    /// The mesh.
    pub mesh: String,
    /// Every CA in its trust bundle.
    pub cas: Vec<CaView>,
    /// The rotation underway, if any.
    pub rotation: Option<RotationView>,
}

/// One CA.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaView {
    /// `sha256:<hex of the DER>`.
    pub fingerprint: String,
    /// `pending`, `signing` or `trusted-until` (retired, still trusted).
    pub role: &'static str,
    /// `builtin` or `provided`.
    pub source: &'static str,
    /// The certificate's subject.
    pub subject: String,
    /// Start of validity (RFC 3339).
    pub not_before: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// End of validity, seconds since the epoch.
    pub not_after_unix: i64,
    /// When it started signing (RFC 3339), if it did.
    pub signing_since: Option<String>,
    /// For `trusted-until`: when it leaves the bundle (RFC 3339).
    pub trusted_until: Option<String>,
    /// The same, seconds since the epoch.
    pub trusted_until_unix: Option<i64>,
    /// The CA certificate (PEM).
    pub certificate_pem: String,
}

/// A rotation underway.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationView {
    /// The pending CA's fingerprint.
    pub pending: String,
    /// When it was added (RFC 3339).
    pub since: String,
    /// The online agents whose acknowledged bundle lacks it.
    pub waiting_for: Vec<String>,
    /// When it signs even if some agents have not acknowledged it.
    pub signs_by: String,
}

fn time(secs: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

fn subject(pem: &str) -> String {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .ok()
        .and_then(|(_, pem)| pem.parse_x509().ok().map(|cert| cert.subject().to_string()))
        .unwrap_or_default()
}

fn ca(record: &MeshCaRecord) -> CaView {
    CaView {
        fingerprint: record.ca.fingerprint.clone(),
        role: match record.role {
            CaRole::Pending => "pending",
            CaRole::Signing => "signing",
            CaRole::Retired => "trusted-until",
        },
        source: record.ca.source.as_str(),
        subject: subject(&record.ca.cert_pem),
        not_before: time(record.ca.not_before),
        not_after: time(record.ca.not_after),
        not_after_unix: record.ca.not_after,
        signing_since: record.signing_since.map(time),
        trusted_until: record.trusted_until.map(time),
        trusted_until_unix: record.trusted_until,
        certificate_pem: record.ca.cert_pem.clone(),
    }
}

/// The view of `mesh`'s CAs `records`.
pub async fn view(
    store: &Store,
    zone: &str,
    mesh: &str,
    records: &[MeshCaRecord],
) -> Result<MeshCaView, StoreError> {
    let rotation = match with_role(records, CaRole::Pending) {
        Some(pending) => {
            let wait = i64::try_from(ACK_WAIT.as_secs()).unwrap_or(i64::MAX);
            Some(RotationView {
                pending: pending.ca.fingerprint.clone(),
                since: time(pending.added_at),
                waiting_for: waiting_for(store, zone, mesh, &pending.ca.fingerprint).await?,
                signs_by: time(pending.added_at.saturating_add(wait)),
            })
        }
        None => None,
    };
    Ok(MeshCaView {
        mesh: mesh.to_owned(),
        cas: records.iter().map(ca).collect(),
        rotation,
    })
}
