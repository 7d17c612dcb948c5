//! Token buckets for the rate limits of SPEC §5 (off unless a workspace sets them).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::settings::RateLimit;

/// Buckets beyond this many are forgotten when full (an idle key's bucket is full anyway).
const MAX_BUCKETS: usize = 100_000;

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// Takes one token from `key`'s bucket, or says how long until one is there.
    pub fn check(&self, key: &str, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let burst = f64::from(limit.burst);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() * limit.per_second < burst
            });
        }
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * limit.per_second;
        b.tokens = (b.tokens + refill).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / limit.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_per_key() {
        let r = RateLimiter::default();
        let limit = RateLimit {
            per_second: 2.0,
            burst: 3,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(r.check("a", limit, t0).is_ok());
        }
        let wait = r.check("a", limit, t0).expect_err("over the burst");
        assert!(wait <= Duration::from_millis(500) && wait > Duration::ZERO);
        assert!(r.check("b", limit, t0).is_ok(), "keys are independent");
        assert!(r.check("a", limit, t0 + Duration::from_millis(500)).is_ok());
        assert!(r
            .check("a", limit, t0 + Duration::from_millis(500))
            .is_err());
    }
}
