//! What a test made outside its own process (bridges, containers, VMs,
//! overlay mounts), written down as it is made, so that a later test can
//! undo it when the test that made it was killed before its `Drop` guards
//! ran (a nextest timeout sends SIGKILL).
//!
//! Each guard undoes its own work in `Drop`; the ledger is only the safety
//! net. Records live in `/run/weft-realhost/`, one file per guard, named
//! after the owning test process: `<owner pid>-<n>`. A file whose owner is
//! gone is replayed (newest line first) and removed by [`sweep_stale`].

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The folder of the records (a tmpfs: a reboot clears it with the rest).
pub const DIR: &str = "/run/weft-realhost";

/// One guard's record file.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: File,
}

impl Ledger {
    /// A new record file for this process; sweeps stale ones first (once).
    pub fn new() -> Result<Ledger> {
        static SWEEP: Once = Once::new();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        std::fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;
        SWEEP.call_once(sweep_stale);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(DIR).join(format!("{}-{n}", std::process::id()));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Ledger { path, file })
    }

    /// Records a process to kill (with its start time, so that a reused
    /// pid is never killed).
    pub fn process(&mut self, pid: u32) {
        if let Some(start) = start_time(pid) {
            self.line(&format!("kill {pid} {start}"));
        }
    }

    /// Records a network interface to delete.
    pub fn link(&mut self, name: &str) {
        self.line(&format!("link {name}"));
    }

    /// Records a mount point to unmount.
    pub fn mount(&mut self, path: &std::path::Path) {
        self.line(&format!("umount {}", path.display()));
    }

    fn line(&mut self, line: &str) {
        // A record that cannot be written only weakens the safety net.
        let _ = writeln!(self.file, "{line}");
        let _ = self.file.sync_data();
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // The guard that owns this ledger has undone its work by now.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `starttime` (field 22 of `/proc/<pid>/stat`), in clock ticks since boot.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Replays and removes the records of test processes that are gone.
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .split_once('-')
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || PathBuf::from(format!("/proc/{owner}")).exists() {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines().rev() {
            undo(line);
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

fn undo(line: &str) {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("kill"), Some(pid), Some(start)) => {
            let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
                return;
            };
            // Same pid and start time: the very process that was recorded.
            if start_time(pid) == Some(start) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while start_time(pid) == Some(start) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        (Some("link"), Some(name), None) => {
            let _ = Command::new("ip").args(["link", "del", name]).output();
        }
        (Some("umount"), Some(path), None) => {
            let _ = Command::new("umount").args(["-l", path]).output();
        }
        _ => {}
    }
}
