//! Harness for Weft's end-to-end scenarios: hosts made of network
//! namespaces joined by veth pairs, the real `weft-agent` binary started in
//! them, real client and server programs, certificates made on the fly, and
//! tools to check what happened (metrics, packet captures, exit codes).
//!
//! The scenarios themselves live in `tests/*.rs`; they need root.

pub mod agent;
pub mod apps;
pub mod binaries;
pub mod capture;
pub mod client;
pub mod h2app;
pub mod hbone;
pub mod http;
pub mod meshca;
pub mod metrics;
pub mod netns;
pub mod nodehost;
pub mod otlp;
pub mod pattern;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod realhost;
pub mod servers;
pub mod tempdir;
pub mod topology;
pub mod traffic;
pub mod vmzone;
pub mod wait;
pub mod witness;
pub mod yaml;
pub mod zone;

/// The path of this package's `weft-echo` binary, for use in integration
/// tests of this package (where cargo sets `CARGO_BIN_EXE_weft-echo`).
#[macro_export]
macro_rules! echo_bin {
    () => {
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_weft-echo"))
    };
}

/// Fails with a clear message unless the process runs as root, which the
/// scenarios need to create network namespaces.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "the e2e scenarios need root: they create network namespaces and nftables rules"
        );
    }
    Ok(())
}

/// A marker string unique to this process and call, to look for in payloads.
pub fn unique_marker(what: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("WEFT-{what}-MARKER-{}-{n}", std::process::id())
}
