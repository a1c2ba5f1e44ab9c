//! Bootstrap tokens: what lets a new agent enrol. Only a SHA-256 of each
//! secret is stored; a presented secret names its token's id, and its hash
//! is compared in constant time.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use subtle::ConstantTimeEq;

use crate::agents::{AGENT_CUT_VERSION, AGENT_KIND};
use crate::backend::{on_pool, on_writer, Store};
use crate::changes::{append_change, take_seq};
use crate::clock::now_ms;
use crate::clock::{from_unix_seconds, unix_seconds};
use crate::columns::Columns;
use crate::error::{to_u64, StoreError};

/// The prefix of every secret, so a leaked one is recognisable.
const SECRET_PREFIX: &str = "weft-bt1";

/// Which workloads an agent that enrols with a token may register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WorkloadScope {
    /// Exactly these workload names.
    Names(Vec<String>),
    /// Any workload whose name starts with this.
    Prefix(String),
}

impl WorkloadScope {
    /// Whether a workload of this name is allowed.
    pub fn allows(&self, workload: &str) -> bool {
        match self {
            WorkloadScope::Names(names) => names.iter().any(|n| n == workload),
            WorkloadScope::Prefix(prefix) => workload.starts_with(prefix.as_str()),
        }
    }
}

/// What a new token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    /// The mesh the agent joins.
    pub mesh: String,
    /// The only zone that accepts the token.
    pub zone: String,
    /// The workloads the agent may register.
    pub workloads: WorkloadScope,
    /// When the token stops working.
    pub expires_at: SystemTime,
    /// How many enrolments it allows (1: single use).
    pub max_uses: u32,
}

/// A token as listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The public id (also part of the secret).
    pub id: String,
    /// The mesh, zone, workloads, expiry and bound it was issued with.
    pub spec: TokenSpec,
    /// Enrolments so far.
    pub uses: u32,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// What a successfully consumed token grants the enrolling agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// The token's id, to record which token enrolled the agent (and cut it
    /// off when the token is revoked).
    pub id: String,
    /// The mesh the agent joins.
    pub mesh: String,
    /// The zone.
    pub zone: String,
    /// The workloads the agent may register.
    pub workloads: WorkloadScope,
    /// Enrolments left after this one.
    pub uses_left: u32,
}

/// Why a token was refused; each cause is its own variant so that the
/// controller can log it (the agent should get a less telling message).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No token has this secret (malformed, never issued, or wrong secret).
    #[error("unknown bootstrap token")]
    Unknown,
    /// The token is for another zone.
    #[error("bootstrap token {id} is for zone {token_zone:?}, not {presented:?}")]
    WrongZone {
        /// The token's id.
        id: String,
        /// The zone it was issued for.
        token_zone: String,
        /// The zone it was presented to.
        presented: String,
    },
    /// The token was revoked.
    #[error("bootstrap token {id} was revoked")]
    Revoked {
        /// The token's id.
        id: String,
    },
    /// The token's expiry has passed.
    #[error("bootstrap token {id} expired")]
    Expired {
        /// The token's id.
        id: String,
    },
    /// The token was used as many times as it allows.
    #[error("bootstrap token {id} was already used {max_uses} time(s), its limit")]
    Exhausted {
        /// The token's id.
        id: String,
        /// Its bound.
        max_uses: u32,
    },
    /// The store failed; the token was not consumed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn random_hex(bytes: usize) -> Result<String, StoreError> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).map_err(|e| StoreError::Corrupt {
        what: "random source".to_owned(),
        reason: e.to_string(),
    })?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Splits `weft-bt1.<id>.<secret>` into its id and secret.
fn parse_secret(presented: &str) -> Option<(&str, &str)> {
    let rest = presented.strip_prefix(SECRET_PREFIX)?.strip_prefix('.')?;
    let (id, secret) = rest.split_once('.')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

struct TokenRow {
    info: TokenInfo,
    secret_sha256: Vec<u8>,
}

fn decode_token<R>(row: &R) -> Result<TokenRow, StoreError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Vec<u8>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let cols = Columns::new(row, "bootstrap_tokens");
    let id: String = cols.get("id")?;
    let workloads: String = cols.get("workloads")?;
    let workloads: WorkloadScope = serde_json::from_str(&workloads)
        .map_err(StoreError::corrupt(format!("workloads of token {id}")))?;
    let count = |name: &str| -> Result<u32, StoreError> {
        let v: i64 = cols.get(name)?;
        u32::try_from(to_u64(v, name)?).map_err(StoreError::corrupt(name.to_owned()))
    };
    let expires_at: i64 = cols.get("expires_at")?;
    Ok(TokenRow {
        secret_sha256: cols.get("secret_sha256")?,
        info: TokenInfo {
            spec: TokenSpec {
                mesh: cols.get("mesh")?,
                zone: cols.get("zone")?,
                workloads,
                expires_at: from_unix_seconds(expires_at),
                max_uses: count("max_uses")?,
            },
            uses: count("uses")?,
            revoked: cols.get("revoked")?,
            id,
        },
    })
}

const SELECT_TOKEN: &str = "SELECT id, secret_sha256, mesh, zone, workloads, expires_at, \
     max_uses, uses, revoked FROM bootstrap_tokens";

impl Store {
    /// Issues a token; returns its id (for listing and revoking) and its
    /// secret, which is shown once and never stored.
    pub async fn issue_token(&self, spec: &TokenSpec) -> Result<(String, String), StoreError> {
        let id = random_hex(8)?;
        let secret = random_hex(32)?;
        let workloads =
            serde_json::to_string(&spec.workloads).map_err(|e| StoreError::Corrupt {
                what: "encoding workloads".to_owned(),
                reason: e.to_string(),
            })?;
        let op = format!("issue token {id}");
        on_writer!(self, pool => {
            sqlx::query(
                "INSERT INTO bootstrap_tokens (id, secret_sha256, mesh, zone, workloads, \
                 expires_at, max_uses, uses, revoked, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9)",
            )
            .bind(&id)
            .bind(hash(&secret))
            .bind(&spec.mesh)
            .bind(&spec.zone)
            .bind(&workloads)
            .bind(unix_seconds(spec.expires_at))
            .bind(i64::from(spec.max_uses))
            .bind(false)
            .bind(unix_seconds(SystemTime::now()))
            .execute(pool)
            .await
            .map_err(StoreError::db(&op))?;
        });
        let presented = format!("{SECRET_PREFIX}.{id}.{secret}");
        Ok((id, presented))
    }

    /// Finds the token a presented secret names, for `zone`: unknown (no
    /// such id, or the secret does not match) and wrong-zone refusals.
    async fn presented_token(&self, presented: &str, zone: &str) -> Result<TokenInfo, TokenError> {
        let (id, secret) = parse_secret(presented).ok_or(TokenError::Unknown)?;
        let Some(token) = self.token_row(id).await? else {
            return Err(TokenError::Unknown);
        };
        let matches: bool = hash(secret).ct_eq(&token.secret_sha256).into();
        if !matches {
            return Err(TokenError::Unknown);
        }
        let info = token.info;
        if info.spec.zone != zone {
            return Err(TokenError::WrongZone {
                id: info.id,
                token_zone: info.spec.zone,
                presented: zone.to_owned(),
            });
        }
        Ok(info)
    }

    /// Checks a presented secret for `zone` like [`Store::consume_token`]
    /// but without counting a use, so that a request can be checked in full
    /// before the token is spent (a refused enrolment must not burn a
    /// single-use token). Only `consume_token` is authoritative.
    pub async fn peek_token(&self, presented: &str, zone: &str) -> Result<TokenGrant, TokenError> {
        let info = self.presented_token(presented, zone).await?;
        let now = unix_seconds(SystemTime::now());
        if info.revoked {
            return Err(TokenError::Revoked { id: info.id });
        }
        if unix_seconds(info.spec.expires_at) <= now {
            return Err(TokenError::Expired { id: info.id });
        }
        if info.uses >= info.spec.max_uses {
            return Err(TokenError::Exhausted {
                id: info.id,
                max_uses: info.spec.max_uses,
            });
        }
        Ok(TokenGrant {
            uses_left: info.spec.max_uses - info.uses,
            id: info.id,
            mesh: info.spec.mesh,
            zone: info.spec.zone,
            workloads: info.spec.workloads,
        })
    }

    /// A token by its id (without its secret), or `None` if unknown: what
    /// an enrolled agent's workload scope and revocation are read from.
    pub async fn token_info(&self, id: &str) -> Result<Option<TokenInfo>, StoreError> {
        Ok(self.token_row(id).await?.map(|row| row.info))
    }

    /// Checks a presented secret for `zone` and, if the token is good,
    /// counts one use, atomically: concurrent enrolments with a
    /// single-use token let exactly one through.
    pub async fn consume_token(
        &self,
        presented: &str,
        zone: &str,
    ) -> Result<TokenGrant, TokenError> {
        let info = self.presented_token(presented, zone).await?;
        let id = info.id.as_str();
        let now = unix_seconds(SystemTime::now());
        let op = format!("consume token {id}");
        let uses: Option<i64> = on_writer!(self, pool => {
            sqlx::query_scalar(
                "UPDATE bootstrap_tokens SET uses = uses + 1 \
                 WHERE id = $1 AND revoked = $2 AND expires_at > $3 AND uses < max_uses \
                 RETURNING uses",
            )
            .bind(id)
            .bind(false)
            .bind(now)
            .fetch_optional(pool)
            .await
            .map_err(StoreError::db(&op))?
        });
        let Some(uses) = uses else {
            // Refused: read it again to say why (it may have changed since).
            let Some(token) = self.token_row(id).await? else {
                return Err(TokenError::Unknown);
            };
            let info = token.info;
            return Err(if info.revoked {
                TokenError::Revoked { id: info.id }
            } else if unix_seconds(info.spec.expires_at) <= now {
                TokenError::Expired { id: info.id }
            } else {
                TokenError::Exhausted {
                    id: info.id,
                    max_uses: info.spec.max_uses,
                }
            });
        };
        let uses = u32::try_from(to_u64(uses, "bootstrap_tokens.uses")?)
            .map_err(StoreError::corrupt("bootstrap_tokens.uses"))?;
        Ok(TokenGrant {
            id: info.id,
            mesh: info.spec.mesh,
            zone: info.spec.zone,
            workloads: info.spec.workloads,
            uses_left: info.spec.max_uses.saturating_sub(uses),
        })
    }

    /// Revokes a token; returns whether it exists. In the same transaction
    /// every agent enrolled with it leaves the endpoint lists and gets an
    /// entry in the change feed, so that every replica cuts its stream at
    /// once (see [`TokenGrant::id`]).
    pub async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        const AGENT_CUT: i64 = AGENT_CUT_VERSION as i64;
        let op = format!("revoke token {id}");
        let now = now_ms();
        let found = on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            // The sequence first, as every writer does (commit order).
            let mut first = Some(take_seq!(tx, &op));
            let affected = sqlx::query("UPDATE bootstrap_tokens SET revoked = $2 WHERE id = $1")
                .bind(id)
                .bind(true)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(&op))?
                .rows_affected();
            if affected == 0 {
                return Ok::<_, StoreError>(false);
            }
            let agents: Vec<(String, String, String)> = sqlx::query_as(
                "UPDATE agents SET left_at = COALESCE(left_at, $2), \
                 left_reason = COALESCE(left_reason, $3) \
                 WHERE token_id = $1 RETURNING zone, name, mesh",
            )
            .bind(id)
            .bind(now)
            .bind(format!("bootstrap token {id} revoked"))
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(&op))?;
            for (zone, name, mesh) in &agents {
                let seq = match first.take() {
                    Some(seq) => seq,
                    None => take_seq!(tx, &op),
                };
                // The zone is kept in the namespace column.
                append_change!(tx, &op, seq, AGENT_KIND, mesh, zone, name, AGENT_CUT, false);
            }
            tx.commit().await.map_err(StoreError::db(&op))?;
            Ok(true)
        }.await)?;
        if found {
            self.notify_local();
        }
        Ok(found)
    }

    /// Every token, oldest first, without secrets.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(&format!("{SELECT_TOKEN} ORDER BY created_at, id"))
                .fetch_all(pool)
                .await
                .map_err(StoreError::db("list tokens"))?;
            rows.iter().map(|r| decode_token(r).map(|t| t.info)).collect()
        })
    }

    async fn token_row(&self, id: &str) -> Result<Option<TokenRow>, StoreError> {
        let op = format!("read token {id}");
        on_pool!(self, pool => {
            let row = sqlx::query(&format!("{SELECT_TOKEN} WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await
                .map_err(StoreError::db(&op))?;
            row.as_ref().map(decode_token).transpose()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_parse_and_scopes_match() {
        assert_eq!(parse_secret("weft-bt1.ab.cd"), Some(("ab", "cd")));
        assert_eq!(parse_secret("weft-bt1.ab."), None);
        assert_eq!(parse_secret("other.ab.cd"), None);
        assert!(WorkloadScope::Prefix("web-".into()).allows("web-1"));
        assert!(!WorkloadScope::Names(vec!["a".into()]).allows("b"));
    }
}
