//! The README's local demo, run bounded (`--requests 3`) inside its own
//! namespace so its fixed loopback addresses never clash with anything.

use std::time::Duration;

use anyhow::Result;
use weft_e2e::agent::agent_bin;
use weft_e2e::netns::Host;
use weft_e2e::process::Proc;
use weft_e2e::tempdir::TempDir;

#[test]
fn demo_serves_three_requests_through_the_tunnel() -> Result<()> {
    let host = Host::new()?;
    let dir = TempDir::new("weft-e2e-demo")?;
    let mut cmd = host.command(env!("CARGO_BIN_EXE_weft-demo"));
    cmd.args(["--requests", "3", "--agent"]).arg(agent_bin()?);
    let mut demo = Proc::spawn("weft-demo", cmd, dir.path())?;
    let status = demo.wait_exit(Duration::from_secs(90))?;
    let out = demo.stdout();
    assert!(
        status.success(),
        "weft-demo failed ({status})\n{}",
        demo.logs()
    );
    let answered = out
        .lines()
        .filter(|l| l.contains("] 200 in") && l.contains("hello from the demo service"))
        .count();
    assert_eq!(answered, 3, "expected 3 answered requests:\n{out}");
    assert!(
        out.contains("spiffe://weft.demo/ns/demo/sa/client"),
        "no client identity shown:\n{out}"
    );
    assert!(
        out.contains(
            "mTLS spiffe://weft.demo/ns/demo/sa/client -> spiffe://weft.demo/ns/demo/sa/server"
        ),
        "the tunnel's identities do not show in the metrics report:\n{out}"
    );
    assert!(
        out.contains("client-agent stopped (exit status: 0)"),
        "client agent did not stop cleanly:\n{out}"
    );
    assert!(
        out.contains("server-agent stopped (exit status: 0)"),
        "server agent did not stop cleanly:\n{out}"
    );
    // The demo removes its temporary directory.
    let tmp_line = out
        .lines()
        .find(|l| l.contains("certificates in "))
        .unwrap_or_default();
    if let Some(path) = tmp_line
        .split("certificates in ")
        .nth(1)
        .map(|p| p.trim_end_matches(')'))
    {
        assert!(
            !std::path::Path::new(path).exists(),
            "the demo left {path} behind"
        );
    }
    Ok(())
}
