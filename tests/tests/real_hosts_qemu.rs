//! The packages on a real VM: qemu with the Debian kernel (under TCG, as
//! the CI machines' KVM cannot boot it), booted from the cached image.
//! A smoke test: the zone and an agent on the same VM, installed by hand
//! with dpkg, the agent's unit active and enrolled. The nspawn tests
//! (real_hosts.rs) cover the rest faster; this one proves the packages on
//! a kernel and init of the distribution's own. See docs/real-host-tests.md.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use weft_e2e::realhost::image::Image;
use weft_e2e::realhost::packages;
use weft_e2e::realhost::qemu::QemuVm;
use weft_e2e::realhost::weft::{
    agent_entry, configure_agent_by_hand, dpkg_install, install_zone_by_hand, issue_token,
    start_agent, HandAgent,
};
use weft_e2e::realhost::Machine;

/// Everything is slow under TCG (~5 s per Python start-up in the guest).
const T: Duration = Duration::from_secs(240);

#[test]
fn a_vm_runs_the_zone_and_an_enrolled_agent_from_the_packages() -> Result<()> {
    let zone_deb = packages::zone_deb()?;
    let weftctl_deb = packages::weftctl_deb()?;
    let agent_deb = packages::agent_deb()?;
    let image = Image::with_qemu()?;
    let vm = QemuVm::boot(&image, "vm-1", Duration::from_secs(400))?;
    eprintln!(
        "TIMING qemu (TCG) boot to SSH: {:.1} s",
        vm.booted_in().as_secs_f64()
    );
    let kernel = vm.sh_ok("uname -r")?;
    ensure!(kernel.contains("amd64"), "not Debian's kernel: {kernel}");

    let start = Instant::now();
    let pin = install_zone_by_hand(&vm, &[&zone_deb, &weftctl_deb], T)?;
    dpkg_install(&vm, &agent_deb)?;
    // slirp gives the guest 10.0.2.15; the zone is on the same VM.
    let address = vm.sh_ok("ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1")?;
    let token = issue_token(&vm, "vm-1")?;
    configure_agent_by_hand(
        &vm,
        &HandAgent {
            controller: "127.0.0.1:5678",
            ca_pin: &pin,
            token: &token,
            workload: "vm-1",
            service: "vm",
            address: address.trim(),
        },
    )?;
    start_agent(&vm)?;
    vm.wait_active("weft-agent", T)?;
    eprintln!(
        "TIMING qemu: packages installed to agent active: {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let agents = vm.sh_ok("weftctl --server http://127.0.0.1:5681 inspect agents -o json")?;
    let agents: Value = serde_json::from_str(&agents)?;
    let entry = agent_entry(&agents, "vm-1").with_context(|| format!("{agents:#}"))?;
    ensure!(entry["state"] == "online", "{entry:#}");
    ensure!(
        entry["host"]["kernel"].as_str() == Some(kernel.trim()),
        "the agent reports another kernel than the VM's: {entry:#}"
    );
    Ok(())
}
