//! Trust earned by passing audits lowers how often a miner's tasks are audited, never to
//! zero; one failed audit restores full checking. Trust is kept per operator (the unit of
//! collusion), so one operator's many worker names share one record: a lie by any of them
//! restores full checking for all. Plain logic, no I/O.

use std::collections::HashMap;

use sundara_schemas::{Standing, Verdict};

/// Passed audits after which a miner's tasks are audited at half the model's rate.
pub const HALF_AT: u32 = 50;
/// The lowest share of the model's audit rate trust can bring a task to.
pub const FLOOR: f64 = 0.25;

/// Consecutive passed audits per miner, as this verifier has seen them.
#[derive(Debug, Default)]
pub struct Trust {
    passes: HashMap<String, u32>,
}

impl Trust {
    /// The audit rate for a task run by the `operators` of its miners: the model's `base`
    /// rate, lowered by the least trusted operator's record to no less than [`FLOOR`] of it. A base of 1 (audit
    /// every task) is the operator's demand and stays 1.
    pub fn audit_rate<'a>(&self, base: f64, miners: impl IntoIterator<Item = &'a str>) -> f64 {
        if base >= 1.0 {
            return base;
        }
        let least = miners.into_iter().map(|m| self.passes.get(m).copied().unwrap_or(0)).min().unwrap_or(0);
        base * (1.0 / (1.0 + f64::from(least) / f64::from(HALF_AT))).max(FLOOR)
    }

    /// Learns from a verdict judged against the reference: miners who agreed with it earn
    /// a pass; one who did not starts again from nothing.
    pub fn record(&mut self, verdict: &Verdict) {
        if !verdict.judged_by_reference() {
            return;
        }
        for m in &verdict.miners {
            match m.standing {
                Standing::Agreed => *self.passes.entry(m.operator().to_string()).or_default() += 1,
                Standing::Disagreed => {
                    self.passes.insert(m.operator().to_string(), 0);
                }
                Standing::Failed | Standing::Missing | Standing::Late => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundara_schemas::{CompareRule, MinerVerdict, ModelRef, ReferenceCheck, WIRE_VERSION};

    fn verdict(check: Option<ReferenceCheck>, miners: &[(&str, Standing)]) -> Verdict {
        Verdict {
            v: WIRE_VERSION,
            task_id: "t".into(),
            tenant: "t".into(),
            model: ModelRef { name: "m".into(), version: "1".into() },
            k: miners.len() as u8,
            rule: CompareRule::Exact,
            accepted: true,
            miners: miners
                .iter()
                .map(|(w, s)| MinerVerdict {
                    operator: String::new(),
                    worker: w.to_string(),
                    replica: 0,
                    attempt: 0,
                    standing: *s,
                    latency_us: None,
                })
                .collect(),
            decided_at_ms: 0,
            reference: check,
        }
    }

    #[test]
    fn trust_lowers_audits_never_to_zero_and_one_failure_restores_them() {
        let mut trust = Trust::default();
        assert_eq!(trust.audit_rate(0.2, ["a"]), 0.2, "a newcomer gets the full rate");
        for _ in 0..HALF_AT {
            trust.record(&verdict(Some(ReferenceCheck::AuditPassed), &[("a", Standing::Agreed)]));
        }
        assert!((trust.audit_rate(0.2, ["a"]) - 0.1).abs() < 1e-12, "half the rate after {HALF_AT} passes");
        for _ in 0..10_000 {
            trust.record(&verdict(Some(ReferenceCheck::AuditPassed), &[("a", Standing::Agreed)]));
        }
        assert!((trust.audit_rate(0.2, ["a"]) - 0.2 * FLOOR).abs() < 1e-12, "never below the floor");
        assert_eq!(trust.audit_rate(1.0, ["a"]), 1.0, "auditing every task stays so");
        // A task with a newcomer is checked at the newcomer's rate.
        assert_eq!(trust.audit_rate(0.2, ["a", "b"]), 0.2);
        // Votes without a reference teach nothing.
        trust.record(&verdict(None, &[("a", Standing::Disagreed)]));
        assert!(trust.audit_rate(0.2, ["a"]) < 0.2);
        // One failed audit: full checking again.
        trust.record(&verdict(Some(ReferenceCheck::AuditFailed), &[("a", Standing::Disagreed)]));
        assert_eq!(trust.audit_rate(0.2, ["a"]), 0.2);
    }

    #[test]
    fn an_operators_names_share_one_trust_record() {
        let mut trust = Trust::default();
        let mut v = verdict(Some(ReferenceCheck::AuditPassed), &[("w1", Standing::Agreed)]);
        v.miners[0].operator = "op".into();
        for _ in 0..HALF_AT {
            trust.record(&v);
        }
        assert!(trust.audit_rate(0.2, ["op"]) < 0.2, "trust is the operator's");
        // A lie by another of its names restores full checking for the operator.
        let mut lie = verdict(Some(ReferenceCheck::AuditFailed), &[("w2", Standing::Disagreed)]);
        lie.miners[0].operator = "op".into();
        trust.record(&lie);
        assert_eq!(trust.audit_rate(0.2, ["op"]), 0.2);
    }
}
