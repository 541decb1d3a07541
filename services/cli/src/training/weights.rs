//! The weights being trained: seeded initial values, the optimizer's update, and the
//! trained values written into an inference graph's initializers.

use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use sundara_schemas::{DType, Tensor, TensorSpec};

use super::TrainError;

/// The weights, named and shaped as the step model's weight inputs, in its order.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub tensors: Vec<Tensor>,
}

impl Weights {
    /// Seeded initial weights for `specs` (every dimension fixed, f32): matrices uniform in
    /// ±√(6 / (fan-in + fan-out)) (Glorot), vectors zero.
    pub fn initial(specs: &[TensorSpec], seed: u64) -> Result<Weights, TrainError> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let tensors = specs
            .iter()
            .map(|spec| {
                let shape: Option<Vec<u64>> = spec.shape.iter().copied().collect();
                let shape = shape.filter(|_| spec.dtype == DType::F32).ok_or_else(|| {
                    TrainError::StepModel(format!("weight `{}` must be f32 with every dimension fixed", spec.name))
                })?;
                let n = shape.iter().product::<u64>() as usize;
                let values: Vec<f32> = match shape.as_slice() {
                    [fan_in, fan_out] => {
                        let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                        (0..n).map(|_| rng.random_range(-limit..=limit)).collect()
                    }
                    _ => vec![0.0; n],
                };
                Ok(Tensor::from_values(&spec.name, shape, &values))
            })
            .collect::<Result<_, TrainError>>()?;
        Ok(Weights { tensors })
    }

    /// The weights' values, one vector per tensor.
    pub fn values(&self) -> Vec<Vec<f32>> {
        self.tensors.iter().map(|t| t.values::<f32>().expect("weights are f32")).collect()
    }

    /// Hex sha256 over every tensor's name, shape and bytes: the version's identity in a lineage.
    pub fn sha256(&self) -> String {
        let mut h = Sha256::new();
        for t in &self.tensors {
            h.update(t.name.as_bytes());
            t.shape.iter().for_each(|d| h.update(d.to_le_bytes()));
            h.update(&t.data);
        }
        hex::encode(h.finalize())
    }
}

/// SGD with momentum over [`Weights`]: v ← μ·v + g/rows, w ← w − lr·v, with g the gradient
/// summed over the batch's rows.
#[derive(Debug, Clone)]
pub struct Sgd {
    pub learning_rate: f32,
    pub momentum: f32,
    velocity: Vec<Vec<f32>>,
}

impl Sgd {
    pub fn new(learning_rate: f32, momentum: f32) -> Sgd {
        Sgd { learning_rate, momentum, velocity: Vec::new() }
    }

    /// Applies one step: `gradients[i]` (summed over `rows` rows) to `weights.tensors[i]`.
    pub fn step(&mut self, weights: &mut Weights, gradients: &[Vec<f32>], rows: usize) {
        if self.velocity.is_empty() {
            self.velocity = gradients.iter().map(|g| vec![0.0; g.len()]).collect();
        }
        let scale = 1.0 / rows.max(1) as f32;
        for ((tensor, grad), v) in weights.tensors.iter_mut().zip(gradients).zip(&mut self.velocity) {
            let mut w = tensor.values::<f32>().expect("weights are f32");
            for ((w, g), v) in w.iter_mut().zip(grad).zip(v.iter_mut()) {
                *v = self.momentum * *v + g * scale;
                *w -= self.learning_rate * *v;
            }
            *tensor = Tensor::from_values(&tensor.name, tensor.shape.clone(), &w);
        }
    }
}

/// `model` (ONNX bytes) with each initializer named as one of `weights` holding its values
/// instead. Each such initializer must store its values as `raw_data` of the same size (as
/// `numpy_helper.from_array` writes them); the bytes are replaced in place, so the rest of
/// the file is unchanged.
pub fn into_initializers(model: &[u8], weights: &Weights) -> Result<Vec<u8>, TrainError> {
    let mut out = model.to_vec();
    for (raw, t) in raw_initializers(model, &weights.tensors)?.into_iter().zip(&weights.tensors) {
        out[raw].copy_from_slice(&t.data);
    }
    Ok(out)
}

/// The weights a published version holds: its initializers named and shaped as `specs`
/// (the step model's weight inputs), read from their `raw_data`.
pub fn from_initializers(model: &[u8], specs: &[TensorSpec]) -> Result<Weights, TrainError> {
    let mut weights = Weights::initial(specs, 0)?;
    for (raw, t) in raw_initializers(model, &weights.tensors)?.into_iter().zip(&mut weights.tensors) {
        t.data.copy_from_slice(&model[raw]);
    }
    Ok(weights)
}

/// Where each of `tensors`' initializers keeps its values in `model`: the byte range of
/// its `raw_data`, which must be exactly as long as the tensor's data, and there once.
fn raw_initializers(model: &[u8], tensors: &[Tensor]) -> Result<Vec<std::ops::Range<usize>>, TrainError> {
    let bad = |why: &str| TrainError::Template(why.to_string());
    let mut found: Vec<Option<std::ops::Range<usize>>> = vec![None; tensors.len()];
    // ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name = 8, raw_data = 9.
    for (_, graph) in protobuf_fields(model).map_err(bad)?.into_iter().filter(|(f, _)| *f == 7) {
        for (_, init) in protobuf_fields(&model[graph.clone()]).map_err(bad)?.into_iter().filter(|(f, _)| *f == 5) {
            let at = |r: &std::ops::Range<usize>| graph.start + init.start + r.start..graph.start + init.start + r.end;
            let fields = protobuf_fields(&model[at(&(0..init.len()))]).map_err(bad)?;
            let name = fields.iter().find(|(f, _)| *f == 8).map(|(_, r)| &model[at(r)]);
            let Some(i) = tensors.iter().position(|t| Some(t.name.as_bytes()) == name) else { continue };
            match fields.iter().find(|(f, _)| *f == 9).map(|(_, r)| at(r)) {
                Some(raw) if raw.len() == tensors[i].data.len() && found[i].is_none() => found[i] = Some(raw),
                _ => {
                    let (name, len) = (&tensors[i].name, tensors[i].data.len());
                    return Err(bad(&format!("initializer `{name}` is not {len} bytes of raw_data, once")));
                }
            }
        }
    }
    found
        .into_iter()
        .zip(tensors)
        .map(|(raw, t)| raw.ok_or_else(|| bad(&format!("no initializer `{}`", t.name))))
        .collect()
}

/// The length-delimited fields of one protobuf message, as (field number, byte range of the
/// payload); other wire types are skipped.
fn protobuf_fields(bytes: &[u8]) -> Result<Vec<(u64, std::ops::Range<usize>)>, &'static str> {
    fn varint(bytes: &[u8], pos: &mut usize) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *bytes.get(*pos).ok_or("truncated varint")?;
            *pos += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long")
    }
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let key = varint(bytes, &mut pos)?;
        let skip = match key & 7 {
            0 => varint(bytes, &mut pos).map(|_| 0)?,
            1 => 8,
            2 => {
                let len = usize::try_from(varint(bytes, &mut pos)?).map_err(|_| "length too large")?;
                let end = pos.checked_add(len).filter(|&e| e <= bytes.len()).ok_or("truncated field")?;
                fields.push((key >> 3, pos..end));
                len
            }
            5 => 4,
            _ => return Err("unsupported wire type"),
        };
        pos = pos.checked_add(skip).filter(|&p| p <= bytes.len()).ok_or("truncated field")?;
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: &[u64]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype: DType::F32, shape: shape.iter().map(|&d| Some(d)).collect() }
    }

    #[test]
    fn initial_weights_are_seeded_and_bounded() {
        let specs = [spec("w1", &[64, 64]), spec("b1", &[64])];
        let a = Weights::initial(&specs, 7).unwrap();
        assert_eq!(a, Weights::initial(&specs, 7).unwrap());
        assert_ne!(a.sha256(), Weights::initial(&specs, 8).unwrap().sha256());
        let v = a.values();
        assert!(v[0].iter().all(|x| x.abs() <= (6.0f32 / 128.0).sqrt()) && v[0].iter().any(|x| *x != 0.0));
        assert!(v[1].iter().all(|x| *x == 0.0));
        let dynamic = TensorSpec { shape: vec![None, Some(3)], ..spec("w", &[]) };
        assert!(matches!(Weights::initial(&[dynamic], 7), Err(TrainError::StepModel(_))));
    }

    #[test]
    fn sgd_with_momentum_follows_its_formula() {
        let mut w = Weights { tensors: vec![Tensor::from_values("w", vec![2], &[1.0f32, -1.0])] };
        let mut sgd = Sgd::new(0.5, 0.9);
        sgd.step(&mut w, &[vec![4.0, 0.0]], 2); // v = [2, 0], w = [0, -1]
        sgd.step(&mut w, &[vec![0.0, 2.0]], 2); // v = [1.8, 1], w = [-0.9, -1.5]
        assert_eq!(w.values(), vec![vec![-0.9, -1.5]]);
    }

    /// A ModelProto (ir_version 8) whose graph has one initializer `name` with `raw` data.
    fn model_with(name: &str, raw: &[u8]) -> Vec<u8> {
        let field = |key: u8, payload: &[u8]| [&[key, payload.len() as u8][..], payload].concat();
        let tensor = [field(0x42, name.as_bytes()), field(0x4a, raw)].concat();
        [&[0x08, 8][..], &field(0x3a, &field(0x2a, &tensor))].concat()
    }

    #[test]
    fn weights_go_into_and_come_out_of_initializers() {
        let values = [1.5f32, -2.0];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let model = model_with("w", &bytes);
        let specs = [spec("w", &[2])];
        assert_eq!(from_initializers(&model, &specs).unwrap().values(), vec![values.to_vec()]);
        let trained = Weights { tensors: vec![Tensor::from_values("w", vec![2], &[7.0f32, 8.0])] };
        let written = into_initializers(&model, &trained).unwrap();
        assert_eq!(written.len(), model.len());
        assert_eq!(from_initializers(&written, &specs).unwrap(), trained);
        for (model, says) in
            [(model_with("v", &bytes), "no initializer `w`"), (model_with("w", &bytes[..4]), "not 8 bytes")]
        {
            let e = from_initializers(&model, &specs).unwrap_err();
            assert!(matches!(&e, TrainError::Template(m) if m.contains(says)), "{e}");
        }
    }

    #[test]
    fn protobuf_fields_refuse_truncation() {
        // field 1, length 5, but 2 bytes follow.
        assert!(protobuf_fields(&[0x0a, 5, 1, 2]).is_err());
        assert!(protobuf_fields(&[0x80]).is_err());
        assert_eq!(protobuf_fields(&[0x08, 0x96, 0x01, 0x12, 1, 9]).unwrap(), vec![(2, 5..6)]);
    }
}
