//! ONNX Runtime through `ort`, loaded dynamically from the onnxruntime PyPI wheel.
//!
//! One process holds one ONNX Runtime environment ([`init`]); a [`Model`] is one session,
//! owned by one thread (ort's `Session::run` takes `&mut self`).

pub mod batch;
pub mod executor;
pub mod residency;

pub use executor::{Executor, ExecutorConfig, JobError, JobResult, ModelRun, Ran, SliceReport};
pub use residency::{Residency, Room};

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};
use sundara_schemas::{DType, Tensor, TensorSpec};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found: set ORT_DYLIB_PATH to libonnxruntime.so.*, or run scripts/setup \
         (it installs the onnxruntime wheel into .venv)"
    )]
    LibraryNotFound,
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    LoadLibrary { path: PathBuf, reason: String },
    #[error("ONNX Runtime is not initialised: call sundara_runtime::init first")]
    NotInitialised,
    #[error("invalid model: {0}")]
    InvalidModel(String),
    #[error("model {what} `{name}` has element type {ty:?}, which Sundara does not carry")]
    UnsupportedType { what: &'static str, name: String, ty: String },
    #[error("inference failed: {0}")]
    Inference(String),
}

static ENV: OnceLock<ort::environment::Environment> = OnceLock::new();

/// Loads the ONNX Runtime library (once per process; later calls are no-ops).
pub fn init(library: &Path) -> Result<(), RuntimeError> {
    if ENV.get().is_some() {
        return Ok(());
    }
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if ENV.get().is_some() {
        return Ok(());
    }
    let load = |reason: String| RuntimeError::LoadLibrary { path: library.to_path_buf(), reason };
    let builder = ort::init_from(library).map_err(|e| load(e.to_string()))?;
    let env = builder.with_name("sundara").build().map_err(|e| load(e.to_string()))?;
    let _ = ENV.set(env);
    Ok(())
}

/// Finds libonnxruntime: `ORT_DYLIB_PATH`, else the wheel in `<root>/.venv` for `root` in `roots`.
pub fn find_library(roots: &[PathBuf]) -> Result<PathBuf, RuntimeError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Ok(PathBuf::from(p));
    }
    for root in roots {
        let Ok(pythons) = std::fs::read_dir(root.join(".venv/lib")) else { continue };
        for py in pythons.flatten() {
            let capi = py.path().join("site-packages/onnxruntime/capi");
            let Ok(files) = std::fs::read_dir(&capi) else { continue };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with("libonnxruntime.so") {
                    return Ok(f.path());
                }
            }
        }
    }
    Err(RuntimeError::LibraryNotFound)
}

fn env() -> Result<&'static ort::environment::Environment, RuntimeError> {
    ENV.get().ok_or(RuntimeError::NotInitialised)
}

/// Where a session runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA device (by index among those visible to the process), its memory arena capped
    /// at `memory_limit` bytes. A MIG instance is device 0 of a process that sees only it
    /// (`CUDA_VISIBLE_DEVICES=MIG-<uuid>`, set by the worker before ONNX Runtime starts).
    Cuda {
        device_id: u32,
        memory_limit: u64,
    },
}

/// How a session's graph is prepared at load.
#[derive(Clone, Copy, Debug)]
pub enum Graph<'a> {
    /// ONNX Runtime optimizes it (the default).
    Optimize,
    /// Optimized, and the optimized graph written to this file for later loads.
    OptimizeAndSave(&'a Path),
    /// Already optimized by an earlier load on this machine ([`Graph::OptimizeAndSave`]):
    /// loaded as it is, which skips most of a small model's session creation (silero_vad:
    /// 15 against 32 ms).
    Optimized,
}

fn build_session(bytes: &[u8], intra_threads: usize, device: &Device, graph: Graph) -> ort::Result<Session> {
    let env = ENV.get().ok_or_else(|| ort::Error::new("ONNX Runtime is not initialised"))?;
    // One intra-op thread without spinning: sessions run side by side on the slice's
    // threads, and spinning threads fight each other on small machines (STACK.md §2).
    let builder = Session::builder(env)?
        .with_intra_threads(intra_threads)?
        .with_inter_threads(1)?
        .with_intra_op_spinning(false)?;
    let builder = match graph {
        Graph::Optimize => builder,
        Graph::OptimizeAndSave(path) => builder.with_optimized_model_path(path)?,
        Graph::Optimized => builder.with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)?,
    };
    let mut builder = match device {
        Device::Cpu => builder,
        Device::Cuda { device_id, memory_limit } => with_cuda(builder, *device_id, *memory_limit)?,
    };
    builder.commit_from_memory(bytes)
}

/// Whether sessions can run on CUDA here: this build has the CUDA execution provider
/// (`--features cuda`) and the ONNX Runtime library loaded by [`init`] provides it (the
/// `onnxruntime-gpu` wheel's does, the CPU wheel's does not). `Err` says which is missing
/// and what to do. Whether a given device works shows only when a session starts on it.
pub fn cuda_support() -> Result<(), NoCuda> {
    #[cfg(feature = "cuda")]
    {
        use ort::ep::ExecutionProvider;
        if ENV.get().is_none() {
            return Err(NoCuda::NotInitialised);
        }
        match ort::ep::CUDA::is_available() {
            Ok(true) => Ok(()),
            Ok(false) => Err(NoCuda::NoProvider),
            Err(e) => Err(NoCuda::Providers(e)),
        }
    }
    #[cfg(not(feature = "cuda"))]
    Err(NoCuda::NotBuilt)
}

/// Why sessions cannot run on CUDA here (see [`cuda_support`]).
#[derive(Debug, thiserror::Error)]
pub enum NoCuda {
    #[error(
        "this build has no CUDA execution provider: rebuild with `cargo build --release --features cuda` and run \
         it with the onnxruntime-gpu wheel's library (see docs/mining.md)"
    )]
    NotBuilt,
    #[error("ONNX Runtime is not initialised")]
    NotInitialised,
    #[error(
        "the ONNX Runtime library loaded has no CUDA execution provider: install the onnxruntime-gpu wheel \
         (`pip install onnxruntime-gpu`) and set ORT_DYLIB_PATH to its \
         onnxruntime/capi/libonnxruntime.so.<version> (see docs/mining.md)"
    )]
    NoProvider,
    #[error("ONNX Runtime could not list its execution providers: {0}")]
    Providers(#[source] ort::Error),
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    device_id: u32,
    memory_limit: u64,
) -> ort::Result<ort::session::builder::SessionBuilder> {
    let cuda = ort::ep::CUDA::default()
        .with_device_id(device_id as i32)
        .with_memory_limit(memory_limit as usize)
        .with_arena_extend_strategy(ort::ep::ArenaExtendStrategy::SameAsRequested)
        .build()
        .error_on_failure();
    Ok(builder.with_execution_providers([cuda])?)
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _: ort::session::builder::SessionBuilder,
    _: u32,
    _: u64,
) -> ort::Result<ort::session::builder::SessionBuilder> {
    Err(ort::Error::new("this build has no CUDA support: build with `--features cuda`"))
}

/// Bytes of heap in use by the process, from glibc's allocator (all arenas and mmapped
/// blocks). The worker measures a model's footprint as the growth of this across its load
/// and warm-up: unlike resident memory it falls when memory is freed, so a load that
/// reuses freed memory is still counted in full. Resident bytes where glibc is absent.
pub fn heap_bytes() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        (info.uordblks + info.hblkhd) as u64
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        resident_bytes()
    }
}

/// Bytes of the process resident in RAM (Linux `/proc/self/statm`); 0 where unknown.
pub fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// Bytes of memory available to new work on this machine (`MemAvailable`); 0 where unknown.
pub fn available_memory() -> u64 {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Inputs that fit a model, `rows` along the first dynamic dimension: for warm-up runs,
/// tests and demos. Known inputs get realistic values: silero-vad's `sr` is the 16 kHz
/// sample rate, its recurrent `state` starts at zero and its audio chunk is 512 samples;
/// images are 48×192 (PP-OCR's text lines); integer inputs (magika's byte windows) are
/// bytes 0-255; floats are uniform in [-1, 1).
pub fn example_inputs(inputs: &[TensorSpec], rows: u64, rng: &mut impl rand::Rng) -> Vec<Tensor> {
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

fn dtype_of(ty: TensorElementType) -> Option<DType> {
    Some(match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::Int8 => DType::I8,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Int16 => DType::I16,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Bool => DType::Bool,
        _ => return None,
    })
}

fn spec_of(what: &'static str, name: &str, ty: &ValueType) -> Result<TensorSpec, RuntimeError> {
    let unsupported = |ty: String| RuntimeError::UnsupportedType { what, name: name.to_string(), ty };
    let ValueType::Tensor { ty: elem, shape, .. } = ty else {
        return Err(unsupported(format!("{ty:?}")));
    };
    let dtype = dtype_of(*elem).ok_or_else(|| unsupported(format!("{elem:?}")))?;
    let shape = shape.iter().map(|&d| u64::try_from(d).ok()).collect();
    Ok(TensorSpec { name: name.to_string(), dtype, shape })
}

/// One loaded model: an ONNX Runtime session and its declared inputs and outputs.
pub struct Model {
    session: Session,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl Model {
    /// Loads a model from its ONNX bytes. [`init`] must have been called.
    pub fn load(bytes: &[u8], intra_threads: usize) -> Result<Model, RuntimeError> {
        Model::load_on(bytes, intra_threads, &Device::Cpu)
    }

    /// Loads a model onto `device`.
    pub fn load_on(bytes: &[u8], intra_threads: usize, device: &Device) -> Result<Model, RuntimeError> {
        Model::load_graph(bytes, intra_threads, device, Graph::Optimize)
    }

    /// Loads a model onto `device`, its graph prepared as `graph` says.
    pub fn load_graph(
        bytes: &[u8],
        intra_threads: usize,
        device: &Device,
        graph: Graph,
    ) -> Result<Model, RuntimeError> {
        env()?;
        let session = build_session(bytes, intra_threads.max(1), device, graph)
            .map_err(|e| RuntimeError::InvalidModel(e.to_string()))?;
        let inputs =
            session.inputs().iter().map(|o| spec_of("input", o.name(), o.dtype())).collect::<Result<_, _>>()?;
        let outputs =
            session.outputs().iter().map(|o| spec_of("output", o.name(), o.dtype())).collect::<Result<_, _>>()?;
        Ok(Model { session, inputs, outputs })
    }

    /// Runs the model. Inputs are matched by name; outputs come back in declared order.
    /// Callers validate inputs against [`Model::inputs`] first; ONNX Runtime checks again.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        let fail = |e: ort::Error| RuntimeError::Inference(e.to_string());
        let values = inputs
            .iter()
            .map(|t| Ok((t.name.clone(), to_ort(t).map_err(fail)?)))
            .collect::<Result<Vec<(String, DynValue)>, RuntimeError>>()?;
        let names: Vec<String> = self.outputs.iter().map(|o| o.name.clone()).collect();
        let outputs = self.session.run(values).map_err(fail)?;
        names
            .iter()
            .map(|name| {
                let value = outputs.get(name).ok_or_else(|| RuntimeError::Inference(format!("no output `{name}`")))?;
                from_ort(name, value)
            })
            .collect()
    }
}

/// An ort value of `t`; an error, not ort's panic, when the shape and the bytes disagree
/// (a tensor that never passed `Tensor::validate`).
fn to_ort(t: &Tensor) -> ort::Result<DynValue> {
    let shape: Vec<i64> = t
        .shape
        .iter()
        .map(|&d| i64::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| ort::Error::new("a dimension over i64"))?;
    let elements = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?));
    fn make<
        T: sundara_schemas::tensor::Element + ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static,
    >(
        shape: Vec<i64>,
        elements: Option<usize>,
        t: &Tensor,
    ) -> ort::Result<DynValue> {
        let values = t.values::<T>().ok_or_else(|| ort::Error::new("dtype mismatch"))?;
        if elements != Some(values.len()) {
            return Err(ort::Error::new(format!("shape {:?} does not match {} values", t.shape, values.len())));
        }
        Ok(OrtTensor::from_array((shape, values))?.into_dyn())
    }
    match t.dtype {
        DType::F32 => make::<f32>(shape, elements, t),
        DType::F64 => make::<f64>(shape, elements, t),
        DType::I8 => make::<i8>(shape, elements, t),
        DType::U8 => make::<u8>(shape, elements, t),
        DType::I16 => make::<i16>(shape, elements, t),
        DType::I32 => make::<i32>(shape, elements, t),
        DType::I64 => make::<i64>(shape, elements, t),
        DType::Bool => make::<bool>(shape, elements, t),
    }
}

fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, RuntimeError> {
    fn take<T: sundara_schemas::tensor::Element + ort::value::PrimitiveTensorElementType>(
        name: &str,
        value: &DynValue,
    ) -> Result<Tensor, RuntimeError> {
        let (shape, data) = value.try_extract_tensor::<T>().map_err(|e| RuntimeError::Inference(e.to_string()))?;
        let shape = shape.iter().map(|&d| d.max(0) as u64).collect();
        Ok(Tensor::from_values(name, shape, data))
    }
    let ty = value.dtype().tensor_type().and_then(dtype_of).ok_or_else(|| RuntimeError::UnsupportedType {
        what: "output",
        name: name.to_string(),
        ty: format!("{:?}", value.dtype()),
    })?;
    match ty {
        DType::F32 => take::<f32>(name, value),
        DType::F64 => take::<f64>(name, value),
        DType::I8 => take::<i8>(name, value),
        DType::U8 => take::<u8>(name, value),
        DType::I16 => take::<i16>(name, value),
        DType::I32 => take::<i32>(name, value),
        DType::I64 => take::<i64>(name, value),
        DType::Bool => take::<bool>(name, value),
    }
}
