//! When to try a Dataverse request again, and how long to wait first.

use std::time::{Duration, Instant};

/// Bounds for retrying one request: a number of attempts and a deadline (usually the
/// Lambda's remaining time less a safety margin), whichever comes first.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with full jitter for the given (1-based) failed attempt:
    /// a uniform wait in `[0, min(max_delay, base * 2^(attempt-1))]`, so many
    /// containers failing at once spread their retries.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(20);
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        ceiling.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// How long to wait before the next attempt, or `None` when the policy is spent
    /// or the wait would run past the deadline. A server's `Retry-After` is a floor:
    /// the next request is never sent before it elapses.
    pub fn next_wait(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        now: Instant,
        deadline: Instant,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let wait = match retry_after {
            // A little jitter on top keeps retried callers from arriving in lockstep.
            Some(floor) => floor.saturating_add(self.backoff(1, fastrand::f64()) / 4),
            None => self.backoff(attempt, fastrand::f64()),
        };
        // Any Retry-After, however large, only means "not before the deadline".
        now.checked_add(wait)
            .is_some_and(|at| at < deadline)
            .then_some(wait)
    }
}

/// Parses `Retry-After` in its delay-seconds form, the one Dataverse sends.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds >= 0.0).then(|| Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_after_of_any_size_saturates_instead_of_panicking() {
        let policy = RetryPolicy::default();
        let now = Instant::now();
        for value in [
            "1e300",
            "inf",
            "18446744073709551616",
            "99999999999999999999",
        ] {
            let wait = parse_retry_after(value);
            assert_eq!(wait, Some(Duration::MAX), "{value}");
            assert_eq!(
                policy.next_wait(1, wait, now, now + Duration::from_secs(30)),
                None
            );
        }
        assert_eq!(parse_retry_after("NaN"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.backoff(1, 1.0), Duration::from_millis(200));
        assert_eq!(policy.backoff(2, 1.0), Duration::from_millis(400));
        assert_eq!(policy.backoff(4, 1.0), Duration::from_millis(1600));
        assert_eq!(policy.backoff(30, 1.0), Duration::from_secs(10));
        assert_eq!(policy.backoff(3, 0.0), Duration::ZERO);
        assert_eq!(policy.backoff(3, 0.5), Duration::from_millis(400));
    }

    #[test]
    fn retry_after_is_a_floor_and_the_deadline_a_ceiling() {
        let policy = RetryPolicy::default();
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        for _ in 0..100 {
            let wait = policy
                .next_wait(1, Some(Duration::from_secs(2)), now, far)
                .unwrap();
            assert!(wait >= Duration::from_secs(2));
        }
        let near = now + Duration::from_secs(1);
        assert_eq!(
            policy.next_wait(1, Some(Duration::from_secs(2)), now, near),
            None
        );
        assert_eq!(policy.next_wait(policy.max_attempts, None, now, far), None);
    }

    #[test]
    fn retry_after_header_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
