//! The README's first command, `weftctl quickstart`, run bounded
//! (`--duration`) inside its own namespace so its loopback addresses never
//! clash with anything: a controller, two enrolled agents, a demo service
//! and live calls over mTLS, then a clean stop that leaves no files.

use std::time::Duration;

use anyhow::{ensure, Result};
use weft_e2e::binaries;
use weft_e2e::netns::Host;
use weft_e2e::process::Proc;
use weft_e2e::tempdir::TempDir;

#[test]
fn quickstart_runs_a_zone_and_stops_cleanly() -> Result<()> {
    let host = Host::new()?;
    let logs = TempDir::new("weft-e2e-quickstart")?;
    let mut cmd = host.command(binaries::find("weftctl", "WEFTCTL_BIN")?);
    cmd.args(["quickstart", "--duration", "6s"]);
    weft_e2e::agent::without_weft_env(&mut cmd);
    let mut run = Proc::spawn("quickstart", cmd, logs.path())?;
    let status = run.wait_exit(Duration::from_secs(120))?;
    let out = run.stdout();
    ensure!(
        status.success(),
        "quickstart failed ({status})\n{}",
        run.logs()
    );
    let answered = out
        .lines()
        .filter(|l| {
            l.contains("web-1 -> payments.default.mesh: 200") && l.contains("hello from payments-1")
        })
        .count();
    ensure!(answered >= 3, "expected at least 3 answered calls:\n{out}");
    for stopped in ["web-1 stopped", "payments-1 stopped", "weft-zone stopped"] {
        ensure!(out.contains(stopped), "no `{stopped}`:\n{out}");
    }
    let dir = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("files in "))
        .unwrap_or_default();
    ensure!(!dir.is_empty(), "the files' directory is not shown:\n{out}");
    ensure!(!std::path::Path::new(dir).exists(), "{dir} was left behind");
    Ok(())
}
