//! What hostile input must never do, checked on arbitrary bytes. One function per fuzz
//! target; the same functions replay `fuzz/regressions/<target>/*` in CI through
//! `tests/hostile_input.rs`, which compiles this file by path. So it uses nothing but std,
//! `sundara_schemas` and `sundara_ingress`.
//!
//! Each check panics (a crash for libFuzzer, a failure for the test) when a property breaks:
//! - decoding never panics, and a decoded message re-encodes to bytes that decode to it again;
//! - memory use while decoding is bounded by the bytes actually present, never by the
//!   lengths the bytes claim ([`decode_budget`], measured by the allocator below);
//! - a submission the ingress admits is exactly what its model declares, within [`Limits`];
//! - `Tensor::validate` accepts exactly the tensors whose bytes match dtype × shape within
//!   the limits, and the conversions of tensor bytes to values never panic, validated or not.

use sundara_ingress::{Rejection, admit, decode_request};
use sundara_schemas::codec::Versioned;
use sundara_schemas::{
    Assignment, Assignments, ClientResult, ControlReply, ControlRequest, DType, DeadLetter, DecodeError, EpochWeights,
    FleetRequest, JobReply, JobRequest, Limits, MAX_MESSAGE_BYTES, ModelMeta, Outcome, Policy, RejectCode, RewardTrace,
    RewardTraces, SubmitReply, SubmitRequest, Task, Tensor, TensorError, TensorSpec, Verdict, WIRE_VERSION, decode,
    encode,
};

/// A fuzz target's check: panics when a property breaks.
pub type Check = fn(&[u8]);

/// Every target by name (its directory under `fuzz/regressions` and `fuzz/corpus`).
pub const TARGETS: &[(&str, Check)] =
    &[("decode_messages", decode_messages), ("submission", submission), ("tensor_validate", tensor_validate)];

/// serde preallocates at most 1 MiB for a sequence, whatever length it claims.
const PREALLOC: usize = 1 << 20;

/// The nesting `sundara_schemas::decode` allows (`MAX_DEPTH` in schemas/src/codec.rs).
const MAX_DEPTH: usize = 32;

/// Most bytes a decode of `len` bytes may have live at once. Claimed-but-absent sequences:
/// serde preallocates at most 1 MiB for each, and at most one per level of nesting is open
/// (internally tagged enums buffer any value, so every level can hold one). Then what the
/// bytes present can build: the worst is serde's buffered `Content`, 32 bytes per 1-byte
/// element, in a vector that grows by doubling: 64 bytes per input byte.
pub fn decode_budget(len: usize) -> usize {
    (MAX_DEPTH + 1) * PREALLOC + 64 * len
}

// ---------------------------------------------------------------------------------------
// decode_messages

/// Decodes `data` as every top-level wire type and checks the round trip.
pub fn decode_messages(data: &[u8]) {
    macro_rules! each {
        ($($t:ty),* $(,)?) => {$(
            let (decoded, used) = usage::measure(|| decode::<$t>(data, MAX_MESSAGE_BYTES));
            used.within(decode_budget(data.len()), stringify!($t), data.len());
            match decoded {
                Ok(msg) => {
                    assert_eq!(msg.version(), WIRE_VERSION, "{} decoded at another version", stringify!($t));
                    let bytes = encode(&msg);
                    let again = decode::<$t>(&bytes, MAX_MESSAGE_BYTES)
                        .unwrap_or_else(|e| panic!("{} re-encoded does not decode: {e}", stringify!($t)));
                    same(&again, &msg, stringify!($t));
                    assert_eq!(encode(&again), bytes, "{} re-encodes differently", stringify!($t));
                }
                Err(e) => decode_error_is_typed(&e, data.len(), MAX_MESSAGE_BYTES),
            }
        )*};
    }
    sundara_schemas::with_messages!(each);
    each!(ModelMeta);
    // Tickets are covered inside assignments and outcomes.
}

/// Equal, or (a float field is NaN, which is not equal to itself) identical when printed.
fn same<T: PartialEq + std::fmt::Debug>(a: &T, b: &T, what: &str) {
    if a != b {
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{what} decoded differently after a round trip");
    }
}

fn decode_error_is_typed(e: &DecodeError, len: usize, max: usize) {
    match e {
        DecodeError::TooLarge { len: l, max: m } => {
            assert!(*l == len && *m == max && len > max, "TooLarge for {len} bytes under a {max} limit: {e}")
        }
        DecodeError::Malformed(_) | DecodeError::UnsupportedVersion(_) => {
            assert!(len <= max, "{len} bytes over the {max} limit were decoded: {e}")
        }
    }
}

// ---------------------------------------------------------------------------------------
// submission

/// Small limits, so the fuzzer reaches every bound.
pub const SUBMISSION_LIMITS: Limits = Limits { max_rank: 4, max_tensors: 4, max_tensor_bytes: 1024 };

/// The ingress's byte bound for the fuzzer (the service's default is 4 MiB).
pub const MAX_SUBMISSION_BYTES: usize = 64 << 10;

fn spec(name: &str, dtype: DType, shape: &[Option<u64>]) -> TensorSpec {
    TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
}

fn model(name: &str, inputs: Vec<TensorSpec>) -> ModelMeta {
    ModelMeta {
        v: WIRE_VERSION,
        name: name.into(),
        version: "1".into(),
        sha256: String::new(),
        size: 0,
        object: String::new(),
        inputs,
        outputs: vec![],
        policy: Policy::default(),
        pushed_at_ms: 0,
        batching: Default::default(),
        lineage: None,
    }
}

/// Models the fuzzer submits to: static and dynamic dimensions, scalars, every dtype.
pub fn models() -> Vec<ModelMeta> {
    vec![
        model("static", vec![spec("x", DType::F32, &[Some(1), Some(4)])]),
        model(
            "dynamic",
            vec![
                spec("x", DType::F32, &[None, Some(4)]),
                spec("mask", DType::Bool, &[None]),
                spec("ids", DType::I64, &[None, None]),
            ],
        ),
        model("scalar", vec![spec("sr", DType::I64, &[]), spec("audio", DType::F64, &[Some(1), None])]),
        model(
            "mixed",
            vec![
                spec("a", DType::U8, &[None, Some(3), None]),
                spec("b", DType::I8, &[Some(2)]),
                spec("c", DType::I16, &[None]),
                spec("d", DType::I32, &[Some(0), None]),
            ],
        ),
    ]
}

/// Decodes `data` as a submission and admits it against every model in [`models`].
pub fn submission(data: &[u8]) {
    let (decoded, used) = usage::measure(|| decode_request(data, MAX_SUBMISSION_BYTES));
    used.within(decode_budget(data.len()), "submission", data.len());
    let req = match decoded {
        Ok(req) => req,
        Err(r) => {
            let expected = if data.len() > MAX_SUBMISSION_BYTES {
                &[RejectCode::PayloadTooLarge][..]
            } else {
                &[RejectCode::Malformed, RejectCode::UnsupportedVersion]
            };
            assert!(expected.contains(&r.code), "decoding {} bytes refused as {:?}: {}", data.len(), r.code, r.reason);
            return;
        }
    };
    assert_eq!(req.v, WIRE_VERSION);
    let limits = SUBMISSION_LIMITS;
    for m in models() {
        // Admission allocates only its answer: no copy of the tensors, nothing from shapes.
        let (verdict, used) = usage::measure(|| admit(&req, &m, &limits));
        used.within(64 << 10, "admit", data.len());
        match verdict {
            Ok(()) => admitted_matches_the_model(&req, &m, &limits),
            Err(Rejection { code, reason }) => {
                let known = [
                    RejectCode::Malformed,
                    RejectCode::HostileShape,
                    RejectCode::PayloadTooLarge,
                    RejectCode::UnexpectedInput,
                    RejectCode::MissingInput,
                    RejectCode::WrongDtype,
                    RejectCode::WrongShape,
                ];
                assert!(known.contains(&code), "admit answered {code:?}: {reason}");
                assert!(!reason.is_empty(), "{code:?} without a reason");
            }
        }
    }
}

fn admitted_matches_the_model(req: &SubmitRequest, m: &ModelMeta, limits: &Limits) {
    assert!(req.inputs.len() <= limits.max_tensors, "{} tensors admitted", req.inputs.len());
    assert_eq!(req.inputs.len(), m.inputs.len(), "admitted inputs are not the model's ({})", m.name);
    for spec in &m.inputs {
        let given: Vec<&Tensor> = req.inputs.iter().filter(|t| t.name == spec.name).collect();
        assert_eq!(given.len(), 1, "input `{}` admitted {} times", spec.name, given.len());
        let t = given[0];
        assert_eq!(t.validate(limits), Ok(()), "admitted an invalid tensor");
        assert_eq!(spec.mismatch(t), None, "admitted a tensor that does not fit its spec");
        assert!(t.data.len() <= limits.max_tensor_bytes);
    }
}

// ---------------------------------------------------------------------------------------
// tensor_validate

const DTYPES: [DType; 8] =
    [DType::F32, DType::F64, DType::I8, DType::U8, DType::I16, DType::I32, DType::I64, DType::Bool];

/// Reads a tensor and limits from raw bytes: dtype, limits, rank, then one byte per
/// dimension (`0xf8..` = the next 8 bytes, little-endian, as the dimension; otherwise the
/// byte itself), then the data. Short input ends the shape early.
pub fn parse_tensor(data: &[u8]) -> (Tensor, Limits) {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let dtype = DTYPES[byte(0) as usize % DTYPES.len()];
    let sel = byte(1);
    let max_tensor_bytes = [0, 1, 64, 4096, 1 << 16, 16 << 20, usize::MAX, 3][(sel >> 3) as usize % 8];
    let limits = Limits { max_rank: (sel & 7) as usize + 1, max_tensors: 16, max_tensor_bytes };
    let rank = byte(2) as usize % 12;
    let mut at = 3.min(data.len());
    let mut shape = Vec::with_capacity(rank);
    for _ in 0..rank {
        let Some(&tag) = data.get(at) else { break };
        at += 1;
        if tag >= 0xf8 && at + 8 <= data.len() {
            shape.push(u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes")));
            at += 8;
        } else {
            shape.push(tag as u64);
        }
    }
    (Tensor { name: "t".into(), dtype, shape, data: data[at..].to_vec() }, limits)
}

/// `Tensor::validate` against its specification, and every conversion of tensor bytes.
pub fn tensor_validate(data: &[u8]) {
    let (t, limits) = parse_tensor(data);
    let size = t.dtype.size();
    let elements = Tensor::checked_elements(&t.shape);
    let (verdict, used) = usage::measure(|| t.validate(&limits));
    // Validation allocates only its error (a copy of name and shape), never from the claim.
    used.within(1024 + 16 * t.shape.len(), "validate", data.len());
    match verdict {
        Ok(()) => {
            assert!(t.shape.len() <= limits.max_rank);
            assert!(t.shape.iter().all(|&d| d <= i64::MAX as u64), "valid dimension beyond ONNX's i64");
            let n = elements.expect("a valid shape has a size") as u128;
            assert_eq!(n * size as u128, t.data.len() as u128, "valid tensor whose bytes do not match its shape");
            assert!(t.data.len() <= limits.max_tensor_bytes, "valid tensor over the byte limit");
        }
        Err(TensorError::RankTooHigh { rank, max, .. }) => {
            assert!(rank == t.shape.len() && max == limits.max_rank && rank > max)
        }
        Err(TensorError::HostileShape { .. }) => {
            let beyond_onnx = t.shape.iter().any(|&d| d > i64::MAX as u64);
            assert!(t.shape.len() <= limits.max_rank && (elements.is_none() || beyond_onnx), "{:?} is fine", t.shape)
        }
        Err(TensorError::TooLarge { bytes, max, .. }) => {
            let n = elements.expect("a sized shape") as u128;
            assert!(bytes == n * size as u128 && max == limits.max_tensor_bytes && bytes > max as u128);
        }
        Err(TensorError::LengthMismatch { expected, actual, .. }) => {
            let n = elements.expect("a sized shape") as u128;
            assert!(expected as u128 == n * size as u128 && expected as u128 <= limits.max_tensor_bytes as u128);
            assert!(actual == t.data.len() && actual != expected);
        }
    }

    // The conversions run on tensors whatever validate said (the verifier widens miners'
    // outputs, which nobody validated): they read `data`, never the shape's claim.
    let whole = t.data.len() / size;
    let (wide, used) = usage::measure(|| t.to_f64());
    used.within(64 + 8 * whole, "to_f64", data.len());
    assert_eq!(wide.len(), whole);
    fn typed<T: sundara_schemas::tensor::Element + std::fmt::Debug>(t: &Tensor, whole: usize) {
        match t.values::<T>() {
            Some(values) => {
                assert_eq!(values.len(), whole);
                let again = Tensor::from_values(&t.name, t.shape.clone(), &values);
                let read = &t.data[..whole * T::DTYPE.size()];
                if T::DTYPE == DType::Bool {
                    // Any non-zero byte reads as true and writes back as 1.
                    assert!(again.data.iter().zip(read).all(|(&b, &r)| b == (r != 0) as u8));
                } else {
                    assert_eq!(again.data[..], read[..], "values do not round-trip");
                }
            }
            None => assert_ne!(t.dtype, T::DTYPE),
        }
    }
    typed::<f32>(&t, whole);
    typed::<f64>(&t, whole);
    typed::<i8>(&t, whole);
    typed::<u8>(&t, whole);
    typed::<i16>(&t, whole);
    typed::<i32>(&t, whole);
    typed::<i64>(&t, whole);
    typed::<bool>(&t, whole);

    // A spec with the tensor's own dimensions (every other one dynamic) fits exactly when the
    // dtypes agree.
    let own: Vec<Option<u64>> = t.shape.iter().enumerate().map(|(i, &d)| (i % 2 == 0).then_some(d)).collect();
    for dtype in DTYPES {
        let fits = spec("t", dtype, &own).mismatch(&t).is_none();
        assert_eq!(fits, dtype == t.dtype);
    }
    if !t.shape.is_empty() {
        assert!(spec("t", t.dtype, &own[1..]).mismatch(&t).is_some(), "a spec of another rank fits");
    }
}

// ---------------------------------------------------------------------------------------
// Memory accounting

/// Per-thread allocation accounting (the test harness runs tests on parallel threads).
pub mod usage {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// The system allocator, counting what the current thread allocates while [`measure`] runs.
    pub struct Counting;

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    #[derive(Clone, Copy, Default)]
    struct State {
        on: bool,
        live: isize,
        peak: isize,
        largest: usize,
    }

    thread_local! {
        static STATE: Cell<State> = const { Cell::new(State { on: false, live: 0, peak: 0, largest: 0 }) };
    }

    fn note(grown: usize, freed: usize) {
        let _ = STATE.try_with(|s| {
            let mut st = s.get();
            if st.on {
                st.live += grown as isize - freed as isize;
                st.peak = st.peak.max(st.live);
                st.largest = st.largest.max(grown);
                s.set(st);
            }
        });
    }

    // SAFETY: every call is forwarded unchanged to the system allocator; counting allocates nothing.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size(), 0);
            // SAFETY: the caller's contract for this method is the system allocator's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size(), 0);
            // SAFETY: the caller's contract for this method is the system allocator's.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            note(0, layout.size());
            // SAFETY: the caller's contract for this method is the system allocator's.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size, layout.size());
            // SAFETY: the caller's contract for this method is the system allocator's.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    /// Memory one call used on this thread.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Usage {
        /// Most bytes live at once, over what was live when the call began.
        pub peak: usize,
        /// Largest single allocation asked for (counted before the allocator is asked,
        /// so even one that would fail is seen).
        pub largest: usize,
    }

    impl Usage {
        /// Panics when the call had more than `budget` bytes live at once.
        pub fn within(self, budget: usize, what: &str, input_len: usize) {
            assert!(
                self.peak <= budget,
                "{what}: {input_len} input bytes had {} bytes live at once (largest allocation {}), over {budget}",
                self.peak,
                self.largest
            );
        }
    }

    /// Runs `f`, counting its allocations on this thread (nested calls each count their own).
    pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
        let outer = STATE.with(|s| s.replace(State { on: true, ..State::default() }));
        let result = f();
        let inner = STATE.with(|s| s.get());
        STATE.with(|s| {
            // The outer measurement sees the inner call's peak on top of its own live bytes.
            let mut o = outer;
            if o.on {
                o.peak = o.peak.max(o.live + inner.peak);
                o.live += inner.live;
                o.largest = o.largest.max(inner.largest);
            }
            s.set(o)
        });
        (result, Usage { peak: inner.peak.max(0) as usize, largest: inner.largest })
    }
}
