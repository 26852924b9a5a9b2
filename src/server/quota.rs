//! Per-key-store request quotas (spec: "An XKS proxy MAY implement independent request
//! quotas on each path prefix and respond with a ThrottlingException").
//!
//! A token bucket: `rate` tokens a second up to `burst`; a request takes one or is
//! refused. One short critical section per request (two floats and an instant) under
//! a parking_lot mutex; at KMS's 1800 TPS per key store it never contends measurably.

use std::time::Instant;

use parking_lot::Mutex;

/// A token bucket.
#[derive(Debug)]
pub struct Quota {
    rate: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Quota {
    /// `rate` requests a second on average, `burst` at once; starts full.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// Takes a token at `now` if there is one.
    pub fn try_acquire_at(&self, now: Instant) -> bool {
        let mut bucket = self.state.lock();
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = bucket.at.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes a token now if there is one.
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_rate() {
        let quota = Quota::new(10.0, 3.0);
        let t0 = Instant::now();
        let taken = (0..5).filter(|_| quota.try_acquire_at(t0)).count();
        assert_eq!(taken, 3, "the burst is three");
        // 10 per second: one token per 100 ms.
        assert!(!quota.try_acquire_at(t0 + Duration::from_millis(50)));
        assert!(quota.try_acquire_at(t0 + Duration::from_millis(110)));
        assert!(!quota.try_acquire_at(t0 + Duration::from_millis(120)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        let taken = (0..10).filter(|_| quota.try_acquire_at(later)).count();
        assert_eq!(taken, 3);
    }
}
