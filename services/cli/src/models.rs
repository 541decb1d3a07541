//! Registering models and making inputs for them.

use std::path::Path;

use rand::Rng;
use sha2::{Digest, Sha256};
use sundara_common::Registry;
use sundara_schemas::{DType, ModelMeta, Policy, Tensor, TensorSpec, WIRE_VERSION, now_ms, subjects as subj};

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

/// Random inputs that fit a model, `rows` along the first dynamic dimension.
///
/// Known demo inputs get realistic values: silero-vad's `sr` is the 16 kHz sample rate,
/// its recurrent `state` starts at zero and its audio chunk is 512 samples; images are
/// 48×192 (PP-OCR's text lines); integer inputs (magika's byte windows) are bytes 0-255.
pub fn sample_inputs(inputs: &[TensorSpec], rows: u64, rng: &mut impl Rng) -> Vec<Tensor> {
    inputs
        .iter()
        .map(|spec| {
            let mut first_dynamic = true;
            let shape: Vec<u64> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(axis, d)| match d {
                    Some(v) => *v,
                    None if spec.name == "state" => rows,
                    None if first_dynamic => {
                        first_dynamic = false;
                        rows
                    }
                    // Images [batch, channels, height, width]: a 48×192 text line (PP-OCR).
                    None if spec.shape.len() == 4 => [0, 0, 48, 192][axis],
                    None => 512,
                })
                .collect();
            let n = Tensor::checked_elements(&shape).unwrap_or(0) as usize;
            match (spec.dtype, spec.name.as_str()) {
                (DType::I64, "sr") => Tensor::from_values(&spec.name, shape, &vec![16000i64; n]),
                (DType::F32, "state") => Tensor::from_values(&spec.name, shape, &vec![0f32; n]),
                (DType::F32, _) => {
                    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                    Tensor::from_values(&spec.name, shape, &v)
                }
                (DType::F64, _) => {
                    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                    Tensor::from_values(&spec.name, shape, &v)
                }
                (DType::I32, _) => {
                    let v: Vec<i32> = (0..n).map(|_| rng.random_range(0..256)).collect();
                    Tensor::from_values(&spec.name, shape, &v)
                }
                (dtype, _) => Tensor { name: spec.name.clone(), dtype, shape, data: vec![0; n * dtype.size()] },
            }
        })
        .collect()
}
