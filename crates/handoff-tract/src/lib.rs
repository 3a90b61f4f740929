//! tract backend: the ONNX model is loaded, optimised into a typed plan
//! (symbolic `batch`/`seq` kept, so one plan serves every shape) and run
//! inside a private rayon pool of the case's thread count, which tract's
//! matmuls share out.
//!
//! With the `cuda` feature a `cuda` case goes through tract-cuda's runtime:
//! the plan copies its outputs back to the host, so `run` returning means
//! the GPU work is done.

pub mod cost;

pub use cost::{CostError, flops};

use std::path::Path;
use std::sync::Arc;

use handoff_backend::{
    Backend, BackendError, Device, ExecutionKind, ModelRef, PrepareOptions, Prepared, Probe,
    Tensor, TensorData, cpu_only_probe, unsupported_op_from_message,
};
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{SimplePlan, SimpleState};
use tract_onnx::tract_core::runtime::RunOptions;

/// The tract release this backend is built against.
pub const TRACT_VERSION: &str = "0.23.9";

#[derive(Debug, Default)]
pub struct TractBackend;

type Plan = SimplePlan<TypedFact, Box<dyn TypedOp>>;
type State = SimpleState<TypedFact, Box<dyn TypedOp>>;

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn execution_kind(&self) -> ExecutionKind {
        ExecutionKind::OptimisedGraph
    }

    fn probe(&self, device: Device) -> Probe {
        #[cfg(feature = "cuda")]
        if device == Device::Cuda {
            return match cuda_runtime() {
                Ok(_) => Probe::Available {
                    version: TRACT_VERSION.into(),
                    detail: "tract-cuda on cuda:0 (NVRTC kernels); outputs copied to the host inside the clock".into(),
                },
                Err(e) => Probe::Unavailable {
                    reason: e.to_string().trim_start_matches("unavailable: ").to_owned(),
                },
            };
        }
        cpu_only_probe(
            device,
            TRACT_VERSION,
            "pure Rust; matmuls on a per-session rayon pool",
            "tract-cuda (feature `cuda`)",
        )
    }

    fn prepare(
        &self,
        model: &ModelRef,
        options: &PrepareOptions,
    ) -> Result<Box<dyn Prepared>, BackendError> {
        #[cfg(feature = "cuda")]
        let gpu = if options.device == Device::Cuda {
            Some(cuda_runtime()?)
        } else {
            None
        };
        #[cfg(not(feature = "cuda"))]
        handoff_backend::require_cpu(options.device)?;
        let concrete = options.options.get("shapes").and_then(|v| v.as_str()) == Some("concrete");
        let typed = if is_nnef(model.path()) {
            nnef()
                .model_for_path(model.path())
                .map_err(|e| classify(&e, true))?
                .into_optimized()
                .map_err(|e| classify(&e, false))?
        } else {
            let pinned = concrete.then_some(options.inputs.as_slice());
            match optimized_onnx(model.path(), pinned) {
                Ok(typed) => typed,
                // The cell points to concrete shapes only where they were
                // tried and plan: a failure that has nothing to do with
                // symbolic dims (an op tract lacks, a dtype it mixes) gets
                // no such hint.
                Err(e) if !concrete && plans_concrete(model.path(), &options.inputs) => {
                    return Err(with_shapes_hint(e));
                }
                Err(e) => return Err(e),
            }
        };
        let output_names = output_names(&typed)?;
        #[cfg(feature = "cuda")]
        if let Some(runtime) = gpu {
            let runnable = runtime
                .prepare_with_options(typed, &RunOptions::default())
                .map_err(|e| classify(&e, false))?;
            let state = runnable.spawn().map_err(|e| classify(&e, false))?;
            return Ok(Box::new(TractPrepared {
                engine: Engine::Gpu(state),
                inputs: TVec::new(),
                output_names,
                last: TVec::new(),
                pool: None,
            }));
        }
        let executor = if options.threads > 1 {
            Executor::multithread(options.threads)
        } else {
            Executor::SingleThread
        };
        let pool = match &executor {
            Executor::MultiThread(pool) => Some(pool.clone()),
            _ => None,
        };
        let run_options = RunOptions {
            executor: Some(executor),
            ..Default::default()
        };
        let plan: Arc<Plan> = typed
            .into_runnable_with_options(&run_options)
            .map_err(|e| classify(&e, false))?;
        let state = SimpleState::new(&plan).map_err(|e| classify(&e, false))?;
        Ok(Box::new(TractPrepared {
            engine: Engine::Cpu(state),
            inputs: TVec::new(),
            output_names,
            last: TVec::new(),
            pool,
        }))
    }
}

/// The ONNX model at `path` typed and optimised, with its inputs pinned to
/// `concrete` when given.
fn optimized_onnx(
    path: &Path,
    concrete: Option<&[handoff_backend::TensorSpec]>,
) -> Result<TypedModel, BackendError> {
    // With every input pinned, tract infers the rest; the exporter's
    // symbolic shapes of intermediate values and outputs (`batch,8,16,16`
    // from PyTorch's exporter) would contradict the pinned ones
    // ("Impossible to unify Sym(batch) with Val(1)").
    let mut onnx = tract_onnx::onnx()
        .with_ignore_value_info(concrete.is_some())
        .with_ignore_output_shapes(concrete.is_some())
        .model_for_path(path)
        .map_err(|e| classify(&e, true))?;
    if let Some(specs) = concrete {
        onnx = with_concrete_inputs(onnx, specs)?;
    }
    onnx.into_typed()
        .map_err(|e| classify(&e, true))?
        .into_optimized()
        .map_err(|e| classify(&e, false))
}

/// Whether tract plans the model with its inputs pinned to `specs` (a
/// panic in tract counts as no).
fn plans_concrete(path: &Path, specs: &[handoff_backend::TensorSpec]) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        optimized_onnx(path, Some(specs)).is_ok()
    }))
    .unwrap_or(false)
}

/// Pins each model input to the shape and type this case feeds it
/// (`backend_options: {tract: {shapes: concrete}}`).
fn with_concrete_inputs(
    mut model: InferenceModel,
    specs: &[handoff_backend::TensorSpec],
) -> Result<InferenceModel, BackendError> {
    let outlets = model
        .input_outlets()
        .map_err(|e| classify(&e, true))?
        .to_vec();
    for (i, outlet) in outlets.iter().enumerate() {
        let name = model.node(outlet.node).name.clone();
        let spec = specs.iter().find(|s| s.name == name).ok_or_else(|| {
            BackendError::InvalidModel(format!("no shape given for input `{name}`"))
        })?;
        model = model
            .with_input_fact(
                i,
                InferenceFact::dt_shape(datum_type(spec.dtype), &spec.shape),
            )
            .map_err(|e| classify(&e, true))?;
    }
    Ok(model)
}

/// The values of `t`, row-major.
fn plain<T: Datum + Copy>(t: &tract_onnx::prelude::Tensor) -> TractResult<Vec<T>> {
    Ok(t.to_plain_array_view::<T>()?.iter().copied().collect())
}

pub(crate) fn datum_type(dtype: handoff_backend::DType) -> DatumType {
    match dtype {
        handoff_backend::DType::F32 => f32::datum_type(),
        handoff_backend::DType::F16 => f16::datum_type(),
        handoff_backend::DType::I64 => i64::datum_type(),
        handoff_backend::DType::I32 => i32::datum_type(),
        handoff_backend::DType::Bool => bool::datum_type(),
    }
}

/// Names the way out when tract cannot plan a model with symbolic dims
/// and plans it with the case's shapes.
fn with_shapes_hint(e: BackendError) -> BackendError {
    const HINT: &str =
        "; with each case's shapes tract plans it: backend_options: {tract: {shapes: concrete}}";
    match e {
        BackendError::InvalidModel(m) => BackendError::InvalidModel(m + HINT),
        BackendError::Failed(m) => BackendError::Failed(m + HINT),
        other => other,
    }
}

/// tract's NNEF dialect with its core and ONNX extensions (the ops an
/// ONNX model turns into).
fn nnef() -> tract_nnef::framework::Nnef {
    use tract_onnx::WithOnnx;
    tract_nnef::nnef().with_onnx()
}

/// An NNEF archive (a tar file) rather than an ONNX protobuf.
pub fn is_nnef(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 262];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[257..262] == b"ustar"
}

/// Writes `onnx` as tract NNEF (a tar archive): typed, neither decluttered
/// (declutter fuses ops, e.g. GeluExact, that 0.23.9 cannot serialise) nor
/// optimised (machine-specific). Loading it skips ONNX parsing and type
/// inference; the loader optimises as for ONNX.
pub fn export_nnef(onnx: &std::path::Path, out: &std::path::Path) -> Result<(), BackendError> {
    let typed = tract_onnx::onnx()
        .model_for_path(onnx)
        .map_err(|e| classify(&e, true))?
        .into_typed()
        .map_err(|e| classify(&e, true))?;
    let file = std::fs::File::create(out)
        .map_err(|e| BackendError::Failed(format!("{}: {e}", out.display())))?;
    nnef()
        .write_to_tar(&typed, file)
        .map_err(|e| BackendError::Unsupported(format!("NNEF export: {e:#}")))?;
    Ok(())
}

fn output_names(model: &TypedModel) -> Result<Vec<String>, BackendError> {
    Ok(model
        .output_outlets()
        .map_err(|e| classify(&e, false))?
        .iter()
        .map(|o| {
            model
                .outlet_label(*o)
                .unwrap_or(&model.node(o.node).name)
                .to_owned()
        })
        .collect())
}

/// tract-cuda's runtime, or why it cannot run here (no driver, a missing
/// CUDA library).
#[cfg(feature = "cuda")]
fn cuda_runtime() -> Result<&'static dyn tract_onnx::tract_core::runtime::Runtime, BackendError> {
    // Linking the crate is what registers its runtime.
    use tract_cuda as _;
    match tract_onnx::tract_core::runtime::runtime_for_name("cuda") {
        Ok(Some(rt)) => Ok(rt),
        Ok(None) => Err(BackendError::Unavailable(
            "no CUDA device: tract-cuda's runtime is not registered".into(),
        )),
        Err(e) => Err(BackendError::Unavailable(format!("no CUDA device: {e:#}"))),
    }
}

fn classify(e: &TractError, loading: bool) -> BackendError {
    let msg = format!("{e:?}");
    if let Some(op) = unsupported_op_from_message(&msg) {
        return BackendError::Unsupported(format!("op {op}"));
    }
    let short = format!("{e:#}");
    if loading {
        BackendError::InvalidModel(short)
    } else {
        BackendError::Failed(short)
    }
}

enum Engine {
    Cpu(State),
    #[cfg(feature = "cuda")]
    Gpu(Box<dyn tract_onnx::tract_core::runtime::State>),
}

struct TractPrepared {
    engine: Engine,
    inputs: TVec<TValue>,
    output_names: Vec<String>,
    last: TVec<TValue>,
    /// The multi-threaded plan's pool, which each run goes into whole: the
    /// thread walking the plan is then one of its workers and joins in each
    /// matmul. Called from outside, every matmul would hand its work to the
    /// pool and put the caller to sleep until it is done (two cross-thread
    /// wake-ups a matmul, and one thread more than the case's count on the
    /// CPUs): a 20-layer encoder at two threads ran 1.4x slower than at one.
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl Prepared for TractPrepared {
    fn bind(&mut self, inputs: &[Tensor]) -> Result<(), BackendError> {
        let err = |e: TractError| BackendError::Failed(format!("input tensor: {e}"));
        self.inputs = inputs
            .iter()
            .map(|t| {
                let tensor = match &t.data {
                    TensorData::F32(v) => tract_onnx::prelude::Tensor::from_shape(&t.shape, v),
                    TensorData::F16(v) => tract_onnx::prelude::Tensor::from_shape(&t.shape, v),
                    TensorData::I64(v) => tract_onnx::prelude::Tensor::from_shape(&t.shape, v),
                    TensorData::I32(v) => tract_onnx::prelude::Tensor::from_shape(&t.shape, v),
                    TensorData::Bool(v) => tract_onnx::prelude::Tensor::from_shape(&t.shape, v),
                }
                .map_err(err)?;
                Ok(tensor.into_tvalue())
            })
            .collect::<Result<_, BackendError>>()?;
        Ok(())
    }

    fn run(&mut self) -> Result<(), BackendError> {
        let inputs = self.inputs.clone();
        self.last = match &mut self.engine {
            Engine::Cpu(state) => match &self.pool {
                Some(pool) => pool.install(|| state.run(inputs)),
                None => state.run(inputs),
            },
            #[cfg(feature = "cuda")]
            Engine::Gpu(state) => state.run(inputs),
        }
        .map_err(|e| classify(&e, false))?;
        Ok(())
    }

    fn outputs(&mut self) -> Result<Vec<Tensor>, BackendError> {
        self.last
            .iter()
            .zip(&self.output_names)
            .map(|(v, name)| {
                let err = |e: TractError| BackendError::Failed(format!("output `{name}`: {e}"));
                let data = match v.datum_type() {
                    DatumType::F32 => TensorData::F32(plain(v).map_err(err)?),
                    DatumType::I64 => TensorData::I64(plain(v).map_err(err)?),
                    DatumType::I32 => TensorData::I32(plain(v).map_err(err)?),
                    DatumType::Bool => TensorData::Bool(plain(v).map_err(err)?),
                    // Compared as f32, as on the other backends.
                    DatumType::F16 | DatumType::F64 => {
                        let wide = v.cast_to::<f32>().map_err(err)?;
                        TensorData::F32(plain(&wide).map_err(err)?)
                    }
                    other => {
                        return Err(BackendError::Unsupported(format!(
                            "output dtype {other:?} of `{name}`"
                        )));
                    }
                };
                Ok(Tensor {
                    name: name.clone(),
                    shape: v.shape().to_vec(),
                    data,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU or without the feature a cuda case is refused with the
    /// reason, never run on the CPU instead; a CUDA build next to a driver
    /// finds the device.
    #[test]
    fn cuda_without_a_device_is_unavailable_not_cpu() {
        if cfg!(feature = "cuda") && handoff_backend::nvidia_driver().is_some() {
            // A CUDA build on a GPU machine must find the device (a build
            // without the feature refuses even there, checked below).
            match TractBackend.probe(Device::Cuda) {
                Probe::Available { .. } => return,
                other => panic!("a CUDA build beside an NVIDIA driver cannot use it: {other:?}"),
            }
        }
        let model = ModelRef {
            path: "/nonexistent.onnx".into(),
            id: "x".into(),
            hf_dir: None,
        };
        handoff_backend::check_cuda_refused(&TractBackend, &model).unwrap();
    }
}
