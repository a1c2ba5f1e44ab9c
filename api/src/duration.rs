//! Durations as resources spell them: `24h`, `90s`, `1h30m`, `500ms` (the
//! integer subset of Go's `time.ParseDuration`, which is what Kubernetes
//! users write and what a CRD's `format: duration` accepts).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A non-negative length of time written as text (`24h`, `1h30m`), so that
/// resources stay readable and round-trip to the same spelling.
///
/// It keeps millisecond precision; it always prints in canonical form
/// (largest units first, zero parts left out, `0s` for zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(std::time::Duration);

/// Why a string is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}; write e.g. 24h, 1h30m, 30s or 500ms")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

impl Duration {
    /// A duration of whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    /// A duration of whole hours, for defaults and limits.
    pub const fn from_hours(hours: u64) -> Self {
        Duration(std::time::Duration::from_secs(hours * 3600))
    }

    /// The value as a standard duration, for timers and certificate validity.
    pub const fn as_std(self) -> std::time::Duration {
        self.0
    }
}

impl From<std::time::Duration> for Duration {
    /// Truncates to whole milliseconds, the precision the text form keeps.
    fn from(d: std::time::Duration) -> Self {
        let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
        Duration(std::time::Duration::from_millis(ms))
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| DurationError {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(err("it is empty"));
        }
        if input == "0" {
            return Ok(Duration::default());
        }
        let mut rest = input;
        let mut total_ms: u64 = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err("expected a number"));
            }
            let (number, after) = rest.split_at(digits);
            let unit_len = after
                .bytes()
                .take_while(|b| b.is_ascii_alphabetic())
                .count();
            let (unit, after_unit) = after.split_at(unit_len);
            let Some(&(_, unit_ms)) = UNITS.iter().find(|(name, _)| *name == unit) else {
                return Err(if unit.is_empty() {
                    err("a number needs a unit (h, m, s or ms)")
                } else {
                    err("the unit must be h, m, s or ms")
                });
            };
            let value: u64 = number.parse().map_err(|_| err("number too large"))?;
            total_ms = value
                .checked_mul(unit_ms)
                .and_then(|ms| total_ms.checked_add(ms))
                .ok_or_else(|| err("too large"))?;
            rest = after_unit;
        }
        Ok(Duration(std::time::Duration::from_millis(total_ms)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (name, unit_ms) in UNITS {
            let unit_ms = u128::from(unit_ms);
            let count = ms / unit_ms;
            if count > 0 {
                write!(f, "{count}{name}")?;
                ms -= count * unit_ms;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "format": "duration",
            "pattern": "^(0|([0-9]+(h|m|s|ms))+)$",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_canonically() {
        for (text, secs_ms, canonical) in [
            ("24h", 86_400_000, "24h"),
            ("90m", 5_400_000, "1h30m"),
            ("1h30m", 5_400_000, "1h30m"),
            ("30s", 30_000, "30s"),
            ("500ms", 500, "500ms"),
            ("1m1s1ms", 61_001, "1m1s1ms"),
            ("0", 0, "0s"),
            ("0s", 0, "0s"),
        ] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.as_std().as_millis(), secs_ms, "{text}");
            assert_eq!(d.to_string(), canonical, "{text}");
            assert_eq!(canonical.parse::<Duration>().unwrap(), d);
        }
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "24",
            "h",
            "1d",
            "1.5h",
            "-1h",
            " 1h",
            "1h ",
            "99999999999999999999h",
            "5124095576030432h",
        ] {
            assert!(
                bad.parse::<Duration>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
