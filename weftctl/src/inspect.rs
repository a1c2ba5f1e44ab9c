//! `weftctl inspect agents|services|workloads`: the zone's inventory, as a
//! table, YAML or the API's JSON; `weftctl inspect policies --workload`:
//! the policies of one workload.

use std::io::Write;

use clap::ValueEnum;
use http::Method;
use serde_json::Value;
use weft_api::policy::target::TargetRef;

use crate::output::{cell, print_view};
use crate::{expect_ok, Client, Error, Format};

/// What `inspect` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Inspected {
    /// Enrolled agents: liveness, config version, last refusal.
    Agents,
    /// Services with their virtual IPs and endpoints.
    Services,
    /// Registered workloads with their agent and readiness.
    Workloads,
    /// The policies of one workload (`--workload <ns>/<name>`).
    Policies,
}

impl Inspected {
    fn path(self) -> &'static str {
        match self {
            Inspected::Agents => "/v1/inspect/agents",
            Inspected::Services => "/v1/inspect/services",
            Inspected::Workloads | Inspected::Policies => "/v1/inspect/workloads",
        }
    }
}

/// An agent's host facts in a few words: OS, kernel, CPUs, memory, and
/// the agent's own resident memory, as it reported them.
fn host(h: &Value) -> String {
    let mib = |v: &Value| v.as_u64().map(|b| b >> 20);
    let (Some(os), Some(cpus)) = (h["os"].as_str(), h["cpus"].as_u64()) else {
        return "-".to_owned();
    };
    let mut out = format!("{os}, {}, {cpus} CPU", h["kernel"].as_str().unwrap_or("?"));
    if let Some(total) = mib(&h["memoryBytes"]) {
        out.push_str(&format!(", {total} MiB"));
    }
    if let Some(rss) = mib(&h["agentRssBytes"]) {
        out.push_str(&format!(", agent {rss} MiB"));
        if let Some(cpu) = h["agentCpuSeconds"].as_f64() {
            out.push_str(&format!(" {cpu:.1} s CPU"));
        }
    }
    out
}

/// Runs `inspect`.
pub(crate) async fn run(
    client: &Client,
    what: Inspected,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let answer = client.request(Method::GET, what.path(), None).await?;
    let body = expect_ok(answer)?;
    let items: Vec<Value> = crate::decode(&body)?;
    print_view(out, format, &items, |out| table(what, &items, out))
}

/// Runs `inspect policies`: a table of the policies that apply (kind,
/// name, targetRef, place in the merge order), or with `-o yaml|json` the
/// controller's whole answer, compiled policy included.
pub(crate) async fn policies(
    client: &Client,
    mesh: &str,
    workload: Option<&str>,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let Some((namespace, name)) = workload.and_then(|w| w.split_once('/')) else {
        return Err(Error::Usage(
            "inspect policies needs --workload <namespace>/<name>".to_owned(),
        ));
    };
    let path = format!(
        "/v1/inspect/workloads/{}/{}/{}/policies",
        crate::encode(mesh),
        crate::encode(namespace),
        crate::encode(name)
    );
    let answer = client.request(Method::GET, &path, None).await?;
    let body = expect_ok(answer)?;
    let view: Value = crate::decode(&body)?;
    print_view(out, format, &view, |out| {
        let applied = view["policies"].as_array().cloned().unwrap_or_default();
        if applied.is_empty() {
            writeln!(
                out,
                "No policy applies to {namespace}/{name}: its agent refuses every call."
            )?;
            return Ok(());
        }
        let mut rows = vec![["KIND", "NAME", "TARGET", "ORDER"]
            .map(str::to_owned)
            .to_vec()];
        rows.extend(applied.iter().map(|p| {
            let target = serde_json::from_value::<TargetRef>(p["targetRef"].clone())
                .map_or_else(|_| cell(&p["targetRef"]), |t| t.to_string());
            vec![
                cell(&p["kind"]),
                cell(&p["name"]),
                target,
                cell(&p["order"]),
            ]
        }));
        crate::output::write_rows(out, &rows)?;
        writeln!(
            out,
            "\nWithin a kind, later ORDER wins field by field; -o yaml shows the merged result."
        )?;
        Ok(())
    })
}

fn ports(value: &Value) -> String {
    let list: Vec<String> = value
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .map(|p| format!("{}/{}", cell(&p["port"]), cell(&p["protocol"])))
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        "-".to_owned()
    } else {
        list.join(",")
    }
}

/// The first 12 characters of a config version: enough to tell them apart.
fn short(value: &Value) -> String {
    let full = cell(value);
    full.chars().take(12).collect()
}

/// Turns one item into its table cells.
type RowFn = fn(&Value) -> Vec<String>;

fn table(what: Inspected, items: &[Value], out: &mut dyn Write) -> Result<(), Error> {
    if items.is_empty() {
        writeln!(
            out,
            "No {} found.",
            what.path().rsplit('/').next().unwrap_or("items")
        )?;
        return Ok(());
    }
    let (header, row): (&[&str], RowFn) = match what {
        Inspected::Agents => (
            &[
                "NAME",
                "MESH",
                "STATE",
                "HBONE",
                "REPLICA",
                "LAST SEEN",
                "APPLIED",
                "LAST NACK",
                "WORKLOADS",
                "HOST",
            ],
            |a| {
                vec![
                    cell(&a["name"]),
                    cell(&a["mesh"]),
                    // `gone` says why: revoked, deleted, vanished, goodbye.
                    match a["left"]["reason"].as_str() {
                        Some(reason) if a["state"] == "gone" => format!("gone ({reason})"),
                        _ => cell(&a["state"]),
                    },
                    // A node agent's workloads each have their own.
                    match a["hboneAddress"].as_str() {
                        Some("") => "per workload".to_owned(),
                        _ => cell(&a["hboneAddress"]),
                    },
                    cell(&a["connectedReplica"]),
                    cell(&a["lastSeen"]),
                    short(&a["appliedVersion"]),
                    if a["lastNack"].is_null() {
                        "-".to_owned()
                    } else {
                        format!(
                            "{}: {}",
                            short(&a["lastNack"]["version"]),
                            cell(&a["lastNack"]["reason"])
                        )
                    },
                    a["workloads"]
                        .as_array()
                        .map(|w| w.iter().map(cell).collect::<Vec<_>>().join(","))
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "-".to_owned()),
                    host(&a["host"]),
                ]
            },
        ),
        Inspected::Services => (
            &[
                "NAME",
                "MESH",
                "NAMESPACE",
                "ZONE",
                "VIRTUAL IP",
                "PORTS",
                "ENDPOINTS",
            ],
            |s| {
                let endpoints = s["endpoints"].as_array().cloned().unwrap_or_default();
                let ready = endpoints.iter().filter(|e| e["ready"] == true).count();
                vec![
                    cell(&s["name"]),
                    cell(&s["mesh"]),
                    cell(&s["namespace"]),
                    cell(&s["zone"]),
                    cell(&s["virtualIp"]),
                    ports(&s["ports"]),
                    format!("{ready}/{} ready", endpoints.len()),
                ]
            },
        ),
        Inspected::Workloads | Inspected::Policies => (
            &[
                "NAME",
                "MESH",
                "NAMESPACE",
                "SERVICE",
                "ADDRESS",
                "PORTS",
                "AGENT",
                "MODE",
                "READY",
                "SPIFFE ID",
                "LOCALITY",
            ],
            |w| {
                // A node agent's workload has its own HBONE listener.
                let mode = if w["hboneAddress"].is_string() || w["placedOn"].is_string() {
                    "node"
                } else {
                    "sidecar"
                };
                vec![
                    cell(&w["name"]),
                    cell(&w["mesh"]),
                    cell(&w["namespace"]),
                    cell(&w["service"]),
                    cell(&w["address"]),
                    ports(&w["ports"]),
                    cell(&w["agent"]),
                    mode.to_owned(),
                    cell(&w["ready"]),
                    cell(&w["spiffeId"]),
                    // region/zone/subzone, for locality-aware picks.
                    cell(&w["locality"]),
                ]
            },
        ),
    };
    let mut rows = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    rows.extend(items.iter().map(row));
    crate::output::write_rows(out, &rows)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn host_facts_read_in_a_few_words() {
        let h = json!({"os": "Debian GNU/Linux 12", "kernel": "6.1.0", "cpus": 2,
                       "memoryBytes": 4u64 << 30, "agentRssBytes": 10u64 << 20,
                       "agentCpuSeconds": 12.34});
        assert_eq!(
            super::host(&h),
            "Debian GNU/Linux 12, 6.1.0, 2 CPU, 4096 MiB, agent 10 MiB 12.3 s CPU"
        );
        assert_eq!(super::host(&json!({})), "-");
    }
}
