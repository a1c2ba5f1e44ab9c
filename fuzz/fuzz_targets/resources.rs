//! Resources as users apply them (`weftctl apply -f`, the zone's HTTP
//! API): arbitrary text read as a YAML stream and as a JSON object, every
//! kind, with defaults and validation; what parses is validated again and
//! written back out, and that text must read again.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(resources) = weft_api::parse_yaml(text) {
        for r in &resources {
            // Parsing validated already: a second run must agree.
            assert!(r.validate().is_ok(), "parsed resource fails validation");
        }
        let yaml = weft_api::to_yaml(&resources).expect("parsed resources encode");
        let again = weft_api::parse_yaml(&yaml);
        assert!(again.is_ok(), "re-reading {yaml:?}: {again:?}");
    }
    if let Ok(r) = weft_api::parse_json(text) {
        assert!(r.validate().is_ok(), "parsed resource fails validation");
    }
});
