//! Finding the workspace's binaries (`weft-agent`, `weft-zone`, `weftctl`)
//! from a test, whichever target directory the tests were built into.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

/// Finds `name`: `$<env>` when set, else `name` in the target directory
/// this test binary was built into, else `<workspace>/target/debug/<name>`.
pub fn find(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{env}={} is not a file", path.display());
        }
        return Ok(path);
    }
    let mut candidates = Vec::new();
    // Test binaries live in <target>/<profile>/deps/; binaries in <target>/<profile>/.
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(name));
        }
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/debug")
            .join(name),
    );
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "{name} not found (looked at {}): build it first: cargo build --workspace --bins",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}
