//! Restarts without downtime: on SIGUSR2 (what `systemctl reload` sends)
//! an agent starts its binary again, hands it its listening sockets, and
//! drains. A paced transfer through the tunnel is under way throughout and
//! completes intact on the old process; new connections, probed all along,
//! are never refused; the old process exits 0 once its transfer is done and
//! the new one serves on. Once on the caller's agent, once on the callee's.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Result};
use weft_e2e::agent::Agent;
use weft_e2e::client::{self, payload, Pace, Probe};
use weft_e2e::topology::{Pair, ECHO_LISTENER};
use weft_e2e::vmzone::{bring_up, wait_curl, HTTP_PORT};
use weft_e2e::zone::agent_entry;
use weft_e2e::{echo_bin, unique_marker, wait};

const T: Duration = Duration::from_secs(30);

/// The process that took over, killed when the test ends however it ends.
struct Successor(u32);

impl Drop for Successor {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal.
        unsafe {
            libc::kill(self.0 as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// The pid of the new process, from the old one's log.
fn successor_pid(agent: &Agent) -> Result<Successor> {
    let pid = wait::until("the new agent process to serve", T, || {
        let logs = agent.proc.logs();
        Ok(logs
            .lines()
            .find(|l| l.contains("the new agent process serves"))
            .and_then(|l| l.split("pid=").nth(1))
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|pid| pid.parse().ok()))
    })
    .map_err(|e| anyhow!("{e:#}\n{}", agent.proc.logs()))?;
    Ok(Successor(pid))
}

/// Hands over `which` agent mid-transfer and checks what the module doc
/// promises.
fn hand_over_mid_transfer(which: &str) -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("handoff");
    let _app = pair.start_server_app(&marker)?;
    let mut server_spec = pair.server_spec(&pair.identity("server")?);
    server_spec.set("drain_timeout", "30s");
    let mut server = pair.start_server_agent(&server_spec, None)?;
    let mut client_spec = pair.client_spec(&pair.identity("client")?);
    client_spec.set("drain_timeout", "30s");
    let mut client = pair.start_client_agent(&client_spec, None)?;
    let old = if which == "client" {
        &mut client
    } else {
        &mut server
    };

    // 4 MiB in 64 KiB writes, 60 ms apart: about 4 s on the wire.
    let data = payload(&marker, 4 << 20);
    let pace = Pace {
        chunk: 64 * 1024,
        pause: Duration::from_millis(60),
    };
    let progress = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let (transfer, probes, successor) = pair.client.enter(|| {
        std::thread::scope(|s| {
            let transfer = s.spawn(|| {
                let got = client::echo_exchange(ECHO_LISTENER, &data, pace, &progress, T * 2);
                done.store(true, Ordering::Release);
                got
            });
            // New connections all along: every one must be answered.
            let probing = s.spawn(|| -> Result<usize> {
                let mut answered = 0;
                // Bounded: the transfer ends within its deadline.
                while !done.load(Ordering::Acquire) && answered < 10_000 {
                    match client::probe(ECHO_LISTENER, b"probe", Duration::from_secs(5))? {
                        Probe::Answered(_) => answered += 1,
                        Probe::Refused(why) => {
                            bail!("a new connection failed during the handoff: {why}")
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(answered)
            });
            let mut signal = || -> Result<Successor> {
                wait::until("a quarter of the transfer to echo back", T, || {
                    Ok((progress.load(Ordering::Relaxed) >= data.len() / 4).then_some(()))
                })?;
                old.proc.signal(libc::SIGUSR2)?;
                successor_pid(old)
            };
            let successor = signal();
            let transfer = transfer
                .join()
                .map_err(|_| anyhow!("transfer thread panicked"))?;
            done.store(true, Ordering::Release);
            let probes = probing
                .join()
                .map_err(|_| anyhow!("probe thread panicked"))?;
            Ok::<_, anyhow::Error>((transfer, probes, successor?))
        })
    })?;
    let got = transfer.map_err(|e| {
        anyhow!(
            "the transfer broke during the handoff: {e:#}\n{}",
            old.proc.logs()
        )
    })?;
    client::check_same(&data, &got)?;
    let probes = probes.map_err(|e| anyhow!("{e:#}\n{}", old.proc.logs()))?;
    ensure!(probes > 10, "only {probes} probes ran during the handoff");
    // The old process exits by itself once its transfer is done.
    let status = old.proc.wait_exit(T)?;
    ensure!(
        status.success(),
        "the old agent exited with {status}\n{}",
        old.proc.logs()
    );
    // The new one serves on, on the same sockets.
    let answer = pair
        .client
        .enter(|| client::probe(ECHO_LISTENER, b"after", Duration::from_secs(5)))?;
    ensure!(
        matches!(answer, Probe::Answered(_)),
        "after the old process exited: {answer:?}\n{}",
        old.proc.logs()
    );
    // It took the very sockets (their logs share the old one's files).
    // The whole logs, not their tail: per-connection debug lines (protocol
    // detection) can push the handoff's out of it.
    let logs = format!("{}\n{}", old.proc.stdout(), old.proc.stderr());
    ensure!(
        logs.contains("handoff complete: this process is the agent now"),
        "{}",
        old.proc.logs()
    );
    ensure!(!logs.contains("binding anew"), "{}", old.proc.logs());
    // SAFETY: kill with signal 0 only checks that the process exists.
    ensure!(
        unsafe { libc::kill(successor.0 as libc::pid_t, 0) } == 0,
        "the new agent process is gone"
    );
    Ok(())
}

#[test]
fn the_callers_agent_hands_over_without_breaking_a_connection() -> Result<()> {
    hand_over_mid_transfer("client")
}

#[test]
fn the_callees_agent_hands_over_without_breaking_a_connection() -> Result<()> {
    hand_over_mid_transfer("server")
}

/// In a zone: the zone hears from the new process before the old one says
/// goodbye, so the workload never leaves the endpoint lists, and callers by
/// DNS name are served all along.
#[test]
fn a_zone_agent_hands_over_and_stays_in_the_endpoint_lists() -> Result<()> {
    let mut up = bring_up(echo_bin!(), &["web", "payments"], "24h")?;
    let url = format!("http://payments.mesh:{HTTP_PORT}/hello");
    wait_curl(&up.zone, 0, &url, &up.markers[1])?;
    up.agents[1].proc.signal(libc::SIGUSR2)?;
    let mut calls = 0;
    let successor = loop {
        let body = up.zone.curl_ok(0, &url)?;
        ensure!(body.contains(&up.markers[1]), "{body}");
        calls += 1;
        let agents = up.controller.inspect("agents")?;
        let state = agent_entry(&agents, "payments-1")
            .and_then(|a| a["state"].as_str())
            .unwrap_or_default()
            .to_owned();
        ensure!(
            state == "online",
            "payments-1 is {state:?} during the handoff: {agents:#}"
        );
        if up.agents[1].proc.try_exit()?.is_some() {
            break successor_pid(&up.agents[1])?;
        }
        ensure!(
            calls < 500,
            "the old process did not exit\n{}",
            up.agents[1].proc.logs()
        );
    };
    ensure!(calls > 1, "the old process exited before any call ran");
    let logs = up.agents[1].proc.logs();
    ensure!(logs.contains("handoff complete"), "{logs}");
    // The zone still has it, on the new process's stream.
    up.controller
        .wait_inspect("agents", "payments-1 online after the handoff", T, |a| {
            agent_entry(a, "payments-1").is_some_and(|a| a["state"] == "online")
        })?;
    wait_curl(&up.zone, 0, &url, &up.markers[1])?;
    let zone_logs = up.controller.proc.logs();
    ensure!(
        zone_logs.contains("the agent's newer stream carries on"),
        "{zone_logs}"
    );
    drop(successor);
    Ok(())
}
