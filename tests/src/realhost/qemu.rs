//! A real host as a qemu VM: its own Debian kernel, systemd as PID 1, a
//! disk of its own (a qcow2 overlay over the cached image). KVM cannot boot
//! Debian kernels on the CI machines (their /dev/kvm is a PVM hypervisor),
//! so the VM runs under TCG, software emulation: ~30 s to boot, and every
//! command is slow. User networking with `restrict=on` keeps the guest off
//! the machine's networks and the outside; only SSH is forwarded, to a
//! loopback port.

use std::fs::File;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::image::Image;
use super::ledger::Ledger;
use super::Machine;
use crate::tempdir::TempDir;
use crate::wait;

/// A running VM; powered off (killed) and its disk removed on drop.
#[derive(Debug)]
pub struct QemuVm {
    hostname: String,
    qemu: Child,
    ssh_port: u16,
    key: std::path::PathBuf,
    dir: TempDir,
    _ledger: Ledger,
    booted_in: Duration,
}

impl QemuVm {
    /// Boots `hostname` from `image` (made with [`Image::with_qemu`]) and
    /// waits until root can log in over SSH, at most `timeout`.
    pub fn boot(image: &Image, hostname: &str, timeout: Duration) -> Result<QemuVm> {
        crate::require_root()?;
        let dir = TempDir::new(&format!("weft-vm-{hostname}"))?;
        let disk = dir.join("disk.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.base_qcow2())
            .arg(&disk)
            .output()
            .context("running qemu-img (is qemu-utils installed?)")?;
        if !out.status.success() {
            bail!("qemu-img create: {}", super::describe(&out));
        }
        // A free loopback port for SSH: taken from the kernel, released,
        // then given to qemu (a race with another bind is possible but
        // would only fail this boot, loudly).
        let ssh_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let console = dir.join("console.log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "2",
        ])
        .arg("-kernel")
        .arg(image.kernel())
        .arg("-initrd")
        .arg(image.initrd())
        .args([
            "-append",
            &format!("root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.hostname={hostname}"),
        ])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
        .args([
            "-netdev",
            &format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"),
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("qemu.stdout"))?)
        .stderr(File::create(dir.join("qemu.stderr"))?);
        let start = Instant::now();
        let qemu = cmd
            .spawn()
            .context("spawning qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
        let mut ledger = Ledger::new()?;
        ledger.process(qemu.id());
        let mut vm = QemuVm {
            hostname: hostname.to_owned(),
            qemu,
            ssh_port,
            key: image.ssh_key(),
            dir,
            _ledger: ledger,
            booted_in: Duration::ZERO,
        };
        vm.wait_ssh(timeout)?;
        vm.booted_in = start.elapsed();
        Ok(vm)
    }

    fn wait_ssh(&mut self, timeout: Duration) -> Result<()> {
        let waited = wait::until(&format!("SSH into {}", self.hostname), timeout, || {
            if let Some(status) = self.qemu.try_wait()? {
                return Err(wait::fatal(format!("qemu exited ({status})")));
            }
            let out = self.ssh(&["-o", "ConnectTimeout=5"]).arg("true").output()?;
            if out.status.success() {
                Ok(Some(()))
            } else {
                Err(anyhow::anyhow!(
                    "{}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        });
        waited.map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.console()))
    }

    /// `ssh root@127.0.0.1 -p <port>` with the image's key, host keys not
    /// checked (every VM is new), and `extra` options; add the command.
    pub fn ssh(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-i"])
            .arg(&self.key)
            .args(["-p", &self.ssh_port.to_string()])
            .args(ssh_options())
            .args(extra)
            .arg("root@127.0.0.1");
        cmd
    }

    /// The forwarded SSH port on 127.0.0.1.
    pub fn ssh_port(&self) -> u16 {
        self.ssh_port
    }

    /// From qemu's start to SSH answering.
    pub fn booted_in(&self) -> Duration {
        self.booted_in
    }

    /// The serial console's tail.
    pub fn console(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        crate::process::tail(&text, 60)
    }
}

/// SSH options for throw-away hosts: no host key checks or records, no
/// prompts, no agent; a connection that stops answering fails within
/// ~15 s instead of hanging (as one open while the agent installs its
/// capture does on a host without a firewall: see docs/real-host-tests.md).
pub fn ssh_options() -> [&'static str; 16] {
    [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=2",
    ]
}

impl Machine for QemuVm {
    fn name(&self) -> &str {
        &self.hostname
    }

    fn sh(&self, script: &str) -> Result<Output> {
        self.ssh(&[])
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("ssh into {}", self.hostname))
    }

    fn copy_in(&self, src: &Path, dst: &str) -> Result<()> {
        let mut cmd = self.ssh(&[]);
        cmd.arg(format!("cat > '{dst}'"));
        super::pipe_file(cmd, src, &self.hostname, dst)
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- {} console -----\n{}", self.hostname, self.console());
        }
        // The disk is thrown away: no clean shutdown needed.
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}
