//! Model registry records (KV bucket `models`).

use serde::{Deserialize, Serialize};

use crate::tensor::{DType, Tensor};

/// A model pinned to one immutable version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

impl ModelRef {
    /// Splits what a client names a model by: `name` (the latest version) or `name@version`
    /// (that version, pinned). Names and versions themselves never contain `@`.
    pub fn split_spec(spec: &str) -> (&str, Option<&str>) {
        match spec.split_once('@') {
            Some((name, version)) => (name, Some(version)),
            None => (spec, None),
        }
    }

    /// `name@version`: one version, pinned, as clients name it and slice reports key their
    /// loaded models; [`ModelRef::split_spec`] reads it back.
    pub fn spec(name: &str, version: &str) -> String {
        format!("{name}@{version}")
    }

    /// The model name of a spec (`mlp` for both `mlp` and `mlp@2`).
    pub fn spec_name(spec: &str) -> &str {
        ModelRef::split_spec(spec).0
    }
}

impl std::fmt::Display for ModelRef {
    /// `name@version` ([`ModelRef::spec`]).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// Declared input or output of a model, read from the ONNX file itself.
/// A `None` dimension is dynamic (symbolic or -1 in the model).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Option<u64>>,
}

impl TensorSpec {
    /// Whether input `t` fits this spec: same dtype, same rank, fixed dimensions equal.
    pub fn mismatch(&self, t: &Tensor) -> Option<String> {
        self.mismatch_of("input", t)
    }

    /// As [`TensorSpec::mismatch`], for a tensor that is the model's `what` ("output").
    pub fn mismatch_of(&self, what: &str, t: &Tensor) -> Option<String> {
        if t.dtype != self.dtype {
            return Some(format!("{what} `{}` must be {}, got {}", self.name, self.dtype, t.dtype));
        }
        let fits = t.shape.len() == self.shape.len()
            && self.shape.iter().zip(&t.shape).all(|(want, got)| want.is_none_or(|w| w == *got));
        if !fits {
            return Some(format!(
                "{what} `{}` must have shape {}, got {:?}",
                self.name,
                shape_text(&self.shape),
                t.shape
            ));
        }
        None
    }
}

/// `[batch, 784]`-style text for a declared shape (`?` for dynamic dimensions).
pub fn shape_text(shape: &[Option<u64>]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.map_or("?".to_string(), |v| v.to_string())).collect();
    format!("[{}]", dims.join(", "))
}

/// How the outcomes of different miners are compared. Integer and bool outputs are always
/// compared exactly; the rule says how float outputs are compared.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "rule", rename_all = "lowercase")]
pub enum CompareRule {
    /// Bit-identical outputs (digest equality).
    Exact,
    /// `|a - b| <= atol + rtol * |b|` element-wise, as numpy's allclose.
    AllClose { atol: f64, rtol: f64 },
    /// Same index of the maximum along the last axis, for every row.
    Argmax,
    /// Cosine similarity of each row (last axis) at least `min`.
    Cosine { min: f64 },
}

impl Default for CompareRule {
    /// Float outputs differ across hardware; a tolerance well above float32 noise and far
    /// below any real disagreement.
    fn default() -> Self {
        CompareRule::AllClose { atol: 1e-4, rtol: 1e-3 }
    }
}

impl std::fmt::Display for CompareRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompareRule::Exact => f.write_str("exact"),
            CompareRule::AllClose { atol, rtol } => write!(f, "allclose(atol={atol}, rtol={rtol})"),
            CompareRule::Argmax => f.write_str("argmax"),
            CompareRule::Cosine { min } => write!(f, "cosine(min={min})"),
        }
    }
}

/// Verification policy of a model.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Distinct miners that run each task (k).
    pub redundancy: u8,
    pub rule: CompareRule,
    /// Fraction of tasks the verifier also runs on its own reference runtime (audits),
    /// whatever k is: the check that a colluding majority, or a lone miner at k=1, cannot pass.
    #[serde(default = "default_audit_rate")]
    pub audit_rate: f64,
}

/// Audits on 5 % of tasks: a miner who cheats on a fraction f of its tasks is caught
/// within about 20/f of them.
pub const DEFAULT_AUDIT_RATE: f64 = 0.05;

fn default_audit_rate() -> f64 {
    DEFAULT_AUDIT_RATE
}

impl Policy {
    pub fn new(redundancy: u8, rule: CompareRule) -> Policy {
        Policy { redundancy, rule, audit_rate: DEFAULT_AUDIT_RATE }
    }

    /// Refuses a policy that can never work: k outside 1..=[`MAX_REDUNDANCY`] (k=0 would
    /// "verify" a task with no miner at all), an audit rate outside [0, 1], or a rule whose
    /// tolerance is not a finite, non-negative number (allclose) or whose minimum similarity
    /// is outside (-1, 1] (cosine). k=1 is allowed: only audits then check a miner.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(1..=MAX_REDUNDANCY).contains(&self.redundancy) {
            return Err(PolicyError::Redundancy(self.redundancy));
        }
        if !(0.0..=1.0).contains(&self.audit_rate) {
            return Err(PolicyError::AuditRate(self.audit_rate));
        }
        match self.rule {
            CompareRule::AllClose { atol, rtol } => {
                for (name, value) in [("atol", atol), ("rtol", rtol)] {
                    if !(value.is_finite() && value >= 0.0) {
                        return Err(PolicyError::Tolerance { name, value });
                    }
                }
            }
            CompareRule::Cosine { min } if !(min > -1.0 && min <= 1.0) => return Err(PolicyError::MinCosine(min)),
            CompareRule::Exact | CompareRule::Argmax | CompareRule::Cosine { .. } => {}
        }
        Ok(())
    }
}

/// Most distinct miners a task may ask for: each replica needs a worker of its own operator.
pub const MAX_REDUNDANCY: u8 = 9;

/// A verification or batching policy that can never work (see [`Policy::validate`],
/// [`Batching::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "redundancy must be 1 to {MAX_REDUNDANCY} distinct miners per task, got {0} (0 would accept a result no miner produced)"
    )]
    Redundancy(u8),
    #[error("audit rate must be between 0 and 1, got {0}")]
    AuditRate(f64),
    #[error("{name} must be a finite number ≥ 0, got {value}")]
    Tolerance { name: &'static str, value: f64 },
    #[error("the minimum cosine similarity must be in (-1, 1], got {0}")]
    MinCosine(f64),
    #[error("max batch must be at least 1 (1 turns batching off), got 0")]
    MaxBatch,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(2, CompareRule::default())
    }
}

/// Dynamic batching of a model's tasks on a worker slice (models with a dynamic first
/// dimension on every input and output; others always run one task at a time).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Most tasks run as one inference (1 turns batching off).
    pub max_batch: u32,
    /// Longest a queued task waits for its batch to fill, in µs. 0 runs whatever is queued
    /// as soon as a session is free (batches then form only under load).
    pub max_delay_us: u32,
}

impl Batching {
    /// Refuses `max_batch` 0 (no task could ever run).
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.max_batch == 0 {
            return Err(PolicyError::MaxBatch);
        }
        Ok(())
    }
}

impl Default for Batching {
    fn default() -> Self {
        Batching { max_batch: 32, max_delay_us: 0 }
    }
}

/// A registered model: where its bytes are and what it accepts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelMeta {
    pub v: u16,
    pub name: String,
    pub version: String,
    /// Hex sha256 of the ONNX bytes; workers check it before loading.
    pub sha256: String,
    pub size: u64,
    /// Object name in the `model-blobs` store.
    pub object: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub policy: Policy,
    pub pushed_at_ms: u64,
    /// How workers batch tasks of this model (records written before it existed get the default).
    #[serde(default)]
    pub batching: Batching,
    /// Where the weights came from, for a version made by training on the network
    /// (`sundara train`); `None` for a pushed file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
}

/// How a version's weights were made: trained from its parent version (or from seeded
/// initial weights) by applying the gradients of verified tasks, in order. With the parent's
/// weights, the tasks' verified results and these settings, anyone can recompute the weights.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Lineage {
    /// The training run: every version of one run shares it.
    pub run: String,
    /// The training-step model whose tasks computed the gradients.
    pub trained_with: ModelRef,
    /// The version trained from (`name@version`); `None` for the run's first, trained from
    /// `seed`'s weights.
    pub parent: Option<String>,
    /// The seed of the run's initial weights and batch order.
    pub seed: u64,
    /// Optimizer steps applied since the run began, this version's included.
    pub steps: u64,
    pub learning_rate: f64,
    pub batch_rows: u64,
    /// The verified tasks whose gradients were applied since `parent`, in order.
    pub tasks: Vec<String>,
    /// Mean loss over the last epoch's batches, before each step's update.
    pub train_loss: f64,
    /// Accuracy on the held-out rows, measured by verified tasks.
    pub test_accuracy: Option<f64>,
}

impl ModelMeta {
    pub fn model_ref(&self) -> ModelRef {
        ModelRef { name: self.name.clone(), version: self.version.clone() }
    }
}

impl crate::codec::Versioned for ModelMeta {
    fn version(&self) -> u16 {
        self.v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut Policy)) -> Result<(), PolicyError> {
        let mut p = Policy::default();
        f(&mut p);
        p.validate()
    }

    #[test]
    fn policies_that_cannot_work_are_refused() {
        assert_eq!(with(|_| {}), Ok(()));
        assert_eq!(with(|p| p.redundancy = 1), Ok(()), "k=1 is allowed: audits check it");
        assert_eq!(with(|p| p.redundancy = MAX_REDUNDANCY), Ok(()));
        assert_eq!(with(|p| p.redundancy = 0), Err(PolicyError::Redundancy(0)));
        assert_eq!(with(|p| p.redundancy = MAX_REDUNDANCY + 1), Err(PolicyError::Redundancy(MAX_REDUNDANCY + 1)));
        assert_eq!(with(|p| p.audit_rate = 1.0), Ok(()));
        assert_eq!(with(|p| p.audit_rate = 0.0), Ok(()));
        assert!(matches!(with(|p| p.audit_rate = 1.5), Err(PolicyError::AuditRate(_))));
        assert!(matches!(with(|p| p.audit_rate = -0.1), Err(PolicyError::AuditRate(_))));
        assert!(matches!(with(|p| p.audit_rate = f64::NAN), Err(PolicyError::AuditRate(_))));
        let allclose = |atol, rtol| with(|p| p.rule = CompareRule::AllClose { atol, rtol });
        assert_eq!(allclose(0.0, 0.0), Ok(()));
        assert!(matches!(allclose(-1e-4, 1e-3), Err(PolicyError::Tolerance { name: "atol", .. })));
        assert!(matches!(allclose(1e-4, f64::INFINITY), Err(PolicyError::Tolerance { name: "rtol", .. })));
        assert!(matches!(allclose(f64::NAN, 0.0), Err(PolicyError::Tolerance { name: "atol", .. })));
        let cosine = |min| with(|p| p.rule = CompareRule::Cosine { min });
        assert_eq!(cosine(1.0), Ok(()));
        assert_eq!(cosine(0.999), Ok(()));
        assert!(matches!(cosine(-1.0), Err(PolicyError::MinCosine(_))));
        assert!(matches!(cosine(1.01), Err(PolicyError::MinCosine(_))));
        assert!(matches!(cosine(f64::NAN), Err(PolicyError::MinCosine(_))));
        assert_eq!(with(|p| p.rule = CompareRule::Exact), Ok(()));
        assert_eq!(Batching { max_batch: 0, max_delay_us: 0 }.validate(), Err(PolicyError::MaxBatch));
        assert_eq!(Batching { max_batch: 1, max_delay_us: 0 }.validate(), Ok(()));
    }

    #[test]
    fn a_model_spec_names_a_version_after_an_at() {
        assert_eq!(ModelRef::split_spec("mlp"), ("mlp", None));
        assert_eq!(ModelRef::split_spec("mlp@2"), ("mlp", Some("2")));
        assert_eq!(ModelRef::split_spec("mlp@"), ("mlp", Some("")));
        let pinned = ModelRef { name: "mlp".into(), version: "2".into() };
        assert_eq!(ModelRef::spec("mlp", "2"), pinned.to_string());
        assert_eq!(ModelRef::split_spec(&pinned.to_string()), ("mlp", Some("2")));
        assert_eq!(ModelRef::spec_name("mlp@2"), "mlp");
        assert_eq!(ModelRef::spec_name("mlp"), "mlp");
    }
}
