//! Each mesh's CA, loaded on first need: the built-in one generated and
//! stored once (every replica uses the first one stored), or the operator's
//! `provided` one read from the Mesh spec. Cached per mesh until its CA
//! settings change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use weft_api::{CaChoice, CaSpec, Mesh, PemChoice, PemSource};
use weft_pki::{MeshCa, DEFAULT_CA_LIFETIME};
use weft_store::{CaMaterial, Store};

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

/// A cached CA and the settings it was loaded for.
struct Cached {
    ca_spec: CaSpec,
    trust_domain: String,
    ca: Arc<MeshCa>,
}

/// The cache of mesh CAs.
pub struct MeshCas {
    store: Store,
    cache: Mutex<HashMap<String, Cached>>,
}

impl MeshCas {
    /// An empty cache over `store`.
    pub fn new(store: Store) -> Self {
        MeshCas {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The CA of `mesh`, loading or creating it if needed.
    pub async fn get(&self, mesh: &Mesh) -> Result<Arc<MeshCa>, MeshCaError> {
        let name = mesh.metadata.name.clone();
        let spec = &mesh.spec;
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(cached) = cache.get(&name) {
                if cached.ca_spec == spec.ca && cached.trust_domain == spec.trust_domain {
                    return Ok(cached.ca.clone());
                }
            }
        }
        let unusable = |reason: String| MeshCaError::Unusable {
            mesh: name.clone(),
            reason,
        };
        let ca = match spec.ca.choice() {
            Some(CaChoice::Provided(provided)) => {
                let cert = read_pem(&provided.certificate).await.map_err(&unusable)?;
                let key = read_pem(&provided.key).await.map_err(&unusable)?;
                MeshCa::from_pem(&cert, &key, &spec.trust_domain)
                    .map_err(|e| unusable(e.to_string()))?
            }
            _ => {
                let stored = match self.store.get_ca(&name).await? {
                    Some(stored) => stored,
                    None => {
                        let fresh = MeshCa::generate(&spec.trust_domain, DEFAULT_CA_LIFETIME)
                            .map_err(|e| unusable(e.to_string()))?
                            .to_pem();
                        let material = CaMaterial {
                            cert_pem: fresh.cert_pem,
                            key_pem: fresh.key_pem,
                        };
                        let stored = self.store.put_ca_if_absent(&name, &material).await?;
                        if stored == material {
                            tracing::info!(mesh = %name, "built-in mesh CA generated");
                        }
                        stored
                    }
                };
                MeshCa::from_pem(&stored.cert_pem, &stored.key_pem, &spec.trust_domain)
                    .map_err(|e| unusable(e.to_string()))?
            }
        };
        let ca = Arc::new(ca);
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
            name,
            Cached {
                ca_spec: spec.ca.clone(),
                trust_domain: spec.trust_domain.clone(),
                ca: ca.clone(),
            },
        );
        Ok(ca)
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
