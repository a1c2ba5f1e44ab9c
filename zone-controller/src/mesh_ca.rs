//! Each mesh's CAs as the store keeps them (see `weft_store::MeshCaRecord`):
//! the one signing, a pending one during a rotation, retired ones still
//! trusted. The first CA is made on first need: the operator's `provided`
//! one from the Mesh spec, the built-in one stored before CA rotation
//! existed, or a freshly generated one; every replica uses the first one
//! stored. Parsed CAs are cached by fingerprint; the set itself is read
//! from the store on every use, so a transition made by the leader applies
//! on every replica at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use weft_api::{CaChoice, FieldError, FieldPath, Mesh, PemChoice, PemSource};
use weft_pki::{CaError, MeshCa};
use weft_store::{CaRole, CaSource, MeshCaRecord, NewMeshCa, Store};

use crate::zone_ca::hex;

/// Why a mesh's CA cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MeshCaError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] weft_store::StoreError),
    /// The CA is not usable (bad PEM, expired, wrong trust domain, ...).
    #[error("the CA of mesh {mesh:?} is unusable: {reason}")]
    Unusable {
        /// The mesh.
        mesh: String,
        /// Why.
        reason: String,
    },
}

/// What signing and pushing need of a mesh's CAs right now.
pub struct CaSet {
    /// The CA that signs new workload certificates.
    pub signing: Arc<MeshCa>,
    /// Every CA of the mesh (pending, signing, retired), oldest first, as
    /// one PEM text: the trust bundle agents get. The same bytes on every
    /// replica, so that agents do not reload for nothing.
    pub bundle_pem: String,
}

/// `sha256:<hex>` of a certificate's DER: how CAs are named everywhere.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(der)))
}

/// Seconds since the epoch, now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A loaded CA as the store records it.
fn to_new(ca: &MeshCa, source: CaSource) -> NewMeshCa {
    let pem = ca.to_pem();
    NewMeshCa {
        fingerprint: fingerprint(ca.cert_der()),
        source,
        cert_pem: pem.cert_pem,
        key_pem: pem.key_pem,
        not_before: ca.not_before(),
        not_after: ca.not_after(),
    }
}

/// A cache key: a CA is checked against one trust domain.
#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    mesh: String,
    fingerprint: String,
    trust_domain: String,
}

/// The mesh CAs of this replica.
pub struct MeshCas {
    store: Store,
    /// How long generated (built-in) CAs live.
    builtin_lifetime: Duration,
    cache: Mutex<HashMap<CacheKey, Arc<MeshCa>>>,
}

impl MeshCas {
    /// An empty cache over `store`; built-in CAs it generates live
    /// `builtin_lifetime` (by default `weft_pki::DEFAULT_CA_LIFETIME`).
    pub fn new(store: Store, builtin_lifetime: Duration) -> Self {
        MeshCas {
            store,
            builtin_lifetime,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The store behind it.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The signing CA and trust bundle of `mesh`, creating its first CA if
    /// needed.
    pub async fn get(&self, mesh: &Mesh) -> Result<CaSet, MeshCaError> {
        let records = self.records(mesh).await?;
        let name = &mesh.metadata.name;
        let signing = records
            .iter()
            .find(|r| r.role == CaRole::Signing)
            .ok_or_else(|| MeshCaError::Unusable {
                mesh: name.clone(),
                reason: "it has CAs but none signing".to_owned(),
            })?;
        let signing = self.load(mesh, signing)?;
        self.prune(name, &records);
        Ok(CaSet {
            signing,
            bundle_pem: bundle_pem(&records),
        })
    }

    /// The CAs of `mesh` as stored, oldest first, creating the first one if
    /// the mesh has none yet.
    pub async fn records(&self, mesh: &Mesh) -> Result<Vec<MeshCaRecord>, MeshCaError> {
        let name = &mesh.metadata.name;
        let records = self.store.mesh_cas(name).await?;
        if !records.is_empty() {
            return Ok(records);
        }
        let first = self.first_ca(mesh).await?;
        let records = self.store.init_mesh_ca(name, &first, now_secs()).await?;
        if records
            .iter()
            .any(|r| r.ca.fingerprint == first.fingerprint)
        {
            tracing::info!(mesh = %name, fingerprint = %first.fingerprint, source = first.source.as_str(), "mesh CA in use");
        }
        Ok(records)
    }

    /// The CA a mesh starts with.
    async fn first_ca(&self, mesh: &Mesh) -> Result<NewMeshCa, MeshCaError> {
        let name = &mesh.metadata.name;
        if let Some(CaChoice::Provided(_)) = mesh.spec.ca.choice() {
            return self.provided(mesh).await;
        }
        // A CA stored before rotation existed keeps signing.
        if let Some(legacy) = self.store.get_ca(name).await? {
            let ca = MeshCa::from_pem(&legacy.cert_pem, &legacy.key_pem, &mesh.spec.trust_domain)
                .map_err(|e| unusable(name, e.to_string()))?;
            return Ok(to_new(&ca, CaSource::Builtin));
        }
        self.generate(mesh)
    }

    /// A new built-in CA for `mesh`.
    pub fn generate(&self, mesh: &Mesh) -> Result<NewMeshCa, MeshCaError> {
        let ca = MeshCa::generate(&mesh.spec.trust_domain, self.builtin_lifetime)
            .map_err(|e| unusable(&mesh.metadata.name, e.to_string()))?;
        Ok(to_new(&ca, CaSource::Builtin))
    }

    /// The operator's CA from the Mesh's `spec.ca.provided`, checked.
    pub async fn provided(&self, mesh: &Mesh) -> Result<NewMeshCa, MeshCaError> {
        let name = &mesh.metadata.name;
        let Some(CaChoice::Provided(provided)) = mesh.spec.ca.choice() else {
            return Err(unusable(name, "spec.ca.provided is not set".to_owned()));
        };
        let cert = read_pem(&provided.certificate)
            .await
            .map_err(|e| unusable(name, format!("spec.ca.provided.certificate: {e}")))?;
        let key = read_pem(&provided.key)
            .await
            .map_err(|e| unusable(name, format!("spec.ca.provided.key: {e}")))?;
        let ca = MeshCa::from_pem(&cert, &key, &mesh.spec.trust_domain)
            .map_err(|e| unusable(name, e.to_string()))?;
        Ok(to_new(&ca, CaSource::Provided))
    }

    /// A stored CA, parsed and checked once per trust domain.
    fn load(&self, mesh: &Mesh, record: &MeshCaRecord) -> Result<Arc<MeshCa>, MeshCaError> {
        let key = CacheKey {
            mesh: mesh.metadata.name.clone(),
            fingerprint: record.ca.fingerprint.clone(),
            trust_domain: mesh.spec.trust_domain.clone(),
        };
        if let Some(ca) = self.lock().get(&key) {
            return Ok(ca.clone());
        }
        let ca = MeshCa::from_pem(
            &record.ca.cert_pem,
            &record.ca.key_pem,
            &mesh.spec.trust_domain,
        )
        .map_err(|e| {
            unusable(
                &mesh.metadata.name,
                format!("CA {}: {e}", record.ca.fingerprint),
            )
        })?;
        let ca = Arc::new(ca);
        self.lock().insert(key, ca.clone());
        Ok(ca)
    }

    /// Forgets cached CAs of `mesh` that left its set.
    fn prune(&self, mesh: &str, records: &[MeshCaRecord]) {
        self.lock().retain(|key, _| {
            key.mesh != mesh || records.iter().any(|r| r.ca.fingerprint == key.fingerprint)
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Arc<MeshCa>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Loads a Mesh's `spec.ca.provided` as the leader will (readable, a CA
/// valid now for the mesh's trust domain, with its own key), so that an
/// apply refuses a CA that could never sign instead of storing a Mesh the
/// leader can only warn about. `Ok` for a built-in CA.
pub async fn check_provided(mesh: &Mesh) -> Result<(), FieldError> {
    let Some(CaChoice::Provided(provided)) = mesh.spec.ca.choice() else {
        return Ok(());
    };
    let path = FieldPath::of(&["spec", "ca", "provided"]);
    let cert = read_field(&provided.certificate, &path.field("certificate")).await?;
    let key = read_field(&provided.key, &path.field("key")).await?;
    MeshCa::from_pem(&cert, &key, &mesh.spec.trust_domain).map_err(|e| {
        let field = match e {
            CaError::Key(_) | CaError::KeyMismatch => "key",
            _ => "certificate",
        };
        FieldError::new(path.field(field), e.to_string())
    })?;
    Ok(())
}

/// The PEM text of `source`, or an error at `path.file` (or `path`).
async fn read_field(source: &PemSource, path: &FieldPath) -> Result<String, FieldError> {
    read_pem(source).await.map_err(|e| {
        let at = match source.choice() {
            Some(PemChoice::File(_)) => path.field("file"),
            _ => path.clone(),
        };
        FieldError::new(at, e)
    })
}

/// The trust bundle of a CA set: every certificate, oldest first.
pub fn bundle_pem(records: &[MeshCaRecord]) -> String {
    let mut pem = String::new();
    for record in records {
        pem.push_str(record.ca.cert_pem.trim_end());
        pem.push('\n');
    }
    pem
}

fn unusable(mesh: &str, reason: String) -> MeshCaError {
    MeshCaError::Unusable {
        mesh: mesh.to_owned(),
        reason,
    }
}

async fn read_pem(source: &PemSource) -> Result<String, String> {
    match source.choice() {
        Some(PemChoice::Inline(text)) => Ok(text.to_owned()),
        Some(PemChoice::File(path)) => tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("cannot read {path}: {e}")),
        None => Err("set exactly one of file, inline".to_owned()),
    }
}
