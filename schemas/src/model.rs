//! Model registry records (KV bucket `models`).

use serde::{Deserialize, Serialize};

use crate::tensor::{DType, Tensor};

/// A model pinned to one immutable version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

impl std::fmt::Display for ModelRef {
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
