//! Mesh CA rotation in two phases, so that no agent ever meets a
//! certificate its bundle does not trust:
//!
//! 1. a new CA is added as *pending*: it joins the trust bundle pushed to
//!    every agent, but signs nothing yet;
//! 2. once every online agent of the mesh has acknowledged a config whose
//!    bundle holds it (or after [`ACK_WAIT`], logged), the leader makes it
//!    the *signing* CA. The old CA is *retired*: it stays in the bundle
//!    until every certificate it signed has expired (one workload
//!    certificate lifetime, capped by its own expiry), then the leader
//!    drops it and the smaller bundle is pushed.
//!
//! Rotations start from `POST /v1/meshes/{mesh}/ca/rotate`, automatically
//! when the signing built-in CA has lived [`ROTATE_AT`] of its life, and
//! when a Mesh is applied with another provided CA (or switches between
//! provided and built-in).

use std::time::Duration;

use weft_api::{CaChoice, Mesh};
use weft_store::{CaRole, CaSource, MeshCaRecord, NewMeshCa, Store, StoreError};

use crate::mesh_ca::{now_secs, MeshCaError, MeshCas};
use crate::views::online;

/// How long the leader waits for every online agent to trust a pending CA
/// before making it sign anyway.
pub const ACK_WAIT: Duration = Duration::from_secs(60);
/// The share of its life after which a built-in signing CA is rotated.
pub const ROTATE_AT: f64 = 0.8;

/// Why a rotation could not start.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The mesh's CAs do not allow it now (e.g. one is already pending).
    #[error("{0}")]
    Refused(String),
    /// The CA or the store failed.
    #[error(transparent)]
    Ca(#[from] MeshCaError),
}

impl From<StoreError> for RotateError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::CaTransition { .. } => RotateError::Refused(error.to_string()),
            other => RotateError::Ca(MeshCaError::Store(other)),
        }
    }
}

/// The CA with `role`, if any.
pub fn with_role(records: &[MeshCaRecord], role: CaRole) -> Option<&MeshCaRecord> {
    records.iter().find(|r| r.role == role)
}

/// Whether a signing CA valid from `not_before` to `not_after` has lived
/// [`ROTATE_AT`] of its life at `now`.
pub fn rotation_due(not_before: i64, not_after: i64, now: i64) -> bool {
    let life = not_after.saturating_sub(not_before).max(0) as f64;
    now >= not_before.saturating_add((life * ROTATE_AT) as i64)
}

/// Starts a rotation of `mesh`'s built-in CA to a newly generated one (the
/// operator's request); returns the CAs afterwards.
pub async fn rotate(cas: &MeshCas, mesh: &Mesh) -> Result<Vec<MeshCaRecord>, RotateError> {
    if let Some(CaChoice::Provided(_)) = mesh.spec.ca.choice() {
        return Err(RotateError::Refused(format!(
            "mesh {:?} uses a provided CA: apply the Mesh with the new CA in spec.ca.provided to rotate to it",
            mesh.metadata.name
        )));
    }
    let records = cas.records(mesh).await?;
    let fresh = cas.generate(mesh)?;
    start(
        cas.store(),
        mesh,
        &records,
        &fresh,
        "requested by the operator",
    )
    .await
}

/// Adds `fresh` as `mesh`'s pending CA, and logs it.
async fn start(
    store: &Store,
    mesh: &Mesh,
    records: &[MeshCaRecord],
    fresh: &NewMeshCa,
    reason: &str,
) -> Result<Vec<MeshCaRecord>, RotateError> {
    let name = &mesh.metadata.name;
    let after = store.add_pending_ca(name, fresh, now_secs()).await?;
    let old = with_role(records, CaRole::Signing).map_or("-", |r| r.ca.fingerprint.as_str());
    tracing::info!(
        mesh = %name,
        old = %old,
        new = %fresh.fingerprint,
        source = fresh.source.as_str(),
        reason,
        "CA rotation started: the new CA is pending (in every trust bundle, not signing yet)"
    );
    Ok(after)
}

/// The leader's pass over one mesh: drops retired CAs whose certificates
/// have all expired, starts the rotations the Mesh or the CA's age call
/// for, and promotes a pending CA once every online agent trusts it (or
/// [`ACK_WAIT`] has passed).
pub async fn reconcile(cas: &MeshCas, zone: &str, mesh: &Mesh) -> Result<(), RotateError> {
    let store = cas.store();
    let name = &mesh.metadata.name;
    let now = now_secs();
    let mut records = cas.records(mesh).await?;
    for gone in store.drop_expired_cas(name, now).await? {
        tracing::info!(
            mesh = %name,
            fingerprint = %gone.ca.fingerprint,
            trusted_until = gone.trusted_until.unwrap_or_default(),
            "retired CA left the trust bundle: every certificate it signed has expired"
        );
        records.retain(|r| r.ca.fingerprint != gone.ca.fingerprint);
    }
    if let Some(pending) = unwanted_provided(mesh, &records) {
        // The Mesh went back to a built-in CA before the provided one signed.
        records = cancel(store, name, pending).await?;
    }
    if let Some((fresh, reason)) = wanted_rotation(cas, mesh, &records).await? {
        if let Some(pending) = with_role(&records, CaRole::Pending) {
            // The provided CA changed again before the last one signed.
            records = cancel(store, name, pending).await?;
        }
        records = start(store, mesh, &records, &fresh, reason).await?;
    }
    if let Some(pending) = with_role(&records, CaRole::Pending) {
        promote_when_trusted(store, zone, mesh, &records, pending, now).await?;
    }
    Ok(())
}

/// The pending CA of a Mesh that now asks for a built-in CA, when that
/// pending CA is a provided one: the Mesh no longer asks for it.
fn unwanted_provided<'a>(mesh: &Mesh, records: &'a [MeshCaRecord]) -> Option<&'a MeshCaRecord> {
    if let Some(CaChoice::Provided(_)) = mesh.spec.ca.choice() {
        return None;
    }
    with_role(records, CaRole::Pending).filter(|p| p.ca.source == CaSource::Provided)
}

/// Cancels `pending` (logged) and returns the mesh's CAs afterwards.
async fn cancel(
    store: &Store,
    mesh: &str,
    pending: &MeshCaRecord,
) -> Result<Vec<MeshCaRecord>, RotateError> {
    if store
        .cancel_pending_ca(mesh, &pending.ca.fingerprint)
        .await?
    {
        tracing::info!(mesh = %mesh, fingerprint = %pending.ca.fingerprint, "pending CA cancelled: the Mesh asks for another CA");
    }
    Ok(store.mesh_cas(mesh).await?)
}

/// The rotation the Mesh or the signing CA's age asks for, if any.
async fn wanted_rotation(
    cas: &MeshCas,
    mesh: &Mesh,
    records: &[MeshCaRecord],
) -> Result<Option<(NewMeshCa, &'static str)>, RotateError> {
    let Some(signing) = with_role(records, CaRole::Signing) else {
        return Ok(None);
    };
    let pending = with_role(records, CaRole::Pending);
    if let Some(CaChoice::Provided(_)) = mesh.spec.ca.choice() {
        let provided = cas.provided(mesh).await?;
        let known = signing.ca.fingerprint == provided.fingerprint
            || pending.is_some_and(|p| p.ca.fingerprint == provided.fingerprint)
            // A CA still trusted cannot come back as a new one; the
            // operator waits until it has left the bundle.
            || records.iter().any(|r| r.ca.fingerprint == provided.fingerprint);
        return Ok((!known).then_some((provided, "the Mesh's provided CA changed")));
    }
    if pending.is_some() {
        return Ok(None);
    }
    if signing.ca.source == CaSource::Provided {
        return Ok(Some((
            cas.generate(mesh)?,
            "the Mesh switched to a built-in CA",
        )));
    }
    // Its life counts from when it was added: generated CAs are backdated
    // a little for clock skew, which would make a short-lived one due at
    // once.
    let start = signing.ca.not_before.max(signing.added_at);
    if rotation_due(start, signing.ca.not_after, now_secs()) {
        return Ok(Some((
            cas.generate(mesh)?,
            "automatic: the signing CA has lived 80% of its life",
        )));
    }
    Ok(None)
}

/// The online agents of `mesh` whose acknowledged bundle lacks `fingerprint`.
pub async fn waiting_for(
    store: &Store,
    zone: &str,
    mesh: &str,
    fingerprint: &str,
) -> Result<Vec<String>, StoreError> {
    let now_ms = weft_store::now_ms();
    Ok(store
        .list_agents(zone, Some(mesh))
        .await?
        .into_iter()
        .filter(|a| online(a, now_ms) && !a.applied_cas.iter().any(|f| f == fingerprint))
        .map(|a| a.enrollment.name)
        .collect())
}

async fn promote_when_trusted(
    store: &Store,
    zone: &str,
    mesh: &Mesh,
    records: &[MeshCaRecord],
    pending: &MeshCaRecord,
    now: i64,
) -> Result<(), RotateError> {
    let name = &mesh.metadata.name;
    let new = &pending.ca.fingerprint;
    let waiting = waiting_for(store, zone, name, new).await?;
    let waited = now.saturating_sub(pending.added_at);
    let limit = i64::try_from(ACK_WAIT.as_secs()).unwrap_or(i64::MAX);
    if !waiting.is_empty() {
        if waited < limit {
            tracing::debug!(mesh = %name, new = %new, ?waiting, "pending CA: waiting for agents to trust it");
            return Ok(());
        }
        tracing::warn!(
            mesh = %name,
            new = %new,
            ?waiting,
            waited_secs = waited,
            "pending CA not acknowledged by every online agent in time; it signs anyway"
        );
    }
    let lifetime = i64::try_from(mesh.spec.workload_certificate_lifetime.as_std().as_secs())
        .unwrap_or(i64::MAX);
    let old = with_role(records, CaRole::Signing).map(|r| r.ca.fingerprint.clone());
    match store.promote_pending_ca(name, new, now, lifetime).await {
        Ok(after) => {
            let trusted_until = old
                .as_ref()
                .and_then(|f| after.iter().find(|r| &r.ca.fingerprint == f))
                .and_then(|r| r.trusted_until)
                .unwrap_or_default();
            tracing::info!(
                mesh = %name,
                old = old.as_deref().unwrap_or("-"),
                new = %new,
                trusted_until,
                "CA rotation: the new CA signs now; the old one stays trusted until its certificates expire"
            );
            Ok(())
        }
        // Promoted or cancelled meanwhile: the next pass sees it.
        Err(StoreError::CaTransition { reason, .. }) => {
            tracing::debug!(mesh = %name, %reason, "pending CA changed meanwhile");
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_due_at_80_percent_of_life() {
        assert!(!rotation_due(0, 100, 79));
        assert!(rotation_due(0, 100, 80));
        assert!(rotation_due(1_000, 2_000, 1_900));
        assert!(!rotation_due(1_000, 11_000, 8_999));
        // A CA that is not valid for any time is due at once.
        assert!(rotation_due(10, 5, 10));
    }
}
