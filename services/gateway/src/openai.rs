//! OpenAI's embeddings API: `POST /v1/embeddings` with `input` as a string, a list of
//! strings, a list of token ids or a list of those; `encoding_format` `float` or `base64`;
//! `usage` in tokens. Texts are tokenized here with the model's own tokenizer (Hugging Face
//! `tokenizer.json`), so miners see token ids only; the inputs are cut into tasks of at most
//! [`ROWS_PER_TASK`] rows, each padded to its longest row. Pure: tested without I/O.

use serde::Deserialize;
use serde_json::{Value, json};
use sundara_schemas::Tensor;

use crate::error::ApiError;

/// Rows (texts) per task: a request of more becomes several tasks, run at once.
pub const ROWS_PER_TASK: usize = 32;
/// Most inputs in one request (OpenAI's bound).
pub const MAX_INPUTS: usize = 2048;
/// Longest input in tokens, special tokens included (all-MiniLM-L6-v2 was trained on 256).
pub const MAX_TOKENS: usize = 256;

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: Input,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<u64>,
    /// Accepted and ignored (OpenAI's abuse-monitoring id).
    #[serde(default)]
    #[allow(dead_code)]
    pub user: Option<String>,
}

/// The shapes `input` may take.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// Whether the response carries floats or base64 of little-endian f32s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Float,
    Base64,
}

impl EmbeddingsRequest {
    pub fn encoding(&self) -> Result<Encoding, ApiError> {
        match self.encoding_format.as_deref() {
            None | Some("float") => Ok(Encoding::Float),
            Some("base64") => Ok(Encoding::Base64),
            Some(other) => {
                Err(ApiError::invalid("invalid_value", format!("encoding_format {other:?}: float or base64"))
                    .with_param("encoding_format"))
            }
        }
    }
}

/// Token ids per input: texts through `tokenize` (special tokens added), token lists as
/// given. Each must be 1 to [`MAX_TOKENS`] long, and there must be 1 to [`MAX_INPUTS`].
pub fn token_rows(
    input: &Input,
    tokenize: impl Fn(&str) -> Result<Vec<u32>, String>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let rows: Vec<Vec<u32>> = match input {
        Input::Text(t) => vec![tokenize(t).map_err(tokenizer_error)?],
        Input::Texts(ts) => ts.iter().map(|t| tokenize(t)).collect::<Result<_, _>>().map_err(tokenizer_error)?,
        Input::Tokens(ids) => vec![ids.clone()],
        Input::TokenLists(lists) => lists.clone(),
    };
    if rows.is_empty() || rows.len() > MAX_INPUTS {
        let message = format!("input must have 1 to {MAX_INPUTS} items, not {}", rows.len());
        return Err(ApiError::invalid("invalid_value", message).with_param("input"));
    }
    if let Some((i, row)) = rows.iter().enumerate().find(|(_, r)| r.is_empty() || r.len() > MAX_TOKENS) {
        let message = format!("input[{i}] is {} tokens; the model takes 1 to {MAX_TOKENS}", row.len());
        return Err(ApiError::invalid("context_length_exceeded", message).with_param("input"));
    }
    Ok(rows)
}

fn tokenizer_error(e: String) -> ApiError {
    ApiError::invalid("invalid_value", format!("cannot tokenize the input: {e}")).with_param("input")
}

/// One task's inputs for `rows`: `input_ids`, `attention_mask` and `token_type_ids`
/// ([rows, longest], int64), padded with 0 and masked.
pub fn task_inputs(rows: &[Vec<u32>]) -> Vec<Tensor> {
    let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::with_capacity(rows.len() * longest), Vec::with_capacity(rows.len() * longest));
    for row in rows {
        ids.extend(row.iter().map(|&t| i64::from(t)).chain(std::iter::repeat_n(0, longest - row.len())));
        mask.extend(std::iter::repeat_n(1i64, row.len()).chain(std::iter::repeat_n(0, longest - row.len())));
    }
    let shape = vec![rows.len() as u64, longest as u64];
    vec![
        Tensor::from_values("input_ids", shape.clone(), &ids),
        Tensor::from_values("attention_mask", shape.clone(), &mask),
        Tensor::from_values("token_type_ids", shape, &vec![0i64; rows.len() * longest]),
    ]
}

/// OpenAI's response for `embeddings` (one per input, in order).
pub fn response(model: &str, embeddings: &[Vec<f32>], tokens: usize, encoding: Encoding) -> Value {
    let data: Vec<Value> = embeddings
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let embedding = match encoding {
                Encoding::Float => json!(e),
                Encoding::Base64 => {
                    use base64::Engine;
                    let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Result<Vec<u32>, String> {
        Ok(std::iter::once(101).chain(text.split_whitespace().map(|w| w.len() as u32)).chain([102]).collect())
    }

    #[test]
    fn every_input_shape_becomes_token_rows() {
        let parse = |v: Value| serde_json::from_value::<EmbeddingsRequest>(json!({"model": "m", "input": v})).unwrap();
        assert_eq!(token_rows(&parse(json!("a bb")).input, words).unwrap(), vec![vec![101, 1, 2, 102]]);
        assert_eq!(token_rows(&parse(json!(["a", "bb c"])).input, words).unwrap().len(), 2);
        assert_eq!(token_rows(&parse(json!([101, 7, 102])).input, words).unwrap(), vec![vec![101, 7, 102]]);
        assert_eq!(token_rows(&parse(json!([[101, 102], [101, 5, 102]])).input, words).unwrap().len(), 2);
        let empty = token_rows(&parse(json!([])).input, words).unwrap_err();
        assert_eq!((empty.code, empty.param.as_deref()), ("invalid_value", Some("input")));
        let long = token_rows(&parse(json!(vec![1u32; MAX_TOKENS + 1])).input, words).unwrap_err();
        assert_eq!(long.code, "context_length_exceeded");
        let format =
            serde_json::from_value::<EmbeddingsRequest>(json!({"model": "m", "input": "x", "encoding_format": "int8"}));
        assert!(format.unwrap().encoding().is_err());
    }

    #[test]
    fn a_task_pads_its_rows_to_the_longest_and_masks_the_padding() {
        let inputs = task_inputs(&[vec![101, 5, 102], vec![101, 102]]);
        assert_eq!(inputs[0].shape, vec![2, 3]);
        assert_eq!(inputs[0].values::<i64>().unwrap(), vec![101, 5, 102, 101, 102, 0]);
        assert_eq!(inputs[1].values::<i64>().unwrap(), vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(inputs[2].values::<i64>().unwrap(), vec![0; 6]);
    }

    #[test]
    fn embeddings_are_written_as_floats_or_base64_of_little_endian_f32() {
        let floats = response("m", &[vec![0.5, -1.0]], 4, Encoding::Float);
        assert_eq!(floats["data"][0]["embedding"], json!([0.5, -1.0]));
        assert_eq!(floats["usage"]["prompt_tokens"], 4);
        let b64 = response("m", &[vec![0.5, -1.0]], 4, Encoding::Base64);
        // 0.5f32 = 00 00 00 3f, -1.0f32 = 00 00 80 bf
        assert_eq!(b64["data"][0]["embedding"], "AAAAPwAAgL8=");
    }
}
