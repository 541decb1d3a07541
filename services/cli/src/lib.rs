//! The `sundara` tool as a library: the embedded stack, the in-process pipeline, the
//! client, model registration and `sundara up`. `main.rs` only parses arguments.

pub mod auth;
pub mod client;
pub mod fleet;
pub mod models;
pub mod pipeline;
pub mod stack;
pub mod status;
pub mod tasks;
pub mod up;

use sundara_schemas::{DType, Tensor};

/// Reads task inputs from JSON: `{"inputs": [{"name": "x", "dtype": "f32", "shape": [1, 4], "values": [..]}]}`.
pub fn inputs_from_json(text: &str) -> Result<Vec<Tensor>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        inputs: Vec<Input>,
    }
    #[derive(serde::Deserialize)]
    struct Input {
        name: String,
        dtype: DType,
        shape: Vec<u64>,
        values: Vec<f64>,
    }
    let file: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(file
        .inputs
        .into_iter()
        .map(|i| match i.dtype {
            DType::F32 => {
                Tensor::from_values(&i.name, i.shape, &i.values.iter().map(|&v| v as f32).collect::<Vec<_>>())
            }
            DType::F64 => Tensor::from_values(&i.name, i.shape, &i.values),
            DType::I64 => {
                Tensor::from_values(&i.name, i.shape, &i.values.iter().map(|&v| v as i64).collect::<Vec<_>>())
            }
            DType::I32 => {
                Tensor::from_values(&i.name, i.shape, &i.values.iter().map(|&v| v as i32).collect::<Vec<_>>())
            }
            DType::I16 => {
                Tensor::from_values(&i.name, i.shape, &i.values.iter().map(|&v| v as i16).collect::<Vec<_>>())
            }
            DType::I8 => Tensor::from_values(&i.name, i.shape, &i.values.iter().map(|&v| v as i8).collect::<Vec<_>>()),
            DType::U8 => Tensor::from_values(&i.name, i.shape, &i.values.iter().map(|&v| v as u8).collect::<Vec<_>>()),
            DType::Bool => {
                Tensor::from_values(&i.name, i.shape, &i.values.iter().map(|&v| v != 0.0).collect::<Vec<_>>())
            }
        })
        .collect())
}
