//! Requests waiting for their task's result. The gateway subscribes to every result as it
//! is published (core NATS on `sundara.result.>`, no consumer to hold) and hands each to
//! the request waiting for its task, if any; a request registers before it submits, so
//! no result can arrive unclaimed. What a core subscription can miss (a reconnect) the
//! waiting request reads back from RESULTS itself ([`Waiters::wait`]'s re-checks).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sundara_schemas::ClientResult;
use tokio::sync::oneshot;

/// Task id → the request waiting for it (with its registration's number).
#[derive(Clone, Default)]
pub struct Waiters {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Default)]
struct Registry {
    next: u64,
    waiting: HashMap<String, (u64, oneshot::Sender<ClientResult>)>,
}

/// A registered wait; dropping it (the request answered or abandoned) unregisters it.
pub struct Waiting {
    waiters: Waiters,
    task_id: String,
    number: u64,
    rx: oneshot::Receiver<ClientResult>,
}

impl Waiters {
    /// Registers a wait for `task_id` (a second wait for the same task replaces the first:
    /// an idempotent retry of one request).
    pub fn register(&self, task_id: &str) -> Waiting {
        let (tx, rx) = oneshot::channel();
        let mut registry = self.inner.lock().unwrap();
        registry.next += 1;
        let number = registry.next;
        registry.waiting.insert(task_id.to_string(), (number, tx));
        Waiting { waiters: self.clone(), task_id: task_id.to_string(), number, rx }
    }

    /// Hands `result` to its waiting request; `false` when none waits.
    pub fn deliver(&self, result: ClientResult) -> bool {
        let waiting = self.inner.lock().unwrap().waiting.remove(&result.task_id);
        waiting.is_some_and(|(_, tx)| tx.send(result).is_ok())
    }

    /// Whether a request waits for `task_id`.
    pub fn waits_for(&self, task_id: &str) -> bool {
        self.inner.lock().unwrap().waiting.contains_key(task_id)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().waiting.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Waiting {
    /// The result, or `None` when `within` passes first. Every `recheck` without it,
    /// `read_back` is asked (the result may have been stored while the subscription was
    /// down).
    pub async fn wait<F, Fut>(mut self, within: Duration, recheck: Duration, read_back: F) -> Option<ClientResult>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Option<ClientResult>>,
    {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let next_check = (tokio::time::Instant::now() + recheck).min(deadline);
            match tokio::time::timeout_at(next_check, &mut self.rx).await {
                Ok(Ok(result)) => return Some(result),
                Ok(Err(_)) => return None,
                Err(_) if tokio::time::Instant::now() >= deadline => return None,
                Err(_) => {
                    if let Some(result) = read_back().await {
                        return Some(result);
                    }
                }
            }
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut registry = self.waiters.inner.lock().unwrap();
        // Only this wait's entry: a retry may have replaced it.
        if registry.waiting.get(&self.task_id).is_some_and(|(number, _)| *number == self.number) {
            registry.waiting.remove(&self.task_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundara_schemas::{FailureCode, ModelRef, ResultStatus, WIRE_VERSION};

    fn result(task_id: &str) -> ClientResult {
        ClientResult {
            v: WIRE_VERSION,
            task_id: task_id.into(),
            model: ModelRef { name: "mlp".into(), version: "1".into() },
            status: ResultStatus::Failed { code: FailureCode::Expired, reason: String::new() },
            completed_at_ms: 0,
            timing: None,
        }
    }

    #[tokio::test]
    async fn a_result_reaches_its_waiter_and_an_abandoned_wait_leaves_nothing() {
        let waiters = Waiters::default();
        let waiting = waiters.register("t1");
        assert!(!waiters.deliver(result("t2")), "nobody waits for t2");
        assert!(waiters.deliver(result("t1")));
        let none = || async { None };
        let got = waiting.wait(Duration::from_secs(1), Duration::from_secs(1), none).await;
        assert_eq!(got.unwrap().task_id, "t1");
        assert!(waiters.is_empty());

        drop(waiters.register("t3"));
        assert!(waiters.is_empty(), "a dropped wait unregisters");
    }

    #[tokio::test(start_paused = true)]
    async fn a_missed_result_is_read_back_and_a_wait_ends_at_its_deadline() {
        let waiters = Waiters::default();
        let read_back = || async { Some(result("t1")) };
        let got = waiters.register("t1").wait(Duration::from_secs(10), Duration::from_secs(2), read_back).await;
        assert_eq!(got.unwrap().task_id, "t1");
        let never = || async { None };
        let started = tokio::time::Instant::now();
        assert!(waiters.register("t2").wait(Duration::from_secs(5), Duration::from_secs(2), never).await.is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
