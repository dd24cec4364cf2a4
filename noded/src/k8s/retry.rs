//! Retry policy for the publisher: capped exponential backoff with jitter, and which API errors are
//! worth retrying. Every failure path of the publisher ends in a backoff sleep, so an API server that is
//! down, overloaded or rejecting us never turns into a busy loop.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with "equal jitter": the delay is drawn from `[d/2, d]` where `d` doubles
/// per attempt up to `cap`. Half the delay stays deterministic so a retry never fires immediately;
/// the random half spreads a fleet of nodes that lost the API server at the same moment.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base: base.max(Duration::from_millis(1)),
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; grows until `cap`.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let extra = if jitter_ms == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter_ms)
        };
        half + Duration::from_millis(extra)
    }

    /// Back to the first delay after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// What to do about a failed API call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 409, or 422 from a failed JSON-patch `test` guard: someone else changed the object; re-read it
    /// and compute the patch again.
    Conflict,
    /// Connection refused/reset, timeouts, 429, 5xx: the same request may succeed later.
    Transient,
    /// 401/403/404/400...: retrying the same request does not help until an operator acts (RBAC,
    /// wrong node name). The publisher still retries with the capped backoff so it heals on its own once
    /// the cause is fixed, but logs at error level.
    Permanent,
}

pub fn classify(err: &kube::Error) -> ErrorClass {
    match err {
        kube::Error::Api(status) => classify_status(status.code, &status.message),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => {
            ErrorClass::Transient
        }
        _ => ErrorClass::Permanent,
    }
}

/// The API server answers a failed `test` op with 422 and a message naming the test; any other 422 is a
/// real validation error.
pub fn classify_status(code: u16, message: &str) -> ErrorClass {
    match code {
        409 => ErrorClass::Conflict,
        422 if message.contains("test") => ErrorClass::Conflict,
        429 | 500..=599 => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_never_zero() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut last_floor = Duration::ZERO;
        for attempt in 0..12u32 {
            let d = b.next_delay();
            let ceiling =
                (Duration::from_millis(100) * 2u32.pow(attempt.min(5))).min(Duration::from_secs(2));
            assert!(
                d >= ceiling / 2,
                "attempt {attempt}: {d:?} below half of {ceiling:?}"
            );
            assert!(d <= ceiling, "attempt {attempt}: {d:?} above {ceiling:?}");
            assert!(ceiling / 2 >= last_floor);
            last_floor = ceiling / 2;
        }
        assert_eq!(b.attempts(), 12);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn status_classes() {
        assert_eq!(
            classify_status(409, "Operation cannot be fulfilled"),
            ErrorClass::Conflict
        );
        assert_eq!(
            classify_status(422, "testing value /spec/taints failed: test failed"),
            ErrorClass::Conflict
        );
        assert_eq!(
            classify_status(422, "spec.taints: Invalid value"),
            ErrorClass::Permanent
        );
        assert_eq!(classify_status(429, ""), ErrorClass::Transient);
        assert_eq!(classify_status(503, ""), ErrorClass::Transient);
        assert_eq!(classify_status(403, "forbidden"), ErrorClass::Permanent);
        assert_eq!(classify_status(404, "not found"), ErrorClass::Permanent);
    }
}
