//! Local token buckets for the RateLimit policy: `n` per `interval`, with
//! bursts up to `n`, refilled continuously. Local to one agent: a service
//! with ten callers lets in up to ten times a client-side limit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket.
pub struct Bucket {
    capacity: f64,
    per_second: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// `n` tokens per `interval`, starting full.
    pub fn new(n: u32, interval: Duration) -> Self {
        let capacity = f64::from(n.max(1));
        let per_second = capacity / interval.as_secs_f64().max(0.001);
        Bucket {
            capacity,
            per_second,
            state: Mutex::new((capacity, Instant::now())),
        }
    }

    /// Takes a token if one is left; otherwise how long until one is.
    pub fn take(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *state;
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.per_second)
            .min(self.capacity);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refused_then_refilled() {
        let b = Bucket::new(3, Duration::from_millis(60));
        assert!(b.take().is_ok());
        assert!(b.take().is_ok());
        assert!(b.take().is_ok());
        let wait = b.take().unwrap_err();
        assert!(wait <= Duration::from_millis(21), "{wait:?}");
        // Put the clock forward instead of sleeping.
        b.state.lock().unwrap().1 -= Duration::from_millis(40);
        assert!(b.take().is_ok());
        assert!(b.take().is_ok());
        assert!(b.take().is_err());
    }
}
