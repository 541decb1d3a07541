//! The text-embedding workload: a fixed corpus of English sentences (generated from a
//! seed, so every system gets the same texts), cut into OpenAI `/v1/embeddings` requests
//! of [`TEXTS_PER_REQUEST`] texts, and the in-process ceiling: the same tokenizer and
//! `minilm.onnx` run by `ort` on the benchmark's threads.

use std::path::Path;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sundara_schemas::Tensor;

/// Texts per request (and so per task: the gateway cuts at 32).
pub const TEXTS_PER_REQUEST: usize = 16;
/// Distinct requests in the corpus (as the tensor workloads use 64 input sets).
pub const REQUESTS: usize = 64;
/// The embedding model's registered name, file and tokenizer in `.cache/models`.
pub const MODEL: &str = "minilm";
pub const MODEL_FILE: &str = "minilm.onnx";
pub const TOKENIZER_FILE: &str = "minilm_tokenizer.json";

const SUBJECTS: &[&str] = &[
    "The city council",
    "A young engineer",
    "Our neighbours",
    "The old fisherman",
    "A small startup in Lisbon",
    "Several students",
    "The hospital",
    "My grandmother",
    "The local bakery",
    "An independent journalist",
    "The football team",
    "A group of volunteers",
    "The museum",
    "Her brother",
    "The airline",
    "Most farmers in the valley",
];
const PREDICATES: &[&str] = &[
    "approved the new budget",
    "repaired the broken bridge",
    "published a detailed report on water quality",
    "opened a second shop near the station",
    "won the regional championship",
    "planted two hundred trees along the river",
    "cancelled the evening flights",
    "baked bread for the whole street",
    "found a rare painting in the attic",
    "raised money for the children's library",
    "switched to solar power",
    "started offering free language classes",
    "lost the keys to the storage room",
    "hired three more nurses",
    "moved the market to the main square",
    "complained about the noise from the highway",
];
const TAILS: &[&str] = &[
    "",
    " last Tuesday",
    " after a long debate",
    " despite the heavy rain",
    " before the end of the year",
    " to everyone's surprise",
    " in less than a week",
    " for the third time this month",
];
const REASONS: &[&str] = &[
    "demand had doubled since spring",
    "the old system kept failing",
    "prices at the supermarket went up again",
    "nobody else wanted to do it",
    "the mayor asked them to",
    "the weather forecast looked good for once",
];

/// `n` sentences from `seed`: one or two clauses (about 10 to 35 tokens), as in sentence
/// similarity sets.
pub fn corpus(n: usize, seed: u64) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pick = |rng: &mut rand::rngs::StdRng, words: &[&'static str]| *words.choose(rng).expect("not empty");
    (0..n)
        .map(|_| {
            let mut s = format!("{} {}{}", pick(&mut rng, SUBJECTS), pick(&mut rng, PREDICATES), pick(&mut rng, TAILS));
            match rng.random_range(0..3) {
                0 => s.push_str(&format!(" because {}", pick(&mut rng, REASONS))),
                1 => {
                    let other = pick(&mut rng, SUBJECTS);
                    let lower = other[..1].to_lowercase() + &other[1..];
                    s.push_str(&format!(", and {lower} {}", pick(&mut rng, PREDICATES)));
                }
                _ => {}
            }
            s.push('.');
            s
        })
        .collect()
}

/// The benchmark's requests: [`REQUESTS`] × [`TEXTS_PER_REQUEST`] sentences of seed 7.
pub fn requests() -> Vec<Vec<String>> {
    corpus(REQUESTS * TEXTS_PER_REQUEST, 7).chunks(TEXTS_PER_REQUEST).map(<[String]>::to_vec).collect()
}

/// `POST /v1/embeddings`' body for `texts` (base64 floats, what the `openai` package asks for).
pub fn request_body(texts: &[String]) -> Vec<u8> {
    json!({"model": MODEL, "input": texts, "encoding_format": "base64"}).to_string().into_bytes()
}

/// The tokenizer as the gateway loads it: the file's padding and truncation off.
pub fn load_tokenizer(path: &Path) -> anyhow::Result<tokenizers::Tokenizer> {
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(tokenizer)
}

/// Token ids of each text, special tokens added (as the gateway counts `usage`).
pub fn token_rows(tokenizer: &tokenizers::Tokenizer, texts: &[String]) -> Result<Vec<Vec<u32>>, String> {
    texts
        .iter()
        .map(|t| tokenizer.encode(t.as_str(), true).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string()))
        .collect()
}

/// One task's inputs for `texts`, built as the gateway builds them.
pub fn task_inputs(tokenizer: &tokenizers::Tokenizer, texts: &[String]) -> Result<Vec<Tensor>, String> {
    Ok(sundara_gateway::openai::task_inputs(&token_rows(tokenizer, texts)?))
}

/// The JSON document `bench corpus` writes for the peers: each request's texts and tokens.
pub fn corpus_document(tokenizer: &tokenizers::Tokenizer) -> anyhow::Result<serde_json::Value> {
    let mut requests = Vec::new();
    for texts in self::requests() {
        let tokens: usize = token_rows(tokenizer, &texts).map_err(anyhow::Error::msg)?.iter().map(Vec::len).sum();
        requests.push(json!({"input": texts, "tokens": tokens}));
    }
    Ok(json!({"model": MODEL, "texts_per_request": TEXTS_PER_REQUEST, "requests": requests}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_is_fixed_and_varied() {
        let (a, b) = (corpus(200, 7), corpus(200, 7));
        assert_eq!(a, b);
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 190, "{} distinct", distinct.len());
        let words: Vec<usize> = a.iter().map(|s| s.split_whitespace().count()).collect();
        assert!(words.iter().min() < Some(&8) && words.iter().max() > Some(&14), "{words:?}");
        assert!(a.iter().all(|s| s.ends_with('.')));
        let r = requests();
        assert_eq!((r.len(), r[0].len()), (REQUESTS, TEXTS_PER_REQUEST));
    }
}
