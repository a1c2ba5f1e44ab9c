//! The agent's compiled-policy path: the zone's `policy_json` (a JSON list
//! of per-workload policies) compiled as the agent compiles it, then every
//! request matcher in it compiled on its own and run, with the compiled
//! policy, against a request from the rest of the input.
//!
//! Input: the JSON, then a NUL byte, then the request (`METHOD URI` and
//! `name: value` lines; see `weft_fuzz::request_from`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_agent::l7::matcher::RequestMatch;
use weft_agent::l7::policy::Policy;
use weft_api::policy::compiled::WorkloadPolicy;
use weft_api::policy::conf::HttpMatch;

fuzz_target!(|data: &[u8]| {
    let (json, request) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"GET /"[..]),
    };
    let Ok(mut policies) = serde_json::from_slice::<Vec<WorkloadPolicy>>(json) else {
        return;
    };
    // File backends would create files wherever the input says.
    weft_fuzz::confine_access_logs(&mut policies);
    let req = weft_fuzz::request_from(request);
    for p in &policies {
        let mut matches: Vec<&HttpMatch> = Vec::new();
        matches.extend(p.inbound.permissions.iter().flat_map(|r| &r.http));
        for conf in std::iter::once(&p.outbound_defaults).chain(p.outbound.values()) {
            matches.extend(conf.routes.iter().flat_map(|r| &r.rule.matches));
        }
        for m in matches {
            if let (Ok(compiled), Some(req)) = (RequestMatch::compile(m), &req) {
                let _ = compiled.matches(req);
                let _ = compiled.path_prefix();
            }
        }
        let Ok(compiled) = Policy::compile(p, &weft_fuzz::LOGS) else {
            continue;
        };
        let peer = &*weft_fuzz::PEER;
        let _ = compiled.inbound.connection(peer, true);
        let _ = compiled.inbound.connection(peer, false);
        let _ = compiled.inbound.limit(peer);
        let Some(req) = &req else {
            continue;
        };
        let _ = compiled.inbound.request(peer, req);
        for key in p.outbound.keys().map(String::as_str).chain(["none/none"]) {
            if let Some(route) = compiled.outbound(key).route(req) {
                let _ = route.matched_prefix(req);
                let _ = route.pick_backend();
            }
        }
    }
});
