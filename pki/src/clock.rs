//! Wall-clock time as X.509 sees it: whole seconds since the Unix epoch,
//! within what a certificate can encode.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;

/// The latest instant X.509 can encode (GeneralizedTime 9999-12-31T23:59:59Z).
pub(crate) const MAX_X509_TIME: i64 = 253_402_300_799;

/// Seconds since the epoch now (0 if the clock is before the epoch).
pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(seconds)
        .unwrap_or(0)
}

/// A duration in whole seconds, saturating instead of overflowing.
pub(crate) fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The `OffsetDateTime` rcgen wants, for a time already clamped to what
/// X.509 can encode.
pub(crate) fn datetime(ts: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(ts.clamp(0, MAX_X509_TIME))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `2026-01-02T03:04:05Z`, for error messages.
pub(crate) fn rfc3339(ts: i64) -> String {
    let t = datetime(ts);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_clamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(seconds(Duration::from_secs(u64::MAX)), i64::MAX);
    }
}
