//! The `sundara` tool as a library: the embedded stack, the in-process pipeline, the
//! client, model registration and `sundara up`. `main.rs` only parses arguments.

pub mod auth;
pub mod bridge;
pub mod chain;
pub mod client;
pub mod context;
pub mod fleet;
pub mod jobs;
pub mod models;
pub mod pipeline;
pub mod server_jobs;
pub mod stack;
pub mod staged;
pub mod status;
pub mod submit;
pub mod tasks;
pub mod tls;
pub mod training;
pub mod up;

use serde_json::Value;
use sundara_schemas::tensor::Element;
use sundara_schemas::{DType, Tensor};

/// Why a client command has no inputs to send.
#[derive(Debug, thiserror::Error)]
pub enum InputsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Input { path: String, source: InputError },
    #[error("no model {0} is registered")]
    UnknownModel(String),
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
}

/// A client command's inputs for `model`: read from the JSON file `input`, else generated
/// (`rows` rows, from the registered model's inputs).
pub async fn command_inputs(
    nats: &async_nats::Client,
    model: &str,
    input: Option<&std::path::Path>,
    rows: u64,
) -> Result<Vec<Tensor>, InputsError> {
    if let Some(path) = input {
        let at = || path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| InputsError::Read { path: at(), source })?;
        return inputs_from_json(&text).map_err(|source| InputsError::Input { path: at(), source });
    }
    // A tenant may read the registry but not create streams: no provisioning here.
    let registry = sundara_common::Registry::open(&async_nats::jetstream::new(nats.clone())).await?;
    let meta = registry.resolve(model).await?.ok_or_else(|| InputsError::UnknownModel(model.to_string()))?;
    Ok(models::sample_inputs(&meta.inputs, rows, &mut rand::rng()))
}

/// Why an inputs file cannot become tensors. Positions are the input's name and the
/// value's index: `x[3]` in a flat list, `x[0][3]` in nested lists.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(r#"not an inputs file ({{"inputs": [{{"name", "dtype", "shape", "values"}}]}}): {0}"#)]
    Json(#[from] serde_json::Error),
    #[error("{name}: shape {shape:?} needs {expected} values, got {got}")]
    ValueCount { name: String, shape: Vec<u64>, expected: u64, got: usize },
    #[error("{name}: shape {shape:?} has more elements than can be counted")]
    HugeShape { name: String, shape: Vec<u64> },
    #[error("{name}{at}: {found}, where shape {shape:?} needs {needed}")]
    Nesting { name: String, at: String, found: String, needed: String, shape: Vec<u64> },
    #[error("{name}{at}: {value} is out of range for {dtype}")]
    OutOfRange { name: String, at: String, value: String, dtype: DType },
    #[error("{name}{at}: {value} is not an integer, as {dtype} needs")]
    NotInteger { name: String, at: String, value: String, dtype: DType },
    #[error("{name}{at}: {value} is not valid for {dtype}")]
    NotA { name: String, at: String, value: String, dtype: DType },
}

/// Reads task inputs from JSON: `{"inputs": [{"name": "x", "dtype": "f32", "shape": [1, 4], "values": [..]}]}`.
/// `values` is flat (row-major) or nested lists as numpy's `tolist()` writes them, whose
/// nesting must then match `shape`. Every value must be representable in the dtype: a
/// float out of range (`1e39` for f32), a fraction for an integer dtype or a number out of
/// its range is an error, never a silent cast. Float dtypes also take the strings `"NaN"`,
/// `"Infinity"` and `"-Infinity"` (JSON has no literal for them); bool takes `true`,
/// `false`, 0 and 1.
pub fn inputs_from_json(text: &str) -> Result<Vec<Tensor>, InputError> {
    #[derive(serde::Deserialize)]
    struct File {
        inputs: Vec<Input>,
    }
    #[derive(serde::Deserialize)]
    struct Input {
        name: String,
        dtype: DType,
        shape: Vec<u64>,
        values: Value,
    }
    let file: File = serde_json::from_str(text)?;
    file.inputs.into_iter().map(|i| tensor_from_json(&i.name, i.dtype, i.shape, &i.values)).collect()
}

fn tensor_from_json(name: &str, dtype: DType, shape: Vec<u64>, values: &Value) -> Result<Tensor, InputError> {
    let expected = Tensor::checked_elements(&shape)
        .ok_or_else(|| InputError::HugeShape { name: name.into(), shape: shape.clone() })?;
    let nested = match values {
        Value::Array(items) => items.iter().any(Value::is_array),
        _ => false,
    };
    let mut flat = Vec::new();
    if nested {
        flatten(name, &shape, values, 0, &mut String::new(), &mut flat)?;
    } else {
        match values {
            Value::Array(items) => flat.extend(items),
            // A scalar (rank 0) may be given bare.
            scalar => flat.push(scalar),
        }
        if flat.len() as u64 != expected {
            return Err(InputError::ValueCount { name: name.into(), shape, expected, got: flat.len() });
        }
    }
    // Where value `i` is, as the file wrote it.
    let dims = shape.clone();
    let at = move |i: usize| if nested { nested_index(&dims, i) } else { format!("[{i}]") };
    let bad = Bad { name, dtype, at: &at };
    Ok(match dtype {
        DType::F32 => typed(name, shape, &flat, |i, v| {
            let x = bad.float(i, v)?;
            let narrowed = x as f32;
            if x.is_finite() && narrowed.is_infinite() {
                return Err(bad.out_of_range(i, v));
            }
            Ok(narrowed)
        })?,
        DType::F64 => typed(name, shape, &flat, |i, v| bad.float(i, v))?,
        DType::I64 => typed(name, shape, &flat, |i, v| bad.integer::<i64>(i, v))?,
        DType::I32 => typed(name, shape, &flat, |i, v| bad.integer::<i32>(i, v))?,
        DType::I16 => typed(name, shape, &flat, |i, v| bad.integer::<i16>(i, v))?,
        DType::I8 => typed(name, shape, &flat, |i, v| bad.integer::<i8>(i, v))?,
        DType::U8 => typed(name, shape, &flat, |i, v| bad.integer::<u8>(i, v))?,
        DType::Bool => typed(name, shape, &flat, |i, v| match v {
            Value::Bool(b) => Ok(*b),
            Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
            Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
            Value::Number(_) => Err(bad.out_of_range(i, v)),
            _ => Err(bad.not_a(i, v)),
        })?,
    })
}

fn typed<T: Element>(
    name: &str,
    shape: Vec<u64>,
    flat: &[&Value],
    mut convert: impl FnMut(usize, &Value) -> Result<T, InputError>,
) -> Result<Tensor, InputError> {
    let values = flat.iter().enumerate().map(|(i, v)| convert(i, v)).collect::<Result<Vec<T>, _>>()?;
    Ok(Tensor::from_values(name, shape, &values))
}

/// Walks nested lists that must match `shape` level by level, collecting the scalars.
fn flatten<'a>(
    name: &str,
    shape: &[u64],
    value: &'a Value,
    depth: usize,
    at: &mut String,
    out: &mut Vec<&'a Value>,
) -> Result<(), InputError> {
    let nesting = |at: &str, found: String, needed: String| InputError::Nesting {
        name: name.into(),
        at: at.to_string(),
        found,
        needed,
        shape: shape.to_vec(),
    };
    let Some(&want) = shape.get(depth) else {
        if value.is_array() {
            return Err(nesting(at, "a list".into(), format!("a number (rank {})", shape.len())));
        }
        out.push(value);
        return Ok(());
    };
    let Value::Array(items) = value else {
        return Err(nesting(at, describe_json(value), format!("a list of {want}")));
    };
    if items.len() as u64 != want {
        return Err(nesting(at, format!("a list of {}", items.len()), format!("{want}")));
    }
    for (i, item) in items.iter().enumerate() {
        let len = at.len();
        at.push_str(&format!("[{i}]"));
        flatten(name, shape, item, depth + 1, at, out)?;
        at.truncate(len);
    }
    Ok(())
}

/// `[0][3]` for flat index 3 of shape [2, 4].
fn nested_index(shape: &[u64], mut flat: usize) -> String {
    let mut parts = Vec::with_capacity(shape.len());
    for &d in shape.iter().rev() {
        let d = d.max(1) as usize;
        parts.push(flat % d);
        flat /= d;
    }
    parts.iter().rev().map(|p| format!("[{p}]")).collect()
}

fn describe_json(v: &Value) -> String {
    match v {
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Bool(b) => format!("{b}"),
        Value::Null => "null".into(),
        Value::Array(a) => format!("a list of {}", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

/// Builds the errors about one input's values.
struct Bad<'a> {
    name: &'a str,
    dtype: DType,
    at: &'a dyn Fn(usize) -> String,
}

impl Bad<'_> {
    fn text(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    fn out_of_range(&self, i: usize, v: &Value) -> InputError {
        InputError::OutOfRange { name: self.name.into(), at: (self.at)(i), value: Self::text(v), dtype: self.dtype }
    }

    fn not_a(&self, i: usize, v: &Value) -> InputError {
        InputError::NotA { name: self.name.into(), at: (self.at)(i), value: describe_json(v), dtype: self.dtype }
    }

    fn float(&self, i: usize, v: &Value) -> Result<f64, InputError> {
        match v {
            Value::Number(n) => n.as_f64().ok_or_else(|| self.out_of_range(i, v)),
            Value::String(s) => match s.as_str() {
                "NaN" | "nan" => Ok(f64::NAN),
                "Infinity" | "inf" | "+inf" => Ok(f64::INFINITY),
                "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
                _ => Err(self.not_a(i, v)),
            },
            _ => Err(self.not_a(i, v)),
        }
    }

    fn integer<T: TryFrom<i64>>(&self, i: usize, v: &Value) -> Result<T, InputError> {
        let Value::Number(n) = v else { return Err(self.not_a(i, v)) };
        let whole = match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(x), _, _) => x,
            // Above i64::MAX: out of range of every integer dtype carried.
            (None, Some(_), _) => return Err(self.out_of_range(i, v)),
            (None, None, Some(f)) if f.fract() != 0.0 => {
                return Err(InputError::NotInteger {
                    name: self.name.into(),
                    at: (self.at)(i),
                    value: n.to_string(),
                    dtype: self.dtype,
                });
            }
            // A whole number written as a float (`3.0`, `1e3`), if it fits in i64.
            (None, None, Some(f)) if (-9.223372036854776e18..9.223372036854776e18).contains(&f) => f as i64,
            _ => return Err(self.out_of_range(i, v)),
        };
        T::try_from(whole).map_err(|_| self.out_of_range(i, v))
    }
}

/// The text printed for a failed command: `error: …`, then each cause that the lines
/// above do not already say (errors often repeat their source in their own message).
pub fn error_report(error: &anyhow::Error) -> String {
    let mut out = format!("error: {error}");
    let mut said = vec![error.to_string()];
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if said.iter().any(|s| s.contains(&text)) {
            continue;
        }
        out.push_str(&format!("\n  caused by: {text}"));
        said.push(text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(dtype: &str, shape: &str, values: &str) -> Result<Tensor, InputError> {
        let text =
            format!(r#"{{"inputs": [{{"name": "x", "dtype": "{dtype}", "shape": {shape}, "values": {values}}}]}}"#);
        inputs_from_json(&text).map(|mut t| t.remove(0))
    }

    fn message(dtype: &str, shape: &str, values: &str) -> String {
        one(dtype, shape, values).unwrap_err().to_string()
    }

    #[test]
    fn flat_and_nested_values_give_the_same_tensor() {
        let flat = one("f32", "[2, 3]", "[1, 2, 3, 4, 5, 6]").unwrap();
        let nested = one("f32", "[2, 3]", "[[1, 2, 3], [4, 5, 6]]").unwrap();
        assert_eq!(flat, nested);
        assert_eq!(flat.values::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let deep = one("i64", "[2, 1, 2]", "[[[1, 2]], [[3, 4]]]").unwrap();
        assert_eq!(deep.values::<i64>().unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(one("f64", "[]", "7.5").unwrap().values::<f64>().unwrap(), vec![7.5], "a bare scalar for rank 0");
        assert_eq!(one("f32", "[0, 4]", "[]").unwrap().data.len(), 0, "empty is the ingress's to refuse");
    }

    #[test]
    fn nesting_must_match_the_shape() {
        assert_eq!(message("f32", "[3, 2]", "[[1, 2, 3], [4, 5, 6]]"), "x: a list of 2, where shape [3, 2] needs 3");
        assert_eq!(message("f32", "[2, 3]", "[[1, 2, 3], [4, 5]]"), "x[1]: a list of 2, where shape [2, 3] needs 3");
        assert_eq!(message("f32", "[2, 2]", "[[1, 2], 3]"), "x[1]: the number 3, where shape [2, 2] needs a list of 2");
        assert_eq!(message("f32", "[2]", "[[1], [2]]"), "x[0]: a list, where shape [2] needs a number (rank 1)");
    }

    #[test]
    fn a_wrong_count_is_told_in_values() {
        assert_eq!(message("f32", "[1, 4]", "[1, 2, 3]"), "x: shape [1, 4] needs 4 values, got 3");
        assert_eq!(message("u8", "[2]", "[1, 2, 3]"), "x: shape [2] needs 2 values, got 3");
        assert!(message("f32", "[4294967296, 4294967296]", "[]").contains("more elements than can be counted"));
    }

    #[test]
    fn values_the_dtype_cannot_hold_are_refused_by_position() {
        assert_eq!(message("f32", "[1, 2]", "[0.5, 1e39]"), "x[1]: 1e+39 is out of range for f32");
        assert_eq!(message("f32", "[2, 2]", "[[0, 0], [1e39, 0]]"), "x[1][0]: 1e+39 is out of range for f32");
        assert_eq!(message("u8", "[3]", "[0, 255, 300]"), "x[2]: 300 is out of range for u8");
        assert_eq!(message("u8", "[1]", "[-1]"), "x[0]: -1 is out of range for u8");
        assert_eq!(message("i8", "[1]", "[128]"), "x[0]: 128 is out of range for i8");
        assert_eq!(message("i32", "[2]", "[1, 1.5]"), "x[1]: 1.5 is not an integer, as i32 needs");
        assert_eq!(
            message("i64", "[1]", "[18446744073709551615]"),
            "x[0]: 18446744073709551615 is out of range for i64"
        );
        assert_eq!(message("i64", "[1]", r#"["NaN"]"#), r#"x[0]: the string "NaN" is not valid for i64"#);
        assert_eq!(message("f32", "[1]", r#"["one"]"#), r#"x[0]: the string "one" is not valid for f32"#);
        assert_eq!(message("bool", "[2]", "[1, 2]"), "x[1]: 2 is out of range for bool");
        assert_eq!(message("f32", "[1]", "[null]"), "x[0]: null is not valid for f32");
        // JSON itself refuses numbers beyond f64.
        assert!(matches!(one("f64", "[1]", "[1e400]"), Err(InputError::Json(_))));
    }

    #[test]
    fn representable_values_are_kept_exactly() {
        assert_eq!(
            one("i64", "[2]", "[9007199254740993, -9223372036854775808]").unwrap().values::<i64>().unwrap(),
            vec![9_007_199_254_740_993, i64::MIN]
        );
        assert_eq!(one("i32", "[2]", "[3.0, 1e3]").unwrap().values::<i32>().unwrap(), vec![3, 1000], "whole floats");
        assert_eq!(one("u8", "[2]", "[0, 255]").unwrap().values::<u8>().unwrap(), vec![0, 255]);
        assert_eq!(one("bool", "[3]", "[true, 0, 1]").unwrap().values::<bool>().unwrap(), vec![true, false, true]);
        let special = one("f32", "[3]", r#"["NaN", "Infinity", "-Infinity"]"#).unwrap().values::<f32>().unwrap();
        assert!(special[0].is_nan() && special[1] == f32::INFINITY && special[2] == f32::NEG_INFINITY);
        assert_eq!(one("f32", "[1]", "[3.4e38]").unwrap().values::<f32>().unwrap(), vec![3.4e38]);
        assert_eq!(one("f64", "[1]", "[1e39]").unwrap().values::<f64>().unwrap(), vec![1e39]);
    }

    #[test]
    fn a_file_that_is_not_inputs_says_what_is_expected() {
        let e = inputs_from_json(r#"{"inputs": [{"name": "x", "dtype": "f16", "shape": [1], "values": [1]}]}"#);
        let text = e.unwrap_err().to_string();
        assert!(text.starts_with("not an inputs file") && text.contains("f16"), "{text}");
    }

    #[test]
    fn an_error_is_reported_once_with_only_the_causes_it_does_not_say() {
        #[derive(Debug, thiserror::Error)]
        #[error("Redis: {0}")]
        struct Wrapped(#[source] std::io::Error);
        let refused =
            || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let e = anyhow::Error::new(Wrapped(refused()));
        assert_eq!(error_report(&e), "error: Redis: Connection refused (os error 111)");
        let e = anyhow::Error::new(refused()).context("reading inputs.json");
        assert_eq!(error_report(&e), "error: reading inputs.json\n  caused by: Connection refused (os error 111)");
    }
}
