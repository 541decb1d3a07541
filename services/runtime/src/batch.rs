//! Dynamic batching: several tasks' inputs stacked along the batch dimension for one
//! inference, and the outputs split back per task. Pure functions, no I/O.

use sundara_schemas::{Tensor, TensorSpec};

/// Whether a model can batch tasks: every input and output has a dynamic first dimension
/// (the batch), so tasks stack along it. Models with a batch axis elsewhere, or scalar
/// inputs (silero-vad's `sr`), run one task at a time.
pub fn batchable(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> bool {
    !inputs.is_empty() && inputs.iter().chain(outputs).all(|s| s.shape.first() == Some(&None))
}

/// Rows of a task: the first dimension of its first input.
pub fn rows(inputs: &[Tensor]) -> Option<u64> {
    inputs.first()?.shape.first().copied()
}

/// Most rows a task may have and still share a batch. More is possible only with tensors
/// of zero elements (validation bounds the bytes); such a task runs alone, so that the row
/// sums of a batch cannot overflow.
const MAX_BATCHED_ROWS: u64 = 1 << 32;

/// Whether two tasks' inputs can share a batch: same names, dtypes and shapes but for the
/// first dimension.
pub fn compatible(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && x.dtype == y.dtype
                && !x.shape.is_empty()
                && x.shape[1..] == y.shape[1..]
                && x.shape[0].max(y.shape[0]) <= MAX_BATCHED_ROWS
        })
}

/// Stacks the tasks' inputs (already [`compatible`]) along the first dimension.
pub fn stack(tasks: &[&[Tensor]]) -> Vec<Tensor> {
    let first = tasks[0];
    (0..first.len())
        .map(|i| {
            let rows: u64 = tasks.iter().map(|t| t[i].shape[0]).sum();
            let mut shape = first[i].shape.clone();
            shape[0] = rows;
            let mut data = Vec::with_capacity(tasks.iter().map(|t| t[i].data.len()).sum());
            for t in tasks {
                data.extend_from_slice(&t[i].data);
            }
            Tensor { name: first[i].name.clone(), dtype: first[i].dtype, shape, data }
        })
        .collect()
}

/// Splits a batch's outputs back into one output set per task (`rows` per task, in order).
/// `None` if an output's first dimension does not match the rows stacked.
pub fn split(outputs: Vec<Tensor>, rows: &[u64]) -> Option<Vec<Vec<Tensor>>> {
    let total: u64 = rows.iter().sum();
    if outputs.iter().any(|out| out.shape.first() != Some(&total)) {
        return None;
    }
    let mut start = 0;
    rows.iter()
        .map(|&r| {
            let part = slice(&outputs, start, r);
            start += r;
            part
        })
        .collect()
}

/// Rows `start..start + rows` of every tensor (each with at least that many rows along its
/// first dimension), copied; `None` when one has fewer.
pub fn slice(tensors: &[Tensor], start: u64, rows: u64) -> Option<Vec<Tensor>> {
    tensors
        .iter()
        .map(|t| {
            let total = *t.shape.first()?;
            if start.checked_add(rows)? > total {
                return None;
            }
            let row_bytes = t.data.len() / total.max(1) as usize;
            let (from, len) = (start as usize * row_bytes, rows as usize * row_bytes);
            let mut shape = t.shape.clone();
            shape[0] = rows;
            Some(Tensor { name: t.name.clone(), dtype: t.dtype, shape, data: t.data.get(from..from + len)?.to_vec() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundara_schemas::DType;

    fn spec(shape: Vec<Option<u64>>) -> TensorSpec {
        TensorSpec { name: "x".into(), dtype: DType::F32, shape }
    }

    #[test]
    fn only_batch_first_models_batch() {
        assert!(batchable(&[spec(vec![None, Some(784)])], &[spec(vec![None, Some(10)])]));
        // silero-vad: a scalar `sr` input and a state batched on its second axis.
        assert!(!batchable(&[spec(vec![None, Some(512)]), spec(vec![])], &[spec(vec![None, Some(1)])]));
        assert!(!batchable(&[spec(vec![Some(2), None, Some(128)])], &[spec(vec![None])]));
        assert!(!batchable(&[spec(vec![Some(1), Some(4)])], &[spec(vec![None])]));
    }

    #[test]
    fn stack_then_split_gives_each_task_its_rows_back() {
        let a = vec![Tensor::from_values("x", vec![1, 3], &[1f32, 2., 3.])];
        let b = vec![Tensor::from_values("x", vec![2, 3], &[4f32, 5., 6., 7., 8., 9.])];
        assert!(compatible(&a, &b));
        let batch = stack(&[&a, &b]);
        assert_eq!(batch[0].shape, vec![3, 3]);
        assert_eq!(batch[0].values::<f32>().unwrap(), (1..=9).map(|v| v as f32).collect::<Vec<_>>());
        // An identity model: outputs are the inputs.
        let back = split(batch, &[rows(&a).unwrap(), rows(&b).unwrap()]).unwrap();
        assert_eq!(back, vec![a, b]);
    }

    #[test]
    fn incompatible_inputs_do_not_share_a_batch() {
        let a = vec![Tensor::from_values("x", vec![1, 3], &[1f32, 2., 3.])];
        let wider = vec![Tensor::from_values("x", vec![1, 4], &[1f32, 2., 3., 4.])];
        let other_name = vec![Tensor::from_values("y", vec![1, 3], &[1f32, 2., 3.])];
        let ints = vec![Tensor::from_values("x", vec![1, 3], &[1i32, 2, 3])];
        assert!(!compatible(&a, &wider));
        assert!(!compatible(&a, &other_name));
        assert!(!compatible(&a, &ints));
        let huge = vec![Tensor { name: "x".into(), dtype: DType::F32, shape: vec![1 << 62, 0], data: vec![] }];
        assert!(!compatible(&huge, &huge), "rows that could overflow a batch's sum run alone");
    }

    #[test]
    fn outputs_that_lost_rows_are_refused() {
        let out = vec![Tensor::from_values("p", vec![2, 1], &[0.5f32, 0.25])];
        assert!(split(out, &[1, 2]).is_none());
    }
}
