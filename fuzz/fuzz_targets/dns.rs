//! The agent's DNS proxy, which answers applications' queries for mesh
//! names: arbitrary bytes as one query packet, answered from a fixed view;
//! and arbitrary text as `/etc/resolv.conf`, where upstreams come from.

#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use weft_agent::dns::{parse_resolv_conf, Dns};
use weft_agent::metrics::Metrics;
use weft_agent::view::{shared, MeshView};

static DNS: LazyLock<Arc<Dns>> = LazyLock::new(|| {
    let view = MeshView::from_update(&weft_fuzz::base_update(), "web")
        .unwrap_or_else(|e| panic!("the base view is valid: {e}"));
    Dns::new(shared(view), Arc::new(Metrics::new()), Vec::new())
});

fuzz_target!(|data: &[u8]| {
    let _ = DNS.handle(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_resolv_conf(text);
    }
});
