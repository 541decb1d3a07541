//! Runs the demo models (made by scripts/setup) through the runtime.

use std::path::PathBuf;

use sundara_runtime::{Model, find_library, init};
use sundara_schemas::{DType, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(name: &str) -> Model {
    init(&find_library(&[root()]).expect("run scripts/setup")).unwrap();
    let bytes = std::fs::read(root().join(".cache/models").join(name)).expect("run scripts/setup");
    Model::load(&bytes, 1).unwrap()
}

#[test]
fn mlp_declares_dynamic_batch_and_runs() {
    let mut m = model("mlp.onnx");
    assert_eq!(m.inputs.len(), 1);
    assert_eq!(m.inputs[0].name, "x");
    assert_eq!(m.inputs[0].shape, vec![None, Some(784)]);
    assert_eq!(m.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["logits", "probs"]);
    let x = Tensor::from_values("x", vec![3, 784], &vec![0.5f32; 3 * 784]);
    let out = m.run(&[x]).unwrap();
    assert_eq!(out[1].shape, vec![3, 10]);
    let probs = out[1].values::<f32>().unwrap();
    let row: f32 = probs[..10].iter().sum();
    assert!((row - 1.0).abs() < 1e-5, "softmax row sums to {row}");
}

#[test]
fn silero_takes_mixed_dtypes_and_a_scalar() {
    let mut m = model("silero_vad.onnx");
    let sr = m.inputs.iter().find(|i| i.name == "sr").unwrap();
    assert_eq!((sr.dtype, sr.shape.len()), (DType::I64, 0));
    let inputs = [
        Tensor::from_values("input", vec![2, 512], &vec![0.01f32; 1024]),
        Tensor::from_values("state", vec![2, 2, 128], &vec![0f32; 512]),
        Tensor::from_values("sr", vec![], &[16000i64]),
    ];
    let out = m.run(&inputs).unwrap();
    assert_eq!(out[0].shape, vec![2, 1]);
    assert_eq!(out[1].shape, vec![2, 2, 128]);
}

#[test]
fn garbage_bytes_are_an_invalid_model() {
    init(&find_library(&[root()]).unwrap()).unwrap();
    assert!(matches!(Model::load(b"not onnx", 1), Err(sundara_runtime::RuntimeError::InvalidModel(_))));
}

#[test]
fn magika_classifies_i32_byte_windows() {
    let mut m = model("magika.onnx");
    assert_eq!(m.inputs.len(), 1);
    assert_eq!((m.inputs[0].dtype, m.inputs[0].shape.clone()), (DType::I32, vec![None, Some(2048)]));
    // Two windows of a file's bytes (magika reads values 0-255, 256 = padding).
    let bytes: Vec<i32> = (0..2 * 2048).map(|i| if i % 2048 < 1500 { i * 7 % 256 } else { 256 }).collect();
    let out = m.run(&[Tensor::from_values(&m.inputs[0].name.clone(), vec![2, 2048], &bytes)]).unwrap();
    assert_eq!(out[0].shape, vec![2, 214]);
    let scores = out[0].values::<f32>().unwrap();
    let row: f32 = scores[..214].iter().sum();
    assert!((row - 1.0).abs() < 1e-3, "class scores sum to {row}");
}

#[test]
fn ppocr_direction_classifier_takes_images() {
    let mut m = model("ppocr_cls.onnx");
    assert_eq!(m.inputs[0].dtype, DType::F32);
    // [batch, 3, height, width], all but the channels dynamic; the classifier is trained on 48×192.
    assert_eq!(m.inputs[0].shape, vec![None, Some(3), None, None]);
    let image = vec![0.25f32; 3 * 48 * 192];
    let out = m.run(&[Tensor::from_values(&m.inputs[0].name.clone(), vec![1, 3, 48, 192], &image)]).unwrap();
    assert_eq!(out[0].shape, vec![1, 2]);
    let p = out[0].values::<f32>().unwrap();
    assert!((p[0] + p[1] - 1.0).abs() < 1e-4, "orientation probabilities {p:?}");
}
