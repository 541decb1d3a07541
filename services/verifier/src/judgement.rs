//! When the verifier runs a task on its own reference instead of trusting the vote. Pure
//! logic, tested without NATS.
//!
//! A vote only tells the validator that the majority agreed, and a cartel that holds the
//! majority of a task's replicas agrees on whatever it likes. So the vote alone is final
//! only when it is unanimous: every replica answered and all answers agree. A task whose
//! answers disagree is always judged by the reference ([`Why::Split`]); a lie then passes
//! only when every replica of the task is a liar (and the sampled audit did not pick it).
//!
//! Failures and abandoned replicas leave a task short of a unanimous vote too (an honest
//! replica that failed leaves only the others to agree), so they are judged as well
//! ([`Why::Shortfall`]), but a miner must not be able to make the validator run tasks by
//! failing on purpose: each worker has a small budget of such runs ([`ShortfallBudget`]).
//! Beyond it the vote of the others stands, and the failure still costs the miner its
//! score for the task.

use std::collections::HashMap;
use std::time::Instant;

use sundara_schemas::Standing;

use crate::quorum::Decision;

/// Why the verifier runs a task itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A sampled audit of a unanimous vote.
    Audit,
    /// The miners' answers disagree (or no group holds a majority): never accepted on the
    /// vote alone, so without a reference run the task is dead-lettered.
    Split,
    /// Every answer agrees, but some replicas failed or are missing.
    Shortfall,
}

/// How far short of unanimous a vote is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unanimity {
    /// Every one of the k replicas answered, and all agree.
    Unanimous,
    /// Answers disagree, or no majority.
    Split,
    /// The answers agree; these workers failed or abandoned their replicas (and `absent`
    /// replicas never reported at all).
    Shortfall { workers: Vec<String>, absent: usize },
}

/// Classifies a vote of `k` replicas; `workers[i]` answered `voted.standings[i]`.
pub fn unanimity(k: u8, voted: &Decision, workers: &[&str]) -> Unanimity {
    if voted.winner.is_none() || voted.standings.contains(&Standing::Disagreed) {
        return Unanimity::Split;
    }
    let workers: Vec<String> = voted
        .standings
        .iter()
        .zip(workers)
        .filter(|(s, _)| matches!(s, Standing::Failed | Standing::Missing))
        .map(|(_, w)| w.to_string())
        .collect();
    let absent = (k as usize).saturating_sub(voted.standings.len());
    if workers.is_empty() && absent == 0 { Unanimity::Unanimous } else { Unanimity::Shortfall { workers, absent } }
}

/// Reference runs that each worker's failures may cause: a token bucket per worker of
/// `burst` runs, refilled at `per_minute`. Bounded in memory: past `max_workers` entries
/// the full buckets (workers that caused nothing lately) are forgotten.
pub struct ShortfallBudget {
    buckets: HashMap<String, (f64, Instant)>,
    burst: f64,
    per_minute: f64,
    max_workers: usize,
}

impl ShortfallBudget {
    pub fn new(burst: u32, per_minute: u32) -> ShortfallBudget {
        ShortfallBudget {
            buckets: HashMap::new(),
            burst: f64::from(burst),
            per_minute: f64::from(per_minute),
            max_workers: 100_000,
        }
    }

    /// Whether a shortfall caused by `workers` (with `absent` replicas nobody answered for)
    /// is judged by the reference. Replicas the validator side lost are always judged;
    /// otherwise every worker that still has budget is charged one run, and the task is
    /// judged if any had budget.
    pub fn take(&mut self, workers: &[String], absent: usize, now: Instant) -> bool {
        if self.buckets.len() > self.max_workers {
            let burst = self.burst;
            let rate = self.per_minute / 60.0;
            self.buckets.retain(|_, (tokens, at)| *tokens + rate * now.duration_since(*at).as_secs_f64() < burst);
        }
        let mut judged = absent > 0;
        for w in workers {
            let (tokens, at) = self.buckets.entry(w.clone()).or_insert((self.burst, now));
            *tokens = (*tokens + self.per_minute / 60.0 * now.duration_since(*at).as_secs_f64()).min(self.burst);
            *at = now;
            if *tokens >= 1.0 {
                *tokens -= 1.0;
                judged = true;
            }
        }
        judged
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use Standing::*;

    fn decision(winner: Option<usize>, standings: &[Standing]) -> Decision {
        Decision { winner, standings: standings.to_vec(), group_sizes: vec![] }
    }

    #[test]
    fn only_a_full_agreeing_vote_is_unanimous() {
        let w = ["a", "b", "c"];
        assert_eq!(unanimity(3, &decision(Some(0), &[Agreed, Agreed, Agreed]), &w), Unanimity::Unanimous);
        // A colluding majority over one honest miner: judged, whatever the vote says.
        assert_eq!(unanimity(3, &decision(Some(0), &[Agreed, Disagreed, Agreed]), &w), Unanimity::Split);
        assert_eq!(unanimity(2, &decision(None, &[Disagreed, Disagreed]), &w), Unanimity::Split);
        assert_eq!(
            unanimity(3, &decision(Some(0), &[Agreed, Failed, Agreed]), &w),
            Unanimity::Shortfall { workers: vec!["b".into()], absent: 0 }
        );
        assert_eq!(
            unanimity(3, &decision(Some(0), &[Agreed, Agreed]), &w),
            Unanimity::Shortfall { workers: vec![], absent: 1 }
        );
    }

    #[test]
    fn failing_on_purpose_buys_a_bounded_number_of_reference_runs() {
        let mut budget = ShortfallBudget::new(3, 6);
        let t0 = Instant::now();
        let failer = vec!["x".to_string()];
        let judged = (0..100).filter(|_| budget.take(&failer, 0, t0)).count();
        assert_eq!(judged, 3, "the burst, then nothing");
        // Another worker's budget is its own.
        assert!(budget.take(&["y".to_string()], 0, t0));
        // Refilled at 6 a minute: one more after 10 s.
        let later = t0 + Duration::from_secs(10);
        assert!(budget.take(&failer, 0, later));
        assert!(!budget.take(&failer, 0, later));
        // Replicas the validator lost are always judged.
        assert!(budget.take(&failer, 1, later));
    }
}
