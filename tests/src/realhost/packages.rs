//! The packages `packaging/build` makes, found where it leaves them, and
//! variants of them the tests make (a newer version of the same build).
//!
//! Missing packages fail the test with what to run: the real-host tests
//! test the packages, so they never pass without them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The folders searched, in order: `$WEFT_PACKAGES_DIR`, then `debian/`,
/// `rpm/` and `generate-rpm/` of the target directory (`$CARGO_TARGET_DIR`,
/// the one this test was built in, and the workspace's `target/`).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut targets = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        targets.push(PathBuf::from(dir));
    }
    // Test binaries live in <target>/<profile>/deps/.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(target) = exe.ancestors().nth(3) {
            targets.push(target.to_owned());
        }
    }
    targets.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("WEFT_PACKAGES_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    for target in targets {
        for sub in ["debian", "rpm", "generate-rpm"] {
            let dir = target.join(sub);
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// The file whose name starts with `prefix` and ends with `suffix` (e.g.
/// `weft-agent_` and `.deb`) in the first search folder that has one (the
/// newest there, when several builds are).
pub fn find(prefix: &str, suffix: &str) -> Result<PathBuf> {
    let dirs = search_dirs();
    for dir in &dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(prefix) && name.ends_with(suffix)
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        found.sort();
        if let Some((_, path)) = found.pop() {
            return Ok(path);
        }
    }
    bail!(
        "no {prefix}*{suffix} package in {}: run packaging/build first",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The weft-agent .deb.
pub fn agent_deb() -> Result<PathBuf> {
    find("weft-agent_", ".deb")
}

/// The weft-zone .deb.
pub fn zone_deb() -> Result<PathBuf> {
    find("weft-zone_", ".deb")
}

/// The weftctl .deb (the zone host's operator CLI, a package of its own).
pub fn weftctl_deb() -> Result<PathBuf> {
    find("weftctl_", ".deb")
}

/// The weft-agent .rpm.
pub fn agent_rpm() -> Result<PathBuf> {
    find("weft-agent-", ".rpm")
}

/// A field of a .deb's control file (e.g. `Version`).
pub fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .args(["--field"])
        .arg(deb)
        .arg(field)
        .output()
        .context("running dpkg-deb")?;
    if !out.status.success() {
        bail!(
            "dpkg-deb --field {}: {}",
            deb.display(),
            super::describe(&out)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The same package as `deb` with version `<its version>+<suffix>`, which
/// dpkg takes as newer: an upgrade that runs every maintainer script and
/// the conffile handling as a new build would, without building again.
/// Written into `out_dir`.
pub fn newer_deb(deb: &Path, suffix: &str, out_dir: &Path) -> Result<PathBuf> {
    let version = deb_field(deb, "Version")?;
    let newer = format!("{version}+{suffix}");
    let tree = out_dir.join(format!("tree-{suffix}"));
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?}: {}", super::describe(&out));
        }
        Ok(())
    };
    let _ = std::fs::remove_dir_all(&tree);
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree))?;
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control)?;
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("Version:") {
                format!("Version: {newer}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&control, text)?;
    let name = deb_field(deb, "Package")?;
    let arch = deb_field(deb, "Architecture")?;
    let out = out_dir.join(format!("{name}_{newer}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["-Zgzip", "-b"])
        .arg(&tree)
        .arg(&out))?;
    let _ = std::fs::remove_dir_all(&tree);
    Ok(out)
}
