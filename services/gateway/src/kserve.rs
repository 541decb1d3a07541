//! The KServe v2 / Open Inference Protocol's JSON tensors, to and from Sundara's tensors:
//! `{"name", "shape", "datatype", "data"}`, `data` flat in row-major order (nested arrays
//! are flattened, as the protocol allows). With the binary tensor data extension, a body is
//! a JSON header of `Inference-Header-Content-Length` bytes followed by the raw
//! little-endian data of each input whose `parameters.binary_data_size` says how many
//! bytes it takes, in order; outputs come back the same way when the request asks
//! (`parameters.binary_data_output`, or an output's `parameters.binary_data`). Pure:
//! tested without I/O.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sundara_schemas::{DType, ModelMeta, Tensor, TensorSpec};

/// `POST /v2/models/{name}/infer`'s body.
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    pub inputs: Vec<JsonTensor>,
    /// Which outputs to return (all when absent).
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
    #[serde(default)]
    pub parameters: Parameters,
}

/// A tensor's or a request's `parameters` (only the binary extension's are read).
#[derive(Debug, Default, Deserialize, Serialize, PartialEq, Clone)]
pub struct Parameters {
    /// This tensor's data is this many bytes of the body's binary part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_data_size: Option<u64>,
    /// (An output) return its data in binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_data: Option<bool>,
    /// (A request) return every output in binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_data_output: Option<bool>,
}

impl Parameters {
    fn is_empty(&self) -> bool {
        *self == Parameters::default()
    }
}

#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Parameters,
}

/// One tensor as the protocol writes it.
#[derive(Debug, Deserialize, Serialize, PartialEq)]
pub struct JsonTensor {
    pub name: String,
    pub shape: Vec<u64>,
    pub datatype: String,
    /// Absent when the data is binary.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    #[serde(default, skip_serializing_if = "Parameters::is_empty")]
    pub parameters: Parameters,
}

/// The response of a verified inference.
#[derive(Debug, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<JsonTensor>,
}

/// A tensor's metadata: `shape` with -1 for a dimension of any size.
#[derive(Debug, Serialize, PartialEq)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{name}[/versions/{v}]`.
#[derive(Debug, Serialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: &'static str,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

impl ModelMetadata {
    pub fn of(meta: &ModelMeta, versions: Vec<String>) -> ModelMetadata {
        let specs = |specs: &[TensorSpec]| specs.iter().map(tensor_metadata).collect();
        ModelMetadata {
            name: meta.name.clone(),
            versions,
            platform: "onnxruntime_onnx",
            inputs: specs(&meta.inputs),
            outputs: specs(&meta.outputs),
        }
    }
}

fn tensor_metadata(spec: &TensorSpec) -> TensorMetadata {
    TensorMetadata {
        name: spec.name.clone(),
        datatype: datatype(spec.dtype),
        shape: spec.shape.iter().map(|d| d.map_or(-1, |d| d as i64)).collect(),
    }
}

/// The protocol's name of `dtype`.
pub fn datatype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::I8 => "INT8",
        DType::U8 => "UINT8",
        DType::I16 => "INT16",
        DType::I32 => "INT32",
        DType::I64 => "INT64",
        DType::Bool => "BOOL",
    }
}

/// Why a JSON tensor is not one Sundara can take.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error(
        "input {name}: datatype {datatype:?} is not supported (BOOL, UINT8, INT8, INT16, INT32, INT64, FP32, FP64)"
    )]
    Datatype { name: String, datatype: String },
    #[error("input {name}: shape {shape:?} has {want} elements, data has {got}")]
    Count { name: String, shape: Vec<u64>, want: u64, got: usize },
    #[error("input {name}: element {index} is not a {datatype} value")]
    Element { name: String, index: usize, datatype: String },
    #[error("input {name}: shape {shape:?} is too large")]
    Shape { name: String, shape: Vec<u64> },
    #[error("input {name}: binary_data_size {size} does not match {want} bytes of its shape and datatype")]
    BinarySize { name: String, size: u64, want: u64 },
    #[error("the binary part has {got} bytes; its inputs' binary_data_size add up to {want}")]
    BinaryTotal { want: u64, got: usize },
    #[error("Inference-Header-Content-Length {header} is beyond the body's {body} bytes")]
    HeaderLength { header: usize, body: usize },
    #[error("the JSON header: {0}")]
    Json(String),
}

/// A request body: its JSON header (the whole body, or its first `header_length` bytes with
/// the binary extension) and its inputs, binary ones taken from the rest in order.
pub fn parse_request(body: &[u8], header_length: Option<usize>) -> Result<(InferRequest, Vec<Tensor>), TensorError> {
    let split = header_length.unwrap_or(body.len());
    if split > body.len() {
        return Err(TensorError::HeaderLength { header: split, body: body.len() });
    }
    let (header, mut binary) = body.split_at(split);
    let request: InferRequest = serde_json::from_slice(header).map_err(|e| TensorError::Json(e.to_string()))?;
    let mut tensors = Vec::with_capacity(request.inputs.len());
    let total: u64 = request.inputs.iter().filter_map(|t| t.parameters.binary_data_size).sum();
    if total != binary.len() as u64 {
        return Err(TensorError::BinaryTotal { want: total, got: binary.len() });
    }
    for input in &request.inputs {
        let tensor = match input.parameters.binary_data_size {
            Some(size) => {
                let (bytes, rest) = binary.split_at(size as usize);
                binary = rest;
                input.binary_tensor(bytes)?
            }
            None => input.to_tensor()?,
        };
        tensors.push(tensor);
    }
    Ok((request, tensors))
}

/// The protocol's `datatype` named `name`.
fn dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FP32" => DType::F32,
        "FP64" => DType::F64,
        "INT8" => DType::I8,
        "UINT8" => DType::U8,
        "INT16" => DType::I16,
        "INT32" => DType::I32,
        "INT64" => DType::I64,
        "BOOL" => DType::Bool,
        _ => return None,
    })
}

/// A response body: JSON, or with `binary` outputs a JSON header followed by their data;
/// the header's length for `Inference-Header-Content-Length` when there is binary data.
pub fn render_response(
    mut response: InferResponse,
    outputs: &[Tensor],
    binary: impl Fn(&str) -> bool,
) -> (Vec<u8>, Option<usize>) {
    let mut tail = Vec::new();
    for (json, tensor) in response.outputs.iter_mut().zip(outputs) {
        if binary(&tensor.name) {
            json.data = Value::Null;
            json.parameters.binary_data_size = Some(tensor.data.len() as u64);
            tail.extend_from_slice(&tensor.data);
        }
    }
    let mut body = serde_json::to_vec(&response).expect("a response encodes");
    if tail.is_empty() {
        return (body, None);
    }
    let header = body.len();
    body.extend_from_slice(&tail);
    (body, Some(header))
}

/// Flattens nested arrays (row-major), at most `max` scalars.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>, max: u64) {
    match value {
        Value::Array(items) => {
            for item in items {
                if out.len() as u64 > max {
                    return;
                }
                flatten(item, out, max);
            }
        }
        scalar => out.push(scalar),
    }
}

impl JsonTensor {
    /// This tensor from the raw little-endian `bytes` the binary extension carries.
    fn binary_tensor(&self, bytes: &[u8]) -> Result<Tensor, TensorError> {
        let name = self.name.clone();
        let Some(dtype) = dtype(&self.datatype) else {
            return Err(TensorError::Datatype { name, datatype: self.datatype.clone() });
        };
        let want = Tensor::checked_elements(&self.shape).and_then(|n| n.checked_mul(dtype.size() as u64));
        let Some(want) = want else { return Err(TensorError::Shape { name, shape: self.shape.clone() }) };
        if want != bytes.len() as u64 {
            return Err(TensorError::BinarySize { name, size: bytes.len() as u64, want });
        }
        Ok(Tensor { name, dtype, shape: self.shape.clone(), data: bytes.to_vec() })
    }

    /// This tensor in Sundara's form: the elements checked against the datatype and
    /// counted against the shape before anything is allocated from the shape's claim.
    pub fn to_tensor(&self) -> Result<Tensor, TensorError> {
        let name = self.name.clone();
        let Some(want) = Tensor::checked_elements(&self.shape) else {
            return Err(TensorError::Shape { name, shape: self.shape.clone() });
        };
        let mut scalars = Vec::new();
        flatten(&self.data, &mut scalars, want);
        if scalars.len() as u64 != want {
            return Err(TensorError::Count { name, shape: self.shape.clone(), want, got: scalars.len() });
        }
        let element = |index| TensorError::Element { name: name.clone(), index, datatype: self.datatype.clone() };
        let shape = self.shape.clone();
        macro_rules! typed {
            ($t:ty, $read:expr) => {{
                let values = scalars
                    .iter()
                    .enumerate()
                    .map(|(i, v)| $read(v).ok_or_else(|| element(i)))
                    .collect::<Result<Vec<$t>, _>>()?;
                Tensor::from_values(&self.name, shape, &values)
            }};
        }
        let int = |v: &Value| v.as_i64();
        let Some(dt) = dtype(&self.datatype) else {
            return Err(TensorError::Datatype { name, datatype: self.datatype.clone() });
        };
        Ok(match dt {
            DType::F32 => typed!(f32, |v: &Value| v.as_f64().map(|x| x as f32)),
            DType::F64 => typed!(f64, |v: &Value| v.as_f64()),
            DType::I8 => typed!(i8, |v: &Value| int(v).and_then(|x| i8::try_from(x).ok())),
            DType::U8 => typed!(u8, |v: &Value| int(v).and_then(|x| u8::try_from(x).ok())),
            DType::I16 => typed!(i16, |v: &Value| int(v).and_then(|x| i16::try_from(x).ok())),
            DType::I32 => typed!(i32, |v: &Value| int(v).and_then(|x| i32::try_from(x).ok())),
            DType::I64 => typed!(i64, int),
            DType::Bool => typed!(bool, |v: &Value| v.as_bool()),
        })
    }

    /// `tensor` as the protocol writes it (data flat).
    pub fn from_tensor(tensor: &Tensor) -> JsonTensor {
        let data: Vec<Value> = match tensor.dtype {
            DType::Bool => tensor.data.iter().map(|b| Value::Bool(*b != 0)).collect(),
            DType::F32 | DType::F64 => tensor.to_f64().into_iter().map(float).collect(),
            _ => tensor.to_f64().into_iter().map(|x| Value::from(x as i64)).collect(),
        };
        JsonTensor {
            name: tensor.name.clone(),
            shape: tensor.shape.clone(),
            datatype: datatype(tensor.dtype).to_string(),
            data: Value::Array(data),
            parameters: Parameters::default(),
        }
    }
}

/// A float as JSON; NaN and infinities, which JSON cannot write, become null.
fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tensor(datatype: &str, shape: Vec<u64>, data: Value) -> JsonTensor {
        JsonTensor { name: "x".into(), shape, datatype: datatype.into(), data, parameters: Parameters::default() }
    }

    #[test]
    fn binary_inputs_are_taken_from_the_tail_in_order_and_outputs_go_back_the_same_way() {
        let a = Tensor::from_values("a", vec![2], &[1.5f32, -2.0]);
        let b = Tensor::from_values("b", vec![1], &[7i64]);
        let header = json!({"inputs": [
            {"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
            {"name": "c", "shape": [1], "datatype": "INT32", "data": [3]},
            {"name": "b", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 8}},
        ], "parameters": {"binary_data_output": true}})
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&a.data);
        body.extend_from_slice(&b.data);
        let (request, tensors) = parse_request(&body, Some(header.len())).unwrap();
        assert_eq!(request.parameters.binary_data_output, Some(true));
        assert_eq!((&tensors[0], &tensors[2]), (&a, &b));
        assert_eq!(tensors[1].values::<i32>().unwrap(), vec![3]);

        let short = &body[..body.len() - 1];
        assert!(matches!(
            parse_request(short, Some(header.len())),
            Err(TensorError::BinaryTotal { want: 16, got: 15 })
        ));
        assert!(matches!(parse_request(&body, Some(body.len() + 1)), Err(TensorError::HeaderLength { .. })));
        let wrong = json!({"inputs": [
            {"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}},
            {"name": "b", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 8}},
        ]})
        .to_string();
        let mut body = wrong.clone().into_bytes();
        body.extend_from_slice(&[0; 12]);
        assert!(matches!(parse_request(&body, Some(wrong.len())), Err(TensorError::BinarySize { want: 8, .. })));

        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![JsonTensor::from_tensor(&a), JsonTensor::from_tensor(&b)],
        };
        let (body, header) = render_response(response, &[a.clone(), b.clone()], |name| name == "a");
        let header = header.expect("binary data follows");
        let json: Value = serde_json::from_slice(&body[..header]).unwrap();
        assert_eq!(json["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(json["outputs"][0].get("data").is_none());
        assert_eq!(json["outputs"][1]["data"], json!([7]));
        assert_eq!(&body[header..], &a.data[..]);
    }

    #[test]
    fn json_tensors_round_trip_flat_or_nested() {
        let flat = tensor("FP32", vec![2, 2], json!([1.0, -2.5, 3.0, 0.0])).to_tensor().unwrap();
        let nested = tensor("FP32", vec![2, 2], json!([[1.0, -2.5], [3.0, 0.0]])).to_tensor().unwrap();
        assert_eq!(flat, nested);
        assert_eq!(flat.values::<f32>().unwrap(), vec![1.0, -2.5, 3.0, 0.0]);
        assert_eq!(JsonTensor::from_tensor(&flat), tensor("FP32", vec![2, 2], json!([1.0, -2.5, 3.0, 0.0])));
        let ints = tensor("INT64", vec![3], json!([1, -2, 3])).to_tensor().unwrap();
        assert_eq!(JsonTensor::from_tensor(&ints).data, json!([1, -2, 3]));
        let bools = tensor("BOOL", vec![2], json!([true, false])).to_tensor().unwrap();
        assert_eq!(JsonTensor::from_tensor(&bools).data, json!([true, false]));
    }

    #[test]
    fn bad_tensors_are_refused_by_kind() {
        let count = tensor("FP32", vec![2, 2], json!([1.0, 2.0, 3.0])).to_tensor().unwrap_err();
        assert!(matches!(count, TensorError::Count { want: 4, got: 3, .. }), "{count}");
        let too_many = tensor("FP32", vec![1], json!([1.0, 2.0, 3.0])).to_tensor().unwrap_err();
        assert!(matches!(too_many, TensorError::Count { want: 1, .. }), "{too_many}");
        let element = tensor("INT8", vec![2], json!([1, 300])).to_tensor().unwrap_err();
        assert!(matches!(element, TensorError::Element { index: 1, .. }), "{element}");
        let text = tensor("FP32", vec![1], json!(["a"])).to_tensor().unwrap_err();
        assert!(matches!(text, TensorError::Element { index: 0, .. }), "{text}");
        let kind = tensor("BYTES", vec![1], json!(["a"])).to_tensor().unwrap_err();
        assert!(matches!(kind, TensorError::Datatype { .. }), "{kind}");
        let huge = tensor("FP32", vec![u64::MAX, 4], json!([])).to_tensor().unwrap_err();
        assert!(matches!(huge, TensorError::Shape { .. }), "{huge}");
    }
}
