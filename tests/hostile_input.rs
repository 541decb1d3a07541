//! Hostile input. Every file under `fuzz/regressions/<target>/` (crashes the fuzzer found,
//! and hand-made seeds) is replayed through that fuzz target's own check, then the nastiest
//! cases are spelled out by name. The checks live in `fuzz/src/checks.rs`, shared with
//! `cargo fuzz`; `scripts/fuzz` runs the fuzzer and keeps any crash in `fuzz/regressions`.

#[allow(dead_code)]
#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

use checks::usage::measure;
use checks::{SUBMISSION_LIMITS, decode_budget, models};
use sundara_ingress::{Rejection, admit, decode_request};
use sundara_schemas::{
    ControlRequest, DType, DecodeError, Limits, MAX_MESSAGE_BYTES, RejectCode, SubmitRequest, Tensor, TensorError,
    decode,
};

fn regressions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("regressions")
}

#[test]
fn every_regression_input_replays_through_its_check() {
    let targets: Vec<&str> = checks::TARGETS.iter().map(|(name, _)| *name).collect();
    for dir in std::fs::read_dir(regressions()).expect("fuzz/regressions") {
        let name = dir.unwrap().file_name().into_string().unwrap();
        assert!(targets.contains(&name.as_str()), "fuzz/regressions/{name} is no fuzz target's ({targets:?})");
    }
    for (target, check) in checks::TARGETS {
        let mut files: Vec<PathBuf> = std::fs::read_dir(regressions().join(target))
            .unwrap_or_else(|e| panic!("fuzz/regressions/{target}: {e}"))
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 5, "fuzz/regressions/{target} has only {} inputs", files.len());
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&bytes));
            assert!(outcome.is_ok(), "{target} fails on {}", file.display());
        }
    }
}

/// Minimal MessagePack writer for hand-made bytes (32-bit headers, so lengths can lie).
#[derive(Default)]
struct Mp(Vec<u8>);

impl Mp {
    fn head(mut self, marker: u8, n: u32) -> Mp {
        self.0.push(marker);
        self.0.extend_from_slice(&n.to_be_bytes());
        self
    }
    fn map(self, n: u32) -> Mp {
        self.head(0xdf, n)
    }
    fn arr(self, n: u32) -> Mp {
        self.head(0xdd, n)
    }
    fn bin(self, claimed: u32) -> Mp {
        self.head(0xc6, claimed)
    }
    fn str(self, s: &str) -> Mp {
        self.head(0xdb, s.len() as u32).raw(s.as_bytes())
    }
    fn uint(mut self, v: u64) -> Mp {
        self.0.push(0xcf);
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn raw(mut self, bytes: &[u8]) -> Mp {
        self.0.extend_from_slice(bytes);
        self
    }
    fn times(self, n: usize, f: impl Fn(Mp) -> Mp) -> Mp {
        (0..n).fold(self, |m, _| f(m))
    }
}

/// A submission's fields but `inputs`, then `extra` more entries (the map header counts them).
fn submission(inputs: Mp, extra: usize) -> Mp {
    Mp::default()
        .map(7 + extra as u32)
        .str("v")
        .uint(1)
        .str("model")
        .str("m")
        .str("request_id")
        .raw(&[0xc0])
        .str("seed")
        .uint(0)
        .str("timeout_ms")
        .raw(&[0xc0])
        .str("priority")
        .str("normal")
        .str("inputs")
        .raw(&inputs.0)
}

fn tensor(name: &str, dtype: &str, shape: &[u64]) -> Mp {
    let m = Mp::default().map(4).str("name").str(name).str("dtype").str(dtype).str("shape").arr(shape.len() as u32);
    shape.iter().fold(m, |m, &d| m.uint(d)).str("data")
}

/// A submission of `inputs` to model `m`, as a client sends it.
fn wire(inputs: &[Tensor]) -> Vec<u8> {
    let list = inputs.iter().fold(Mp::default().arr(inputs.len() as u32), |m, t| {
        let head = tensor(&t.name, &t.dtype.to_string(), &t.shape).bin(t.data.len() as u32);
        m.raw(&head.raw(&t.data).0)
    });
    submission(list, 0).0
}

fn x() -> Tensor {
    Tensor::from_values("x", vec![1, 4], &[1f32, 2.0, 3.0, 4.0])
}

fn model(name: &str) -> sundara_schemas::ModelMeta {
    models().into_iter().find(|m| m.name == name).expect("a fuzz model")
}

fn admitted(inputs: Vec<Tensor>, model_name: &str) -> Result<(), Rejection> {
    let req = decode_request(&wire(&inputs), 1 << 20).expect("a well-formed submission");
    admit(&req, &model(model_name), &SUBMISSION_LIMITS)
}

#[test]
fn a_bin_header_claiming_4_gib_is_rejected_without_allocating() {
    // The tensor's data claims u32::MAX bytes; 16 follow.
    let data = tensor("x", "f32", &[1, 4]).bin(u32::MAX).raw(&[0; 16]);
    let bytes = submission(Mp::default().arr(1).raw(&data.0), 0).0;
    let (refused, used) = measure(|| decode_request(&bytes, MAX_MESSAGE_BYTES));
    assert_eq!(refused.unwrap_err().code, RejectCode::Malformed);
    // Nothing is sized from the claim: the message's strings and the one tensor slot.
    assert!(used.largest < 4096, "{used:?}");
    assert!(used.peak < 16 << 10, "{used:?}");
}

#[test]
fn a_string_claiming_4_gib_is_rejected_without_allocating() {
    let bytes = Mp::default().map(2).str("v").uint(1).str("model").head(0xdb, u32::MAX).raw(b"mlp").0;
    let (refused, used) = measure(|| decode::<SubmitRequest>(&bytes, MAX_MESSAGE_BYTES));
    assert!(matches!(refused, Err(DecodeError::Malformed(_))), "{refused:?}");
    assert!(used.largest < 4096, "{used:?}");
}

#[test]
fn a_map_claiming_2_pow_32_entries_is_rejected_without_allocating() {
    let bytes = Mp::default().map(u32::MAX).str("v").uint(1).str("seed").uint(2).0;
    let (refused, used) = measure(|| decode::<SubmitRequest>(&bytes, MAX_MESSAGE_BYTES));
    assert!(matches!(refused, Err(DecodeError::Malformed(_))), "{refused:?}");
    assert!(used.largest < 4096, "{used:?}");
}

#[test]
fn an_array_claiming_2_pow_32_tensors_preallocates_at_most_1_mib() {
    let bytes = submission(Mp::default().arr(u32::MAX).raw(&tensor("x", "u8", &[1]).bin(1).raw(&[7]).0), 0).0;
    let (refused, used) = measure(|| decode_request(&bytes, MAX_MESSAGE_BYTES));
    assert_eq!(refused.unwrap_err().code, RejectCode::Malformed);
    // serde's cautious size hint caps the preallocation, not the claim (2^32 × 80 bytes).
    assert!(used.largest <= 1 << 20, "{used:?}");
}

#[test]
fn a_message_over_the_byte_limit_is_refused_before_decoding() {
    let bytes = wire(&[x()]);
    assert!(decode_request(&bytes, bytes.len()).is_ok());
    let (refused, used) = measure(|| decode_request(&bytes, bytes.len() - 1));
    let refused = refused.unwrap_err();
    assert_eq!(refused.code, RejectCode::PayloadTooLarge, "{}", refused.reason);
    assert!(used.largest < 256, "only the reason is allocated: {used:?}");
}

#[test]
fn every_truncation_of_a_valid_message_is_malformed() {
    let bytes = wire(&[x(), Tensor::from_values("ids", vec![2], &[1i64, 2])]);
    for len in 0..bytes.len() {
        let refused = decode_request(&bytes[..len], MAX_MESSAGE_BYTES).unwrap_err();
        assert_eq!(refused.code, RejectCode::Malformed, "{len} bytes: {}", refused.reason);
    }
}

#[test]
fn nesting_deeper_than_any_message_is_refused() {
    // An unknown field is skipped, whatever it holds: but not to any depth. 40 levels is
    // over the decoder's limit (our messages nest at most 8 deep) and decodes without it.
    let deep =
        |levels: usize| submission(Mp::default().arr(0), 1).str("junk").times(levels, |m| m.raw(&[0x91])).uint(0);
    assert!(decode_request(&deep(10).0, MAX_MESSAGE_BYTES).is_ok(), "an unknown field is ignored");
    let refused = decode_request(&deep(40).0, MAX_MESSAGE_BYTES).unwrap_err();
    assert_eq!(
        (refused.code, refused.reason.as_str()),
        (RejectCode::Malformed, "malformed message: depth limit exceeded")
    );
}

#[test]
fn nesting_a_hundred_thousand_deep_fails_cleanly_on_a_small_stack() {
    // Recursion stops at the depth limit, long before a 256 KiB stack runs out (tokio's
    // workers have 2 MiB). Without the limit this thread overflows its stack and aborts.
    let submit = submission(Mp::default().arr(0), 1).str("junk").times(100_000, |m| m.raw(&[0x91])).0;
    let control = Mp::default().map(2).str("v").uint(1).str("command").map(1).str("junk");
    let control = control.times(100_000, |m| m.raw(&[0x91])).0;
    let answers = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || {
            (
                decode_request(&submit, MAX_MESSAGE_BYTES).unwrap_err(),
                decode::<ControlRequest>(&control, MAX_MESSAGE_BYTES),
            )
        })
        .unwrap()
        .join()
        .expect("decoding deep nesting must not overflow the stack");
    assert_eq!(answers.0.reason, "malformed message: depth limit exceeded");
    assert_eq!(answers.1.unwrap_err(), DecodeError::Malformed("depth limit exceeded".into()));
}

#[test]
fn a_tagged_enum_cannot_be_made_to_preallocate_a_mib_per_level() {
    // Internally tagged enums (`Control`, `FleetUpdate`, `ReferenceCheck`, `CompareRule`)
    // buffer their value whole; each nested array claiming 2^32 elements preallocates 1 MiB.
    // 1000 levels are 5 KB of input: 1 GiB without the depth limit, 32 MiB with it.
    let bytes =
        Mp::default().map(2).str("v").uint(1).str("command").map(2).str("junk").times(1000, |m| m.arr(u32::MAX)).0;
    let (refused, used) = measure(|| decode::<ControlRequest>(&bytes, MAX_MESSAGE_BYTES));
    assert_eq!(refused.unwrap_err(), DecodeError::Malformed("depth limit exceeded".into()));
    assert!(used.peak <= decode_budget(bytes.len()), "{} bytes had {used:?} live", bytes.len());
    assert!(used.peak <= 33 << 20, "{used:?}");
}

#[test]
fn a_shape_whose_size_wraps_to_zero_is_hostile() {
    // 2^32 × 2^32 wraps to 0 elements, which an unchecked product would match to no data.
    let wraps = Tensor { name: "ids".into(), dtype: DType::I64, shape: vec![1 << 32, 1 << 32], data: vec![] };
    assert!(matches!(wraps.validate(&Limits::default()), Err(TensorError::HostileShape { .. })));
    let mask = Tensor::from_values("mask", vec![1], &[true]);
    let refused = admitted(vec![x(), mask, wraps], "dynamic").unwrap_err();
    assert_eq!(refused.code, RejectCode::HostileShape, "{}", refused.reason);
}

#[test]
fn a_dimension_beyond_i64_is_hostile_even_with_zero_elements() {
    // ONNX dimensions are i64; 2^63 would reach ONNX Runtime as a negative dimension.
    let zero = Tensor { name: "ids".into(), dtype: DType::I64, shape: vec![0, 1 << 63], data: vec![] };
    assert!(matches!(zero.validate(&Limits::default()), Err(TensorError::HostileShape { .. })));
    let fine = Tensor { name: "ids".into(), dtype: DType::I64, shape: vec![0, i64::MAX as u64], data: vec![] };
    assert_eq!(fine.validate(&Limits::default()), Ok(()));
}

#[test]
fn limits_on_rank_bytes_count_and_length_each_have_their_code() {
    let mask = || Tensor::from_values("mask", vec![1], &[true]);
    let ids = |shape: Vec<u64>, n: usize| Tensor::from_values("ids", shape, &vec![0i64; n]);
    let code = |ids: Tensor| admitted(vec![x(), mask(), ids], "dynamic").map_err(|r| r.code);
    assert_eq!(code(ids(vec![2, 3], 6)), Ok(()));
    // Over max_rank (4) for a model taking any shape's dims: rank is checked first.
    assert_eq!(code(ids(vec![1, 1, 1, 1, 1], 1)), Err(RejectCode::HostileShape));
    // 129 × 8 bytes, all present, is over max_tensor_bytes (1024).
    assert_eq!(code(ids(vec![129, 1], 129)), Err(RejectCode::PayloadTooLarge));
    // A claim far over the limit, with no data behind it.
    assert_eq!(code(ids(vec![1 << 20, 1 << 20], 0)), Err(RejectCode::PayloadTooLarge));
    assert_eq!(code(ids(vec![2, 3], 5)), Err(RejectCode::Malformed));
    // Five tensors, one more than max_tensors, refused before any is looked at.
    let five = ["a", "b", "c", "d", "e"].map(|n| Tensor::from_values(n, vec![1], &[0u8])).to_vec();
    let refused = admitted(five, "mixed").unwrap_err();
    assert_eq!((refused.code, refused.reason.as_str()), (RejectCode::Malformed, "5 tensors, over the limit of 4"));
}

#[test]
fn conversions_of_unvalidated_tensors_read_only_the_bytes_present() {
    // The verifier widens miners' outputs, which nobody validated, to compare them.
    let lying = Tensor { name: "y".into(), dtype: DType::F32, shape: vec![u64::MAX, u64::MAX], data: vec![0; 10] };
    let (wide, used) = measure(|| lying.to_f64());
    assert_eq!(wide.len(), 2);
    assert!(used.peak <= 16, "{used:?}");
    assert_eq!(lying.values::<f32>().map(|v| v.len()), Some(2));
}
