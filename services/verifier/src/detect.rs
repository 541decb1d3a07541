//! What each rejected outcome looked like, for the detection metrics. The verifier cannot
//! see how a miner cheated, only what its outputs show next to the accepted result; each
//! class of the cheater catalogue leaves one of these signatures (docs/verification.md).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use sundara_schemas::{OutcomeResult, Standing, Tensor};

/// Relative difference under which a wrong float output counts as a near miss (a
/// quantised copy or slightly perturbed weights) rather than unrelated values.
const NEAR_RTOL: f64 = 0.05;
const NEAR_ATOL: f64 = 1e-3;
/// Outputs remembered per model to recognise replays.
const RECENT_PER_MODEL: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Detection {
    /// The miner reported a failure.
    Failed,
    /// Answered after its assignment's deadline.
    Late,
    /// Output names, dtypes or shapes differ from the accepted result.
    WrongShape,
    /// Identical to outputs returned for another task of the model whose accepted result
    /// was different.
    Replayed,
    /// Identical to another rejected outcome of the same task: copied or colluding.
    Copied,
    /// Every output tensor holds one value repeated.
    Constant,
    /// Within 5 % of the accepted result, yet outside the model's rule.
    NearMiss,
    /// Anything else: random, rotated or another model's values.
    Far,
}

impl Detection {
    pub const ALL: [Detection; 8] = [
        Detection::Failed,
        Detection::Late,
        Detection::WrongShape,
        Detection::Replayed,
        Detection::Copied,
        Detection::Constant,
        Detection::NearMiss,
        Detection::Far,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Detection::Failed => "failed",
            Detection::Late => "late",
            Detection::WrongShape => "wrong_shape",
            Detection::Replayed => "replayed",
            Detection::Copied => "copied",
            Detection::Constant => "constant",
            Detection::NearMiss => "near_miss",
            Detection::Far => "far",
        }
    }
}

/// Digest of outputs (names, dtypes, shapes and bytes).
fn digest(outputs: &[Tensor]) -> u64 {
    let mut h = DefaultHasher::new();
    for t in outputs {
        (&t.name, t.dtype as u8, &t.shape, &t.data).hash(&mut h);
    }
    h.finish()
}

/// Digests of recently seen outputs per model, each with the digest of the accepted result
/// of the task that last returned it: bounded, least recently seen forgotten first.
#[derive(Default)]
pub struct Recent {
    per_model: HashMap<String, Seen>,
}

#[derive(Default)]
struct Seen {
    /// (digest, when) in the order seen; an entry is stale once its digest is seen again.
    order: VecDeque<(u64, u64)>,
    /// digest → (accepted result of the task that last returned it, when).
    last: HashMap<u64, (u64, u64)>,
    clock: u64,
}

impl Recent {
    /// Whether these outputs were returned before for a task whose right answer was
    /// different (a task with the same answer, or the same task again, is no replay).
    fn returned_for_another_answer(&self, model: &str, digest: u64, answer: u64) -> bool {
        self.per_model.get(model).and_then(|s| s.last.get(&digest)).is_some_and(|(a, _)| *a != answer)
    }

    fn remember(&mut self, model: &str, digest: u64, answer: u64) {
        let seen = self.per_model.entry(model.to_string()).or_default();
        seen.clock += 1;
        seen.last.insert(digest, (answer, seen.clock));
        seen.order.push_back((digest, seen.clock));
        // Stale entries behind a live front could pile up: the order is bounded too.
        while seen.last.len() > RECENT_PER_MODEL || seen.order.len() > 2 * RECENT_PER_MODEL {
            let Some((old, when)) = seen.order.pop_front() else { break };
            if seen.last.get(&old).is_some_and(|(_, w)| *w == when) {
                seen.last.remove(&old);
            }
        }
        // Stale entries of digests seen again are dropped as they reach the front.
        while seen.order.front().is_some_and(|(d, w)| seen.last.get(d).is_none_or(|(_, lw)| lw != w)) {
            seen.order.pop_front();
        }
    }
}

/// The signature of one wrong output list next to the accepted one.
pub fn classify(accepted: &[Tensor], rejected: &[Tensor]) -> Detection {
    let same_layout = accepted.len() == rejected.len()
        && accepted.iter().zip(rejected).all(|(a, r)| a.name == r.name && a.dtype == r.dtype && a.shape == r.shape);
    if !same_layout {
        return Detection::WrongShape;
    }
    let constant = |outputs: &[Tensor]| {
        outputs.iter().any(|t| t.to_f64().len() > 1)
            && outputs.iter().all(|t| t.to_f64().windows(2).all(|w| w[0] == w[1] || (w[0].is_nan() && w[1].is_nan())))
    };
    if constant(rejected) && !constant(accepted) {
        return Detection::Constant;
    }
    let near = accepted.iter().zip(rejected).all(|(a, r)| {
        let (a, r) = (a.to_f64(), r.to_f64());
        a.iter().zip(&r).all(|(&p, &q)| (p - q).abs() <= NEAR_ATOL + NEAR_RTOL * p.abs().max(q.abs()))
    });
    if near { Detection::NearMiss } else { Detection::Far }
}

/// One detection per rejected outcome of a decided task (`judged`: each outcome with its
/// standing, in verdict order), then remembers every output list of the task. Agreed and
/// missing replicas detect nothing; wrong outputs are classified only against an
/// accepted result.
pub fn rejections<'a>(
    recent: &mut Recent,
    model: &str,
    accepted: Option<&[Tensor]>,
    judged: impl IntoIterator<Item = (Standing, &'a OutcomeResult)>,
) -> Vec<Detection> {
    let judged: Vec<(Standing, &OutcomeResult)> = judged.into_iter().collect();
    let wrong = |(standing, result): &(Standing, &'a OutcomeResult)| match (standing, result) {
        (Standing::Disagreed, OutcomeResult::Ok { outputs }) => Some(digest(outputs)),
        _ => None,
    };
    let wrong_digests: Vec<u64> = judged.iter().filter_map(wrong).collect();
    let answer = accepted.map_or(0, digest);
    let detections = judged
        .iter()
        .filter_map(|j| match j {
            (Standing::Failed, _) => Some(Detection::Failed),
            (Standing::Late, _) => Some(Detection::Late),
            (Standing::Disagreed, OutcomeResult::Ok { outputs }) => {
                let accepted = accepted?;
                let d = digest(outputs);
                Some(if recent.returned_for_another_answer(model, d, answer) {
                    Detection::Replayed
                } else if wrong_digests.iter().filter(|&&w| w == d).count() > 1 {
                    Detection::Copied
                } else {
                    classify(accepted, outputs)
                })
            }
            _ => None,
        })
        .collect();
    for (_, result) in &judged {
        if let OutcomeResult::Ok { outputs } = result {
            recent.remember(model, digest(outputs), answer);
        }
    }
    detections
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32]) -> Vec<Tensor> {
        vec![Tensor::from_values("y", vec![1, values.len() as u64], values)]
    }

    fn ok(outputs: Vec<Tensor>) -> OutcomeResult {
        OutcomeResult::Ok { outputs }
    }

    #[test]
    fn each_signature_is_told_apart() {
        let truth = t(&[0.1, 0.7, 0.2]);
        assert_eq!(classify(&truth, &t(&[0.1004, 0.6972, 0.2008])), Detection::NearMiss);
        assert_eq!(classify(&truth, &t(&[0.7, 0.2, 0.1])), Detection::Far);
        assert_eq!(classify(&truth, &t(&[0.0, 0.0, 0.0])), Detection::Constant);
        assert_eq!(classify(&truth, &t(&[0.1, 0.7])), Detection::WrongShape);
        let renamed = vec![Tensor::from_values("z", vec![1, 3], &[0.1f32, 0.7, 0.2])];
        assert_eq!(classify(&truth, &renamed), Detection::WrongShape);
    }

    #[test]
    fn copies_replays_failures_and_late_answers() {
        let mut recent = Recent::default();
        let (a, b) = (t(&[0.1, 0.7, 0.2]), t(&[0.3, 0.3, 0.4]));
        // Task 1: `a` agreed; nothing rejected.
        let first = rejections(&mut recent, "m", Some(&a), [(Standing::Agreed, &ok(a.clone()))]);
        assert!(first.is_empty());
        // Task 2 (truth `b`): one miner replays task 1's outputs, two colluders agree on a
        // wrong answer, one fails, one answers late.
        let colluded = ok(t(&[0.9, 0.05, 0.05]));
        let failed = OutcomeResult::Failed { reason: "x".into() };
        let judged = [
            (Standing::Agreed, &ok(b.clone())),
            (Standing::Disagreed, &ok(a.clone())),
            (Standing::Disagreed, &colluded),
            (Standing::Disagreed, &colluded),
            (Standing::Failed, &failed),
            (Standing::Late, &ok(b.clone())),
            (Standing::Missing, &failed),
        ];
        let found = rejections(&mut recent, "m", Some(&b), judged);
        use Detection::*;
        assert_eq!(found, vec![Replayed, Copied, Copied, Failed, Late]);
        // The replayer goes on: its outputs were last seen in task 2 (answer `b`); task 4's
        // answer is `c`.
        let c = t(&[0.2, 0.2, 0.6]);
        let found = rejections(&mut recent, "m", Some(&c), [(Standing::Disagreed, &ok(a.clone()))]);
        assert_eq!(found, vec![Replayed]);
        // The same wrong outputs for a task with the same answer are consistently wrong,
        // not a replay (so is the same task decided again).
        assert_eq!(rejections(&mut recent, "m", Some(&c), [(Standing::Disagreed, &ok(a.clone()))]), vec![Far]);
        // Without an accepted result wrong outputs are not classified.
        assert!(rejections(&mut recent, "m", None, [(Standing::Disagreed, &ok(a))]).is_empty());
    }

    #[test]
    fn memory_is_bounded_and_keeps_what_is_seen_again() {
        let mut recent = Recent::default();
        recent.remember("m", 0, 0);
        for i in 1..(3 * RECENT_PER_MODEL as u64) {
            recent.remember("m", i, i);
            recent.remember("m", 0, i);
        }
        let seen = &recent.per_model["m"];
        assert!(seen.last.len() <= RECENT_PER_MODEL && seen.order.len() <= 2 * RECENT_PER_MODEL);
        // One output returned forever behind one never seen again: still bounded.
        let mut recent = Recent::default();
        recent.remember("m", 1, 1);
        for i in 0..(5 * RECENT_PER_MODEL as u64) {
            recent.remember("m", 0, i);
        }
        assert!(recent.per_model["m"].order.len() <= 2 * RECENT_PER_MODEL);
        assert!(recent.returned_for_another_answer("m", 0, u64::MAX), "a digest seen again stays");
        assert!(!recent.returned_for_another_answer("m", 1, u64::MAX), "the oldest are forgotten");
    }
}
