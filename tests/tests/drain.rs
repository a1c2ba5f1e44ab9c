//! SIGTERM drains: a paced transfer through the tunnel is under way when the
//! client agent gets SIGTERM; new connections are refused from then on, the
//! transfer completes intact, and the agent exits 0 by itself once it is
//! done, well before its drain timeout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use weft_e2e::client::{self, payload, Pace, Probe};
use weft_e2e::topology::{Pair, ECHO_LISTENER};
use weft_e2e::{echo_bin, unique_marker, wait};

#[test]
fn sigterm_drains_in_flight_transfer() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let marker = unique_marker("drain");
    let _app = pair.start_server_app(&marker)?;
    let _server = pair.start_server_agent(&pair.server_spec(&pair.identity("server")?), None)?;
    let mut spec = pair.client_spec(&pair.identity("client")?);
    let drain_timeout = Duration::from_secs(30);
    spec.set("drain_timeout", "30s");
    let mut client = pair.start_client_agent(&spec, None)?;

    // 4 MiB in 64 KiB writes, 60 ms apart: about 4 s on the wire.
    let data = payload(&marker, 4 << 20);
    let pace = Pace {
        chunk: 64 * 1024,
        pause: Duration::from_millis(60),
    };
    let progress = AtomicUsize::new(0);
    let (transfer, refused_at, signalled_at) = pair.client.enter(|| {
        std::thread::scope(|s| {
            let transfer = s.spawn(|| {
                client::echo_exchange(
                    ECHO_LISTENER,
                    &data,
                    pace,
                    &progress,
                    Duration::from_secs(60),
                )
            });
            let mut watch = || -> Result<(Instant, usize)> {
                wait::until(
                    "a quarter of the transfer to echo back",
                    Duration::from_secs(20),
                    || Ok((progress.load(Ordering::Relaxed) >= data.len() / 4).then_some(())),
                )?;
                client.proc.signal(libc::SIGTERM)?;
                let signalled_at = Instant::now();
                // New connections stop being served (probes are refused, or closed unanswered).
                let refused = wait::until(
                    "new connections to be refused",
                    Duration::from_secs(5),
                    || match client::probe(ECHO_LISTENER, b"late", Duration::from_secs(2))? {
                        Probe::Refused(_) => Ok(Some(progress.load(Ordering::Relaxed))),
                        Probe::Answered(_) => Ok(None),
                    },
                )?;
                Ok((signalled_at, refused))
            };
            let watched = watch();
            let transfer = transfer
                .join()
                .map_err(|_| anyhow!("transfer thread panicked"))?;
            let (signalled_at, refused_at) = watched?;
            Ok((transfer, refused_at, signalled_at))
        })
    })?;
    let got = transfer.map_err(|e| {
        anyhow!(
            "the in-flight transfer broke on SIGTERM: {e:#}\n{}",
            client.proc.logs()
        )
    })?;
    client::check_same(&data, &got)?;
    assert!(
        refused_at < data.len(),
        "new connections were refused only after the transfer ended, so the drain was not exercised"
    );
    let status = client.proc.wait_exit(drain_timeout / 2)?;
    assert!(
        status.success(),
        "the agent exited with {status} after SIGTERM\n{}",
        client.proc.logs()
    );
    assert!(
        signalled_at.elapsed() < drain_timeout,
        "the agent waited out its drain timeout"
    );
    Ok(())
}
