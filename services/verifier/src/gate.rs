//! A counting gate with two classes of waiters: when a slot frees, a waiting `Urgent`
//! caller gets it before any `Optional` one. The `Optional` queue is bounded; a caller that
//! finds it full is refused at once rather than queued behind work it would delay.
//!
//! The verifier's reference runs go through one: a split vote cannot be accepted without
//! its run, an audit or a shortfall check can be skipped under load.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// How much a caller needs its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Urgent,
    Optional,
}

#[derive(Debug)]
struct State {
    free: usize,
    urgent: VecDeque<oneshot::Sender<()>>,
    optional: VecDeque<oneshot::Sender<()>>,
    max_optional: usize,
}

/// The gate; clones share it.
#[derive(Clone, Debug)]
pub struct Gate {
    state: Arc<Mutex<State>>,
}

/// A held slot; dropping it passes the slot on.
#[derive(Debug)]
pub struct Slot {
    gate: Gate,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.release();
    }
}

impl Gate {
    /// `slots` at once; at most `max_optional` optional callers waiting.
    pub fn new(slots: usize, max_optional: usize) -> Gate {
        let state = State { free: slots, urgent: VecDeque::new(), optional: VecDeque::new(), max_optional };
        Gate { state: Arc::new(Mutex::new(state)) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a slot; `None` for an optional caller when too many wait already.
    pub async fn acquire(&self, class: Class) -> Option<Slot> {
        let granted = {
            let mut s = self.lock();
            if s.free > 0 {
                s.free -= 1;
                return Some(Slot { gate: self.clone() });
            }
            let (tx, rx) = oneshot::channel();
            match class {
                Class::Urgent => s.urgent.push_back(tx),
                Class::Optional if s.optional.len() < s.max_optional => s.optional.push_back(tx),
                Class::Optional => return None,
            }
            rx
        };
        // The releaser hands its slot over by sending; a closed gate cannot happen (the
        // sender is dropped only once it has sent or the slot went to someone else).
        granted.await.ok().map(|()| Slot { gate: self.clone() })
    }

    /// Passes a freed slot to the first waiter still waiting, urgent ones first.
    fn release(&self) {
        let mut s = self.lock();
        while let Some(next) = s.urgent.pop_front().or_else(|| s.optional.pop_front()) {
            if next.send(()).is_ok() {
                return;
            }
        }
        s.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn urgent_waiters_go_first_and_optional_ones_are_bounded() {
        let gate = Gate::new(1, 2);
        let held = gate.acquire(Class::Optional).await.expect("a free slot");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for (name, class) in [("o1", Class::Optional), ("o2", Class::Optional), ("u1", Class::Urgent)] {
            let (gate, order) = (gate.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let slot = gate.acquire(class).await;
                order.lock().unwrap().push(name);
                drop(slot);
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Two optional callers wait already: a third is refused at once.
        assert!(gate.acquire(Class::Optional).await.is_none());
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec!["u1", "o1", "o2"]);
        // Every slot came back.
        let again = gate.acquire(Class::Optional).await;
        assert!(again.is_some());
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_does_not_lose_the_slot() {
        let gate = Gate::new(1, 4);
        let held = gate.acquire(Class::Urgent).await.unwrap();
        let gone = tokio::time::timeout(Duration::from_millis(20), gate.acquire(Class::Urgent)).await;
        assert!(gone.is_err(), "no slot while one is held");
        drop(held);
        let next = tokio::time::timeout(Duration::from_secs(1), gate.acquire(Class::Urgent)).await;
        assert!(next.unwrap().is_some(), "the slot passed over the caller that left");
    }
}
