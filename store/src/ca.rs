//! Per-mesh CA material (certificate and private key, PEM), so that every
//! replica signs with the same CA and a restarted controller keeps it.
//! The key is stored as given: encrypting it at rest is not done yet.

use std::time::SystemTime;

use sqlx::Row;

use crate::backend::{on_pool, on_writer, Store};
use crate::clock::unix_seconds;
use crate::error::StoreError;

/// A mesh's CA as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    /// The CA certificate (chain), PEM.
    pub cert_pem: String,
    /// The CA private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl Store {
    /// Stores (or replaces, e.g. on rotation) the CA of a mesh.
    pub async fn put_ca(&self, mesh: &str, ca: &CaMaterial) -> Result<(), StoreError> {
        let op = format!("store the CA of mesh {mesh}");
        self.insert_ca(
            mesh,
            ca,
            "ON CONFLICT (mesh) DO UPDATE \
             SET cert_pem = excluded.cert_pem, key_pem = excluded.key_pem, \
             updated_at = excluded.updated_at",
            &op,
        )
        .await
    }

    /// Stores `ca` under `name` unless a CA is already stored there, then
    /// returns the one stored: when replicas race to create a CA on first
    /// need, every one of them ends up using the same (the first written).
    /// `name` is a mesh name, or any key that cannot be one (e.g.
    /// `zone/<zone>` for a zone's control-plane CA).
    pub async fn put_ca_if_absent(
        &self,
        name: &str,
        ca: &CaMaterial,
    ) -> Result<CaMaterial, StoreError> {
        let op = format!("store the CA {name}");
        self.insert_ca(name, ca, "ON CONFLICT (mesh) DO NOTHING", &op)
            .await?;
        self.get_ca(name).await?.ok_or_else(|| StoreError::Corrupt {
            what: format!("CA {name}"),
            reason: "missing right after it was stored".to_owned(),
        })
    }

    /// The CA of a mesh, or `None` if none was stored yet.
    pub async fn get_ca(&self, mesh: &str) -> Result<Option<CaMaterial>, StoreError> {
        let op = format!("read the CA of mesh {mesh}");
        on_pool!(self, pool => {
            let row = sqlx::query("SELECT cert_pem, key_pem FROM ca_material WHERE mesh = $1")
                .bind(mesh)
                .fetch_optional(pool)
                .await
                .map_err(StoreError::db(&op))?;
            row.map(|row| {
                Ok(CaMaterial {
                    cert_pem: row
                        .try_get("cert_pem")
                        .map_err(StoreError::corrupt("ca_material.cert_pem"))?,
                    key_pem: row
                        .try_get("key_pem")
                        .map_err(StoreError::corrupt("ca_material.key_pem"))?,
                })
            })
            .transpose()
        })
    }

    /// Inserts `ca` under `name`, stamped now; `on_conflict` says what an
    /// existing row gets (replaced, or kept).
    async fn insert_ca(
        &self,
        name: &str,
        ca: &CaMaterial,
        on_conflict: &'static str,
        op: &str,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO ca_material (mesh, cert_pem, key_pem, updated_at) \
             VALUES ($1, $2, $3, $4) {on_conflict}"
        );
        let now = unix_seconds(SystemTime::now());
        on_writer!(self, pool => {
            sqlx::query(&sql)
                .bind(name)
                .bind(&ca.cert_pem)
                .bind(&ca.key_pem)
                .bind(now)
                .execute(pool)
                .await
                .map_err(StoreError::db(op))?;
        });
        Ok(())
    }
}
