//! Resources: the validated `weft_api::Resource` as JSON, keyed by kind,
//! mesh, namespace and name, with a per-row version for optimistic
//! concurrency. Every write also appends to the change feed, in the same
//! transaction.

use std::fmt;

use sqlx::types::Json;
use sqlx::Row;
use weft_api::{Kind, Resource};

use crate::backend::{on_pool, on_writer, Store};
use crate::changes::{append_change, take_seq};
use crate::columns::Columns;
use crate::error::{to_u64, StoreError};

/// What names a resource: the key of the `resources` table. `mesh` and
/// `namespace` are `None` for kinds outside a mesh or a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    /// The resource's kind.
    pub kind: Kind,
    /// Its mesh, for kinds inside one (default applied).
    pub mesh: Option<String>,
    /// Its namespace, for namespaced kinds.
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

impl ResourceKey {
    /// The key of a resource (its mesh defaulted as the store does).
    pub fn of(resource: &Resource) -> ResourceKey {
        ResourceKey {
            kind: resource.kind(),
            mesh: resource.mesh().map(str::to_owned),
            namespace: resource.metadata().namespace.clone(),
            name: resource.name().to_owned(),
        }
    }

    /// The key of a kind outside any mesh (Mesh, Zone).
    pub fn global(kind: Kind, name: &str) -> ResourceKey {
        ResourceKey {
            kind,
            mesh: None,
            namespace: None,
            name: name.to_owned(),
        }
    }

    /// The key of a namespaced kind in a mesh (Workload, Service, ...).
    pub fn namespaced(kind: Kind, mesh: &str, namespace: &str, name: &str) -> ResourceKey {
        ResourceKey {
            kind,
            mesh: Some(mesh.to_owned()),
            namespace: Some(namespace.to_owned()),
            name: name.to_owned(),
        }
    }

    /// The columns as stored: absent parts are `''`.
    pub(crate) fn columns(&self) -> (&'static str, &str, &str, &str) {
        (
            self.kind.as_str(),
            self.mesh.as_deref().unwrap_or(""),
            self.namespace.as_deref().unwrap_or(""),
            &self.name,
        )
    }

    /// Rebuilds a key from its stored columns.
    pub(crate) fn from_columns(
        kind: &str,
        mesh: String,
        namespace: String,
        name: String,
    ) -> Result<ResourceKey, StoreError> {
        let kind = kind.parse::<Kind>().map_err(StoreError::corrupt(format!(
            "kind of {mesh}/{namespace}/{name}"
        )))?;
        let some = |s: String| (!s.is_empty()).then_some(s);
        Ok(ResourceKey {
            kind,
            mesh: some(mesh),
            namespace: some(namespace),
            name,
        })
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.kind)?;
        if let Some(mesh) = &self.mesh {
            write!(f, "{mesh}/")?;
        }
        if let Some(namespace) = &self.namespace {
            write!(f, "{namespace}/")?;
        }
        f.write_str(&self.name)
    }
}

/// The precondition of a write, for optimistic concurrency: a client that
/// read version N writes with `Version(N)` and gets
/// [`StoreError::Conflict`] if anyone wrote in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No precondition: create or replace.
    Any,
    /// Create only: the resource must not exist.
    Absent,
    /// The resource must exist with exactly this version.
    Version(u64),
}

impl Expect {
    fn allows(self, found: Option<u64>) -> bool {
        match self {
            Expect::Any => true,
            Expect::Absent => found.is_none(),
            Expect::Version(v) => found == Some(v),
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Any => f.write_str("any version"),
            Expect::Absent => f.write_str("absent"),
            Expect::Version(v) => write!(f, "version {v}"),
        }
    }
}

/// A resource as read back, with what a reader needs to detect change.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResource {
    /// The resource (validated and defaulted when written).
    pub resource: Resource,
    /// Its version: 1 when created, +1 at every replace.
    pub version: u64,
    /// The change sequence of its last write.
    pub seq: u64,
}

/// What one kind's listing looked like: its row count and the newest
/// change sequence among its rows. Every write gives its row a sequence
/// above all others and a delete lowers the count, so an equal mark means
/// an equal listing: a reader that kept the listing need not read and
/// decode it again (the zone's hub re-reads a mesh on every change).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListingMark {
    rows: u64,
    newest: u64,
}

/// The [`ListingMark`] of every kind with rows, from one query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListingMarks(Vec<(Kind, ListingMark)>);

impl ListingMarks {
    /// The mark of `kind` (an empty listing's when it has no rows).
    pub fn of(&self, kind: Kind) -> ListingMark {
        self.0
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, mark)| *mark)
            .unwrap_or_default()
    }
}

fn decode_row<R>(row: &R) -> Result<StoredResource, StoreError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Json<serde_json::Value>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let head = decode_head(row)?;
    let resource = decode_body(row, &head.key)?;
    Ok(head.with(resource))
}

/// A row's key, version and sequence: what tells whether its body is
/// already known.
struct Head {
    key: ResourceKey,
    version: u64,
    seq: u64,
}

impl Head {
    fn with(self, resource: Resource) -> StoredResource {
        StoredResource {
            resource,
            version: self.version,
            seq: self.seq,
        }
    }
}

fn decode_head<R>(row: &R) -> Result<Head, StoreError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let cols = Columns::new(row, "resources");
    let kind: String = cols.get("kind")?;
    let mesh: String = cols.get("mesh")?;
    let namespace: String = cols.get("namespace")?;
    let name: String = cols.get("name")?;
    let key = ResourceKey::from_columns(&kind, mesh, namespace, name)?;
    let version: i64 = cols.get("version")?;
    let seq: i64 = cols.get("seq")?;
    Ok(Head {
        key,
        version: to_u64(version, "resources.version")?,
        seq: to_u64(seq, "resources.seq")?,
    })
}

fn decode_body<R>(row: &R, key: &ResourceKey) -> Result<Resource, StoreError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> Json<serde_json::Value>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let cols = Columns::new(row, "resources");
    let Json(body): Json<serde_json::Value> = cols.get("body")?;
    let resource =
        Resource::from_json_value(body).map_err(StoreError::corrupt(format!("body of {key}")))?;
    if ResourceKey::of(&resource) != *key {
        return Err(StoreError::Corrupt {
            what: format!("body of {key}"),
            reason: format!("it holds {}", ResourceKey::of(&resource)),
        });
    }
    Ok(resource)
}

/// Decodes listed rows, taking the bodies of rows unchanged since they
/// were last decoded from the cache; a listing of a whole kind also drops
/// the cached resources it did not return.
fn decode_listed<R>(
    store: &Store,
    kind: Kind,
    whole_kind: bool,
    rows: &[R],
) -> Result<Vec<StoredResource>, StoreError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Json<serde_json::Value>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let mut cache = store.inner.decoded.lock();
    let mut listed = Vec::with_capacity(rows.len());
    for row in rows {
        let head = decode_head(row)?;
        let resource = match cache.get(&head.key) {
            Some((seq, resource)) if *seq == head.seq => resource.clone(),
            _ => {
                let resource = decode_body(row, &head.key)?;
                cache.insert(head.key.clone(), (head.seq, resource.clone()));
                resource
            }
        };
        listed.push(head.with(resource));
    }
    if whole_kind {
        let live = listed
            .iter()
            .map(|s| ResourceKey::of(&s.resource))
            .collect();
        crate::decoded::forget_others(&mut cache, kind, &live);
    }
    Ok(listed)
}

const SELECT_RESOURCE: &str =
    "SELECT kind, mesh, namespace, name, version, seq, body FROM resources";

impl Store {
    /// Creates or replaces a resource after validating it (defaults applied,
    /// e.g. `metadata.mesh`), if `expect` holds; returns its new version.
    /// The row and its change-feed entry are written in one transaction.
    /// References to other resources are not checked here: that is the
    /// caller's policy.
    pub async fn put(&self, resource: &Resource, expect: Expect) -> Result<u64, StoreError> {
        let versions = self.put_many(&[(resource.clone(), expect)]).await?;
        versions
            .first()
            .copied()
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("put {}", ResourceKey::of(resource)),
                reason: "no version returned".to_owned(),
            })
    }

    /// Writes several resources in one transaction: all of them, each with
    /// its `expect` holding, or none (`apply -f` of a file is all or
    /// nothing). Returns their new versions in order.
    pub async fn put_many(&self, batch: &[(Resource, Expect)]) -> Result<Vec<u64>, StoreError> {
        let mut prepared = Vec::with_capacity(batch.len());
        for (resource, expect) in batch {
            let mut resource = resource.clone();
            resource.apply_defaults();
            let key = ResourceKey::of(&resource);
            resource.validate().map_err(|errors| StoreError::Invalid {
                key: key.clone(),
                errors,
            })?;
            let body = serde_json::to_value(&resource).map_err(|e| StoreError::Corrupt {
                what: format!("encoding {key}"),
                reason: e.to_string(),
            })?;
            prepared.push((key, body, *expect));
        }
        let op = match prepared.as_slice() {
            [(key, _, _)] => format!("put {key}"),
            _ => format!("put {} resources", prepared.len()),
        };
        let versions = on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            let mut versions = Vec::with_capacity(prepared.len());
            for (key, body, expect) in &prepared {
                let (kind, mesh, namespace, name) = key.columns();
                let seq = take_seq!(tx, &op);
                let found: Option<i64> = sqlx::query_scalar(
                    "SELECT version FROM resources \
                     WHERE kind = $1 AND mesh = $2 AND namespace = $3 AND name = $4",
                )
                .bind(kind)
                .bind(mesh)
                .bind(namespace)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::db(&op))?;
                let found = found.map(|v| to_u64(v, "resources.version")).transpose()?;
                if !expect.allows(found) {
                    return Err(StoreError::Conflict { key: key.clone(), expected: *expect, found });
                }
                let version = found.map_or(1, |v| v + 1);
                let version = i64::try_from(version).map_err(StoreError::corrupt(format!("version of {key}")))?;
                sqlx::query(
                    "INSERT INTO resources (kind, mesh, namespace, name, version, seq, body) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (kind, mesh, namespace, name) DO UPDATE \
                     SET version = excluded.version, seq = excluded.seq, body = excluded.body",
                )
                .bind(kind)
                .bind(mesh)
                .bind(namespace)
                .bind(name)
                .bind(version)
                .bind(seq)
                .bind(Json(body))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(&op))?;
                append_change!(tx, &op, seq, kind, mesh, namespace, name, version, false);
                versions.push(version);
            }
            tx.commit().await.map_err(StoreError::db(&op))?;
            Ok::<_, StoreError>(versions)
        }.await)?;
        self.notify_local();
        versions
            .into_iter()
            .map(|v| to_u64(v, "resources.version"))
            .collect()
    }

    /// Reads one resource, or `None` if it does not exist.
    pub async fn get(&self, key: &ResourceKey) -> Result<Option<StoredResource>, StoreError> {
        let (kind, mesh, namespace, name) = key.columns();
        let op = format!("get {key}");
        on_pool!(self, pool => {
            let row = sqlx::query(&format!(
                "{SELECT_RESOURCE} WHERE kind = $1 AND mesh = $2 AND namespace = $3 AND name = $4"
            ))
            .bind(kind)
            .bind(mesh)
            .bind(namespace)
            .bind(name)
            .fetch_optional(pool)
            .await
            .map_err(StoreError::db(&op))?;
            row.as_ref().map(decode_row).transpose()
        })
    }

    /// The mark of every kind's listing, in one mesh or in all of them
    /// (see [`ListingMarks`]). Take the marks *before* the listings they
    /// guard: a write between the two then only makes the next mark differ.
    pub async fn listing_marks(&self, mesh: Option<&str>) -> Result<ListingMarks, StoreError> {
        let op = "read the listing marks";
        let rows: Vec<(String, i64, i64)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT kind, COUNT(*), COALESCE(MAX(seq), 0) FROM resources \
                 WHERE ($1 IS NULL OR mesh = $1) GROUP BY kind",
            )
            .bind(mesh)
            .fetch_all(pool)
            .await
            .map_err(StoreError::db(op))?
        });
        let mut marks = ListingMarks::default();
        for (kind, rows, newest) in rows {
            // A kind this build does not know (a newer replica's) is no
            // listing it makes.
            let Ok(kind) = kind.parse::<Kind>() else {
                continue;
            };
            marks.0.push((
                kind,
                ListingMark {
                    rows: to_u64(rows, "resources count")?,
                    newest: to_u64(newest, "resources.seq")?,
                },
            ));
        }
        Ok(marks)
    }

    /// Lists the resources of a kind, optionally only those of one mesh
    /// and/or one namespace, ordered by mesh, namespace and name.
    pub async fn list(
        &self,
        kind: Kind,
        mesh: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Vec<StoredResource>, StoreError> {
        let op = format!("list {kind}");
        on_pool!(self, pool => {
            let rows = sqlx::query(&format!(
                "{SELECT_RESOURCE} WHERE kind = $1 \
                 AND ($2 IS NULL OR mesh = $2) AND ($3 IS NULL OR namespace = $3) \
                 ORDER BY mesh, namespace, name"
            ))
            .bind(kind.as_str())
            .bind(mesh)
            .bind(namespace)
            .fetch_all(pool)
            .await
            .map_err(StoreError::db(&op))?;
            decode_listed(self, kind, mesh.is_none() && namespace.is_none(), &rows)
        })
    }

    /// Deletes a resource if `expect` holds ([`Expect::Version`] to delete
    /// only what was read); returns whether it existed. Deleting a Service
    /// also releases its virtual IP, in the same transaction.
    pub async fn delete(&self, key: &ResourceKey, expect: Expect) -> Result<bool, StoreError> {
        let (kind, mesh, namespace, name) = key.columns();
        let op = format!("delete {key}");
        let vip_service = crate::vips::service_name(key);
        let deleted = on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            let seq = take_seq!(tx, &op);
            let found: Option<i64> = sqlx::query_scalar(
                "DELETE FROM resources \
                 WHERE kind = $1 AND mesh = $2 AND namespace = $3 AND name = $4 \
                 RETURNING version",
            )
            .bind(kind)
            .bind(mesh)
            .bind(namespace)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db(&op))?;
            let found_u = found.map(|v| to_u64(v, "resources.version")).transpose()?;
            if expect != Expect::Any && !expect.allows(found_u) {
                // Dropping the transaction rolls the delete back.
                return Err(StoreError::Conflict { key: key.clone(), expected: expect, found: found_u });
            }
            let Some(version) = found else {
                // Nothing to delete: roll back the sequence bump too.
                return Ok(false);
            };
            append_change!(tx, &op, seq, kind, mesh, namespace, name, version, true);
            if let Some(service) = &vip_service {
                sqlx::query("DELETE FROM virtual_ips WHERE service = $1")
                    .bind(service)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(&op))?;
            }
            tx.commit().await.map_err(StoreError::db(&op))?;
            Ok::<_, StoreError>(true)
        }.await)?;
        if deleted {
            self.notify_local();
        }
        Ok(deleted)
    }
}
