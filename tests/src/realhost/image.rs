//! The cached Debian root that every real host boots, built (once per
//! change of `tests/realhost/rootfs.sh`) by that script.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The folder `rootfs.sh` prints: the root, its SSH key, the kernel.
#[derive(Debug, Clone)]
pub struct Image {
    dir: PathBuf,
}

/// The script, in this crate.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("realhost/rootfs.sh")
}

impl Image {
    /// The root for nspawn hosts (built if missing: ~100 s, else instant).
    pub fn get() -> Result<Image> {
        Image::build(false)
    }

    /// The same root with its qemu disk image (`base.qcow2`) made too.
    pub fn with_qemu() -> Result<Image> {
        Image::build(true)
    }

    fn build(qemu: bool) -> Result<Image> {
        // One build per process at a time; the script itself locks
        // against other processes.
        static LOCK: Mutex<()> = Mutex::new(());
        let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        crate::require_root()?;
        let start = Instant::now();
        let mut cmd = Command::new(script());
        if qemu {
            cmd.arg("qemu");
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {}", script().display()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("{} failed ({}):\n{stderr}", script().display(), out.status);
        }
        if !stderr.trim().is_empty() {
            eprintln!("{}", stderr.trim());
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !dir.join("rootfs/etc/os-release").is_file() {
            bail!(
                "{} printed {}, which holds no root",
                script().display(),
                dir.display()
            );
        }
        eprintln!(
            "real-host image {} ready in {:.1} s",
            dir.display(),
            start.elapsed().as_secs_f64()
        );
        Ok(Image { dir })
    }

    /// The root file system (never written: hosts boot it under an overlay).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// The private key root and `ci` accept over SSH.
    pub fn ssh_key(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    /// The kernel, for `qemu -kernel`.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The initrd, for `qemu -initrd`.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }

    /// The VM disk (only with [`Image::with_qemu`]).
    pub fn base_qcow2(&self) -> PathBuf {
        self.dir.join("base.qcow2")
    }
}
