//! Waiting in tests: on an event where the system announces one (a message, a result, a
//! line a process prints), and otherwise with [`until`], the one place a test polls.
//!
//! Polling is for state that lives in another process and announces no change: a key in
//! Redis, a consumer's pending count, a child's exit, a port that opens. Every wait has a
//! deadline and, when it passes, fails the test saying what it waited for and what it
//! saw last.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

/// Asks `probe` until it answers `Ok(value)`, and returns that value; `Err(seen)` says
/// what it found instead. Panics after `within` with `what` and the last `seen`.
///
/// The probe is asked at once, then after 5 ms, doubling to at most 100 ms: quick for
/// state that is nearly there, light on a server that is busy.
pub async fn until<T, S, F, Fut>(what: impl std::fmt::Display, within: Duration, mut probe: F) -> T
where
    S: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, S>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(5);
    loop {
        let seen = match tokio::time::timeout_at(deadline, probe()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(seen)) => format!("{seen:?}"),
            Err(_) => "a probe still unanswered".to_string(),
        };
        if tokio::time::Instant::now() + pause > deadline {
            panic!("waited {within:?} for {what}; last seen: {seen}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// As [`until`] for a probe that only says yes or no.
pub async fn until_true<F, Fut>(what: impl std::fmt::Display, within: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until(what, within, || {
        let answer = probe();
        async move { if answer.await { Ok(()) } else { Err("no") } }
    })
    .await
}

/// The next item of `stream` that `pick` maps to `Some`, within `within`; panics with
/// `what` when the stream ends or the deadline passes first. For events: messages,
/// results, lines.
pub async fn next_matching<I, T>(
    what: impl std::fmt::Display,
    within: Duration,
    stream: &mut (impl futures::Stream<Item = I> + Unpin),
    mut pick: impl FnMut(I) -> Option<T>,
) -> T {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(item)) => {
                if let Some(found) = pick(item) {
                    return found;
                }
            }
            Ok(None) => panic!("the stream ended before {what}"),
            Err(_) => panic!("waited {within:?} for {what}"),
        }
    }
}
