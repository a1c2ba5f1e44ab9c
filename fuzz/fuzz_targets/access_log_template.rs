//! The AccessLog policy's text template, written by users, filled for
//! every request: arbitrary templates against a fixed entry.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_agent::l7::access_log::{text, Entry};

fuzz_target!(|data: &[u8]| {
    let Ok(template) = std::str::from_utf8(data) else {
        return;
    };
    let entry = Entry {
        direction: "inbound",
        start_time: "2026-01-01T00:00:00.000Z".to_owned(),
        source: "spiffe://td/ns/default/sa/web",
        destination: "default/api",
        route: "r%OUTE%",
        method: "GET",
        path: "/a%20b?x=%PATH%",
        authority: "api.default.mesh:8080",
        protocol: "HTTP/1.1",
        status: 200,
        duration_ms: 1.5,
        upstream: "10.0.0.1:8080",
        flag: "",
    };
    let line = text(template, &entry);
    assert!(line.ends_with('\n'));
    // Text without placeholders is kept as written.
    if !template.contains('%') {
        assert_eq!(&line[..line.len() - 1], template);
    }
});
