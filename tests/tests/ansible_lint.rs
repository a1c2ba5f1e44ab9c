//! The Ansible roles and playbook in `ansible/` pass `ansible-lint` with the
//! production profile (configured in `ansible/.ansible-lint`): no finding,
//! not even a warning. ansible-lint runs from the virtualenv that `.ci/run`
//! creates; without it the test fails rather than skips, so that a CI
//! machine without the venv cannot pass it silently.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// Where `.ci/run` installs ansible-core and ansible-lint.
const VENV: &str = "/var/cache/weft-ci/venv";

#[test]
fn ansible_roles_pass_ansible_lint() -> Result<()> {
    let venv = Path::new(VENV);
    let lint = venv.join("bin/ansible-lint");
    ensure!(
        lint.exists(),
        "{} is missing: run .ci/run (it creates the venv) or \
         `python3 -m venv {VENV} && {VENV}/bin/pip install ansible-core ansible-lint`",
        lint.display()
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ansible");
    // The venv's bin first: ansible-lint runs ansible-playbook
    // --syntax-check and ansible-galaxy from PATH.
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(&lint)
        .args(["--strict", "--nocolor"])
        .current_dir(&dir)
        .env("PATH", path)
        // Its cache and temporary files stay out of the source tree's way.
        .env(
            "ANSIBLE_HOME",
            std::env::temp_dir().join("weft-ansible-lint"),
        )
        .output()
        .with_context(|| format!("running {}", lint.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "ansible-lint found problems in ansible/ ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // --strict turns warnings into failures; the summary line says so too.
    ensure!(
        stderr.contains("0 failure(s), 0 warning(s)")
            || stdout.contains("0 failure(s), 0 warning(s)"),
        "ansible-lint passed but its summary is not clean:\n{stdout}\n{stderr}"
    );
    Ok(())
}
