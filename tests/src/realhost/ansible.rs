//! Running the repository's Ansible playbook (`ansible/`) against real
//! hosts, and reading what it did from its recap.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `ansible-playbook`: `$WEFT_ANSIBLE_PLAYBOOK`, else the CI venv
/// (`/var/cache/weft-ci/venv`, made by `.ci/run`), else the one on PATH.
pub fn playbook_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WEFT_ANSIBLE_PLAYBOOK") {
        return Ok(PathBuf::from(path));
    }
    let venv = PathBuf::from("/var/cache/weft-ci/venv/bin/ansible-playbook");
    if venv.is_file() {
        return Ok(venv);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("ansible-playbook"))
        .find(|p| p.is_file());
    on_path.context(
        "ansible-playbook not found: run .ci/run (it makes /var/cache/weft-ci/venv), or \
         python3 -m venv /var/cache/weft-ci/venv && /var/cache/weft-ci/venv/bin/pip install ansible-core",
    )
}

/// The repository's `ansible/` folder (`$WEFT_ANSIBLE_DIR` to try
/// another copy of it).
pub fn ansible_dir() -> PathBuf {
    match std::env::var_os("WEFT_ANSIBLE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../ansible"),
    }
}

/// One host's line of the PLAY RECAP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recap {
    /// `ok=`
    pub ok: u32,
    /// `changed=`
    pub changed: u32,
    /// `unreachable=`
    pub unreachable: u32,
    /// `failed=`
    pub failed: u32,
}

/// What a playbook run printed and how long it took.
#[derive(Debug)]
pub struct Run {
    /// Per host (inventory name).
    pub recap: BTreeMap<String, Recap>,
    /// stdout and stderr.
    pub output: String,
    /// Wall time.
    pub took: Duration,
}

impl Run {
    /// The sum of `changed=` over every host.
    pub fn changed(&self) -> u32 {
        self.recap.values().map(|r| r.changed).sum()
    }
}

/// Runs `ansible-playbook <playbook> -i <inventory> <extra args>` from the
/// `ansible/` folder (so its `ansible.cfg` applies), with SSH as the test
/// wants it, for at most `timeout` (then it is killed with its SSH
/// processes). Fails, with the output, unless it exits 0 with no host
/// failed or unreachable. `control_dir` holds SSH's control sockets, so
/// that no connection outlives the test for long.
pub fn run_playbook(
    playbook: &Path,
    inventory: &Path,
    extra: &[&str],
    control_dir: &Path,
    timeout: Duration,
) -> Result<Run> {
    let bin = playbook_bin()?;
    let log = control_dir.join(format!(
        "ansible-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    ));
    let out = std::fs::File::create(&log)?;
    let start = Instant::now();
    let mut child = Command::new(&bin)
        .current_dir(ansible_dir())
        .arg(playbook)
        .arg("-i")
        .arg(inventory)
        .args(extra)
        // Hosts are new at every boot: no host key checks.
        .env("ANSIBLE_HOST_KEY_CHECKING", "False")
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
        // Ansible's default connection sharing, with the sockets here and
        // masters that exit 10 s after their last use; no compression on
        // a local bridge (it only costs CPU).
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", control_dir)
        .env(
            "ANSIBLE_SSH_ARGS",
            "-o ControlMaster=auto -o ControlPersist=10s",
        )
        // The machine may have no locale but C.UTF-8; ansible-core needs UTF-8.
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Its own process group: a timeout kills its SSH clients too.
        .process_group(0)
        .spawn()
        .with_context(|| format!("running {}", bin.display()))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let group = -(child.id() as i32);
            // SAFETY: kill has no memory-safety preconditions; the group is
            // the one this child leads.
            unsafe { libc::kill(group, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(500));
            // SAFETY: as above.
            unsafe { libc::kill(group, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = start.elapsed();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let Some(status) = status else {
        bail!(
            "ansible-playbook {} did not finish within {timeout:?}; its output:\n{}",
            playbook.display(),
            crate::process::tail(&output, 120)
        );
    };
    let recap = parse_recap(&output);
    let bad = recap.values().any(|r| r.failed > 0 || r.unreachable > 0);
    if !status.success() || bad || recap.is_empty() {
        bail!(
            "ansible-playbook {} failed ({status}):\n{}",
            playbook.display(),
            crate::process::tail(&output, 120)
        );
    }
    Ok(Run {
        recap,
        output,
        took,
    })
}

/// The PLAY RECAP lines: `host : ok=5 changed=1 unreachable=0 failed=0 ...`.
pub fn parse_recap(output: &str) -> BTreeMap<String, Recap> {
    let mut recap = BTreeMap::new();
    let Some(at) = output.rfind("PLAY RECAP") else {
        return recap;
    };
    for line in output[at..].lines().skip(1) {
        let Some((host, counts)) = line.split_once(" : ") else {
            continue;
        };
        let mut r = Recap::default();
        for word in counts.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else {
                continue;
            };
            let v: u32 = v.parse().unwrap_or(0);
            match k {
                "ok" => r.ok = v,
                "changed" => r.changed = v,
                "unreachable" => r.unreachable = v,
                "failed" => r.failed = v,
                _ => {}
            }
        }
        recap.insert(host.trim().to_owned(), r);
    }
    recap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recap_is_read_per_host() {
        let out = "TASK [x] ***\nok: [a]\n\nPLAY RECAP *********\n\
                   zone   : ok=7    changed=3    unreachable=0    failed=0    skipped=1\n\
                   agent-1 : ok=9 changed=0 unreachable=0 failed=1 skipped=0 rescued=0\n";
        let r = parse_recap(out);
        assert_eq!(r["zone"].changed, 3);
        assert_eq!(r["zone"].ok, 7);
        assert_eq!(r["agent-1"].failed, 1);
        assert_eq!(r.len(), 2);
    }
}
