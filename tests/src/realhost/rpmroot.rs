//! An RPM-installed host without an RPM distribution (none is reachable
//! from CI): the cached Debian root under a writable overlay, with the
//! packages installed by `rpm --root` (scriptlets included, run in the
//! root), then booted as any other host. A stub package provides what the
//! Debian root has but rpm cannot know (it has no rpm database): every
//! requirement of the packages that is not an `rpmlib(...)` feature.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::image::Image;
use super::ledger::Ledger;
use crate::tempdir::TempDir;

/// The overlay (mounted while this lives) with the packages installed.
#[derive(Debug)]
pub struct RpmRoot {
    merged: PathBuf,
    mounted: bool,
    // Dropped after the unmount (see Drop).
    dir: TempDir,
    _ledger: Ledger,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", super::describe(&out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl RpmRoot {
    /// Mounts an overlay over the image's root and installs `rpms` in it.
    pub fn install(image: &Image, rpms: &[&Path]) -> Result<RpmRoot> {
        crate::require_root()?;
        let dir = TempDir::new("weft-rpmroot")?;
        let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d)?;
        }
        let mut ledger = Ledger::new()?;
        ledger.mount(&merged);
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                image.rootfs().display(),
                upper.display(),
                work.display()
            ))
            .arg(&merged))?;
        let root = RpmRoot {
            merged,
            mounted: true,
            dir,
            _ledger: ledger,
        };
        let stub = root.stub_package(rpms)?;
        let mut rpm = root.rpm();
        rpm.arg("--initdb");
        run(&mut rpm)?;
        let mut install = root.rpm();
        install.arg("-ivh").arg(&stub).args(rpms);
        run(&mut install)?;
        Ok(root)
    }

    /// The root, to boot.
    pub fn path(&self) -> &Path {
        &self.merged
    }

    /// `rpm --root <merged>` with the database where RPM distributions
    /// keep it (Debian's rpm defaults to ~/.rpmdb).
    pub fn rpm(&self) -> Command {
        let mut cmd = Command::new("rpm");
        cmd.arg("--root")
            .arg(&self.merged)
            .args(["--dbpath", "/var/lib/rpm"]);
        cmd
    }

    /// Builds `debian-host-provides`, which provides every requirement of
    /// `rpms` except rpmlib features.
    fn stub_package(&self, rpms: &[&Path]) -> Result<PathBuf> {
        let mut needs = std::collections::BTreeSet::new();
        for rpm in rpms {
            let out = run(Command::new("rpm").arg("-qpR").arg(rpm))?;
            for line in out.lines().map(str::trim) {
                if !line.is_empty() && !line.starts_with("rpmlib(") {
                    // A versioned requirement (`systemd >= 240`) is met by
                    // providing the name at a high version.
                    let name = line.split_whitespace().next().unwrap_or(line);
                    needs.insert(name.to_owned());
                }
            }
        }
        let topdir = self.dir.join("rpmbuild");
        std::fs::create_dir_all(topdir.join("SPECS"))?;
        let provides: String = needs
            .iter()
            .map(|n| {
                if n.starts_with('/') {
                    format!("Provides: {n}\n")
                } else {
                    format!("Provides: {n} = 999\n")
                }
            })
            .collect();
        let spec = format!(
            "Name: debian-host-provides\nVersion: 12\nRelease: 1\nSummary: what the Debian root has\n\
             License: MIT\nBuildArch: noarch\n{provides}\n%description\n\
             Stands for the Debian packages of the root rpm cannot see.\n%files\n"
        );
        let spec_path = topdir.join("SPECS/host-provides.spec");
        std::fs::write(&spec_path, spec)?;
        run(Command::new("rpmbuild")
            .arg("--define")
            .arg(format!("_topdir {}", topdir.display()))
            .arg("-bb")
            .arg(&spec_path))
        .context("building the stub package (is rpm installed? it brings rpmbuild)")?;
        Ok(topdir.join("RPMS/noarch/debian-host-provides-12-1.noarch.rpm"))
    }

    fn unmount(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.merged).output();
            self.mounted = false;
        }
    }
}

impl Drop for RpmRoot {
    fn drop(&mut self) {
        // The host booted from it must be stopped first (declare it after
        // this root, so it drops before).
        self.unmount();
    }
}
