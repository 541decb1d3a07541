//! Which models a slice keeps loaded within its memory budget, and which to evict when a
//! new one needs room. Plain logic, no I/O: the slice executor owns one and tells it what
//! it loaded, used and dropped.

use std::collections::HashMap;

/// A model loaded on the slice.
#[derive(Clone, Debug, PartialEq)]
pub struct Resident {
    /// Sessions of it (a slice may run one model on several threads at once).
    pub copies: u32,
    /// Measured bytes of one session, after its warm-up.
    pub bytes_per_copy: u64,
    /// How long loading and warming one session took, in µs: what evicting it costs later.
    pub load_us: u64,
    /// When a task of it last started, in µs on any monotonic clock the caller keeps.
    pub last_used_us: u64,
}

/// What making room for a new session takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Room {
    /// It fits in free memory.
    Fits,
    /// It fits once these models are evicted (least valuable first).
    Evict(Vec<String>),
    /// Not now: the memory is held by models with work queued or running.
    Busy,
    /// Never: more than the whole budget.
    Never { need: u64, budget: u64 },
}

#[derive(Clone, Debug)]
pub struct Residency {
    budget: u64,
    models: HashMap<String, Resident>,
}

impl Residency {
    pub fn new(budget: u64) -> Residency {
        Residency { budget, models: HashMap::new() }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn used(&self) -> u64 {
        self.models.values().map(|r| r.bytes_per_copy * r.copies as u64).sum()
    }

    pub fn free(&self) -> u64 {
        self.budget.saturating_sub(self.used())
    }

    pub fn get(&self, model: &str) -> Option<&Resident> {
        self.models.get(model)
    }

    /// Loaded models and the bytes each holds, sorted by name.
    pub fn loaded(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> =
            self.models.iter().map(|(m, r)| (m.clone(), r.bytes_per_copy * r.copies as u64)).collect();
        v.sort();
        v
    }

    /// What to evict so that `need` more bytes fit. `pinned(model)` says which models have
    /// work queued or running: those are never evicted. The least valuable go first, where
    /// value is recency with the reload cost added (a model that takes 2 s to load counts
    /// as used 2 s more recently than it was), so cheap, long-idle models leave first.
    /// Then every victim that the others free enough without is kept, most valuable first:
    /// small models taken on the way to a large one would be reloads for nothing.
    pub fn make_room(&self, need: u64, pinned: impl Fn(&str) -> bool) -> Room {
        if need > self.budget {
            return Room::Never { need, budget: self.budget };
        }
        let mut free = self.free();
        if need <= free {
            return Room::Fits;
        }
        let mut idle: Vec<(&String, &Resident)> = self.models.iter().filter(|(m, _)| !pinned(m)).collect();
        idle.sort_by_key(|(m, r)| (r.last_used_us + r.load_us, m.as_str()));
        let mut victims = Vec::new();
        for (m, r) in idle {
            victims.push((m, r.bytes_per_copy * r.copies as u64));
            free += r.bytes_per_copy * r.copies as u64;
            if need <= free {
                let mut keep = vec![false; victims.len()];
                for (i, (_, bytes)) in victims.iter().enumerate().rev() {
                    if free - bytes >= need {
                        free -= bytes;
                        keep[i] = true;
                    }
                }
                let evict = victims.iter().zip(keep).filter(|(_, k)| !k).map(|((m, _), _)| (*m).clone());
                return Room::Evict(evict.collect());
            }
        }
        Room::Busy
    }

    /// One more session of `model` is loaded.
    pub fn add_copy(&mut self, model: &str, bytes: u64, load_us: u64, now_us: u64) {
        let r = self.models.entry(model.to_string()).or_insert(Resident {
            copies: 0,
            bytes_per_copy: bytes,
            load_us,
            last_used_us: now_us,
        });
        r.copies += 1;
        r.bytes_per_copy = r.bytes_per_copy.max(bytes);
        r.load_us = r.load_us.max(load_us);
    }

    /// Every session of `model` is gone; returns how many there were.
    pub fn remove(&mut self, model: &str) -> u32 {
        self.models.remove(model).map_or(0, |r| r.copies)
    }

    pub fn touch(&mut self, model: &str, now_us: u64) {
        if let Some(r) = self.models.get_mut(model) {
            r.last_used_us = r.last_used_us.max(now_us);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice() -> Residency {
        let mut r = Residency::new(100);
        r.add_copy("a", 30, 1_000, 10_000); // old, cheap to reload
        r.add_copy("b", 30, 1_000, 50_000); // recent
        r.add_copy("c", 30, 1_000_000, 5_000); // oldest, but takes 1 s to reload
        r
    }

    #[test]
    fn fits_in_free_memory_without_evicting() {
        let r = slice();
        assert_eq!(r.used(), 90);
        assert_eq!(r.make_room(10, |_| false), Room::Fits);
    }

    #[test]
    fn evicts_the_least_valuable_first() {
        let r = slice();
        // c is the oldest, but its reload cost keeps it: a goes first, then b.
        assert_eq!(r.make_room(40, |_| false), Room::Evict(vec!["a".into()]));
        assert_eq!(r.make_room(70, |_| false), Room::Evict(vec!["a".into(), "b".into()]));
    }

    #[test]
    fn evicts_only_what_the_room_needs() {
        let mut r = Residency::new(200);
        r.add_copy("small", 10, 1_000, 1_000); // least valuable
        r.add_copy("tiny", 2, 1_000, 2_000);
        r.add_copy("large", 170, 400_000, 3_000);
        // 18 free: the two small ones alone would free 30, not 40, so the large one must
        // go, and then it alone frees enough: the small ones stay.
        assert_eq!(r.make_room(40, |_| false), Room::Evict(vec!["large".into()]));
        assert_eq!(r.make_room(25, |_| false), Room::Evict(vec!["small".into()]));
    }

    #[test]
    fn never_evicts_a_model_with_work() {
        let r = slice();
        assert_eq!(r.make_room(40, |m| m == "a"), Room::Evict(vec!["b".into()]));
        assert_eq!(r.make_room(40, |_| true), Room::Busy);
    }

    #[test]
    fn a_model_over_the_whole_budget_never_fits() {
        assert_eq!(slice().make_room(101, |_| false), Room::Never { need: 101, budget: 100 });
    }

    #[test]
    fn copies_count_and_removal_frees_them_all() {
        let mut r = slice();
        r.add_copy("a", 30, 1_000, 60_000);
        assert_eq!(r.used(), 120);
        assert_eq!(r.free(), 0);
        assert_eq!(r.loaded()[0], ("a".to_string(), 60));
        assert_eq!(r.remove("a"), 2);
        assert_eq!(r.used(), 60);
        r.touch("b", 1);
        assert_eq!(r.get("b").unwrap().last_used_us, 50_000, "touch never moves time back");
    }
}
