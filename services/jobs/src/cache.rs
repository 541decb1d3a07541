//! The encoded outputs of recently verified shards, so that a follower reading a running
//! job's shards as they are verified is answered from memory, not from the object store.
//! Bounded by bytes, oldest out first. Plain: no I/O.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

pub struct OutputCache {
    max_bytes: usize,
    bytes: usize,
    entries: HashMap<String, Bytes>,
    /// Names in insertion order (a name inserted again appears twice; its first is skipped).
    order: VecDeque<String>,
}

impl OutputCache {
    pub fn new(max_bytes: usize) -> OutputCache {
        OutputCache { max_bytes, bytes: 0, entries: HashMap::new(), order: VecDeque::new() }
    }

    pub fn get(&self, name: &str) -> Option<Bytes> {
        self.entries.get(name).cloned()
    }

    /// Keeps `value` under `name` (unless it alone is over the bound), evicting the oldest
    /// until the bound holds.
    pub fn insert(&mut self, name: String, value: Bytes) {
        if value.len() > self.max_bytes {
            return;
        }
        if let Some(old) = self.entries.insert(name.clone(), value.clone()) {
            self.bytes -= old.len();
        }
        self.bytes += value.len();
        self.order.push_back(name);
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else { break };
            // A name inserted again is evicted at its newest place, not its first.
            if self.order.contains(&oldest) {
                continue;
            }
            if let Some(gone) = self.entries.remove(&oldest) {
                self.bytes -= gone.len();
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_go_first_and_the_bound_holds() {
        let mut cache = OutputCache::new(10);
        for (name, len) in [("a", 4), ("b", 4), ("c", 4)] {
            cache.insert(name.into(), Bytes::from(vec![0; len]));
        }
        assert!(cache.get("a").is_none() && cache.get("b").is_some() && cache.get("c").is_some());
        assert_eq!(cache.bytes(), 8);
        cache.insert("b".into(), Bytes::from(vec![1; 2]));
        cache.insert("d".into(), Bytes::from(vec![0; 6]));
        assert!(cache.get("c").is_none(), "c is older than b's second insert");
        assert_eq!(cache.get("b").unwrap().as_ref(), &[1, 1]);
        assert_eq!(cache.bytes(), 8);
        cache.insert("huge".into(), Bytes::from(vec![0; 11]));
        assert!(cache.get("huge").is_none() && cache.bytes() == 8);
    }
}
