//! Protocol detection: the first bytes any client sends on a port of no
//! declared protocol decide whether the agent parses it as HTTP. Arbitrary
//! bytes, fed whole and a byte at a time as they could arrive.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_agent::detect::{classify, Verdict, H2_PREFACE, PREFIX_LEN};

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    // A verdict never changes as more bytes arrive: the first prefix that
    // decides is the answer, so detection may stop reading there.
    let mut decided = None;
    for end in 0..=data.len().min(PREFIX_LEN) {
        let v = classify(&data[..end]);
        match decided {
            Some(d) => assert_eq!(v, d, "{:?} changed its verdict", &data[..end]),
            None if v != Verdict::NeedMore => decided = Some(v),
            None => {}
        }
    }
    assert_eq!(whole, decided.unwrap_or(Verdict::NeedMore));
    match whole {
        Verdict::Http2 => assert!(data.starts_with(H2_PREFACE)),
        Verdict::Http1 => assert!(data.iter().take(8).any(|&b| b == b' ')),
        Verdict::Tls => assert_eq!(data.first(), Some(&0x16)),
        // Waiting is only for fewer bytes than a verdict needs.
        Verdict::NeedMore => assert!(data.len() < PREFIX_LEN),
        Verdict::NotHttp => {}
    }
});
