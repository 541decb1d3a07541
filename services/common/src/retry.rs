//! Exponential back-off, written once for every retry loop in the workspace.
//!
//! A [`Backoff`] hands out delays that double from `initial` up to `max`; one bounded by a
//! deadline ([`Backoff::until`]) refuses a wait that would not end before it, so the loop
//! gives up instead of sleeping past it. [`retry`] runs an operation a bounded number of
//! times with those delays between the tries.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Delays that double from `initial` up to `max`, optionally bounded by a deadline.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
    deadline: Option<Instant>,
}

impl Backoff {
    /// Delays of `initial`, then twice that, and so on, never longer than `max`.
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { next: initial, max, deadline: None }
    }

    /// The same delays, but a wait that would not end before `deadline` is refused.
    pub fn until(self, deadline: Instant) -> Backoff {
        Backoff { deadline: Some(deadline), ..self }
    }

    /// The delay to wait now, whatever the deadline; the next one doubles (at most `max`).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(self.max);
        delay
    }

    /// The delay to wait now, if a wait begun at `now` ends before the deadline; `None`,
    /// leaving the delays as they were, if it would not.
    pub fn delay_before(&mut self, now: Instant) -> Option<Duration> {
        match self.deadline {
            Some(deadline) if now + self.next >= deadline => None,
            _ => Some(self.next_delay()),
        }
    }

    /// Sleeps the next delay and returns true, or returns false at once where that sleep
    /// would not end before the deadline.
    #[must_use = "false means the deadline is near: stop retrying"]
    pub async fn wait(&mut self) -> bool {
        match self.delay_before(Instant::now()) {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                true
            }
            None => false,
        }
    }
}

/// Runs `op` until it succeeds, at most `attempts` times (at least once), waiting out
/// `backoff`'s delays between the tries and logging each failure as `what`. Returns the
/// last error once the attempts are spent or the backoff's deadline is near.
pub async fn retry<T, E, F, Fut>(what: &str, attempts: u32, mut backoff: Backoff, mut op: F) -> Result<T, E>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= attempts => return Err(e),
            Err(e) => {
                tracing::warn!(attempt, error = %e, "{what} failed; retrying");
                if !backoff.wait().await {
                    return Err(e);
                }
            }
        }
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut b = Backoff::new(100 * MS, 2000 * MS);
        let delays: Vec<_> = (0..7).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 2000, 2000]);
        let mut b = Backoff::new(50 * MS, 2000 * MS);
        let delays: Vec<_> = (0..7).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1600, 2000]);
    }

    #[test]
    fn no_wait_ends_past_the_deadline() {
        let now = Instant::now();
        let mut b = Backoff::new(100 * MS, 2000 * MS).until(now + 350 * MS);
        assert_eq!(b.delay_before(now), Some(100 * MS));
        assert_eq!(b.delay_before(now + 100 * MS), Some(200 * MS));
        // 300 ms in, a 400 ms wait would end past the deadline: refused, and not consumed.
        assert_eq!(b.delay_before(now + 300 * MS), None);
        assert_eq!(b.next_delay(), 400 * MS);
        // A wait ending exactly at the deadline is refused too.
        let mut b = Backoff::new(100 * MS, 2000 * MS).until(now + 100 * MS);
        assert_eq!(b.delay_before(now), None);
    }

    #[test]
    fn without_a_deadline_every_wait_is_allowed() {
        let mut b = Backoff::new(MS, 4 * MS);
        let far = Instant::now() + Duration::from_secs(86_400);
        assert_eq!(b.delay_before(far), Some(MS));
        assert_eq!(b.delay_before(far), Some(2 * MS));
    }

    #[tokio::test]
    async fn retry_stops_after_its_attempts_or_at_success() {
        let mut calls = 0;
        let failing: Result<(), String> = retry("op", 3, Backoff::new(MS, MS), || {
            calls += 1;
            async { Err("no".to_string()) }
        })
        .await;
        assert_eq!((failing, calls), (Err("no".to_string()), 3));
        let mut calls = 0;
        let second = retry("op", 5, Backoff::new(MS, MS), || {
            calls += 1;
            let n = calls;
            async move { if n < 2 { Err("no") } else { Ok(n) } }
        })
        .await;
        assert_eq!(second, Ok(2));
    }

    #[tokio::test]
    async fn retry_gives_up_at_the_deadline() {
        let mut calls = 0;
        let backoff = Backoff::new(Duration::from_secs(60), Duration::from_secs(60)).until(Instant::now());
        let r: Result<(), &str> = retry("op", 10, backoff, || {
            calls += 1;
            async { Err("no") }
        })
        .await;
        assert_eq!((r, calls), (Err("no"), 1));
    }
}
