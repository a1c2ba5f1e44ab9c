//! `weft-agent redirect install|remove|status` in a fresh namespace that
//! already has an unrelated nftables table: install adds `inet weft`,
//! installing twice changes nothing, status tells, and remove restores the
//! ruleset exactly as it was.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{ensure, Result};
use weft_e2e::agent::{self, AgentSpec};
use weft_e2e::netns::Host;
use weft_e2e::pki::{spiffe_id, Ca};
use weft_e2e::tempdir::TempDir;

fn nft_ruleset(host: &Host) -> Result<String> {
    host.run("nft", &["list", "ruleset"])
}

fn redirect(host: &Host, action: &str, config: &str) -> Result<std::process::Output> {
    agent::cli(host, &["redirect", action, "-c", config])
}

/// `redirect status` and `remove` work on the namespace's ruleset alone,
/// without a config.
fn status(host: &Host) -> Result<std::process::Output> {
    agent::cli(host, &["redirect", "status"])
}

fn remove(host: &Host) -> Result<std::process::Output> {
    agent::cli(host, &["redirect", "remove"])
}

#[test]
fn install_twice_then_remove_restores_the_ruleset() -> Result<()> {
    let host = Host::new()?;
    let dir = TempDir::new("weft-e2e-redirect")?;
    let ca = Ca::new("redirect CA")?;
    let ids = ca
        .leaf(&spiffe_id("app"))?
        .write(dir.path(), "app", &[&ca])?;
    let spec = AgentSpec::new(
        &ids,
        IpAddr::V4(Ipv4Addr::new(10, 210, 0, 2)),
        &[(8080, "tcp"), (8443, "http")],
    );
    let config = dir.join("agent.yaml");
    spec.write(&config)?;
    let config = config.to_string_lossy().into_owned();

    // Someone else's table, which must survive untouched.
    host.run("nft", &["add", "table", "ip", "bystander"])?;
    host.run(
        "nft",
        &["add chain ip bystander input { type filter hook input priority 0; policy accept; }"],
    )?;
    host.run(
        "nft",
        &["add rule ip bystander input tcp dport 4242 counter accept"],
    )?;
    let before = nft_ruleset(&host)?;
    ensure!(before.contains("bystander"), "setup failed: {before}");

    let status_before = status(&host)?;

    let out = redirect(&host, "install", &config)?;
    ensure!(
        out.status.success(),
        "install failed: {}",
        agent::describe(&out)
    );
    let installed = nft_ruleset(&host)?;
    assert!(
        installed.contains("table inet weft"),
        "no `table inet weft` after install:\n{installed}"
    );
    assert!(
        installed.contains("15001"),
        "nothing sends traffic to :15001:\n{installed}"
    );
    assert!(
        installed.contains("1337"),
        "the agent's uid is not excluded:\n{installed}"
    );
    assert!(
        installed.contains("table ip bystander"),
        "install disturbed another table:\n{installed}"
    );

    let out = redirect(&host, "install", &config)?;
    ensure!(
        out.status.success(),
        "second install failed: {}",
        agent::describe(&out)
    );
    assert_eq!(
        nft_ruleset(&host)?,
        installed,
        "installing twice is not idempotent"
    );

    let status_installed = status(&host)?;
    ensure!(
        status_installed.status.success(),
        "status failed: {}",
        agent::describe(&status_installed)
    );
    let said = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert_ne!(
        (status_before.status.code(), said(&status_before)),
        (status_installed.status.code(), said(&status_installed)),
        "status reports the same before and after install"
    );

    let out = remove(&host)?;
    ensure!(
        out.status.success(),
        "remove failed: {}",
        agent::describe(&out)
    );
    assert_eq!(
        nft_ruleset(&host)?,
        before,
        "remove did not restore the ruleset"
    );
    let out = remove(&host)?;
    ensure!(
        out.status.success(),
        "removing when nothing is installed failed: {}",
        agent::describe(&out)
    );
    assert_eq!(nft_ruleset(&host)?, before);

    let status_after = status(&host)?;
    assert_eq!(
        (status_after.status.code(), said(&status_after)),
        (status_before.status.code(), said(&status_before)),
        "status after remove differs from before install"
    );
    Ok(())
}

/// After a reboot nftables is empty: an agent with `redirect.on_start`
/// puts its capture rules back before it serves, they survive its stop
/// (captured connections fail rather than go around the mesh), and
/// `redirect remove` leaves nothing behind. Without CAP_NET_ADMIN the agent
/// refuses to start, saying why.
#[test]
fn capture_rules_come_back_when_the_agent_starts_after_a_reboot() -> Result<()> {
    use std::time::Duration;
    use weft_e2e::topology::{self, Pair, ECHO_PORT};
    use weft_e2e::{echo_bin, unique_marker};

    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("reboot");
    let _app = pair.start_server_app(&marker)?;
    let _server = pair.start_server_agent(&pair.server_spec(&pair.identity("server")?), None)?;

    // The "rebooted" host: an empty ruleset.
    pair.client.run("nft", &["flush", "ruleset"])?;
    ensure!(
        nft_ruleset(&pair.client)?.trim().is_empty(),
        "the ruleset is not empty"
    );

    let mut spec = pair.client_spec(&pair.identity("client")?);
    spec.set("outbound.listeners", serde_json::json!([]))
        .set("redirect.inbound", false)
        .set("redirect.on_start", true);

    // Not allowed to touch nftables: a clear refusal, nothing installed.
    let refused = pair.start_client_agent(&spec, Some(agent::AGENT_UID));
    let err = format!(
        "{:#}",
        refused
            .err()
            .ok_or_else(|| anyhow::anyhow!("started without CAP_NET_ADMIN"))?
    );
    ensure!(
        err.contains("CAP_NET_ADMIN"),
        "the refusal does not say why:\n{err}"
    );
    ensure!(
        nft_ruleset(&pair.client)?.trim().is_empty(),
        "rules appeared anyway"
    );

    // As root (its own traffic, uid 0, is left alone), the agent installs them.
    spec.set("redirect.agent_uid", 0);
    let mut client = pair.start_client_agent(&spec, None)?;
    let rules = nft_ruleset(&pair.client)?;
    ensure!(
        rules.contains("table inet weft"),
        "no capture rules after start:\n{rules}"
    );

    // An application (uid 1000) dialing the server directly is captured.
    let out = pair
        .client
        .command_as(echo_bin!(), Some(1000))
        .args([
            "client",
            &topology::server(ECHO_PORT).to_string(),
            "--marker",
            &marker,
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "the captured call failed: {}",
        agent::describe(&out)
    );
    client.wait_metric(
        "weft_connections_opened_total",
        &[("direction", "outbound")],
        1.0,
    )?;

    // Stopping the agent leaves the rules; remove takes every trace away.
    client.proc.signal(libc::SIGTERM)?;
    client.proc.wait_exit(Duration::from_secs(20))?;
    ensure!(
        nft_ruleset(&pair.client)?.contains("table inet weft"),
        "the rules left with the agent"
    );
    let out = remove(&pair.client)?;
    ensure!(
        out.status.success(),
        "remove failed: {}",
        agent::describe(&out)
    );
    let left = nft_ruleset(&pair.client)?;
    ensure!(
        left.trim().is_empty(),
        "remove left something behind:\n{left}"
    );
    Ok(())
}
