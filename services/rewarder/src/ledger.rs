//! The rewarder's scoring state and its pure rules, kept free of I/O so that the same
//! verdicts always give the same weights (a ledger can be rebuilt by replaying VERDICTS).
//!
//! Miners are adversaries, so the rules are built not to be farmed:
//!
//! * **Weight follows verified work.** At the close of an epoch a miner's score is its
//!   moving quality (the EMA of its per-task scores, 1/rank when agreeing and 0 otherwise)
//!   times the number of tasks it agreed on in that epoch ([`epoch_score`]). Twice the
//!   verified work at equal quality is twice the weight; a miner idle in the epoch, or
//!   quarantined when it closes, scores 0.
//! * **Reputation comes from the reference only.** A vote can be won by a colluding
//!   majority, so only verdicts judged against the verifier's own reference run (an audit
//!   or an escalation) move a miner's [`MinerScore::reputation`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sundara_schemas::{
    EpochWeights, MinerVerdict, MinerWeight, RewardEntry, RewardTrace, Standing, Verdict, WIRE_VERSION,
};

/// What all weights of an epoch sum to (Bittensor's u16 weights), unless no miner did any
/// verified work in it (then every weight is 0).
pub const WEIGHT_TOTAL: u16 = u16::MAX;

/// One miner's running record.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct MinerScore {
    /// Exponential moving average of the per-task scores: the miner's quality, which
    /// [`epoch_score`] multiplies by its verified work in the epoch.
    pub ema: f64,
    /// Tasks it took part in, over all epochs.
    pub tasks: u64,
    /// Tasks in which it agreed with the accepted result, over all epochs.
    pub agreed: u64,
    /// Tasks in which the miner did not agree (disagreed, failed or went missing).
    pub strikes: u64,
    /// Tasks in which its outputs were wrong by the verifier's own reference run (an audit
    /// or an escalation), not merely outvoted: proof, on which a miner is quarantined. A
    /// colluding majority can outvote an honest miner, but cannot make this count rise.
    #[serde(default)]
    pub confirmed_wrong: u64,
    /// Tasks in which its outputs matched the verifier's own reference run: the other half
    /// of [`MinerScore::reputation`]. Winning a vote does not count, since colluders can.
    #[serde(default)]
    pub confirmed_right: u64,
    /// Tasks it agreed on in the epoch now accumulating (its verified work there); reset
    /// when the epoch closes.
    #[serde(default)]
    pub epoch_agreed: u64,
    /// Its score in the most recent task it took part in.
    pub last_score: f64,
}

impl MinerScore {
    /// Its share of reference-judged outcomes that the reference confirmed, in [0, 1];
    /// `None` when no reference run has judged it yet (placement then treats it as 1).
    pub fn reputation(&self) -> Option<f64> {
        let judged = self.confirmed_right + self.confirmed_wrong;
        (judged > 0).then(|| self.confirmed_right as f64 / judged as f64)
    }

    /// Scores one task: `score` into the moving quality with smoothing `alpha`, and the
    /// counts. `judged_by_reference`: the verdict came from the verifier's reference run.
    fn record(&mut self, standing: Standing, score: f64, alpha: f64, judged_by_reference: bool) {
        self.ema = alpha * score + (1.0 - alpha) * self.ema;
        self.tasks += 1;
        if standing == Standing::Agreed {
            self.agreed += 1;
            self.epoch_agreed += 1;
        } else {
            self.strikes += 1;
        }
        // Only what the reference itself judged (agreed or disagreed with it) is evidence;
        // a failure, a missing or a late replica says nothing about the outputs' truth.
        if judged_by_reference {
            match standing {
                Standing::Agreed => self.confirmed_right += 1,
                Standing::Disagreed => self.confirmed_wrong += 1,
                Standing::Failed | Standing::Missing | Standing::Late => {}
            }
        }
        self.last_score = score;
    }
}

/// A miner's score at the close of an epoch, from which its weight is normalised: its
/// moving `quality` (EMA of per-task scores) times `agreed_in_epoch`, the tasks it agreed
/// on in the epoch; 0 when it is `quarantined` at the close. Volume counts, so a miner
/// cannot earn a full share from a handful of tasks, and an idle one earns nothing.
pub fn epoch_score(quality: f64, agreed_in_epoch: u64, quarantined: bool) -> f64 {
    if quarantined { 0.0 } else { quality * agreed_in_epoch as f64 }
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
    /// Per operator (the unit of collusion): its proofs over all its workers, and the
    /// workers seen under it. One operator's many names share one record, so a new name
    /// does not start its proofs from nothing.
    #[serde(default)]
    operators: BTreeMap<String, OperatorRecord>,
}

/// One operator's record: what its workers were proven wrong on, together.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct OperatorRecord {
    pub confirmed_wrong: u64,
    pub workers: BTreeSet<String>,
}

/// Whether `alpha` is a usable smoothing factor.
pub fn valid_alpha(alpha: f64) -> bool {
    alpha > 0.0 && alpha <= 1.0
}

impl Ledger {
    /// An empty ledger at epoch 1, starting now.
    pub fn new(alpha: f64, now_ms: u64) -> Ledger {
        Ledger {
            miners: BTreeMap::new(),
            last_seq: 0,
            epoch: 1,
            epoch_started_ms: now_ms,
            alpha,
            operators: BTreeMap::new(),
        }
    }

    /// Miners in id order.
    pub fn miners(&self) -> impl ExactSizeIterator<Item = (&String, &MinerScore)> {
        self.miners.iter()
    }

    /// One miner's record, if it ever took part in a task.
    pub fn miner(&self, id: &str) -> Option<&MinerScore> {
        self.miners.get(id)
    }

    /// Stream sequence (in VERDICTS) of the last verdict applied; 0 before the first.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The epoch currently accumulating; the first is 1.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// When the epoch now accumulating started (Unix ms).
    pub fn epoch_started_ms(&self) -> u64 {
        self.epoch_started_ms
    }

    /// Weight of the newest task score in each miner's moving average.
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
            let score = rank.map_or(0.0, |r| 1.0 / f64::from(r));
            let s = self.miners.entry(m.worker.clone()).or_default();
            s.record(m.standing, score, self.alpha, judged_by_reference);
            let op = self.operators.entry(m.operator().to_string()).or_default();
            op.workers.insert(m.worker.clone());
            if judged_by_reference && m.standing == Standing::Disagreed {
                op.confirmed_wrong += 1;
            }
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

    /// Miners whose proofs (`confirmed_wrong`) reached `after`: those the rewarder itself
    /// quarantines. None when `after` is 0 (quarantine off).
    pub fn quarantined_by_proof(&self, after: u64) -> BTreeSet<String> {
        if after == 0 {
            return BTreeSet::new();
        }
        let by_operator = self.operators.values().filter(|o| o.confirmed_wrong >= after).flat_map(|o| &o.workers);
        let by_miner = self.miners.iter().filter(|(_, s)| s.confirmed_wrong >= after).map(|(m, _)| m);
        by_miner.chain(by_operator).cloned().collect()
    }

    /// One operator's record, if any of its workers took part in a task.
    pub fn operator(&self, id: &str) -> Option<&OperatorRecord> {
        self.operators.get(id)
    }

    /// Every miner's reputation that a reference run has informed, in id order (for the
    /// scheduler's placement). Miners no reference judged are left out: unknown, not bad.
    pub fn reputations(&self) -> Vec<(String, f64)> {
        self.miners.iter().filter_map(|(m, s)| Some((m.clone(), s.reputation()?))).collect()
    }

    /// Closes the current epoch: every miner's weight, in id order, normalised from its
    /// [`epoch_score`], with the miners in `quarantined` weighed 0 (and listed in the
    /// result, so that a replay of the traces can do the same). Moving qualities carry
    /// over; the epoch's work counts restart; the next epoch starts at `now_ms`.
    pub fn close_epoch(&mut self, now_ms: u64, quarantined: &BTreeSet<String>) -> EpochWeights {
        let scores: Vec<f64> =
            self.miners.iter().map(|(m, s)| epoch_score(s.ema, s.epoch_agreed, quarantined.contains(m))).collect();
        let weights = self
            .miners
            .keys()
            .zip(&scores)
            .zip(normalize_u16(&scores))
            .map(|((miner, &score), weight)| MinerWeight { miner: miner.clone(), weight, score })
            .collect();
        let listed = self.miners.keys().filter(|m| quarantined.contains(*m)).cloned().collect();
        let closed =
            EpochWeights { v: WIRE_VERSION, epoch: self.epoch, closed_at_ms: now_ms, weights, quarantined: listed };
        for s in self.miners.values_mut() {
            s.epoch_agreed = 0;
        }
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
    /// Its moving quality when the epoch closed (it carries over from earlier epochs).
    pub quality: f64,
    /// Tasks of the epoch it agreed on: its verified work.
    pub agreed: u64,
    /// Whether it was quarantined when the epoch closed (as published with the weights).
    pub quarantined: bool,
    /// Its epoch score, [`epoch_score`] of the three above: what the weight is normalised from.
    pub score: f64,
    /// Sum of every miner's epoch score.
    pub total_score: f64,
    /// Its weight: its score's share of [`WEIGHT_TOTAL`], rounded by largest remainder.
    pub weight: u16,
}

/// Replays `traces` (in stream order) through epoch `epoch` with smoothing `alpha`, as the
/// ledger applied them, with the miners the published weights list as `quarantined` at the
/// close: anyone holding the REWARDS stream can check a published weight.
pub fn explain(traces: &[RewardTrace], alpha: f64, epoch: u64, quarantined: &[String], miner: &str) -> Explanation {
    let mut quality: BTreeMap<&str, f64> = BTreeMap::new();
    let mut agreed: BTreeMap<&str, u64> = BTreeMap::new();
    let mut entries = Vec::new();
    for t in traces.iter().filter(|t| t.epoch <= epoch) {
        for e in &t.entries {
            let q = quality.entry(e.worker.as_str()).or_default();
            *q = alpha * e.score + (1.0 - alpha) * *q;
            if t.epoch != epoch {
                continue;
            }
            if e.standing == Standing::Agreed {
                *agreed.entry(e.worker.as_str()).or_default() += 1;
            }
            if e.worker == miner {
                entries.push((t.task_id.clone(), e.clone()));
            }
        }
    }
    let quarantined: BTreeSet<&str> = quarantined.iter().map(String::as_str).collect();
    let work = |m: &str| agreed.get(m).copied().unwrap_or(0);
    // Every miner seen so far, in id order, exactly as the ledger weighs them.
    let all: Vec<f64> = quality.iter().map(|(m, &q)| epoch_score(q, work(m), quarantined.contains(m))).collect();
    let index = quality.keys().position(|m| *m == miner);
    Explanation {
        entries,
        quality: quality.get(miner).copied().unwrap_or(0.0),
        agreed: work(miner),
        quarantined: quarantined.contains(miner),
        score: index.map_or(0.0, |i| all[i]),
        total_score: all.iter().sum(),
        weight: index.map_or(0, |i| normalize_u16(&all)[i]),
    }
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
        MinerVerdict { worker: worker.into(), operator: String::new(), replica: 0, attempt: 0, standing, latency_us }
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
        let closed = ledger.close_epoch(5_000, &BTreeSet::new());
        assert_eq!((closed.v, closed.epoch, closed.closed_at_ms), (WIRE_VERSION, 1, 5_000));
        let names: Vec<&str> = closed.weights.iter().map(|w| w.miner.as_str()).collect();
        assert_eq!(names, ["amy", "bob", "zed"]);
        // amy: ema 0.5 × 1 agreed task, zed: ema 0.25 × 1, bob: no verified work.
        assert_eq!(closed.weights.iter().map(|w| w.score).collect::<Vec<_>>(), [0.5, 0.0, 0.25]);
        assert_eq!(closed.weights.iter().map(|w| w.weight).collect::<Vec<_>>(), [43690, 0, 21845]);
        assert_eq!((ledger.epoch(), ledger.epoch_started_ms()), (2, 5_000));
        assert!(closed.quarantined.is_empty());
        let trace = ledger.apply(&verdict("t3", vec![mv("amy", Standing::Agreed, Some(1))]), 3).unwrap();
        assert_eq!(trace.epoch, 2);
        assert_eq!(Ledger::new(0.1, 0).close_epoch(1, &BTreeSet::new()).weights, []);
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
            (ledger.close_epoch(42, &BTreeSet::new()), bytes)
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
    fn an_operators_names_share_one_record_of_proofs() {
        let mut ledger = Ledger::new(0.1, 0);
        let audited = |task: &str, miners: Vec<MinerVerdict>| Verdict {
            reference: Some(ReferenceCheck::AuditFailed),
            ..verdict(task, miners)
        };
        // Three names of operator "cartel", each proven wrong once: no name reaches 3, the
        // operator does, and all three names are quarantined.
        for (i, name) in ["c1", "c2", "c3"].iter().enumerate() {
            let mut liar = mv(name, Standing::Disagreed, Some(10));
            liar.operator = "cartel".into();
            ledger.apply(&audited(&format!("t{i}"), vec![liar, mv("h", Standing::Agreed, Some(10))]), i as u64 + 1);
        }
        assert_eq!(ledger.operator("cartel").unwrap().confirmed_wrong, 3);
        let q = ledger.quarantined_by_proof(3);
        assert_eq!(q.into_iter().collect::<Vec<_>>(), vec!["c1", "c2", "c3"]);
        assert_eq!(ledger.operator("h").unwrap().confirmed_wrong, 0, "a worker without an operator is its own");
    }

    #[test]
    fn the_reward_traces_alone_explain_every_published_weight_bit_for_bit() {
        let standings = [Standing::Agreed, Standing::Agreed, Standing::Disagreed, Standing::Missing];
        let mut ledger = Ledger::new(0.1, 0);
        let mut traces = Vec::new();
        let mut published = Vec::new();
        // Epoch 2 closes with w3 quarantined (as the scheduler would for timeouts).
        let quarantined_at = |epoch: u64| -> BTreeSet<String> {
            match epoch {
                2 => ["w3".to_string()].into(),
                4 => ["w0".to_string()].into(),
                _ => BTreeSet::new(),
            }
        };
        for i in 0..300u64 {
            let miners = (0..3u64)
                .map(|r| {
                    let standing = standings[((i + r) % 4) as usize];
                    mv(&format!("w{}", (i * 7 + r * 3) % 5), standing, Some((i * 31 + r * 17) % 997))
                })
                .collect();
            let mut v = verdict(&format!("t{i}"), miners);
            if i % 10 == 0 {
                v.reference = Some(ReferenceCheck::AuditFailed);
            }
            traces.push(ledger.apply(&v, i + 1).unwrap());
            if i % 100 == 99 {
                let q = quarantined_at(ledger.epoch());
                published.push(ledger.close_epoch(i, &q));
            }
        }
        // Epoch 4: only w0 and w1 work (w2..w4 idle), and w0 is quarantined at its close.
        for i in 300..320u64 {
            let miners = vec![mv("w0", Standing::Agreed, Some(i)), mv("w1", Standing::Agreed, Some(900 - i))];
            traces.push(ledger.apply(&verdict(&format!("t{i}"), miners), i + 1).unwrap());
        }
        published.push(ledger.close_epoch(320, &quarantined_at(4)));
        assert_eq!(published[1].quarantined, ["w3"]);
        for weights in &published {
            for m in &weights.weights {
                let x = explain(&traces, 0.1, weights.epoch, &weights.quarantined, &m.miner);
                assert_eq!(x.weight, m.weight, "epoch {} miner {}", weights.epoch, m.miner);
                assert_eq!(x.score.to_bits(), m.score.to_bits());
                assert!(x.entries.iter().all(|(_, e)| e.worker == m.miner));
            }
            let tasks: usize = weights
                .weights
                .iter()
                .map(|m| explain(&traces, 0.1, weights.epoch, &weights.quarantined, &m.miner).entries.len())
                .sum();
            let expected = if weights.epoch == 4 { 40 } else { 300 };
            assert_eq!(tasks, expected, "each epoch's tasks × their miners");
        }
        let weight =
            |epoch: usize, miner: &str| published[epoch - 1].weights.iter().find(|m| m.miner == miner).unwrap();
        assert_eq!(weight(2, "w3").weight, 0, "quarantined at the close");
        assert!(weight(1, "w3").weight > 0 && weight(3, "w3").weight > 0);
        for idle in ["w2", "w3", "w4"] {
            assert_eq!(weight(4, idle).weight, 0, "{idle} was idle in epoch 4");
        }
        assert_eq!(weight(4, "w1").weight, WEIGHT_TOTAL);
        // Without the published quarantine list the replay cannot match: it is needed.
        assert_ne!(explain(&traces, 0.1, 2, &[], "w3").weight, 0);
    }

    #[test]
    fn weight_grows_with_verified_work_at_equal_quality() {
        // alpha 1: the quality is the last task's score, 1 for both, so only volume differs.
        let mut ledger = Ledger::new(1.0, 0);
        let mut seq = 0;
        for (miner, tasks) in [("busy", 100), ("light", 10)] {
            for i in 0..tasks {
                seq += 1;
                ledger.apply(&verdict(&format!("{miner}-{i}"), vec![mv(miner, Standing::Agreed, Some(5))]), seq);
            }
        }
        assert_eq!(ledger.miner("busy").unwrap().ema, ledger.miner("light").unwrap().ema);
        let closed = ledger.close_epoch(1, &BTreeSet::new());
        let [busy, light] = [&closed.weights[0], &closed.weights[1]];
        assert_eq!((busy.miner.as_str(), light.miner.as_str()), ("busy", "light"));
        assert_eq!((busy.score, light.score), (100.0, 10.0));
        // 10:1 of 65535, largest remainder.
        assert_eq!((busy.weight, light.weight), (59577, 5958));
    }

    #[test]
    fn idle_miners_get_no_weight() {
        let mut ledger = Ledger::new(0.5, 0);
        let both = |t: &str| verdict(t, vec![mv("a", Standing::Agreed, Some(1)), mv("b", Standing::Agreed, Some(2))]);
        ledger.apply(&both("t1"), 1).unwrap();
        let first = ledger.close_epoch(10, &BTreeSet::new());
        assert!(first.weights.iter().all(|w| w.weight > 0));
        // Epoch 2: only a works. b keeps its moving quality, but did nothing verified.
        ledger.apply(&verdict("t2", vec![mv("a", Standing::Agreed, Some(1))]), 2).unwrap();
        // b took part in a task but failed it: still no verified work.
        ledger.apply(&verdict("t3", vec![mv("b", Standing::Failed, Some(1))]), 3).unwrap();
        assert!(ledger.miner("b").unwrap().ema > 0.0);
        let second = ledger.close_epoch(20, &BTreeSet::new());
        let weights: Vec<(&str, u16)> = second.weights.iter().map(|w| (w.miner.as_str(), w.weight)).collect();
        assert_eq!(weights, [("a", WEIGHT_TOTAL), ("b", 0)]);
        // An epoch in which no one worked weighs no one.
        let third = ledger.close_epoch(30, &BTreeSet::new());
        assert!(third.weights.iter().all(|w| w.weight == 0 && w.score == 0.0), "{third:?}");
    }

    #[test]
    fn quarantined_miners_get_no_weight() {
        let mut ledger = Ledger::new(0.5, 0);
        for seq in 1..=3 {
            // Audited: b's outputs were wrong by the reference, three times.
            let mut v = verdict(
                &format!("t{seq}"),
                vec![
                    mv("a", Standing::Agreed, Some(1)),
                    mv("b", Standing::Disagreed, Some(2)),
                    mv("c", Standing::Agreed, Some(3)),
                ],
            );
            v.reference = Some(ReferenceCheck::AuditFailed);
            ledger.apply(&v, seq).unwrap();
        }
        // b agreed on this one (a lucky vote), so only quarantine keeps it from a weight.
        ledger.apply(&verdict("t4", vec![mv("b", Standing::Agreed, Some(1))]), 4).unwrap();
        assert_eq!(ledger.quarantined_by_proof(3), BTreeSet::from(["b".to_string()]));
        assert_eq!(ledger.quarantined_by_proof(4), BTreeSet::new());
        assert_eq!(ledger.quarantined_by_proof(0), BTreeSet::new(), "0 turns quarantine off");
        // The scheduler quarantined c for timeouts; "ghost" is listed too but has no record.
        let mut quarantined = ledger.quarantined_by_proof(3);
        quarantined.extend(["c".to_string(), "ghost".to_string()]);
        let closed = ledger.close_epoch(10, &quarantined);
        let weights: Vec<(&str, u16, f64)> =
            closed.weights.iter().map(|w| (w.miner.as_str(), w.weight, w.score)).collect();
        assert_eq!(weights[1..], [("b", 0, 0.0), ("c", 0, 0.0)]);
        assert_eq!(weights[0].1, WEIGHT_TOTAL);
        assert_eq!(closed.quarantined, ["b", "c"], "only miners with a record are listed");
    }

    #[test]
    fn reputation_comes_from_reference_runs_only() {
        let mut ledger = Ledger::new(0.5, 0);
        let rep = |l: &Ledger, m: &str| l.miner(m).unwrap().reputation();
        let honest_and_colluders = |agreed: [Standing; 3]| {
            verdict(
                "t",
                vec![mv("honest", agreed[0], Some(1)), mv("x", agreed[1], Some(2)), mv("y", agreed[2], Some(3))],
            )
        };
        let (ok, wrong) = (Standing::Agreed, Standing::Disagreed);
        // The colluders win a plain vote: it teaches nothing, either way.
        ledger.apply(&honest_and_colluders([wrong, ok, ok]), 1).unwrap();
        assert_eq!((rep(&ledger, "honest"), rep(&ledger, "x")), (None, None));
        assert_eq!(ledger.reputations(), []);
        // Nor does a vote whose reference could not run.
        let mut v = honest_and_colluders([wrong, ok, ok]);
        v.reference = Some(ReferenceCheck::Unavailable { reason: "timed out".into() });
        ledger.apply(&v, 2).unwrap();
        assert_eq!(ledger.reputations(), []);
        // An audit overrules them: the honest miner was right, the colluders wrong.
        let mut v = honest_and_colluders([ok, wrong, wrong]);
        v.reference = Some(ReferenceCheck::AuditFailed);
        ledger.apply(&v, 3).unwrap();
        assert_eq!((rep(&ledger, "honest"), rep(&ledger, "x")), (Some(1.0), Some(0.0)));
        // More won votes change neither reputation.
        for seq in 4..14 {
            ledger.apply(&honest_and_colluders([wrong, ok, ok]), seq).unwrap();
        }
        assert_eq!((rep(&ledger, "honest"), rep(&ledger, "x")), (Some(1.0), Some(0.0)));
        // A passed audit and an escalation count; a failure in a judged task does not.
        let mut v = honest_and_colluders([ok, ok, Standing::Failed]);
        v.reference = Some(ReferenceCheck::AuditPassed);
        ledger.apply(&v, 14).unwrap();
        let mut v = honest_and_colluders([ok, wrong, ok]);
        v.reference = Some(ReferenceCheck::Escalated);
        ledger.apply(&v, 15).unwrap();
        assert_eq!(rep(&ledger, "x"), Some(1.0 / 3.0));
        assert_eq!(rep(&ledger, "y"), Some(1.0 / 2.0));
        let reps = ledger.reputations();
        assert_eq!(reps, [("honest".to_string(), 1.0), ("x".to_string(), 1.0 / 3.0), ("y".to_string(), 0.5)]);
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
