//! A zone's LAN: a Linux bridge in the root namespace with an address of
//! the test process on it (`10.231.<n>.1/24`), so that the test reaches
//! its hosts' APIs directly. Hosts attach with `--network-bridge`.
//!
//! Each bridge takes a subnet number `<n>` no other running test holds
//! (`/run/weft-realhost/net-<n>`, created exclusively), so tests run
//! concurrently under nextest. `net.ipv4.ip_forward` is left as it is (0
//! on CI): bridges are not routed to each other or to the outside, so the
//! hosts reach nothing but their zone and the test.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::ledger::{Ledger, DIR};

/// A bridge and its subnet; deleted on drop.
#[derive(Debug)]
pub struct Bridge {
    name: String,
    net: u8,
    claim: PathBuf,
    _ledger: Ledger,
}

impl Bridge {
    /// Claims a free subnet and makes its bridge, up, with `.1` on it.
    pub fn new() -> Result<Bridge> {
        crate::require_root()?;
        // The ledger's sweep frees the bridges of killed tests first.
        let mut ledger = Ledger::new()?;
        let (net, claim) = claim_subnet()?;
        let name = format!("wrhb{net}");
        // A bridge of that name can only be a leftover: its subnet is ours.
        let _ = Command::new("ip").args(["link", "del", &name]).output();
        ledger.link(&name);
        let bridge = Bridge {
            name,
            net,
            claim,
            _ledger: ledger,
        };
        ip(&["link", "add", &bridge.name, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", bridge.gateway()),
            "dev",
            &bridge.name,
        ])?;
        ip(&["link", "set", &bridge.name, "up"])?;
        Ok(bridge)
    }

    /// The interface name (`wrhb<n>`), for `--network-bridge`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The test's own address on the bridge (`10.231.<n>.1`), the hosts'
    /// default gateway (which routes nowhere).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.net, 1)
    }

    /// The address of host `i` on this bridge (`10.231.<n>.<10 + i>`).
    pub fn host_ip(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.net, 10 + i)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
        let _ = std::fs::remove_file(&self.claim);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The first subnet number nobody alive holds, claimed with an
/// exclusively created file naming this process.
fn claim_subnet() -> Result<(u8, PathBuf)> {
    for net in 0..=250u8 {
        let path = PathBuf::from(DIR).join(format!("net-{net}"));
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    writeln!(file, "{}", std::process::id())?;
                    return Ok((net, path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    let alive = owner
                        .trim()
                        .parse::<u32>()
                        .map(|pid| PathBuf::from(format!("/proc/{pid}")).exists())
                        // A claim being written right now has no pid yet.
                        .unwrap_or(true);
                    if alive {
                        break;
                    }
                    // Its owner died; its ledger (swept before) removed the bridge.
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
    }
    bail!("no free subnet in 10.231.0.0/16: 251 bridges are held by running tests")
}
