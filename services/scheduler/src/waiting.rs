//! Tasks waiting for capacity, by model and priority. A task tries to reserve only while
//! no task of higher priority waits for the same model, and a freed slot wakes a waiter of
//! the highest priority that has any: under contention, higher priority goes first.
//! Tasks of other models are not held back (they compete for other slots, or for the
//! same slots only when those are free). The gauge `sundara_scheduler_waiting_tasks`
//! counts them by priority.

use std::collections::HashMap;
use std::sync::Mutex;

use sundara_schemas::Priority;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

fn rank(p: Priority) -> usize {
    Priority::ALL.iter().position(|q| *q == p).expect("every priority is listed")
}

#[derive(Default)]
pub struct Waiting {
    /// Waiters per model, by priority rank (0 = highest).
    counts: Mutex<HashMap<String, [usize; 3]>>,
    wake: [Notify; 3],
}

/// One waiting task; it stops counting when dropped.
pub struct Waiter<'a> {
    waiting: &'a Waiting,
    model: String,
    rank: usize,
}

fn gauge(rank: usize) -> metrics::Gauge {
    metrics::gauge!("sundara_scheduler_waiting_tasks", "priority" => Priority::ALL[rank].as_str())
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        gauge(self.rank).decrement(1.0);
        let mut counts = self.waiting.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = counts.get_mut(&self.model) {
            c[self.rank] -= 1;
            if c.iter().all(|n| *n == 0) {
                counts.remove(&self.model);
            }
        }
    }
}

impl Waiting {
    /// Counts a task as waiting for capacity of `model` until the returned guard drops.
    pub fn enter(&self, model: &str, priority: Priority) -> Waiter<'_> {
        let rank = rank(priority);
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).entry(model.to_string()).or_default()[rank] += 1;
        gauge(rank).increment(1.0);
        Waiter { waiting: self, model: model.to_string(), rank }
    }

    /// Whether a task of higher priority waits for the same model.
    pub fn outranked(&self, model: &str, priority: Priority) -> bool {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(model).is_some_and(|c| c[..rank(priority)].iter().any(|n| *n > 0))
    }

    /// Resolves when a freed slot is offered to this priority class. Enable it before
    /// trying to reserve, so a slot freed in between is not missed.
    pub fn freed(&self, priority: Priority) -> Notified<'_> {
        self.wake[rank(priority)].notified()
    }

    /// A slot was freed: wake one waiter of the highest priority that has waiters.
    pub fn wake_one(&self) {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let top = (0..3).find(|r| counts.values().any(|c| c[*r] > 0));
        drop(counts);
        self.wake[top.unwrap_or(rank(Priority::Normal))].notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_of_the_same_model_outranks() {
        let w = Waiting::default();
        let high = w.enter("a", Priority::High);
        assert!(w.outranked("a", Priority::Normal) && w.outranked("a", Priority::Low));
        assert!(!w.outranked("a", Priority::High), "equals do not outrank");
        assert!(!w.outranked("b", Priority::Low), "other models are not held back");
        drop(high);
        assert!(!w.outranked("a", Priority::Low));
        let _normal = w.enter("a", Priority::Normal);
        assert!(w.outranked("a", Priority::Low) && !w.outranked("a", Priority::Normal));
        assert!(w.counts.lock().unwrap().len() == 1);
    }

    #[tokio::test]
    async fn a_freed_slot_wakes_the_highest_class_waiting() {
        let w = Waiting::default();
        let _low = w.enter("a", Priority::Low);
        let _high = w.enter("b", Priority::High);
        let high_woken = w.freed(Priority::High);
        let low_woken = w.freed(Priority::Low);
        tokio::pin!(high_woken, low_woken);
        high_woken.as_mut().enable();
        low_woken.as_mut().enable();
        w.wake_one();
        let t = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(t, high_woken).await.is_ok());
        assert!(tokio::time::timeout(t, low_woken).await.is_err(), "only one waiter is woken");
    }
}
