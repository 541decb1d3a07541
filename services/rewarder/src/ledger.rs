//! The rewarder's scoring state and its pure rules, kept free of I/O so that the same
//! verdicts always give the same weights (a ledger can be rebuilt by replaying VERDICTS).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sundara_schemas::{
    EpochWeights, MinerVerdict, MinerWeight, RewardEntry, RewardTrace, Standing, Verdict, WIRE_VERSION,
};

/// What all weights of an epoch sum to (Bittensor's u16 weights).
pub const WEIGHT_TOTAL: u16 = u16::MAX;

/// One miner's running record.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct MinerScore {
    /// Exponential moving average of the per-task scores; the weight is normalised from it.
    pub ema: f64,
    pub tasks: u64,
    pub agreed: u64,
    /// Tasks in which the miner did not agree (disagreed, failed or went missing).
    pub strikes: u64,
    /// Tasks in which its outputs were wrong by the verifier's own reference run (an audit
    /// or an escalation), not merely outvoted: proof, on which a miner is quarantined. A
    /// colluding majority can outvote an honest miner, but cannot make this count rise.
    #[serde(default)]
    pub confirmed_wrong: u64,
    pub last_score: f64,
}

/// Everything the rewarder has accumulated. Persisted whole, so that `last_seq` and the
/// scores it covers are always stored together (exactly-once application).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Ledger {
    miners: BTreeMap<String, MinerScore>,
    /// Stream sequence (in VERDICTS) of the last verdict applied.
    last_seq: u64,
    /// The epoch currently accumulating; the first is 1.
    epoch: u64,
    epoch_started_ms: u64,
    /// Weight of the newest score in the moving average, in (0, 1].
    alpha: f64,
}

/// Whether `alpha` is a usable smoothing factor.
pub fn valid_alpha(alpha: f64) -> bool {
    alpha > 0.0 && alpha <= 1.0
}

impl Ledger {
    /// An empty ledger at epoch 1, starting now.
    pub fn new(alpha: f64, now_ms: u64) -> Ledger {
        Ledger { miners: BTreeMap::new(), last_seq: 0, epoch: 1, epoch_started_ms: now_ms, alpha }
    }

    /// Miners in id order.
    pub fn miners(&self) -> impl ExactSizeIterator<Item = (&String, &MinerScore)> {
        self.miners.iter()
    }

    pub fn miner(&self, id: &str) -> Option<&MinerScore> {
        self.miners.get(id)
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn epoch_started_ms(&self) -> u64 {
        self.epoch_started_ms
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Changes the smoothing factor for verdicts applied from now on (operator reconfiguration).
    pub fn set_alpha(&mut self, alpha: f64) {
        self.alpha = alpha;
    }

    /// Applies one verdict read at stream sequence `seq`. Returns `None`, changing nothing,
    /// when `seq` was already applied, so that redeliveries are harmless.
    pub fn apply(&mut self, verdict: &Verdict, seq: u64) -> Option<RewardTrace> {
        if seq <= self.last_seq {
            return None;
        }
        let ranks = rank_agreeing(&verdict.miners);
        let judged_by_reference = verdict.judged_by_reference();
        let mut entries = Vec::with_capacity(verdict.miners.len());
        for (m, rank) in verdict.miners.iter().zip(ranks) {
            let agreed = m.standing == Standing::Agreed;
            let score = rank.map_or(0.0, |r| 1.0 / f64::from(r));
            let s = self.miners.entry(m.worker.clone()).or_default();
            s.ema = self.alpha * score + (1.0 - self.alpha) * s.ema;
            s.tasks += 1;
            if agreed {
                s.agreed += 1;
            } else {
                s.strikes += 1;
            }
            if m.standing == Standing::Disagreed && judged_by_reference {
                s.confirmed_wrong += 1;
            }
            s.last_score = score;
            entries.push(RewardEntry {
                worker: m.worker.clone(),
                standing: m.standing,
                latency_us: m.latency_us,
                rank,
                score,
            });
        }
        self.last_seq = seq;
        Some(RewardTrace {
            v: WIRE_VERSION,
            task_id: verdict.task_id.clone(),
            verdict_seq: seq,
            epoch: self.epoch,
            entries,
        })
    }

    /// Closes the current epoch: every miner's weight from its moving score, in id order.
    /// Scores carry over; the next epoch starts at `now_ms`.
    pub fn close_epoch(&mut self, now_ms: u64) -> EpochWeights {
        let scores: Vec<f64> = self.miners.values().map(|s| s.ema).collect();
        let weights = self
            .miners
            .iter()
            .zip(normalize_u16(&scores))
            .map(|((miner, s), weight)| MinerWeight { miner: miner.clone(), weight, score: s.ema })
            .collect();
        let closed = EpochWeights { v: WIRE_VERSION, epoch: self.epoch, closed_at_ms: now_ms, weights };
        self.epoch += 1;
        self.epoch_started_ms = now_ms;
        closed
    }

    /// Internal storage encoding (MessagePack with named fields, so fields can be added).
    pub fn to_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("MessagePack encoding of the ledger cannot fail")
    }

    /// Bounded in length and depth like every decode of stored bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Ledger, sundara_schemas::DecodeError> {
        sundara_schemas::codec::decode_unversioned(bytes, sundara_schemas::MAX_MESSAGE_BYTES)
    }
}

/// How one miner's weight in an epoch came about, recomputed from the reward traces alone.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    /// The miner's share of each task of the epoch, in the order applied.
    pub entries: Vec<(String, RewardEntry)>,
    /// Its moving score when the epoch closed (scores carry over from earlier epochs).
    pub score: f64,
    /// Sum of every miner's moving score then.
    pub total_score: f64,
    /// Its weight: its score's share of [`WEIGHT_TOTAL`], rounded by largest remainder.
    pub weight: u16,
}

/// Replays `traces` (in stream order) through epoch `epoch` with smoothing `alpha`, as the
/// ledger applied them: anyone holding the REWARDS stream can check a published weight.
pub fn explain(traces: &[RewardTrace], alpha: f64, epoch: u64, miner: &str) -> Explanation {
    let mut scores: BTreeMap<&str, f64> = BTreeMap::new();
    let mut entries = Vec::new();
    for t in traces.iter().filter(|t| t.epoch <= epoch) {
        for e in &t.entries {
            let s = scores.entry(e.worker.as_str()).or_default();
            *s = alpha * e.score + (1.0 - alpha) * *s;
            if t.epoch == epoch && e.worker == miner {
                entries.push((t.task_id.clone(), e.clone()));
            }
        }
    }
    let all: Vec<f64> = scores.values().copied().collect();
    let weight = scores.keys().position(|m| *m == miner).map_or(0, |i| normalize_u16(&all)[i]);
    Explanation { entries, score: scores.get(miner).copied().unwrap_or(0.0), total_score: all.iter().sum(), weight }
}

/// Rank of each miner among the agreeing ones (1 = fastest; ties by worker id; unknown
/// latency last), `None` for the others. Same order as `miners`.
fn rank_agreeing(miners: &[MinerVerdict]) -> Vec<Option<u32>> {
    let mut agreeing: Vec<usize> = (0..miners.len()).filter(|&i| miners[i].standing == Standing::Agreed).collect();
    agreeing.sort_by(|&a, &b| {
        let (a, b) = (&miners[a], &miners[b]);
        let key = |m: &MinerVerdict| (m.latency_us.is_none(), m.latency_us);
        key(a).cmp(&key(b)).then_with(|| a.worker.cmp(&b.worker))
    });
    let mut ranks = vec![None; miners.len()];
    for (position, i) in agreeing.into_iter().enumerate() {
        ranks[i] = Some(u32::try_from(position + 1).unwrap_or(u32::MAX));
    }
    ranks
}

/// Normalises scores to u16 weights summing to exactly [`WEIGHT_TOTAL`] (largest-remainder
/// method: floor each share, then hand out the missing units by largest fractional part,
/// ties to the lower index). Non-positive and non-finite scores get 0; when no score is
/// positive every weight is 0. Deterministic: plain IEEE arithmetic in a fixed order.
pub fn normalize_u16(scores: &[f64]) -> Vec<u16> {
    let usable = |s: f64| if s.is_finite() && s > 0.0 { s } else { 0.0 };
    let max = scores.iter().copied().map(usable).fold(0.0, f64::max);
    if max <= 0.0 {
        return vec![0; scores.len()];
    }
    // Scaling by the largest score first keeps the sum finite whatever the magnitudes.
    let scaled: Vec<f64> = scores.iter().map(|&s| usable(s) / max).collect();
    let sum: f64 = scaled.iter().sum();
    let total = f64::from(WEIGHT_TOTAL);
    let mut weights = Vec::with_capacity(scores.len());
    let mut fractions = Vec::with_capacity(scores.len());
    for &s in &scaled {
        let share = (s / sum * total).clamp(0.0, total);
        let floor = share.floor();
        weights.push(floor as u64);
        fractions.push(share - floor);
    }
    let assigned: u64 = weights.iter().sum();
    let target = u64::from(WEIGHT_TOTAL);
    let positive: Vec<usize> = (0..scores.len()).filter(|&i| scaled[i] > 0.0).collect();
    if assigned < target {
        // Largest fraction first, lower index on ties.
        let mut order = positive;
        order.sort_by(|&a, &b| fractions[b].total_cmp(&fractions[a]).then(a.cmp(&b)));
        for k in 0..(target - assigned) as usize {
            weights[order[k % order.len()]] += 1;
        }
    } else if assigned > target {
        // Only rounding error can overshoot: take back from the smallest fractions.
        let mut order: Vec<usize> = positive;
        order.sort_by(|&a, &b| fractions[a].total_cmp(&fractions[b]).then(b.cmp(&a)));
        let mut excess = assigned - target;
        for &i in order.iter().cycle() {
            if excess == 0 {
                break;
            }
            if weights[i] > 0 {
                weights[i] -= 1;
                excess -= 1;
            }
        }
    }
    weights.into_iter().map(|w| u16::try_from(w).unwrap_or(WEIGHT_TOTAL)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundara_schemas::{CompareRule, ModelRef, ReferenceCheck};

    fn mv(worker: &str, standing: Standing, latency_us: Option<u64>) -> MinerVerdict {
        MinerVerdict { worker: worker.into(), replica: 0, attempt: 0, standing, latency_us }
    }

    fn verdict(task: &str, miners: Vec<MinerVerdict>) -> Verdict {
        Verdict {
            v: WIRE_VERSION,
            task_id: task.into(),
            tenant: "t".into(),
            model: ModelRef { name: "mlp".into(), version: "1".into() },
            k: miners.len() as u8,
            rule: CompareRule::Exact,
            accepted: true,
            miners,
            decided_at_ms: 0,
            reference: None,
        }
    }

    fn entry<'a>(trace: &'a RewardTrace, worker: &str) -> &'a RewardEntry {
        trace.entries.iter().find(|e| e.worker == worker).unwrap()
    }

    #[test]
    fn only_a_reference_run_proves_a_miner_wrong() {
        let mut ledger = Ledger::new(0.5, 0);
        // Outvoted by a majority: a strike, but no proof (the majority may be colluders).
        ledger
            .apply(&verdict("t1", vec![mv("a", Standing::Agreed, Some(5)), mv("b", Standing::Disagreed, Some(6))]), 1);
        assert_eq!(ledger.miner("b").unwrap().strikes, 1);
        assert_eq!(ledger.miner("b").unwrap().confirmed_wrong, 0);
        for (seq, check) in [(2, ReferenceCheck::AuditFailed), (3, ReferenceCheck::Escalated)] {
            let mut v = verdict("t", vec![mv("a", Standing::Agreed, Some(5)), mv("b", Standing::Disagreed, Some(6))]);
            v.reference = Some(check);
            ledger.apply(&v, seq);
        }
        assert_eq!(ledger.miner("b").unwrap().confirmed_wrong, 2);
        assert_eq!(ledger.miner("a").unwrap().confirmed_wrong, 0);
        // A reference that could not run proves nothing.
        let mut v = verdict("t4", vec![mv("b", Standing::Disagreed, Some(6))]);
        v.reference = Some(ReferenceCheck::Unavailable { reason: "timed out".into() });
        ledger.apply(&v, 4);
        assert_eq!(ledger.miner("b").unwrap().confirmed_wrong, 2);
    }

    #[test]
    fn agreeing_miners_are_ranked_by_latency() {
        let mut ledger = Ledger::new(0.5, 0);
        let v = verdict(
            "t1",
            vec![
                mv("c", Standing::Agreed, Some(300)),
                mv("a", Standing::Agreed, None),
                mv("b", Standing::Agreed, Some(100)),
                mv("d", Standing::Agreed, Some(100)),
            ],
        );
        let trace = ledger.apply(&v, 1).unwrap();
        // Entries keep the verdict's order.
        let order: Vec<&str> = trace.entries.iter().map(|e| e.worker.as_str()).collect();
        assert_eq!(order, ["c", "a", "b", "d"]);
        // b and d tie on latency: b wins by id; unknown latency ranks last.
        assert_eq!(entry(&trace, "b").rank, Some(1));
        assert_eq!(entry(&trace, "d").rank, Some(2));
        assert_eq!(entry(&trace, "c").rank, Some(3));
        assert_eq!(entry(&trace, "a").rank, Some(4));
        assert_eq!(entry(&trace, "b").score, 1.0);
        assert_eq!(entry(&trace, "d").score, 0.5);
        assert_eq!(entry(&trace, "c").score, 1.0 / 3.0);
        assert_eq!(entry(&trace, "a").score, 0.25);
        assert_eq!(trace.v, WIRE_VERSION);
        assert_eq!(trace.task_id, "t1");
        assert_eq!(trace.verdict_seq, 1);
        assert_eq!(trace.epoch, 1);
    }

    #[test]
    fn non_agreeing_miners_score_zero_and_get_a_strike() {
        let mut ledger = Ledger::new(0.1, 0);
        let v = verdict(
            "t1",
            vec![
                mv("ok", Standing::Agreed, Some(900)),
                mv("dis", Standing::Disagreed, Some(10)),
                mv("fail", Standing::Failed, Some(5)),
                mv("gone", Standing::Missing, None),
            ],
        );
        let trace = ledger.apply(&v, 7).unwrap();
        // The fastest overall disagreed, so the slow agreeing miner still ranks first.
        assert_eq!(entry(&trace, "ok").rank, Some(1));
        assert_eq!(entry(&trace, "ok").score, 1.0);
        for w in ["dis", "fail", "gone"] {
            assert_eq!(entry(&trace, w).rank, None, "{w}");
            assert_eq!(entry(&trace, w).score, 0.0, "{w}");
            let s = ledger.miner(w).unwrap();
            assert_eq!((s.tasks, s.agreed, s.strikes, s.ema), (1, 0, 1, 0.0), "{w}");
        }
        let ok = ledger.miner("ok").unwrap();
        assert_eq!((ok.tasks, ok.agreed, ok.strikes), (1, 1, 0));
        assert_eq!(entry(&trace, "dis").standing, Standing::Disagreed);
        assert_eq!(entry(&trace, "gone").latency_us, None);
    }

    #[test]
    fn ema_follows_alpha() {
        let alpha = 0.1;
        let mut ledger = Ledger::new(alpha, 0);
        let solo = |seq: u64, standing| verdict(&format!("t{seq}"), vec![mv("m", standing, Some(1))]);
        ledger.apply(&solo(1, Standing::Agreed), 1).unwrap();
        assert_eq!(ledger.miner("m").unwrap().ema, alpha * 1.0);
        ledger.apply(&solo(2, Standing::Agreed), 2).unwrap();
        let expected = alpha * 1.0 + (1.0 - alpha) * alpha;
        assert_eq!(ledger.miner("m").unwrap().ema, expected);
        ledger.apply(&solo(3, Standing::Failed), 3).unwrap();
        let m = ledger.miner("m").unwrap();
        assert_eq!(m.ema, (1.0 - alpha) * expected);
        assert_eq!(m.last_score, 0.0);
        assert_eq!((m.tasks, m.agreed, m.strikes), (3, 2, 1));
    }

    #[test]
    fn a_verdict_is_applied_once_per_sequence() {
        let mut ledger = Ledger::new(0.1, 0);
        let v = verdict("t1", vec![mv("m", Standing::Agreed, Some(1))]);
        assert!(ledger.apply(&v, 5).is_some());
        let after = ledger.clone();
        assert!(ledger.apply(&v, 5).is_none());
        assert!(ledger.apply(&v, 3).is_none());
        assert_eq!(ledger, after);
        assert_eq!(ledger.last_seq(), 5);
        assert!(ledger.apply(&v, 6).is_some());
        assert_eq!(ledger.miner("m").unwrap().tasks, 2);
    }

    #[test]
    fn normalisation_sums_to_65535() {
        let cases: Vec<Vec<f64>> = vec![
            vec![1.0, 1.0, 1.0],
            vec![1e-9, 1.0, 2.0],
            vec![0.1; 7],
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            vec![1e-300, 1e300, 3.0],
            vec![f64::MAX, f64::MAX],
            (1..=1000).map(|i| 1.0 / f64::from(i)).collect(),
            vec![0.3, -1.0, 0.0, f64::NAN, 0.7, f64::INFINITY],
        ];
        for scores in cases {
            let w = normalize_u16(&scores);
            assert_eq!(w.len(), scores.len());
            assert_eq!(w.iter().map(|&x| u64::from(x)).sum::<u64>(), 65535, "{scores:?}");
            for (s, w) in scores.iter().zip(&w) {
                if !(s.is_finite() && *s > 0.0) {
                    assert_eq!(*w, 0, "{scores:?}");
                }
            }
        }
        assert_eq!(normalize_u16(&[1.0, 1.0, 1.0]), [21845, 21845, 21845]);
        assert_eq!(normalize_u16(&[1e-9, 1.0, 2.0]), [0, 21845, 43690]);
        assert_eq!(normalize_u16(&[0.37]), [65535]);
        // Two-way tie on the remainder: the lower index gets the extra unit.
        assert_eq!(normalize_u16(&[1.0, 1.0]), [32768, 32767]);
        assert_eq!(normalize_u16(&[0.0, -2.0, 0.5]), [0, 0, 65535]);
    }

    #[test]
    fn nothing_positive_gives_all_zeros() {
        assert_eq!(normalize_u16(&[]), Vec::<u16>::new());
        assert_eq!(normalize_u16(&[0.0, 0.0, 0.0]), [0, 0, 0]);
        assert_eq!(normalize_u16(&[-1.0, f64::NAN]), [0, 0]);
    }

    #[test]
    fn closing_an_epoch_weighs_every_miner_in_id_order() {
        let mut ledger = Ledger::new(0.5, 1_000);
        ledger
            .apply(&verdict("t1", vec![mv("zed", Standing::Agreed, Some(2)), mv("amy", Standing::Agreed, Some(1))]), 1)
            .unwrap();
        ledger.apply(&verdict("t2", vec![mv("bob", Standing::Missing, None)]), 2).unwrap();
        let closed = ledger.close_epoch(5_000);
        assert_eq!((closed.v, closed.epoch, closed.closed_at_ms), (WIRE_VERSION, 1, 5_000));
        let names: Vec<&str> = closed.weights.iter().map(|w| w.miner.as_str()).collect();
        assert_eq!(names, ["amy", "bob", "zed"]);
        // amy: ema 0.5, zed: ema 0.25, bob: 0.
        assert_eq!(closed.weights.iter().map(|w| w.score).collect::<Vec<_>>(), [0.5, 0.0, 0.25]);
        assert_eq!(closed.weights.iter().map(|w| w.weight).collect::<Vec<_>>(), [43690, 0, 21845]);
        assert_eq!((ledger.epoch(), ledger.epoch_started_ms()), (2, 5_000));
        let trace = ledger.apply(&verdict("t3", vec![mv("amy", Standing::Agreed, Some(1))]), 3).unwrap();
        assert_eq!(trace.epoch, 2);
        assert_eq!(Ledger::new(0.1, 0).close_epoch(1).weights, []);
    }

    #[test]
    fn replaying_the_same_verdicts_gives_identical_weights() {
        let standings = [Standing::Agreed, Standing::Agreed, Standing::Disagreed, Standing::Missing];
        let verdicts: Vec<Verdict> = (0..500u64)
            .map(|i| {
                let miners = (0..3u64)
                    .map(|r| {
                        let worker = format!("w{}", (i * 7 + r * 3) % 11);
                        let standing = standings[((i + r) % 4) as usize];
                        let latency = (standing != Standing::Missing).then_some((i * 31 + r * 17) % 997);
                        mv(&worker, standing, latency)
                    })
                    .collect();
                verdict(&format!("t{i}"), miners)
            })
            .collect();
        let run = || {
            let mut ledger = Ledger::new(0.1, 0);
            for (i, v) in verdicts.iter().enumerate() {
                ledger.apply(v, i as u64 + 1).unwrap();
                // Redeliveries in between must change nothing.
                assert!(ledger.apply(v, i as u64 + 1).is_none());
            }
            let bytes = ledger.to_bytes();
            (ledger.close_epoch(42), bytes)
        };
        let (a, a_bytes) = run();
        let (b, b_bytes) = run();
        assert_eq!(a_bytes, b_bytes);
        assert_eq!(a.weights.iter().map(|w| w.weight).sum::<u16>(), 65535);
        let bits = |w: &EpochWeights| -> Vec<(String, u16, u64)> {
            w.weights.iter().map(|m| (m.miner.clone(), m.weight, m.score.to_bits())).collect()
        };
        assert_eq!(bits(&a), bits(&b));
        assert_eq!(sundara_schemas::encode(&a), sundara_schemas::encode(&b));
    }

    #[test]
    fn the_reward_traces_alone_explain_every_published_weight_bit_for_bit() {
        let standings = [Standing::Agreed, Standing::Agreed, Standing::Disagreed, Standing::Missing];
        let mut ledger = Ledger::new(0.1, 0);
        let mut traces = Vec::new();
        let mut published = Vec::new();
        for i in 0..300u64 {
            let miners = (0..3u64)
                .map(|r| {
                    let standing = standings[((i + r) % 4) as usize];
                    mv(&format!("w{}", (i * 7 + r * 3) % 5), standing, Some((i * 31 + r * 17) % 997))
                })
                .collect();
            traces.push(ledger.apply(&verdict(&format!("t{i}"), miners), i + 1).unwrap());
            if i % 100 == 99 {
                published.push(ledger.close_epoch(i));
            }
        }
        for weights in &published {
            for m in &weights.weights {
                let x = explain(&traces, 0.1, weights.epoch, &m.miner);
                assert_eq!(x.weight, m.weight, "epoch {} miner {}", weights.epoch, m.miner);
                assert_eq!(x.score.to_bits(), m.score.to_bits());
                assert!(x.entries.iter().all(|(_, e)| e.worker == m.miner));
            }
            let tasks: usize =
                weights.weights.iter().map(|m| explain(&traces, 0.1, weights.epoch, &m.miner).entries.len()).sum();
            assert_eq!(tasks, 300, "each epoch's 100 tasks × 3 miners");
        }
    }

    #[test]
    fn the_ledger_round_trips_through_its_encoding() {
        let mut ledger = Ledger::new(0.2, 99);
        ledger.apply(&verdict("t1", vec![mv("m", Standing::Agreed, Some(3))]), 4).unwrap();
        let back = Ledger::from_bytes(&ledger.to_bytes()).unwrap();
        assert_eq!(back, ledger);
        assert!(Ledger::from_bytes(b"\xc1garbage").is_err());
    }
}
