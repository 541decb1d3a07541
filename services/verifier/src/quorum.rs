//! Grouping outcomes and finding a majority. Pure logic.

use sundara_schemas::{CompareRule, OutcomeResult, Standing, Tensor};

use crate::compare::agree;

/// The result of comparing a task's outcomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Index (into the outcomes given) of the winning group's first member.
    pub winner: Option<usize>,
    /// Each outcome's standing, in the order given.
    pub standings: Vec<Standing>,
    /// Size of each group of agreeing outputs, largest first.
    pub group_sizes: Vec<usize>,
}

/// Groups the outputs under `rule` (each outcome joins the first group whose first member
/// it agrees with) and accepts a group holding a strict majority of `k`.
pub fn decide(rule: &CompareRule, k: u8, results: &[&OutcomeResult]) -> Decision {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let OutcomeResult::Ok { outputs } = r else { continue };
        let joined = groups.iter_mut().find(|g| agree(rule, outputs_of(results[g[0]]), outputs));
        match joined {
            Some(group) => group.push(i),
            None => groups.push(vec![i]),
        }
    }
    let winning = groups.iter().find(|g| g.len() * 2 > k as usize);
    let standings = results
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            OutcomeResult::Ok { .. } if winning.is_some_and(|g| g.contains(&i)) => Standing::Agreed,
            OutcomeResult::Ok { .. } => Standing::Disagreed,
            OutcomeResult::Failed { .. } => Standing::Failed,
            OutcomeResult::Abandoned { .. } => Standing::Missing,
        })
        .collect();
    let mut group_sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
    group_sizes.sort_unstable_by(|a, b| b.cmp(a));
    Decision { winner: winning.map(|g| g[0]), standings, group_sizes }
}

/// Judges every outcome against the reference's outputs (the verifier's own run): those
/// that agree are accepted, whatever the vote. The winner is the first that agrees, if any.
pub fn judge(rule: &CompareRule, reference: &[Tensor], results: &[&OutcomeResult]) -> Decision {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut agreeing = Vec::new();
    let standings = results
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            OutcomeResult::Ok { outputs } => {
                match groups.iter_mut().find(|g| agree(rule, outputs_of(results[g[0]]), outputs)) {
                    Some(group) => group.push(i),
                    None => groups.push(vec![i]),
                }
                if agree(rule, reference, outputs) {
                    agreeing.push(i);
                    Standing::Agreed
                } else {
                    Standing::Disagreed
                }
            }
            OutcomeResult::Failed { .. } => Standing::Failed,
            OutcomeResult::Abandoned { .. } => Standing::Missing,
        })
        .collect();
    let mut group_sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
    group_sizes.sort_unstable_by(|a, b| b.cmp(a));
    Decision { winner: agreeing.first().copied(), standings, group_sizes }
}

fn outputs_of(r: &OutcomeResult) -> &[Tensor] {
    match r {
        OutcomeResult::Ok { outputs } => outputs,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(v: f32) -> OutcomeResult {
        OutcomeResult::Ok { outputs: vec![Tensor::from_values("y", vec![1], &[v])] }
    }
    const RULE: CompareRule = CompareRule::AllClose { atol: 1e-3, rtol: 0.0 };

    #[test]
    fn majority_wins_and_liar_disagrees() {
        let rs = [ok(1.0), ok(5.0), ok(1.0001)];
        let d = decide(&RULE, 3, &rs.iter().collect::<Vec<_>>());
        assert_eq!(d.winner, Some(0));
        assert_eq!(d.standings, vec![Standing::Agreed, Standing::Disagreed, Standing::Agreed]);
        assert_eq!(d.group_sizes, vec![2, 1]);
    }

    #[test]
    fn split_vote_has_no_winner() {
        let rs = [ok(1.0), ok(2.0)];
        let d = decide(&RULE, 2, &rs.iter().collect::<Vec<_>>());
        assert_eq!(d.winner, None);
        assert_eq!(d.standings, vec![Standing::Disagreed, Standing::Disagreed]);
    }

    #[test]
    fn failures_and_missing_count_against_the_majority() {
        let rs =
            [ok(1.0), OutcomeResult::Failed { reason: "x".into() }, OutcomeResult::Abandoned { reason: "y".into() }];
        let d = decide(&RULE, 3, &rs.iter().collect::<Vec<_>>());
        assert_eq!(d.winner, None);
        assert_eq!(d.standings, vec![Standing::Disagreed, Standing::Failed, Standing::Missing]);
        let rs = [ok(1.0), ok(1.0), OutcomeResult::Abandoned { reason: "y".into() }];
        let d = decide(&RULE, 3, &rs.iter().collect::<Vec<_>>());
        assert_eq!(d.winner, Some(0));
        assert_eq!(d.standings[2], Standing::Missing);
    }

    #[test]
    fn the_reference_overrules_a_wrong_majority() {
        // Two colluders agree on a wrong answer; the honest minority matches the reference.
        let rs = [ok(5.0), ok(1.0), ok(5.0)];
        let results: Vec<&OutcomeResult> = rs.iter().collect();
        assert_eq!(decide(&RULE, 3, &results).winner, Some(0), "the vote alone is fooled");
        let reference = [Tensor::from_values("y", vec![1], &[1.0f32])];
        let d = judge(&RULE, &reference, &results);
        assert_eq!(d.winner, Some(1));
        assert_eq!(d.standings, vec![Standing::Disagreed, Standing::Agreed, Standing::Disagreed]);
        assert_eq!(d.group_sizes, vec![2, 1]);
        // Nobody right: no winner, everyone disagreed.
        let wrong = [Tensor::from_values("y", vec![1], &[9.0f32])];
        assert_eq!(judge(&RULE, &wrong, &results).winner, None);
    }

    #[test]
    fn single_replica_is_its_own_majority() {
        let rs = [ok(1.0)];
        assert_eq!(decide(&RULE, 1, &rs.iter().collect::<Vec<_>>()).winner, Some(0));
    }
}
