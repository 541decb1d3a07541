//! Registering models and making inputs for them.

use std::path::Path;

use sha2::{Digest, Sha256};
use sundara_common::Registry;
use sundara_schemas::{Batching, ModelMeta, Policy, TensorSpec, WIRE_VERSION, now_ms, subjects as subj};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("model name and version must be 1-64 of [A-Za-z0-9_-], got {0:?}")]
    InvalidName(String),
    #[error(transparent)]
    Runtime(#[from] sundara_runtime::RuntimeError),
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
}

/// Reads an ONNX file, learns its inputs and outputs by loading it, and registers it.
pub async fn push(
    registry: &Registry,
    file: &Path,
    name: &str,
    version: &str,
    policy: Policy,
    batching: Batching,
) -> Result<ModelMeta, ModelError> {
    for n in [name, version] {
        if !subj::is_token(n) {
            return Err(ModelError::InvalidName(n.to_string()));
        }
    }
    let bytes = std::fs::read(file).map_err(|source| ModelError::Read { path: file.display().to_string(), source })?;
    let model = sundara_runtime::Model::load(&bytes, 1)?;
    let meta = ModelMeta {
        v: WIRE_VERSION,
        name: name.to_string(),
        version: version.to_string(),
        sha256: hex::encode(Sha256::digest(&bytes)),
        size: bytes.len() as u64,
        object: format!("{name}/{version}"),
        inputs: model.inputs.clone(),
        outputs: model.outputs.clone(),
        policy,
        pushed_at_ms: now_ms(),
        batching,
    };
    registry.push(&meta, &bytes).await?;
    Ok(meta)
}

/// One line per model for `sundara models list`.
pub fn describe(m: &ModelMeta) -> String {
    let specs = |s: &[TensorSpec]| {
        s.iter()
            .map(|t| format!("{}:{}{}", t.name, t.dtype, sundara_schemas::model::shape_text(&t.shape)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "{:<12} {:<8} k={} {:<34} {:>9} B  sha256 {}…  in: {}  out: {}",
        m.name,
        m.version,
        m.policy.redundancy,
        m.policy.rule.to_string(),
        m.size,
        &m.sha256[..12],
        specs(&m.inputs),
        specs(&m.outputs)
    )
}

/// Random inputs that fit a model (see [`sundara_runtime::example_inputs`]).
pub use sundara_runtime::example_inputs as sample_inputs;
