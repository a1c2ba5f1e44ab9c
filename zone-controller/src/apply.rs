//! Applying a request body: read every document, validate each, check
//! references against the store plus the batch itself, and only then write
//! it all in one store transaction.

use std::collections::BTreeMap;

use tokio::sync::Mutex;
use weft_api::kinds::ALLOW_ALL;
use weft_api::{
    check_references, parse_json, parse_yaml, DocumentErrors, FieldError, FieldPath, InputErrors,
    Kind, KnownNames, Resource, TrafficPermissionSpec, Workload,
};
use weft_store::{Expect, ResourceKey, Store, StoreError};

use crate::views::AGENT_LABEL;

/// Why an apply changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Some documents are bad (syntax, unknown kind or field, wrong type,
    /// failed validation, dangling reference, duplicate): nothing written.
    #[error("invalid input:\n{0}")]
    Invalid(InputErrors),
    /// Another writer changed a resource between the checks and the write;
    /// nothing was written.
    #[error("{0}")]
    Conflict(StoreError),
    /// The store failed; the transaction wrote nothing.
    #[error("{0}")]
    Store(StoreError),
}

/// What one document of an apply did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    /// The resource's kind.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its mesh, for kinds inside one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Its namespace, for namespaced kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The version written.
    pub version: u64,
    /// `created` or `configured`.
    pub outcome: &'static str,
}

/// Reads a request body: JSON (one object, or an array of objects) when
/// `json` is set or the body starts with `{` or `[`, else a YAML stream.
pub fn parse_body(body: &str, json: bool) -> Result<Vec<Resource>, InputErrors> {
    let trimmed = body.trim_start();
    if trimmed.starts_with('[') {
        return parse_json_array(body);
    }
    if json || trimmed.starts_with('{') {
        return parse_json(body).map(|r| vec![r]);
    }
    parse_yaml(body)
}

/// Each element of a JSON array is read as its own document. Positions
/// would refer to the re-encoded element, so they are dropped.
fn parse_json_array(body: &str) -> Result<Vec<Resource>, InputErrors> {
    let values: Vec<serde_json::Value> = serde_json::from_str(body).map_err(|e| InputErrors {
        documents: vec![DocumentErrors {
            document: 1,
            line: Some(e.line()),
            kind: None,
            name: None,
            errors: vec![FieldError::new(FieldPath::root(), e.to_string())],
        }],
    })?;
    let mut resources = Vec::new();
    let mut failed = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        match parse_json(&value.to_string()) {
            Ok(resource) => resources.push(resource),
            Err(errors) => failed.extend(errors.documents.into_iter().map(|mut d| {
                d.document = i + 1;
                for error in &mut d.errors {
                    error.position = None;
                }
                d
            })),
        }
    }
    if failed.is_empty() {
        Ok(resources)
    } else {
        Err(InputErrors { documents: failed })
    }
}

/// Refuses a batch naming the same resource twice: which one should win is
/// not for the controller to guess.
fn check_duplicates(batch: &[Resource]) -> Result<(), InputErrors> {
    let mut seen: BTreeMap<ResourceKey, usize> = BTreeMap::new();
    let mut documents = Vec::new();
    for (i, resource) in batch.iter().enumerate() {
        let key = ResourceKey::of(resource);
        if let Some(first) = seen.get(&key) {
            documents.push(DocumentErrors {
                document: i + 1,
                line: None,
                kind: Some(resource.kind()),
                name: Some(resource.name().to_owned()),
                errors: vec![FieldError::new(
                    FieldPath::of(&["metadata", "name"]),
                    format!("{key} is already defined by document {first}"),
                )],
            });
        } else {
            seen.insert(key, i + 1);
        }
    }
    if documents.is_empty() {
        Ok(())
    } else {
        Err(InputErrors { documents })
    }
}

/// Refuses Meshes whose provided CA the controller could not sign with
/// (see [`crate::mesh_ca::check_provided`]): storing one would leave the
/// mesh on its old CA with nothing but a warning in the leader's log.
async fn check_cas(batch: &[Resource]) -> Result<(), InputErrors> {
    let mut documents = Vec::new();
    for (i, resource) in batch.iter().enumerate() {
        let Resource::Mesh(mesh) = resource else {
            continue;
        };
        if let Err(error) = crate::mesh_ca::check_provided(mesh).await {
            documents.push(DocumentErrors {
                document: i + 1,
                line: None,
                kind: Some(resource.kind()),
                name: Some(resource.name().to_owned()),
                errors: vec![error],
            });
        }
    }
    if documents.is_empty() {
        Ok(())
    } else {
        Err(InputErrors { documents })
    }
}

/// The Mesh and Zone names in the store, for reference checks (which are
/// synchronous, so they are read up front).
async fn known_names(store: &Store) -> Result<KnownNames, StoreError> {
    let mut known = KnownNames::new();
    for stored in store.list(Kind::Mesh, None, None).await? {
        known.meshes.insert(stored.resource.name().to_owned());
    }
    for stored in store.list(Kind::Zone, None, None).await? {
        known.zones.insert(stored.resource.name().to_owned());
    }
    // Listed so that policies naming a missing ExternalService are refused
    // (a Service may appear later, so those are not checked).
    let mut external = std::collections::BTreeSet::new();
    for stored in store.list(Kind::ExternalService, None, None).await? {
        let r = &stored.resource;
        external.insert(format!(
            "{}/{}/{}",
            r.mesh().unwrap_or_default(),
            r.metadata().namespace.as_deref().unwrap_or_default(),
            r.name()
        ));
    }
    known.external_services = Some(external);
    Ok(known)
}

/// Validates and writes a batch in one store transaction: all of it or
/// nothing. `lock` serialises applies in this process so that the
/// reference checks still hold when the writes happen; each write also
/// expects the version it read, so a concurrent writer on another replica
/// turns the whole apply into a conflict.
pub async fn apply(
    store: &Store,
    lock: &Mutex<()>,
    batch: Vec<Resource>,
) -> Result<Vec<Applied>, ApplyError> {
    check_duplicates(&batch).map_err(ApplyError::Invalid)?;
    let _guard = lock.lock().await;
    let known = known_names(store).await.map_err(ApplyError::Store)?;
    check_references(&batch, &known).map_err(ApplyError::Invalid)?;
    check_cas(&batch).await.map_err(ApplyError::Invalid)?;
    let mut batch = batch;
    batch.extend(initial_policies(&batch, &known));

    let mut writes = Vec::with_capacity(batch.len());
    let mut existed = Vec::with_capacity(batch.len());
    for resource in batch {
        let (resource, expect, previous) =
            prepare(store, resource).await.map_err(ApplyError::Store)?;
        existed.push(previous);
        writes.push((resource, expect));
    }
    let versions = store.put_many(&writes).await.map_err(|error| match error {
        StoreError::Conflict { .. } => ApplyError::Conflict(error),
        StoreError::Invalid { key, errors } => {
            let document = writes
                .iter()
                .position(|(r, _)| ResourceKey::of(r) == key)
                .map_or(1, |i| i + 1);
            ApplyError::Invalid(InputErrors {
                documents: vec![DocumentErrors {
                    document,
                    line: None,
                    kind: Some(key.kind),
                    name: Some(key.name),
                    errors: errors.0,
                }],
            })
        }
        other => ApplyError::Store(other),
    })?;
    Ok(writes
        .iter()
        .zip(existed)
        .zip(versions)
        .map(|(((resource, _), existed), version)| {
            let key = ResourceKey::of(resource);
            Applied {
                kind: key.kind.as_str().to_owned(),
                name: key.name,
                mesh: key.mesh,
                namespace: key.namespace,
                version,
                outcome: if existed { "configured" } else { "created" },
            }
        })
        .collect())
}

/// The policies a mesh created by this batch starts with, written in the
/// same transaction: the `allow-all` TrafficPermission (agents deny by
/// default, so a new mesh would otherwise refuse every call), unless the
/// batch brings its own TrafficPermission of that name. A mesh that
/// already existed gets nothing: its policies are the operator's.
fn initial_policies(batch: &[Resource], known: &KnownNames) -> Vec<Resource> {
    batch
        .iter()
        .filter(|r| r.kind() == Kind::Mesh && !known.meshes.contains(r.name()))
        .filter(|mesh| {
            !batch.iter().any(|r| {
                r.kind() == Kind::TrafficPermission
                    && r.name() == ALLOW_ALL
                    && r.mesh() == Some(mesh.name())
            })
        })
        .map(|mesh| {
            tracing::info!(
                mesh = mesh.name(),
                policy = ALLOW_ALL,
                "new mesh: creating its initial TrafficPermission"
            );
            Resource::from(TrafficPermissionSpec::allow_all_in(mesh.name()))
        })
        .collect()
}

/// Readies one resource for writing: defaults applied, the version it must
/// still have, and whether it existed. `status` is never taken from input:
/// the stored one, if any, is kept.
async fn prepare(
    store: &Store,
    mut resource: Resource,
) -> Result<(Resource, Expect, bool), StoreError> {
    resource.apply_defaults();
    let key = ResourceKey::of(&resource);
    let previous = store.get(&key).await?;
    match (&mut resource, previous.as_ref().map(|p| &p.resource)) {
        (Resource::Service(service), old) => {
            service.status = match old {
                Some(Resource::Service(old)) => old.status.clone(),
                _ => None,
            };
        }
        (Resource::ExternalService(external), old) => {
            external.status = match old {
                Some(Resource::ExternalService(old)) => old.status.clone(),
                _ => None,
            };
        }
        _ => {}
    }
    if let (Resource::Workload(workload), Some(Resource::Workload(old))) =
        (&mut resource, previous.as_ref().map(|p| &p.resource))
    {
        keep_registration(workload, old);
    }
    let expect = previous
        .as_ref()
        .map_or(Expect::Absent, |p| Expect::Version(p.version));
    Ok((resource, expect, previous.is_some()))
}

/// A placed Workload the operator applies again keeps what its node agent
/// registered (the `weft.io/agent` label and the workload's own HBONE
/// listener) while it stays placed on that agent: the agent registers a
/// workload when it starts serving it, not at every edit of its placement,
/// so dropping them would take the workload out of service until the
/// agent's next registration.
fn keep_registration(workload: &mut Workload, old: &Workload) {
    let Some(node) = &workload.spec.node else {
        return;
    };
    let registered_by = old.metadata.labels.get(AGENT_LABEL);
    if registered_by != Some(&node.agent) || workload.metadata.labels.contains_key(AGENT_LABEL) {
        return;
    }
    workload
        .metadata
        .labels
        .insert(AGENT_LABEL.to_owned(), node.agent.clone());
    if workload.spec.hbone_address.is_none() {
        workload.spec.hbone_address = old.spec.hbone_address;
    }
}
