//! A classification dataset for training: rows of integer features and a class label,
//! read from CSV, held in memory, cut into the step model's `x` and one-hot `y` tensors.

use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use sundara_schemas::Tensor;

use super::TrainError;

/// Rows of features scaled to [0, 1] (divided by the largest value in the file) and their
/// class labels.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub features: usize,
    pub classes: usize,
    x: Vec<f32>,
    labels: Vec<usize>,
}

impl Dataset {
    /// Reads `path`: one row per line, the features then the label, comma-separated
    /// numbers, no header (`scripts/setup` writes scikit-learn's digits so).
    pub fn read_csv(path: &Path) -> Result<Dataset, TrainError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TrainError::ReadData { path: path.display().to_string(), source })?;
        Dataset::parse(&text).map_err(|reason| TrainError::Data { path: path.display().to_string(), reason })
    }

    /// [`Dataset::read_csv`]'s parsing: every line the same width, non-negative finite
    /// features, whole-number labels.
    pub fn parse(text: &str) -> Result<Dataset, String> {
        let mut x = Vec::new();
        let mut labels = Vec::new();
        let mut width = None;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let values: Vec<f64> = line
                .split(',')
                .map(|v| v.trim().parse::<f64>().map_err(|e| format!("line {}: {v:?}: {e}", n + 1)))
                .collect::<Result<_, _>>()?;
            if values.len() < 2 || width.is_some_and(|w| w != values.len()) {
                return Err(format!("line {}: {} values, expected {}", n + 1, values.len(), width.unwrap_or(2)));
            }
            width = Some(values.len());
            let (features, label) = values.split_at(values.len() - 1);
            if features.iter().any(|f| !f.is_finite() || *f < 0.0) {
                return Err(format!("line {}: a feature is negative or not finite", n + 1));
            }
            let label = label[0];
            if label < 0.0 || label.fract() != 0.0 || label > 1e6 {
                return Err(format!("line {}: label {label} is not a class number", n + 1));
            }
            x.extend(features.iter().map(|&f| f as f32));
            labels.push(label as usize);
        }
        let Some(width) = width else { return Err("no rows".into()) };
        let scale = x.iter().copied().fold(0.0f32, f32::max);
        if scale > 0.0 {
            x.iter_mut().for_each(|v| *v /= scale);
        }
        let classes = labels.iter().max().map_or(0, |m| m + 1);
        Ok(Dataset { features: width - 1, classes, x, labels })
    }

    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    /// The row indices, shuffled by `seed`, cut into (training, held out): the last
    /// `held_out` share is held out (at least one row each side when there are two).
    pub fn split(&self, held_out: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        let mut rows: Vec<usize> = (0..self.rows()).collect();
        rows.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let test =
            ((self.rows() as f64 * held_out.clamp(0.0, 1.0)).round() as usize).min(self.rows().saturating_sub(1));
        let train = rows.split_off(self.rows() - test);
        (rows, train)
    }

    /// The step model's `x` (features) and `y` (one-hot labels) for `rows`, in order.
    pub fn tensors(&self, rows: &[usize]) -> [Tensor; 2] {
        let mut x = Vec::with_capacity(rows.len() * self.features);
        let mut y = vec![0f32; rows.len() * self.classes];
        for (i, &r) in rows.iter().enumerate() {
            x.extend_from_slice(&self.x[r * self.features..(r + 1) * self.features]);
            y[i * self.classes + self.labels[r]] = 1.0;
        }
        let n = rows.len() as u64;
        [
            Tensor::from_values("x", vec![n, self.features as u64], &x),
            Tensor::from_values("y", vec![n, self.classes as u64], &y),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_scaled_and_labels_one_hot() {
        let d = Dataset::parse("0,8,16,1\n4,4,0,0\n\n2,0,0,2\n").unwrap();
        assert_eq!((d.rows(), d.features, d.classes), (3, 3, 3));
        let [x, y] = d.tensors(&[1, 0]);
        assert_eq!(x.shape, vec![2, 3]);
        assert_eq!(x.values::<f32>().unwrap(), vec![0.25, 0.25, 0.0, 0.0, 0.5, 1.0]);
        assert_eq!(y.values::<f32>().unwrap(), vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn bad_rows_are_refused_with_their_line() {
        for (text, says) in [
            ("1,2,0\n1,0\n", "line 2: 2 values"),
            ("1,x,0\n", "line 1"),
            ("-1,2,0\n", "negative"),
            ("1,2,0.5\n", "not a class"),
            ("", "no rows"),
        ] {
            let e = Dataset::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_split_is_seeded_disjoint_and_whole() {
        let d = Dataset::parse(&(0..100).map(|i| format!("{i},{}\n", i % 10)).collect::<String>()).unwrap();
        let (train, test) = d.split(0.2, 7);
        assert_eq!((train.len(), test.len()), (80, 20));
        assert_eq!(d.split(0.2, 7), (train.clone(), test.clone()));
        let mut all: Vec<usize> = train.into_iter().chain(test).collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }
}
