//! The agent inventory: who enrolled, with which token, where their HBONE
//! listener is, which replica holds their config stream, when they were
//! last seen and which config version they acked or refused.
//!
//! Transitions other replicas must react to (enrolment, connect,
//! disconnect) are appended to the change feed as `Agent` entries (see
//! [`crate::FeedEntry`]); heartbeats and acks are not, so that a quiet mesh
//! does not churn the feed.

use std::collections::HashSet;

use sqlx::Row;

use weft_api::Kind;

use crate::backend::{on_pool, on_writer, Db, Store};
use crate::changes::{append_change, take_seq};
use crate::clock::now_ms;
use crate::columns::Columns;
use crate::error::StoreError;
use crate::resources::ResourceKey;

/// The kind written in the change feed for inventory transitions; not a
/// resource kind, so resource readers skip it.
pub(crate) const AGENT_KIND: &str = "Agent";
/// The version written with an `Agent` entry when the agent was cut off
/// (0 otherwise): see [`crate::FeedEntry::Agent`].
pub(crate) const AGENT_CUT_VERSION: u64 = 1;

/// What an enrolment records about an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEnrollment {
    /// The agent's name, unique in its zone.
    pub name: String,
    /// The zone it enrolled in.
    pub zone: String,
    /// The mesh its token bound it to.
    pub mesh: String,
    /// Where peers reach its HBONE listener (`ip:port`).
    pub hbone_address: String,
    /// What it reported about its host (JSON object).
    pub host_facts: serde_json::Value,
    /// The token it enrolled with.
    pub token_id: String,
}

/// An agent the leader removed for silence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VanishedAgent {
    /// Its name.
    pub name: String,
    /// Its mesh.
    pub mesh: String,
    /// When it was last seen, milliseconds since the epoch.
    pub last_seen_ms: i64,
}

/// The last config version an agent refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentNack {
    /// The version refused.
    pub version: String,
    /// The agent's reason.
    pub reason: String,
}

/// Why and when an agent left the endpoint lists of its mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentDeparture {
    /// When it left, milliseconds since the epoch.
    pub at_ms: i64,
    /// Why: a goodbye, a revoked token, or silence beyond the grace.
    pub reason: String,
}

/// An agent as the inventory holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    /// What the latest enrolment (and Hello) recorded.
    pub enrollment: AgentEnrollment,
    /// The replica holding its stream, if any.
    pub connected_replica: Option<String>,
    /// When it was last seen, milliseconds since the epoch.
    pub last_seen_ms: i64,
    /// The last version it acknowledged ("" before the first).
    pub applied_version: String,
    /// The last version it refused, if any.
    pub last_nack: Option<AgentNack>,
    /// The CAs (fingerprints) in the trust bundle of the version it last
    /// acknowledged: what it trusts now, as far as the zone knows.
    pub applied_cas: Vec<String>,
    /// Set once it left (goodbye, revoked token, vanished): its workloads
    /// are in no endpoint list until its next accepted Hello.
    pub left: Option<AgentDeparture>,
    /// Workloads of it the operator deleted (`mesh/namespace/name`): it may
    /// not register them again, nor renew their certificates, until it
    /// enrols again.
    pub withdrawn: Vec<String>,
}

/// What endpoint lists need of an agent: the few columns a zone reads for
/// every agent of a mesh at each change, without decoding its host facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPresence {
    /// The agent's name.
    pub name: String,
    /// Where its tunnel listens.
    pub hbone_address: String,
    /// Whether a replica holds its stream.
    pub connected: bool,
    /// When it was last seen, milliseconds since the epoch.
    pub last_seen_ms: i64,
    /// Whether it left (goodbye, revoked token, vanished).
    pub left: bool,
}

const SELECT_AGENT: &str = "SELECT zone, name, mesh, hbone_address, host_facts, token_id, \
     connected_replica, last_seen, applied_version, nack_version, nack_reason, applied_cas, \
     left_at, left_reason, withdrawn FROM agents";

fn decode_agent<R>(row: &R) -> Result<AgentRecord, StoreError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let cols = Columns::new(row, "agents");
    let name: String = cols.get("name")?;
    let facts: String = cols.get("host_facts")?;
    let host_facts = serde_json::from_str(&facts)
        .map_err(StoreError::corrupt(format!("host facts of agent {name}")))?;
    let nack_version: Option<String> = cols.get("nack_version")?;
    let nack_reason: Option<String> = cols.get("nack_reason")?;
    let applied_cas: String = cols.get("applied_cas")?;
    let left_at: Option<i64> = cols.get("left_at")?;
    let left_reason: Option<String> = cols.get("left_reason")?;
    let withdrawn: String = cols.get("withdrawn")?;
    Ok(AgentRecord {
        enrollment: AgentEnrollment {
            zone: cols.get("zone")?,
            mesh: cols.get("mesh")?,
            hbone_address: cols.get("hbone_address")?,
            host_facts,
            token_id: cols.get("token_id")?,
            name,
        },
        connected_replica: cols.get("connected_replica")?,
        last_seen_ms: cols.get("last_seen")?,
        applied_version: cols.get("applied_version")?,
        last_nack: nack_version.map(|version| AgentNack {
            version,
            reason: nack_reason.unwrap_or_default(),
        }),
        applied_cas: applied_cas.split_whitespace().map(str::to_owned).collect(),
        left: left_at.map(|at_ms| AgentDeparture {
            at_ms,
            reason: left_reason.unwrap_or_default(),
        }),
        withdrawn: withdrawn.split_whitespace().map(str::to_owned).collect(),
    })
}

/// Appends an `Agent` entry to the change feed inside `tx`.
macro_rules! feed_agent {
    ($tx:expr, $op:expr, $zone:expr, $mesh:expr, $name:expr) => {{
        let seq = take_seq!($tx, $op);
        // The zone is kept in the namespace column.
        append_change!($tx, $op, seq, AGENT_KIND, $mesh, $zone, $name, 0_i64, false);
    }};
}

impl Store {
    /// Records an enrolment (a new agent, or one enrolling again): its mesh,
    /// HBONE address, host facts and token. Its connection state and
    /// acknowledged version are kept; a departure and withdrawn workloads
    /// are forgotten (enrolling again takes a token: the operator's consent).
    pub async fn enroll_agent(&self, agent: &AgentEnrollment) -> Result<(), StoreError> {
        let op = format!("enroll agent {}", agent.name);
        let facts = agent.host_facts.to_string();
        let now = now_ms();
        on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            feed_agent!(tx, &op, &agent.zone, &agent.mesh, &agent.name);
            sqlx::query(
                "INSERT INTO agents (zone, name, mesh, hbone_address, host_facts, token_id, \
                 connected_replica, last_seen, applied_version, nack_version, nack_reason, \
                 enrolled_at) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, '', NULL, NULL, $7) \
                 ON CONFLICT (zone, name) DO UPDATE SET mesh = excluded.mesh, \
                 hbone_address = excluded.hbone_address, host_facts = excluded.host_facts, \
                 token_id = excluded.token_id, enrolled_at = excluded.enrolled_at, \
                 left_at = NULL, left_reason = NULL, withdrawn = ''",
            )
            .bind(&agent.zone)
            .bind(&agent.name)
            .bind(&agent.mesh)
            .bind(&agent.hbone_address)
            .bind(&facts)
            .bind(&agent.token_id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::db(&op))?;
            tx.commit().await.map_err(StoreError::db(&op))?;
            Ok::<_, StoreError>(())
        }.await)?;
        self.notify_local();
        Ok(())
    }

    /// Marks an agent connected to `replica` (its stream's Hello), with the
    /// HBONE address and host facts it reported, seen now, and back in the
    /// endpoint lists if it had left. Returns the
    /// record, or `None` if the agent never enrolled.
    pub async fn connect_agent(
        &self,
        zone: &str,
        name: &str,
        replica: &str,
        hbone_address: &str,
        host_facts: &serde_json::Value,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let op = format!("connect agent {name}");
        let facts = host_facts.to_string();
        let now = now_ms();
        let mesh: Option<String> = on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            let mesh: Option<String> = sqlx::query_scalar(
                "UPDATE agents SET connected_replica = $3, last_seen = $4, \
                 hbone_address = $5, host_facts = $6, left_at = NULL, left_reason = NULL \
                 WHERE zone = $1 AND name = $2 RETURNING mesh",
            )
            .bind(zone)
            .bind(name)
            .bind(replica)
            .bind(now)
            .bind(hbone_address)
            .bind(&facts)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db(&op))?;
            let Some(mesh) = mesh else {
                return Ok::<_, StoreError>(None);
            };
            feed_agent!(tx, &op, zone, &mesh, name);
            tx.commit().await.map_err(StoreError::db(&op))?;
            Ok(Some(mesh))
        }.await)?;
        if mesh.is_none() {
            return Ok(None);
        }
        self.notify_local();
        self.get_agent(zone, name).await
    }

    /// Replaces the host facts an agent reports on its stream from time to
    /// time (its RSS and CPU time move); not in the change feed: only
    /// inspection reads them. Returns whether the agent is known.
    pub async fn update_host_facts(
        &self,
        zone: &str,
        name: &str,
        host_facts: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        let op = format!("host facts of agent {name}");
        let facts = host_facts.to_string();
        let affected = on_writer!(self, pool => {
            sqlx::query("UPDATE agents SET host_facts = $3 WHERE zone = $1 AND name = $2")
                .bind(zone)
                .bind(name)
                .bind(&facts)
                .execute(pool)
                .await
                .map_err(StoreError::db(&op))?
                .rows_affected()
        });
        Ok(affected > 0)
    }

    /// Marks the agents `names` seen now, those whose stream `replica`
    /// still holds; not in the change feed. One transaction, with one
    /// statement per batch of names, so that a replica's thousands of
    /// streams cost one commit per heartbeat period, not one each, and take
    /// one turn at SQLite's writer. Returns the names it could not mark:
    /// they are no longer this replica's (taken over elsewhere, or removed
    /// after the agent grace).
    pub async fn heartbeat_agents(
        &self,
        zone: &str,
        replica: &str,
        names: &[String],
    ) -> Result<Vec<String>, StoreError> {
        /// Names per statement: far under SQLite's bound on parameters.
        const BATCH: usize = 500;
        let now = now_ms();
        let op = format!("heartbeat of {} agents", names.len());
        let in_list = |n: usize| {
            (0..n)
                .map(|i| format!("${}", i + 3))
                .collect::<Vec<_>>()
                .join(", ")
        };
        on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            let mut lost = Vec::new();
            for batch in names.chunks(BATCH) {
                // No RETURNING: rows handed back one by one would hold the
                // writer while a busy runtime gets round to reading them.
                let sql = format!(
                    "UPDATE agents SET last_seen = ${} \
                     WHERE zone = $1 AND connected_replica = $2 AND name IN ({})",
                    batch.len() + 3,
                    in_list(batch.len())
                );
                let mut query = sqlx::query(&sql).bind(zone).bind(replica);
                for name in batch {
                    query = query.bind(name);
                }
                let marked = query
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::db(&op))?
                    .rows_affected();
                if marked == batch.len() as u64 {
                    continue;
                }
                // Rare: some stream moved or its agent went. Which ones?
                let sql = format!(
                    "SELECT name FROM agents \
                     WHERE zone = $1 AND connected_replica = $2 AND name IN ({})",
                    in_list(batch.len())
                );
                let mut query = sqlx::query_scalar::<_, String>(&sql).bind(zone).bind(replica);
                for name in batch {
                    query = query.bind(name);
                }
                let held: HashSet<String> = query
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::db(&op))?
                    .into_iter()
                    .collect();
                lost.extend(batch.iter().filter(|n| !held.contains(*n)).cloned());
            }
            tx.commit().await.map_err(StoreError::db(&op))?;
            Ok::<_, StoreError>(lost)
        }.await)
    }

    /// Marks an agent disconnected if `replica` still holds its stream (a
    /// newer stream on another replica is left alone). Returns whether it
    /// did.
    pub async fn disconnect_agent(
        &self,
        zone: &str,
        name: &str,
        replica: &str,
    ) -> Result<bool, StoreError> {
        let op = format!("disconnect agent {name}");
        let done = on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            let mesh: Option<String> = sqlx::query_scalar(
                "UPDATE agents SET connected_replica = NULL \
                 WHERE zone = $1 AND name = $2 AND connected_replica = $3 RETURNING mesh",
            )
            .bind(zone)
            .bind(name)
            .bind(replica)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db(&op))?;
            let Some(mesh) = mesh else {
                return Ok::<_, StoreError>(false);
            };
            feed_agent!(tx, &op, zone, &mesh, name);
            tx.commit().await.map_err(StoreError::db(&op))?;
            Ok(true)
        }.await)?;
        if done {
            self.notify_local();
        }
        Ok(done)
    }

    /// Marks an agent gone from the endpoint lists, if `replica` still holds
    /// its stream: it said goodbye (closed its stream cleanly), or was cut
    /// off. A departure already recorded keeps its time and reason.
    /// Returns whether it did.
    pub async fn leave_agent(
        &self,
        zone: &str,
        name: &str,
        replica: &str,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let op = format!("record the goodbye of agent {name}");
        let now = now_ms();
        let done = on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            // The sequence first, as every writer does (commit order).
            let seq = take_seq!(tx, &op);
            let mesh: Option<String> = sqlx::query_scalar(
                "UPDATE agents SET connected_replica = NULL, left_at = COALESCE(left_at, $4), \
                 left_reason = COALESCE(left_reason, $5) \
                 WHERE zone = $1 AND name = $2 AND connected_replica = $3 RETURNING mesh",
            )
            .bind(zone)
            .bind(name)
            .bind(replica)
            .bind(now)
            .bind(reason)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db(&op))?;
            let Some(mesh) = mesh else {
                return Ok::<_, StoreError>(false);
            };
            append_change!(tx, &op, seq, AGENT_KIND, &mesh, zone, name, 0_i64, false);
            tx.commit().await.map_err(StoreError::db(&op))?;
            Ok(true)
        }.await)?;
        if done {
            self.notify_local();
        }
        Ok(done)
    }

    /// Removes from the endpoint lists every agent of `zone` not seen since
    /// `seen_before_ms` that has not left yet (it vanished: no goodbye, no
    /// heartbeat), and forgets the replica that held its stream. Returns
    /// the agents removed, with their mesh and when they were last seen.
    pub async fn remove_vanished_agents(
        &self,
        zone: &str,
        seen_before_ms: i64,
        reason: &str,
    ) -> Result<Vec<VanishedAgent>, StoreError> {
        let op = format!("remove the agents of zone {zone} not seen since {seen_before_ms}");
        let now = now_ms();
        let removed = on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            let mut first = Some(take_seq!(tx, &op));
            let rows: Vec<(String, String, i64)> = sqlx::query_as(
                "UPDATE agents SET connected_replica = NULL, left_at = $3, left_reason = $4 \
                 WHERE zone = $1 AND left_at IS NULL AND last_seen < $2 \
                 RETURNING name, mesh, last_seen",
            )
            .bind(zone)
            .bind(seen_before_ms)
            .bind(now)
            .bind(reason)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::db(&op))?;
            if rows.is_empty() {
                return Ok::<_, StoreError>(Vec::new());
            }
            for (name, mesh, _) in &rows {
                let seq = match first.take() {
                    Some(seq) => seq,
                    None => take_seq!(tx, &op),
                };
                append_change!(tx, &op, seq, AGENT_KIND, mesh, zone, name, 0_i64, false);
            }
            tx.commit().await.map_err(StoreError::db(&op))?;
            Ok(rows
                .into_iter()
                .map(|(name, mesh, last_seen_ms)| VanishedAgent { name, mesh, last_seen_ms })
                .collect())
        }.await)?;
        if !removed.is_empty() {
            self.notify_local();
        }
        Ok(removed)
    }

    /// Records that the operator deleted workload `key`
    /// (`mesh/namespace/name`) of an agent, so that its Hello cannot
    /// register it again; in the change feed, so that every replica cuts
    /// the agent's stream. Returns whether the agent exists.
    pub async fn withdraw_workload(
        &self,
        zone: &str,
        name: &str,
        key: &str,
    ) -> Result<bool, StoreError> {
        let op = format!("withdraw workload {key} of agent {name}");
        let done = on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            // The sequence first: it also makes this read-then-write one
            // writer's turn.
            let seq = take_seq!(tx, &op);
            let row: Option<(String, String)> = sqlx::query_as(
                "SELECT mesh, withdrawn FROM agents WHERE zone = $1 AND name = $2",
            )
            .bind(zone)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::db(&op))?;
            let Some((mesh, withdrawn)) = row else {
                return Ok::<_, StoreError>(false);
            };
            if withdrawn.split_whitespace().any(|k| k == key) {
                return Ok(true);
            }
            let next = if withdrawn.is_empty() {
                key.to_owned()
            } else {
                format!("{withdrawn} {key}")
            };
            append_change!(tx, &op, seq, AGENT_KIND, &mesh, zone, name, 0_i64, false);
            sqlx::query("UPDATE agents SET withdrawn = $3 WHERE zone = $1 AND name = $2")
                .bind(zone)
                .bind(name)
                .bind(&next)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::db(&op))?;
            tx.commit().await.map_err(StoreError::db(&op))?;
            Ok(true)
        }.await)?;
        self.notify_local();
        Ok(done)
    }

    /// Records many acks (agent name, version, trusted CA fingerprints) in
    /// one transaction: one commit for a whole push to thousands of agents,
    /// instead of one each, and one statement per few hundred acks, so
    /// that the transaction holds SQLite's writer briefly.
    pub async fn record_acks(
        &self,
        zone: &str,
        acks: &[(String, String, Vec<String>)],
    ) -> Result<(), StoreError> {
        /// Acks per statement (three parameters each): far under both
        /// backends' bounds on parameters.
        const BATCH: usize = 300;
        let op = format!("record {} acks", acks.len());
        let now = now_ms();
        on_writer!(self, pool => async {
            let mut tx = pool.begin().await.map_err(StoreError::db(&op))?;
            for batch in acks.chunks(BATCH) {
                let rows = (0..batch.len())
                    .map(|i| format!("(${}, ${}, ${})", 3 * i + 3, 3 * i + 4, 3 * i + 5))
                    .collect::<Vec<_>>()
                    .join(", ");
                // VALUES names its columns column1.. on both backends.
                let sql = format!(
                    "UPDATE agents SET applied_version = acked.column2, last_seen = $2, \
                     applied_cas = acked.column3 \
                     FROM (VALUES {rows}) AS acked \
                     WHERE agents.zone = $1 AND agents.name = acked.column1"
                );
                let mut query = sqlx::query(&sql).bind(zone).bind(now);
                for (name, version, trusted_cas) in batch {
                    query = query.bind(name).bind(version).bind(trusted_cas.join(" "));
                }
                query.execute(&mut *tx).await.map_err(StoreError::db(&op))?;
            }
            tx.commit().await.map_err(StoreError::db(&op))
        }.await)?;
        Ok(())
    }

    /// The keys of the Workloads whose label `label` is `agent` (the ones
    /// an agent registered), in any mesh. The label is matched inside the
    /// database, so that one agent's (re)connection does not decode every
    /// Workload of the zone.
    pub async fn labelled_workloads(
        &self,
        label: &str,
        agent: &str,
    ) -> Result<Vec<ResourceKey>, StoreError> {
        let op = format!("list the workloads of agent {agent}");
        let rows: Vec<(String, String, String)> = match &self.inner.db {
            Db::Sqlite { readers: pool, .. } => sqlx::query_as(
                "SELECT mesh, namespace, name FROM resources \
                 WHERE kind = $1 AND json_extract(body, $2) = $3",
            )
            .bind(Kind::Workload.as_str())
            .bind(format!("$.metadata.labels.\"{label}\""))
            .bind(agent)
            .fetch_all(pool)
            .await
            .map_err(StoreError::db(&op))?,
            Db::Postgres(pool) => sqlx::query_as(
                "SELECT mesh, namespace, name FROM resources \
                 WHERE kind = $1 AND body->'metadata'->'labels'->>$2 = $3",
            )
            .bind(Kind::Workload.as_str())
            .bind(label)
            .bind(agent)
            .fetch_all(pool)
            .await
            .map_err(StoreError::db(&op))?,
        };
        Ok(rows
            .iter()
            .map(|(mesh, namespace, name)| {
                ResourceKey::namespaced(Kind::Workload, mesh, namespace, name)
            })
            .collect())
    }

    /// Records that an agent refused `version` for `reason`.
    pub async fn record_nack(
        &self,
        zone: &str,
        name: &str,
        version: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let op = format!("record the nack of agent {name}");
        on_writer!(self, pool => {
            sqlx::query(
                "UPDATE agents SET nack_version = $3, nack_reason = $4, last_seen = $5 \
                 WHERE zone = $1 AND name = $2",
            )
            .bind(zone)
            .bind(name)
            .bind(version)
            .bind(reason)
            .bind(now_ms())
            .execute(pool)
            .await
            .map_err(StoreError::db(&op))?;
        });
        Ok(())
    }

    /// One agent of a zone, or `None` if it never enrolled.
    pub async fn get_agent(
        &self,
        zone: &str,
        name: &str,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let op = format!("read agent {name}");
        on_pool!(self, pool => {
            let row = sqlx::query(&format!("{SELECT_AGENT} WHERE zone = $1 AND name = $2"))
                .bind(zone)
                .bind(name)
                .fetch_optional(pool)
                .await
                .map_err(StoreError::db(&op))?;
            row.as_ref().map(decode_agent).transpose()
        })
    }

    /// The [`AgentPresence`] of every agent of `mesh` in `zone`.
    pub async fn list_presence(
        &self,
        zone: &str,
        mesh: &str,
    ) -> Result<Vec<AgentPresence>, StoreError> {
        let op = "list the presence of agents";
        /// name, hbone_address, connected_replica, last_seen, left_at.
        type PresenceRow = (String, String, Option<String>, i64, Option<i64>);
        let rows: Vec<PresenceRow> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT name, hbone_address, connected_replica, last_seen, left_at \
                 FROM agents WHERE zone = $1 AND mesh = $2",
            )
            .bind(zone)
            .bind(mesh)
            .fetch_all(pool)
            .await
            .map_err(StoreError::db(op))?
        });
        Ok(rows
            .into_iter()
            .map(
                |(name, hbone_address, replica, last_seen_ms, left_at)| AgentPresence {
                    name,
                    hbone_address,
                    connected: replica.is_some(),
                    last_seen_ms,
                    left: left_at.is_some(),
                },
            )
            .collect())
    }

    /// The agents of a zone, optionally of one mesh only, by name.
    pub async fn list_agents(
        &self,
        zone: &str,
        mesh: Option<&str>,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(&format!(
                "{SELECT_AGENT} WHERE zone = $1 AND ($2 IS NULL OR mesh = $2) ORDER BY name"
            ))
            .bind(zone)
            .bind(mesh)
            .fetch_all(pool)
            .await
            .map_err(StoreError::db("list agents"))?;
            rows.iter().map(decode_agent).collect()
        })
    }
}
