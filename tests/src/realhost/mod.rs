//! Real hosts: Debian bookworm booted with systemd as PID 1, in
//! systemd-nspawn containers (fast: a host boots in under a second) or in a
//! qemu VM under TCG (slow: a real kernel of its own), to test what the
//! namespaced hosts of the rest of the suite cannot: the .deb and .rpm
//! packages, the systemd units with their hardening, the Ansible roles, and
//! an agent installed and run the way an operator would.
//!
//! Everything a test makes here is undone by `Drop` guards, also when the
//! test fails or panics, and written down in a [`ledger`] so that a test
//! killed outright is cleaned up by the next one.

pub mod ansible;
pub mod bridge;
pub mod image;
pub mod ledger;
pub mod nspawn;
pub mod packages;
pub mod qemu;
pub mod rpmroot;
pub mod weft;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::wait;

/// A host a test can run commands on and copy files to.
pub trait Machine {
    /// Its host name, for messages.
    fn name(&self) -> &str;

    /// Runs `script` with `/bin/sh -c` as root on the host.
    fn sh(&self, script: &str) -> Result<Output>;

    /// Copies the local file `src` to `dst` on the host.
    fn copy_in(&self, src: &Path, dst: &str) -> Result<()>;

    /// Like [`Machine::sh`], failing with its output unless it exits 0;
    /// returns stdout.
    fn sh_ok(&self, script: &str) -> Result<String> {
        let out = self.sh(script)?;
        if !out.status.success() {
            bail!(
                "on {}: `{script}` failed ({}):\n{}",
                self.name(),
                out.status,
                describe(&out)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes `contents` to `path` on the host with `mode` (octal, e.g.
    /// `"0644"`), owned by root.
    fn write(&self, path: &str, contents: &str, mode: &str) -> Result<()> {
        let tmp = crate::tempdir::TempDir::new("weft-realhost-file")?;
        let local = tmp.join("file");
        std::fs::write(&local, contents)?;
        let staged = format!("{path}.weft-test-new");
        self.copy_in(&local, &staged)?;
        self.sh_ok(&format!(
            "chmod {mode} '{staged}' && mv '{staged}' '{path}'"
        ))?;
        Ok(())
    }

    /// Waits until `systemctl is-active UNIT` says `active`; fails at
    /// once, with the unit's status and journal, if it says `failed`.
    fn wait_active(&self, unit: &str, timeout: Duration) -> Result<()> {
        let waited = wait::until(
            &format!("{unit} to be active on {}", self.name()),
            timeout,
            || {
                let out = self.sh(&format!("systemctl is-active {unit}"))?;
                let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                match state.as_str() {
                    "active" => Ok(Some(())),
                    "failed" => Err(wait::fatal(format!("{unit} is failed"))),
                    other => Err(anyhow::anyhow!("{unit} is {other}")),
                }
            },
        );
        waited.map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.unit_report(unit)))
    }

    /// `systemctl status` and the journal's tail for `unit`, for messages.
    fn unit_report(&self, unit: &str) -> String {
        let script = format!(
            "systemctl status --no-pager --lines=0 {unit}; \
             journalctl --no-pager -o short-monotonic -n 60 -u {unit}"
        );
        match self.sh(&script) {
            Ok(out) => format!(
                "----- {unit} on {} -----\n{}",
                self.name(),
                String::from_utf8_lossy(&out.stdout)
            ),
            Err(e) => format!("(no status for {unit} on {}: {e:#})", self.name()),
        }
    }
}

/// A command's exit status, stdout and stderr, for messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        crate::process::tail(&String::from_utf8_lossy(&out.stdout), 60),
        crate::process::tail(&String::from_utf8_lossy(&out.stderr), 60)
    )
}

/// Kills (and reaps) a child process when dropped, e.g. an SSH client a
/// test holds open; the field is the child, to take its pipes from.
#[derive(Debug)]
pub struct KillOnDrop<'a>(pub &'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Streams the file `src` into `cmd`'s standard input: `cmd` is a shell on
/// `host` that writes it to `dst` (how each kind of host copies a file in).
pub(crate) fn pipe_file(
    mut cmd: std::process::Command,
    src: &Path,
    host: &str,
    dst: &str,
) -> Result<()> {
    use anyhow::Context;
    let input = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let out = cmd
        .stdin(input)
        .output()
        .with_context(|| format!("copying {} into {host}", src.display()))?;
    if !out.status.success() {
        bail!(
            "copying {} to {host}:{dst}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
