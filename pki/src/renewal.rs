//! When an agent renews a certificate: somewhere between 50% and 80% of its
//! life (DESIGN), spread by jitter so that agents enrolled together do not
//! all come back at the same second.

/// The earliest point of a certificate's life at which it is renewed.
pub const RENEW_FROM: f64 = 0.5;
/// The latest point of a certificate's life at which it is renewed.
pub const RENEW_BY: f64 = 0.8;

/// When to renew a certificate valid from `not_before` to `not_after`
/// (seconds since the epoch): at `RENEW_FROM + jitter * (RENEW_BY -
/// RENEW_FROM)` of its life. `jitter` is supplied by the caller (random in
/// production, fixed in tests) and clamped to `[0, 1]`; NaN counts as 0, the
/// earliest. A certificate with no life left is renewed at `not_before`.
pub fn renewal_at(not_before: i64, not_after: i64, jitter: f64) -> i64 {
    if not_after <= not_before {
        return not_before;
    }
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let fraction = RENEW_FROM + jitter * (RENEW_BY - RENEW_FROM);
    let life = i128::from(not_after) - i128::from(not_before);
    // f64 holds the product exactly enough for any realistic life; `as`
    // saturates, and the result is kept inside the certificate's life.
    let offset = (life as f64 * fraction).floor() as i128;
    let at = i128::from(not_before) + offset.clamp(0, life);
    i64::try_from(at).unwrap_or(not_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 60 * 60;

    #[test]
    fn stays_between_half_and_four_fifths_of_life() {
        let nb = 1_700_000_000;
        let na = nb + DAY;
        assert_eq!(renewal_at(nb, na, 0.0), nb + DAY / 2);
        assert_eq!(renewal_at(nb, na, 1.0), nb + DAY * 8 / 10);
        assert_eq!(renewal_at(nb, na, 0.5), nb + DAY * 65 / 100);
        for i in 0..=1000 {
            let at = renewal_at(nb, na, f64::from(i) / 1000.0);
            assert!(at >= nb + DAY / 2 && at <= nb + DAY * 8 / 10, "{i}: {at}");
        }
        // Monotonic in jitter.
        assert!(renewal_at(nb, na, 0.3) < renewal_at(nb, na, 0.7));
    }

    #[test]
    fn clamps_jitter_and_survives_odd_inputs() {
        let nb = 1_000;
        let na = 2_000;
        assert_eq!(renewal_at(nb, na, -3.0), 1_500);
        assert_eq!(renewal_at(nb, na, 7.0), 1_800);
        assert_eq!(renewal_at(nb, na, f64::NAN), 1_500);
        assert_eq!(renewal_at(nb, na, f64::INFINITY), 1_800);
        assert_eq!(renewal_at(na, nb, 0.5), na);
        assert_eq!(renewal_at(nb, nb, 0.5), nb);
        let at = renewal_at(i64::MIN, i64::MAX, 1.0);
        assert!(at > 0 && at < i64::MAX, "{at}");
        // Short lives still renew strictly inside them.
        assert_eq!(renewal_at(0, 10, 0.0), 5);
        assert_eq!(renewal_at(0, 10, 1.0), 8);
    }
}
