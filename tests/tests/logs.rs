//! Logs: `log.format: json` writes one JSON object per line with
//! structured fields, and the human format carries no colour codes when
//! the output is not a terminal.

use anyhow::{Context, Result};
use weft_e2e::echo_bin;
use weft_e2e::topology::Pair;

#[test]
fn json_logs_are_one_object_per_line_with_fields() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let mut spec = pair.server_spec(&pair.identity("server")?);
    spec.set("log.format", "json").set("log.level", "info");
    let agent = pair.start_server_agent(&spec, None)?;
    let stderr = agent.proc.stderr();
    let mut ready = None;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("a log line is not JSON: {line}"))?;
        if v["message"] == "agent ready" {
            ready = Some(v);
        }
    }
    let ready = ready.with_context(|| format!("no `agent ready` line in:\n{stderr}"))?;
    assert_eq!(ready["level"], "INFO");
    assert_eq!(
        ready["identity"], "spiffe://weft.test/ns/default/sa/server",
        "the identity is a field of its own: {ready}"
    );
    Ok(())
}

#[test]
fn human_logs_have_no_colour_codes_in_files() -> Result<()> {
    let pair = Pair::new(echo_bin!())?;
    let mut spec = pair.server_spec(&pair.identity("server")?);
    spec.set("log.format", "human").set("log.level", "info");
    let agent = pair.start_server_agent(&spec, None)?;
    let stderr = agent.proc.stderr();
    assert!(stderr.contains("agent ready"), "no ready line:\n{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{stderr}"
    );
    Ok(())
}
