//! Weft installed and run on real hosts: Debian bookworm booted with
//! systemd as PID 1 in systemd-nspawn containers, one bridge per zone, the
//! packages from `packaging/build` installed by the repository's Ansible
//! playbook. See docs/real-host-tests.md.
//!
//! Needs root, systemd-container, debootstrap (the cached root is built on
//! first use, ~100 s), and `ansible-playbook` (the CI venv).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use weft_e2e::realhost::bridge::Bridge;
use weft_e2e::realhost::image::Image;
use weft_e2e::realhost::nspawn::{Boot, NspawnHost};
use weft_e2e::realhost::packages;
use weft_e2e::realhost::rpmroot::RpmRoot;
use weft_e2e::realhost::weft::{
    agent_entry, check_host_facts, configure_agent_by_hand, curl, dpkg_install,
    install_zone_by_hand, issue_token, main_pid, plaintext_get, scrape, start_agent,
    start_workload, wait_curl, wait_runs_installed_binary, HandAgent, RealZone, WORKLOAD_PORT,
};
use weft_e2e::realhost::Machine;
use weft_e2e::tempdir::TempDir;
use weft_e2e::{unique_marker, wait};

const T: Duration = Duration::from_secs(60);

/// The restart/upgrade and purge scenarios run on hosts with a stateful
/// firewall, as most production hosts are; the playbook and SSH scenarios
/// on bare hosts (a fresh minimal VM), where the kernel tracks no
/// connection before the agent's capture needs it
/// (`an_ssh_session_open_while_the_agent_starts_keeps_working`).
const FIREWALL: bool = true;

/// The example of ansible/inventory.example.ini: two instances of `web`
/// and one of `payments`.
const AGENTS: [(&str, &str); 3] = [
    ("web-1", "web"),
    ("web-2", "web"),
    ("payments-1", "payments"),
];

#[test]
fn a_playbook_run_enrols_three_agents_that_carry_mtls_traffic() -> Result<()> {
    let zone_deb = packages::zone_deb()?;
    let weftctl_deb = packages::weftctl_deb()?;
    let agent_deb = packages::agent_deb()?;
    // Bare hosts, as a fresh VM is: no firewall, nothing tracked.
    let up = RealZone::boot(&AGENTS, false)?;
    up.wait_ssh()?;
    // The clock runs from booted hosts with no Weft on them to an enrolled
    // agent carrying traffic.
    let start = Instant::now();
    let run = up.playbook(&[&zone_deb, &weftctl_deb], &agent_deb, None)?;
    let markers: Vec<String> = AGENTS.iter().map(|(n, _)| unique_marker(n)).collect();
    for (a, marker) in up.agents.iter().zip(&markers) {
        start_workload(&a.host, marker)?;
    }
    let payments = up.agent("payments-1");
    let url = format!("http://payments.default.mesh:{WORKLOAD_PORT}/marker.txt");
    wait_curl(&up.agent("web-1").host, &url, &markers[2], T)?;
    let took = start.elapsed();
    eprintln!(
        "TIMING booted hosts -> playbook ({:.1} s, changed={}) -> enrolled agents carrying traffic: {:.1} s",
        run.took.as_secs_f64(),
        run.changed(),
        took.as_secs_f64()
    );

    // Every agent runs under systemd.
    for a in &up.agents {
        let state = a.host.sh_ok("systemctl is-active weft-agent")?;
        ensure!(state.trim() == "active", "{}: {state}", a.host.name());
    }
    ensure!(up.zone.sh_ok("systemctl is-active weft-zone")?.trim() == "active");

    // The zone lists them, online, with the facts of their hosts.
    let names: Vec<&str> = AGENTS.iter().map(|(n, _)| *n).collect();
    let agents = up.wait_online(&names, T)?;
    for a in &up.agents {
        let entry = weft_e2e::realhost::weft::agent_entry(&agents, a.host.name())
            .expect("wait_online found it");
        check_host_facts(entry, &a.host)?;
    }
    let table = up.weftctl("inspect agents")?;
    ensure!(
        table.contains("HOST") && table.contains("Debian"),
        "inspect agents: {table}"
    );

    // Every host reaches every other service by name, over mTLS.
    for (from, _) in AGENTS {
        for (to, service) in [("web", "web"), ("payments", "payments")] {
            let url = format!("http://{service}.mesh:{WORKLOAD_PORT}/marker.txt");
            let body = wait_curl(&up.agent(from).host, &url, "WEFT-", T)?;
            let expected: Vec<&String> = AGENTS
                .iter()
                .zip(&markers)
                .filter(|((_, s), _)| *s == to)
                .map(|(_, m)| m)
                .collect();
            ensure!(
                expected.iter().any(|m| body.contains(m.as_str())),
                "{from} -> {url} answered {body:?}, from none of {expected:?}"
            );
        }
    }
    let m = scrape(payments.host.ip())?;
    ensure!(
        m.sum("weft_handshakes_total", &[("direction", "inbound")]) >= 1.0,
        "payments-1 accepted no mTLS handshake:\n{}",
        m.dump("weft_handshakes")
    );
    let web = scrape(up.agent("web-1").host.ip())?;
    ensure!(
        web.sum("weft_handshakes_total", &[("direction", "outbound")]) >= 1.0,
        "web-1 made no mTLS handshake:\n{}",
        web.dump("weft_handshakes")
    );

    // Strict mode: plaintext from outside the mesh to the workload's port
    // is refused (captured and reset), though the workload serves it.
    let answer = plaintext_get(payments.host.ip(), WORKLOAD_PORT)?;
    ensure!(
        !answer.contains(&markers[2]) && !answer.starts_with("HTTP/"),
        "plaintext reached the workload: {answer:?}"
    );
    let m = scrape(payments.host.ip())?;
    ensure!(
        m.sum("weft_plaintext_connections_total", &[("result", "refused")]) >= 1.0,
        "no refused plaintext counted:\n{}",
        m.dump("weft_plaintext")
    );
    // An unknown mesh name does not resolve.
    let (code, _, err) = curl(&up.agent("web-1").host, "http://nosuch.default.mesh:8080/")?;
    ensure!(
        code != 0 && err.contains("resolve"),
        "curl exit {code}: {err}"
    );

    // The playbook is idempotent: a second run changes nothing.
    let again = up.playbook(&[&zone_deb, &weftctl_deb], &agent_deb, None)?;
    eprintln!(
        "TIMING second playbook run: {:.1} s",
        again.took.as_secs_f64()
    );
    ensure!(
        again.changed() == 0,
        "the second run changed something: {:?}\n{}",
        again.recap,
        weft_e2e::process::tail(&again.output, 80)
    );
    Ok(())
}

/// The agent's id as it enrolled (enrolment.json in its state directory).
fn enrolment(host: &dyn Machine) -> Result<Value> {
    let text = host.sh_ok("cat /var/lib/weft/agent/enrolment.json")?;
    serde_json::from_str(&text).with_context(|| format!("enrolment.json: {text}"))
}

/// How many tokens the zone has issued.
fn tokens_issued(up: &RealZone) -> Result<usize> {
    let list: Value = serde_json::from_str(&up.weftctl("token list -o json")?)?;
    Ok(list["items"].as_array().map_or(0, Vec::len))
}

/// `log.level` of the config the agent runs with (`/config_dump`).
fn log_level_in_force(host: &dyn Machine) -> Result<String> {
    let dump = host.sh_ok("curl -sf http://127.0.0.1:15000/config_dump")?;
    let dump: Value =
        serde_json::from_str(&dump).with_context(|| format!("config_dump: {dump}"))?;
    let level = dump["config"]["log"]["level"]
        .as_str()
        .or_else(|| dump["log"]["level"].as_str())
        .with_context(|| format!("no log.level in config_dump: {dump:#}"))?;
    Ok(level.to_owned())
}

/// Requests on one keep-alive connection for 6 s (argv: url, marker):
/// prints `ok=N failed=M done`, with the first failure.
const ACROSS_UPGRADE: &str = r#"import http.client, sys, time, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
ok = failed = 0
first = ""
end = time.time() + 6
while time.time() < end:
    try:
        conn.request("GET", u.path)
        body = conn.getresponse().read().decode()
        if sys.argv[2] in body:
            ok += 1
        else:
            failed += 1
            first = first or body[:100]
    except Exception as e:
        failed += 1
        first = first or repr(e)
        conn.close()
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    time.sleep(0.02)
print(f"ok={ok} failed={failed} first={first!r} done", flush=True)
"#;

#[test]
fn restart_and_upgrade_keep_the_operators_edits_and_the_enrolment() -> Result<()> {
    let zone_deb = packages::zone_deb()?;
    let weftctl_deb = packages::weftctl_deb()?;
    let agent_deb = packages::agent_deb()?;
    let up = RealZone::boot(&[("web-1", "web"), ("payments-1", "payments")], FIREWALL)?;
    up.wait_ssh()?;
    up.playbook(&[&zone_deb, &weftctl_deb], &agent_deb, None)?;
    let web = &up.agent("web-1").host;
    let payments = &up.agent("payments-1").host;
    let marker = unique_marker("payments");
    start_workload(payments, &marker)?;
    let url = format!("http://payments.mesh:{WORKLOAD_PORT}/marker.txt");
    wait_curl(web, &url, &marker, T)?;
    let enrolled = enrolment(payments)?;
    let issued = tokens_issued(&up)?;
    // The playbook removed the spent token: from now on the agent can only
    // start from its state directory.
    ensure!(
        payments.sh("test -e /etc/weft/agent.token")?.status.code() == Some(1),
        "the spent token is still on payments-1"
    );

    // The operator's edit: the agent logs at debug level.
    payments.sh_ok(
        "sed -i 's/^\\(\\s*level:\\s*\\)info$/\\1debug/' /etc/weft/agent.yaml && \
         grep -q 'level: debug' /etc/weft/agent.yaml && \
         echo '# operator: debug logs while we look into something' >> /etc/weft/agent.yaml",
    )?;

    // Restart: a new process, the same enrolment, no token needed.
    let before = main_pid(payments, "weft-agent")?;
    let restart = Instant::now();
    payments.sh_ok("systemctl restart weft-agent")?;
    payments.wait_active("weft-agent", T)?;
    eprintln!(
        "TIMING systemctl restart weft-agent: {:.1} s",
        restart.elapsed().as_secs_f64()
    );
    ensure!(
        main_pid(payments, "weft-agent")? != before,
        "the agent was not restarted"
    );
    ensure!(
        log_level_in_force(payments)?.contains("debug"),
        "the edit is not in force"
    );
    wait_curl(web, &url, &marker, T)?;

    // Upgrade to a newer build of the package, with the package manager.
    let scratch = TempDir::new("weft-upgrade")?;
    let newer = packages::newer_deb(&agent_deb, "upgrade1", scratch.path())?;
    let version = packages::deb_field(&newer, "Version")?;
    let before = main_pid(payments, "weft-agent")?;
    // Traffic across the upgrade: web's application sends a request every
    // 20 ms on one keep-alive connection (through both agents) for 6 s, in
    // the background; every one must be answered.
    web.sh_ok(&format!(
        "cat > /tmp/across.py <<'EOF'\n{ACROSS_UPGRADE}EOF\n\
         nohup python3 /tmp/across.py {url} {marker} > /tmp/across.out 2>&1 &"
    ))?;
    let upgrade = Instant::now();
    weft_e2e::realhost::weft::dpkg_install(payments, &newer)?;
    payments.wait_active("weft-agent", T)?;
    eprintln!(
        "TIMING dpkg -i of the newer weft-agent: {:.1} s",
        upgrade.elapsed().as_secs_f64()
    );
    let installed = payments.sh_ok("dpkg-query -W -f '${Version}' weft-agent")?;
    ensure!(
        installed == version,
        "installed {installed}, expected {version}"
    );
    let after = wait_runs_installed_binary(payments, "weft-agent", T)?;
    eprintln!(
        "the upgrade handed the agent over to a new process: {}",
        after != before
    );
    let across = wait::until("the requests across the upgrade to end", T, || {
        let out = web.sh_ok("cat /tmp/across.out")?;
        Ok(out.contains("done").then_some(out))
    })?;
    eprintln!("TIMING requests across the upgrade: {}", across.trim());
    ensure!(
        across.contains(" failed=0 ") && !across.contains("ok=0 "),
        "requests failed across the upgrade: {across}"
    );
    let config = payments.sh_ok("cat /etc/weft/agent.yaml")?;
    ensure!(
        config.contains("# operator: debug logs") && config.contains("level: debug"),
        "the upgrade lost the operator's edit:\n{config}"
    );
    ensure!(
        log_level_in_force(payments)?.contains("debug"),
        "the edit is not in force"
    );

    // Still the same enrolment: no new token was issued or needed.
    ensure!(enrolment(payments)? == enrolled, "the agent enrolled again");
    ensure!(tokens_issued(&up)? == issued, "a token was issued");
    up.wait_online(&["payments-1"], T)?;
    wait_curl(web, &url, &marker, T)?;
    Ok(())
}

#[test]
fn purging_the_agent_leaves_nothing_behind() -> Result<()> {
    let zone_deb = packages::zone_deb()?;
    let weftctl_deb = packages::weftctl_deb()?;
    let agent_deb = packages::agent_deb()?;
    let up = RealZone::boot(&[("web-1", "web")], FIREWALL)?;
    up.wait_ssh()?;
    let run = up.playbook(&[&zone_deb, &weftctl_deb], &agent_deb, None)?;
    eprintln!(
        "TIMING booted zone + 1 agent host -> playbook -> enrolled agent: {:.1} s",
        run.took.as_secs_f64()
    );
    let web = &up.agent("web-1").host;
    // Before: everything the checks below look for is there, so that
    // their passing means removed, not never made.
    web.sh_ok(
        "systemctl cat weft-agent >/dev/null && getent passwd weft && \
         nft list table inet weft >/dev/null && test -d /var/lib/weft/agent",
    )?;

    web.sh_ok("DEBIAN_FRONTEND=noninteractive timeout 300 apt-get purge -y weft-agent </dev/null")?;

    let mut left = Vec::new();
    for (what, check) in [
        (
            "a weft-agent unit file",
            "ls /lib/systemd/system/weft-agent.service /usr/lib/systemd/system/weft-agent.service \
             /etc/systemd/system/multi-user.target.wants/weft-agent.service",
        ),
        ("the weft user", "getent passwd weft"),
        ("the weft group", "getent group weft"),
        ("the nftables table inet weft", "nft list table inet weft"),
        ("/var/lib/weft/agent", "test -e /var/lib/weft/agent"),
        ("/etc/weft/agent.yaml", "test -e /etc/weft/agent.yaml"),
        ("a weft-agent process", "pgrep -x weft-agent"),
        (
            "the package",
            "dpkg-query -W -f '${Status}' weft-agent | grep -v not-installed",
        ),
    ] {
        let out = web.sh(check)?;
        if out.status.success() {
            left.push(format!(
                "{what}: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
    }
    ensure!(
        left.is_empty(),
        "apt purge weft-agent left behind:\n{}",
        left.join("\n")
    );
    Ok(())
}

#[test]
fn the_rpm_installs_into_a_root_and_its_unit_starts_and_enrols() -> Result<()> {
    let zone_deb = packages::zone_deb()?;
    let weftctl_deb = packages::weftctl_deb()?;
    let agent_rpm = packages::agent_rpm()?;
    let image = Image::get()?;
    let rpm_root = RpmRoot::install(&image, &[&agent_rpm])?;
    let bridge = Bridge::new()?;
    let zone = NspawnHost::boot(
        &image,
        Boot {
            hostname: "zone",
            bridge: &bridge,
            index: 0,
            root: None,
            firewall: false,
        },
    )?;
    // Declared after the root it boots: stopped before it is unmounted.
    let host = NspawnHost::boot(
        &image,
        Boot {
            hostname: "rpm-1",
            bridge: &bridge,
            index: 1,
            root: Some(rpm_root.path()),
            firewall: false,
        },
    )?;
    let pin = install_zone_by_hand(&zone, &[&zone_deb, &weftctl_deb], T)?;
    let out = rpm_root.rpm().args(["-q", "weft-agent"]).output()?;
    ensure!(
        out.status.success(),
        "rpm -q weft-agent: {}",
        weft_e2e::realhost::describe(&out)
    );
    host.sh_ok("getent passwd weft && systemctl cat weft-agent >/dev/null")?;
    let token = issue_token(&zone, "rpm-1")?;
    let controller = format!("{}:5678", zone.ip());
    let address = host.ip().to_string();
    configure_agent_by_hand(
        &host,
        &HandAgent {
            controller: &controller,
            ca_pin: &pin,
            token: &token,
            workload: "rpm-1",
            service: "rpm",
            address: &address,
        },
    )?;
    start_agent(&host)?;
    host.wait_active("weft-agent", T)?;
    let agents = zone.sh_ok("weftctl --server http://127.0.0.1:5681 inspect agents -o json")?;
    let agents: Value = serde_json::from_str(&agents)?;
    let entry = agent_entry(&agents, "rpm-1").with_context(|| format!("{agents:#}"))?;
    ensure!(entry["state"] == "online", "{entry:#}");
    Ok(())
}

/// On a bare host (no firewall: the kernel tracks no connection until the
/// agent's nftables table needs it), a TCP connection that was open before
/// the agent installed its capture is picked up mid-stream by conntrack at
/// its next packet. When that packet is an outbound one (an SSH server's
/// answer) and the capture redirects more than opening SYNs, the output
/// chain takes it for a new connection and sends it to the agent: the
/// operator's (or Ansible's) SSH session that started the agent dies. Found
/// by these tests; the capture now redirects opening SYNs only.
#[test]
fn an_ssh_session_open_while_the_agent_starts_keeps_working() -> Result<()> {
    use std::io::{BufRead, BufReader};
    let zone_deb = packages::zone_deb()?;
    let weftctl_deb = packages::weftctl_deb()?;
    let agent_deb = packages::agent_deb()?;
    let up = RealZone::boot(&[("web-1", "web")], false)?;
    let web = &up.agent("web-1").host;
    let pin = install_zone_by_hand(&up.zone, &[&zone_deb, &weftctl_deb], T)?;
    dpkg_install(web, &agent_deb)?;
    let token = issue_token(&up.zone, "web-1")?;
    let controller = format!("{}:5678", up.zone.ip());
    let address = web.ip().to_string();
    configure_agent_by_hand(
        web,
        &HandAgent {
            controller: &controller,
            ca_pin: &pin,
            token: &token,
            workload: "web-1",
            service: "web",
            address: &address,
        },
    )?;

    // The operator's session: says `ready`, then waits (sending nothing)
    // until the test says go, then speaks first: after the agent started,
    // its first packet is the server's.
    web.wait_ssh(T)?;
    let mut ssh = std::process::Command::new("ssh")
        .arg("-i")
        .arg(up.image.ssh_key())
        .args(weft_e2e::realhost::qemu::ssh_options())
        .arg(format!("root@{}", web.ip()))
        .arg("echo ready; while [ ! -e /run/go ]; do sleep 0.1; done; echo still-here")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let session = weft_e2e::realhost::KillOnDrop(&mut ssh);
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = session.0.stdout.take().context("ssh stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(T)
        .context("the SSH session never said ready")?;
    ensure!(line == "ready", "{line}");

    // The agent starts in the meantime, and installs its capture.
    start_agent(web)?;
    web.wait_active("weft-agent", T)?;
    web.sh_ok("nft list table inet weft >/dev/null && touch /run/go")?;

    let answer = rx.recv_timeout(Duration::from_secs(15));
    ensure!(
        answer.as_deref() == Ok("still-here"),
        "the SSH session that was open while weft-agent started is dead ({answer:?}): its \
         next answer was redirected by the capture's output chain (a connection the kernel \
         did not track before the agent's table existed is picked up mid-stream and taken \
         for a new one; only packets that open a connection, SYN without ACK, should be \
         redirected)"
    );
    Ok(())
}
