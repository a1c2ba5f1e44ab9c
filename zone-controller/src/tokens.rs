//! Bootstrap tokens over the HTTP API: checking an issue request, and the
//! JSON shapes of issued and listed tokens. The secret appears only in the
//! answer to the issue request; the store keeps just its hash.
//!
//! An issue request is
//! `{"mesh": "default", "workloads": {"names": [..]} | {"prefix": ".."},
//! "ttl": "1h", "maxUses": 1}`; `ttl` (default `1h`) must be within
//! [`MIN_TTL`]..[`MAX_TTL`], `maxUses` (default 1) within 1..[`MAX_USES`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};
use weft_api::validation::{dns1123_label, DocumentErrors, FieldError, FieldPath};
use weft_api::{InputErrors, Kind};
use weft_store::{ResourceKey, Store, StoreError, TokenInfo, TokenSpec, WorkloadScope};

/// The shortest lifetime a token may be issued with.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest lifetime a token may be issued with (30 days).
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The most enrolments one token may allow.
pub const MAX_USES: u32 = 1000;
/// The lifetime when the request gives none.
const DEFAULT_TTL: &str = "1h";

/// Why an issue request was not turned into a [`TokenSpec`].
#[derive(Debug)]
pub enum IssueRefusal {
    /// The request is wrong: one entry per field at fault.
    Invalid(InputErrors),
    /// The store failed while checking the mesh.
    Store(StoreError),
}

/// Checks an issue request's JSON body for `zone` (the controller's own),
/// including that the mesh exists, and returns what to issue.
pub async fn check_issue(
    store: &Store,
    zone: &str,
    body: &[u8],
    now: SystemTime,
) -> Result<TokenSpec, IssueRefusal> {
    let mut errors = Vec::new();
    let object = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => object,
        Ok(_) => {
            errors.push(error(&[], "the body must be a JSON object"));
            return Err(invalid(errors));
        }
        Err(e) => {
            errors.push(error(&[], format!("the body is not JSON: {e}")));
            return Err(invalid(errors));
        }
    };
    for key in object.keys() {
        if !["mesh", "workloads", "ttl", "maxUses"].contains(&key.as_str()) {
            errors.push(error(
                &[key],
                "unknown field; expected mesh, workloads, ttl or maxUses",
            ));
        }
    }
    let mesh = check_mesh(store, &object, &mut errors)
        .await
        .map_err(IssueRefusal::Store)?;
    let workloads = check_workloads(object.get("workloads"), &mut errors);
    let ttl = check_ttl(object.get("ttl"), &mut errors);
    let max_uses = check_max_uses(object.get("maxUses"), &mut errors);
    match (mesh, workloads, ttl, max_uses) {
        (Some(mesh), Some(workloads), Some(ttl), Some(max_uses)) if errors.is_empty() => {
            Ok(TokenSpec {
                mesh,
                zone: zone.to_owned(),
                workloads,
                expires_at: now + ttl,
                max_uses,
            })
        }
        _ => Err(invalid(errors)),
    }
}

fn error(path: &[&str], reason: impl Into<String>) -> FieldError {
    FieldError::new(FieldPath::of(path), reason)
}

/// The errors in the resource API's shape: one document (the request).
fn invalid(errors: Vec<FieldError>) -> IssueRefusal {
    IssueRefusal::Invalid(InputErrors {
        documents: vec![DocumentErrors {
            document: 1,
            line: None,
            kind: None,
            name: None,
            errors,
        }],
    })
}

async fn check_mesh(
    store: &Store,
    object: &Map<String, Value>,
    errors: &mut Vec<FieldError>,
) -> Result<Option<String>, StoreError> {
    let mesh = match object.get("mesh") {
        None => {
            errors.push(error(&["mesh"], "required: the mesh the agent joins"));
            return Ok(None);
        }
        Some(Value::String(mesh)) => mesh,
        Some(_) => {
            errors.push(error(&["mesh"], "must be a string"));
            return Ok(None);
        }
    };
    if let Err(reason) = dns1123_label(mesh) {
        errors.push(error(&["mesh"], reason));
        return Ok(None);
    }
    if store
        .get(&ResourceKey::global(Kind::Mesh, mesh))
        .await?
        .is_none()
    {
        errors.push(error(&["mesh"], format!("mesh {mesh:?} does not exist")));
        return Ok(None);
    }
    Ok(Some(mesh.clone()))
}

fn check_workloads(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<WorkloadScope> {
    const SHAPE: &str = r#"must be {"names": [..]} or {"prefix": ".."}"#;
    let Some(value) = value else {
        errors.push(error(&["workloads"], format!("required; {SHAPE}")));
        return None;
    };
    let Some(object) = value.as_object().filter(|o| o.len() == 1) else {
        errors.push(error(&["workloads"], SHAPE));
        return None;
    };
    if let Some(names) = object.get("names") {
        let Some(names) = names.as_array().filter(|n| !n.is_empty()) else {
            errors.push(error(
                &["workloads", "names"],
                "must be a non-empty list of workload names",
            ));
            return None;
        };
        let mut valid = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let path = FieldPath::of(&["workloads", "names"]).index(i);
            match name.as_str().map(|n| (n, dns1123_label(n))) {
                Some((name, Ok(()))) => valid.push(name.to_owned()),
                Some((_, Err(reason))) => errors.push(FieldError::new(path, reason)),
                None => errors.push(FieldError::new(path, "must be a string")),
            }
        }
        (valid.len() == names.len()).then_some(WorkloadScope::Names(valid))
    } else if let Some(prefix) = object.get("prefix") {
        match prefix.as_str() {
            Some(prefix) if !prefix.is_empty() => Some(WorkloadScope::Prefix(prefix.to_owned())),
            _ => {
                errors.push(error(
                    &["workloads", "prefix"],
                    "must be a non-empty string",
                ));
                None
            }
        }
    } else {
        errors.push(error(&["workloads"], SHAPE));
        None
    }
}

fn check_ttl(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<Duration> {
    let text = match value {
        None | Some(Value::Null) => DEFAULT_TTL,
        Some(Value::String(text)) => text.as_str(),
        Some(_) => {
            errors.push(error(&["ttl"], "must be a duration such as \"1h\""));
            return None;
        }
    };
    let ttl = match text.parse::<weft_api::Duration>() {
        Ok(ttl) => ttl.as_std(),
        Err(e) => {
            errors.push(error(&["ttl"], e.to_string()));
            return None;
        }
    };
    if ttl < MIN_TTL || ttl > MAX_TTL {
        errors.push(error(
            &["ttl"],
            format!("{text:?} is out of range; must be between 1s and 720h (30 days)"),
        ));
        return None;
    }
    Some(ttl)
}

fn check_max_uses(value: Option<&Value>, errors: &mut Vec<FieldError>) -> Option<u32> {
    let uses = match value {
        None | Some(Value::Null) => return Some(1),
        Some(value) => value.as_u64(),
    };
    match uses.and_then(|u| u32::try_from(u).ok()) {
        Some(uses) if (1..=MAX_USES).contains(&uses) => Some(uses),
        _ => {
            errors.push(error(
                &["maxUses"],
                format!("must be a whole number from 1 to {MAX_USES}"),
            ));
            None
        }
    }
}

/// A token as the API shows it (never with its secret).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    /// The public id, for listing and revoking.
    pub id: String,
    /// The mesh the agent joins.
    pub mesh: String,
    /// The only zone that accepts the token.
    pub zone: String,
    /// `{"names": [..]}` or `{"prefix": ".."}`.
    pub workloads: WorkloadScope,
    /// The expiry, RFC 3339 in UTC.
    pub expires_at: String,
    /// Enrolments so far.
    pub uses: u32,
    /// How many enrolments it allows.
    pub max_uses: u32,
    /// Whether it was revoked.
    pub revoked: bool,
    /// Whether its expiry has passed.
    pub expired: bool,
}

impl From<TokenInfo> for TokenView {
    fn from(info: TokenInfo) -> Self {
        TokenView {
            expired: SystemTime::now() >= info.spec.expires_at,
            expires_at: rfc3339(info.spec.expires_at),
            id: info.id,
            mesh: info.spec.mesh,
            zone: info.spec.zone,
            workloads: info.spec.workloads,
            uses: info.uses,
            max_uses: info.spec.max_uses,
            revoked: info.revoked,
        }
    }
}

/// The answer to an issue request: the token and, this once, its secret.
#[derive(Debug, Serialize)]
pub struct Issued {
    /// The token.
    #[serde(flatten)]
    pub token: TokenView,
    /// What the agent presents; shown only here.
    pub secret: String,
    /// The zone CA's pin (`sha256:<hex>`), for the agent to verify the
    /// controller on first contact.
    #[serde(rename = "caPin")]
    pub ca_pin: String,
}

impl Issued {
    /// The answer for a token just issued with `spec`.
    pub fn new(id: String, secret: String, spec: TokenSpec, ca_pin: String) -> Self {
        Issued {
            token: TokenView::from(TokenInfo {
                id,
                spec,
                uses: 0,
                revoked: false,
            }),
            secret,
            ca_pin,
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (times before 1970 print as the epoch).
pub(crate) fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rest = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_210_096);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn ttls_and_uses_are_bounded() {
        let mut errors = Vec::new();
        assert_eq!(
            check_ttl(Some(&Value::from("1h")), &mut errors),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(check_ttl(Some(&Value::from("0s")), &mut errors), None);
        assert_eq!(check_ttl(Some(&Value::from("721h")), &mut errors), None);
        assert_eq!(check_ttl(Some(&Value::from("forever")), &mut errors), None);
        assert_eq!(check_max_uses(None, &mut errors), Some(1));
        assert_eq!(check_max_uses(Some(&Value::from(0)), &mut errors), None);
        assert_eq!(check_max_uses(Some(&Value::from(1001)), &mut errors), None);
        assert_eq!(check_max_uses(Some(&Value::from(-1)), &mut errors), None);
        assert_eq!(errors.len(), 6);
    }

    #[test]
    fn workload_scopes() {
        let mut errors = Vec::new();
        let names = serde_json::json!({"names": ["web-1", "Bad_Name"]});
        assert_eq!(check_workloads(Some(&names), &mut errors), None);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path.to_string(), "workloads.names[1]");
        let prefix = serde_json::json!({"prefix": "web-"});
        assert_eq!(
            check_workloads(Some(&prefix), &mut errors),
            Some(WorkloadScope::Prefix("web-".into()))
        );
        let both = serde_json::json!({"prefix": "web-", "names": ["a"]});
        assert_eq!(check_workloads(Some(&both), &mut errors), None);
    }
}
