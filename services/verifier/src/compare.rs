//! Comparison rules: when do two miners' outputs count as the same answer?
//!
//! Integer and bool outputs are always compared exactly. The model's rule applies to
//! float outputs, whose low bits differ across CPUs and GPUs.

use sundara_schemas::{CompareRule, Tensor};

/// Whether two output lists agree under `rule`: same names, dtypes and shapes, and each
/// float tensor within the rule.
pub fn agree(rule: &CompareRule, a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && x.dtype == y.dtype
                && x.shape == y.shape
                && x.data.len() == y.data.len()
                && if x.dtype.is_float() { floats_agree(rule, x, y) } else { x.data == y.data }
        })
}

fn floats_agree(rule: &CompareRule, x: &Tensor, y: &Tensor) -> bool {
    match *rule {
        CompareRule::Exact => x.data == y.data,
        CompareRule::AllClose { atol, rtol } => {
            let (a, b) = (x.to_f64(), y.to_f64());
            a.iter().zip(&b).all(|(&p, &q)| close(p, q, atol, rtol))
        }
        CompareRule::Argmax => {
            let row = row_len(x);
            let (a, b) = (x.to_f64(), y.to_f64());
            a.chunks(row).zip(b.chunks(row)).all(|(p, q)| argmax(p) == argmax(q))
        }
        CompareRule::Cosine { min } => {
            let row = row_len(x);
            let (a, b) = (x.to_f64(), y.to_f64());
            a.chunks(row).zip(b.chunks(row)).all(|(p, q)| cosine(p, q) >= min)
        }
    }
}

/// numpy's allclose made symmetric (tolerance relative to the larger magnitude), so that
/// grouping does not depend on which outcome arrived first. NaN only matches NaN.
fn close(p: f64, q: f64, atol: f64, rtol: f64) -> bool {
    if p.is_nan() || q.is_nan() {
        return p.is_nan() && q.is_nan();
    }
    if p == q {
        return true; // also equal infinities
    }
    (p - q).abs() <= atol + rtol * p.abs().max(q.abs())
}

/// Length of the last axis (a scalar or empty shape is one row of one).
fn row_len(t: &Tensor) -> usize {
    t.shape.last().map_or(1, |&d| (d as usize).max(1))
}

/// Index of the first maximum; NaN never wins.
fn argmax(row: &[f64]) -> Option<usize> {
    row.iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .fold(None, |best: Option<(usize, f64)>, (i, &v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

fn cosine(p: &[f64], q: &[f64]) -> f64 {
    let dot: f64 = p.iter().zip(q).map(|(a, b)| a * b).sum();
    let np = p.iter().map(|a| a * a).sum::<f64>().sqrt();
    let nq = q.iter().map(|a| a * a).sum::<f64>().sqrt();
    match (np == 0.0, nq == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => dot / (np * nq),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(values: &[f32], shape: Vec<u64>) -> Vec<Tensor> {
        vec![Tensor::from_values("y", shape, values)]
    }

    #[test]
    fn exact_needs_identical_bits() {
        let a = f(&[1.0, 2.0], vec![2]);
        assert!(agree(&CompareRule::Exact, &a, &a.clone()));
        assert!(!agree(&CompareRule::Exact, &a, &f(&[1.0, 2.000001], vec![2])));
    }

    #[test]
    fn allclose_tolerates_hardware_noise_not_real_differences() {
        let rule = CompareRule::AllClose { atol: 1e-5, rtol: 1e-4 };
        let a = f(&[1.0, -3.0, 1e-7], vec![3]);
        assert!(agree(&rule, &a, &f(&[1.000001, -3.000002, 2e-7], vec![3])));
        assert!(!agree(&rule, &a, &f(&[1.01, -3.0, 0.0], vec![3])));
        assert!(agree(&rule, &f(&[f32::NAN], vec![1]), &f(&[f32::NAN], vec![1])));
        assert!(!agree(&rule, &f(&[f32::NAN], vec![1]), &f(&[0.0], vec![1])));
    }

    #[test]
    fn allclose_is_symmetric() {
        let rule = CompareRule::AllClose { atol: 0.0, rtol: 0.1 };
        let (a, b) = (f(&[1.0], vec![1]), f(&[1.105], vec![1]));
        assert_eq!(agree(&rule, &a, &b), agree(&rule, &b, &a));
    }

    #[test]
    fn argmax_compares_top1_per_row() {
        let a = f(&[0.1, 0.9, 0.0, 0.8, 0.1, 0.1], vec![2, 3]);
        assert!(agree(&CompareRule::Argmax, &a, &f(&[0.3, 0.6, 0.1, 0.5, 0.2, 0.3], vec![2, 3])));
        assert!(!agree(&CompareRule::Argmax, &a, &f(&[0.3, 0.6, 0.1, 0.2, 0.5, 0.3], vec![2, 3])));
    }

    #[test]
    fn cosine_per_row() {
        let rule = CompareRule::Cosine { min: 0.99 };
        let a = f(&[1.0, 0.0, 0.0, 1.0], vec![2, 2]);
        assert!(agree(&rule, &a, &f(&[2.0, 0.01, 0.0, 3.0], vec![2, 2])));
        assert!(!agree(&rule, &a, &f(&[0.0, 1.0, 0.0, 1.0], vec![2, 2])));
    }

    #[test]
    fn integers_are_exact_whatever_the_rule_and_shapes_must_match() {
        let a = vec![Tensor::from_values("best", vec![2], &[3i64, 7])];
        let b = vec![Tensor::from_values("best", vec![2], &[3i64, 8])];
        assert!(!agree(&CompareRule::AllClose { atol: 10.0, rtol: 1.0 }, &a, &b));
        assert!(!agree(&CompareRule::Argmax, &f(&[1.0, 2.0], vec![2]), &f(&[1.0, 2.0], vec![1, 2])));
        assert!(!agree(&CompareRule::Exact, &a, &[]));
    }
}
