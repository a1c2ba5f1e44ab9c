//! Lessons from the incumbents' issue trackers, with the real agent on
//! namespaced hosts: revoking a token cuts the agent enrolled with it at
//! once (an incumbent keeps serving revoked proxies): its config stream
//! ends with the reason, which its `/config_dump` shows, inspect shows it
//! cut off and its endpoints leave every other agent's view; and an agent
//! stopped gracefully leaves the endpoint lists at once, long before the
//! agent grace.

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use serde_json::Value;
use weft_e2e::vmzone::{bring_up, wait_curl, HTTP_PORT};
use weft_e2e::zone::agent_entry;
use weft_e2e::{echo_bin, wait};

/// Well under the default agent grace (60 s): what happens within it is the
/// revocation's or the goodbye's doing, not silence's.
const T: Duration = Duration::from_secs(30);

/// The endpoints of `service` in an inspect answer.
fn endpoints<'a>(services: &'a Value, service: &str) -> Option<&'a Vec<Value>> {
    services
        .as_array()?
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(service))?
        .get("endpoints")?
        .as_array()
}

#[test]
fn revoking_a_token_cuts_the_real_agent_and_a_stopped_agent_leaves_at_once() -> Result<()> {
    let mut up = bring_up(echo_bin!(), &["web", "payments", "orders"], "24h")?;
    let payments = up.zone.vms[1].workload.clone();
    let orders = up.zone.vms[2].workload.clone();
    let url = |service: &str| format!("http://{service}.mesh:{HTTP_PORT}/hello");
    wait_curl(&up.zone, 0, &url("payments"), &up.markers[1])?;

    // Revoke the token payments' agent enrolled with.
    let out = up
        .controller
        .weftctl_ok(&["token", "revoke", &up.tokens[1].id])?;
    ensure!(out.contains("revoked"), "token revoke: {out}");

    // Its stream is cut with the reason, which its /config_dump shows.
    let agent = &up.agents[1];
    let mut last = Value::Null;
    wait::until("the payments agent to show the revocation", T, || {
        last = agent.config_dump()?;
        let controller = &last["controller"];
        Ok((controller["connected"] == false
            && controller["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("revoked")))
        .then_some(()))
    })
    .map_err(|e| {
        anyhow!(
            "{e:#}\nlast /config_dump controller: {:#}",
            last["controller"]
        )
    })?;

    // Inspect shows it cut off, and its endpoint is in no list any more.
    let agents = up
        .controller
        .wait_inspect("agents", "payments gone", T, |agents| {
            agent_entry(agents, &payments).is_some_and(|a| a["state"] == "gone")
        })?;
    let entry = agent_entry(&agents, &payments).ok_or_else(|| anyhow!("{agents:#}"))?;
    ensure!(entry["online"] == false, "{entry:#}");
    let reason = entry["left"]["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("revoked") && reason.contains(&up.tokens[1].id),
        "{entry:#}"
    );
    up.controller
        .wait_inspect("services", "no endpoint for payments", T, |services| {
            endpoints(services, "payments").is_some_and(Vec::is_empty)
        })?;
    // web's agent got that view: payments is no longer reachable from web
    // (its HTTP port is served by web's agent, which answers 503 itself).
    wait::until("payments to be unreachable from web", T, || {
        let (status, _) = up.zone.curl_status(0, &url("payments"))?;
        Ok(matches!(status, 0 | 503).then_some(()))
    })?;
    // The other agents are untouched.
    ensure!(
        up.agents[0].config_dump()?["controller"]["connected"] == true,
        "web's agent lost its stream"
    );
    wait_curl(&up.zone, 0, &url("orders"), &up.markers[2])?;

    // orders' agent stops gracefully: its goodbye takes it out of every
    // endpoint list at once.
    up.agents[2].proc.signal(libc::SIGTERM)?;
    up.agents[2].proc.wait_exit(T)?;
    let agents = up
        .controller
        .wait_inspect("agents", "orders gone", T, |agents| {
            agent_entry(agents, &orders).is_some_and(|a| a["state"] == "gone")
        })?;
    let entry = agent_entry(&agents, &orders).ok_or_else(|| anyhow!("{agents:#}"))?;
    ensure!(
        entry["left"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("goodbye")),
        "{entry:#}"
    );
    up.controller
        .wait_inspect("services", "no endpoint for orders", T, |services| {
            endpoints(services, "orders").is_some_and(Vec::is_empty)
        })?;
    Ok(())
}
