//! The zone's config stream as the agent reads it: a `ConfigUpdate` decoded
//! from arbitrary bytes, checked and built into a view, and applied as a
//! delta on a fixed valid view (then built too), and reassembled as a
//! chunk.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_agent::view::{resolve, Chunks, MeshView};
use weft_api::policy::compiled::WorkloadPolicy;
use weft_api::proto::agent::v1::ConfigUpdate;

fuzz_target!(|data: &[u8]| {
    let Ok(mut update) = ConfigUpdate::decode(data) else {
        return;
    };
    // The view compiles `policy_json`, whose File access logs would create
    // files wherever the input says: confine them (a policy that does not
    // parse is left as is, for the view to refuse).
    if let Ok(mut policies) = serde_json::from_str::<Vec<WorkloadPolicy>>(&update.policy_json) {
        if weft_fuzz::confine_access_logs(&mut policies) {
            match serde_json::to_string(&policies) {
                Ok(json) => update.policy_json = json,
                Err(_) => return,
            }
        }
    }
    let _ = MeshView::from_update(&update, "web");
    let mut chunks = Chunks::default();
    let _ = chunks.push(update.clone());
    let base = weft_fuzz::base_update();
    if let Ok(whole) = resolve(Some(&base), update) {
        let _ = MeshView::from_update(&whole, "web");
    }
});
