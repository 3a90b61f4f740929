//! ONNX Runtime backend, loaded at run time from `libonnxruntime.so`
//! (see [`provision`] for where the library comes from).
//!
//! With the `cuda` feature a `cuda` case registers the CUDA execution
//! provider with error-on-failure: a library or machine without CUDA fails
//! the case with ORT's reason instead of quietly running on the CPU. Outputs
//! are copied to host memory by `Session::run`, so the clock includes the
//! device-to-host copy and stops after the GPU finished.

pub mod denormals;
pub mod provision;

use std::sync::OnceLock;

use handoff_backend::{
    Backend, BackendError, Device, ExecutionKind, ModelRef, PrepareOptions, Prepared, Probe,
    Tensor, TensorData, cpu_only_probe, unsupported_op_from_message,
};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, ValueType};

/// The process-wide ORT environment (ORT allows one per process).
static ENV: OnceLock<Result<(ort::environment::Environment, provision::Located), String>> =
    OnceLock::new();

fn environment() -> Result<&'static (ort::environment::Environment, provision::Located), String> {
    ENV.get_or_init(|| {
        let located = provision::locate().map_err(|e| e.to_string())?;
        let builder =
            ort::init_from(&located.path).map_err(|e| format!("library not loadable: {e}"))?;
        let env = builder
            .with_name("handoff")
            .build()
            .map_err(|e| format!("cannot create ORT environment: {e}"))?;
        Ok((env, located))
    })
    .as_ref()
    .map_err(Clone::clone)
}

#[derive(Debug, Default)]
pub struct OrtBackend;

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        "ort"
    }

    fn execution_kind(&self) -> ExecutionKind {
        ExecutionKind::OptimisedGraph
    }

    fn probe(&self, device: Device) -> Probe {
        let (_, located) = match environment() {
            Ok(e) => e,
            Err(reason) => return Probe::Unavailable { reason },
        };
        #[cfg(feature = "cuda")]
        if device == Device::Cuda {
            use ort::ep::ExecutionProvider;
            return match ort::ep::CUDA::is_available() {
                Ok(true) => Probe::Available {
                    version: located.version.clone(),
                    detail: format!(
                        "CUDA execution provider, {} (from {})",
                        located.path.display(),
                        located.origin
                    ),
                },
                Ok(false) => Probe::Unavailable {
                    reason: format!(
                        "no CUDA device: {} has no CUDA execution provider (use the onnxruntime-gpu library, scripts/build-gpu.sh)",
                        located.path.display()
                    ),
                },
                Err(e) => Probe::Unavailable {
                    reason: format!("no CUDA device: {e}"),
                },
            };
        }
        cpu_only_probe(
            device,
            &located.version,
            &format!("{} (from {})", located.path.display(), located.origin),
            "ORT CUDA execution provider (feature `cuda`)",
        )
    }

    fn prepare(
        &self,
        model: &ModelRef,
        options: &PrepareOptions,
    ) -> Result<Box<dyn Prepared>, BackendError> {
        let (env, _) = environment().map_err(BackendError::Unavailable)?;
        #[cfg(not(feature = "cuda"))]
        handoff_backend::require_cpu(options.device)?;
        let level = match options.options.get("optimization").and_then(|v| v.as_str()) {
            Some("disable") => GraphOptimizationLevel::Disable,
            Some("basic") => GraphOptimizationLevel::Level1,
            Some("extended") => GraphOptimizationLevel::Level2,
            _ => GraphOptimizationLevel::All,
        };
        let e = |e: ort::Error<_>| BackendError::Failed(e.to_string());
        let flush = match options.options.get("denormals").and_then(|v| v.as_str()) {
            Some("flush") if !denormals::SUPPORTED => {
                return Err(BackendError::Unsupported(format!(
                    "denormals: flush is implemented for x86_64 only, not {}",
                    std::env::consts::ARCH
                )));
            }
            Some("flush") => true,
            _ => false,
        };
        let mut builder = Session::builder(env).map_err(|e| BackendError::Failed(e.to_string()))?;
        if flush {
            builder = builder.with_flush_to_zero().map_err(e)?;
        }
        #[cfg(feature = "cuda")]
        if options.device == Device::Cuda {
            // An f32 case computes in f32, as candle and tract do: TF32
            // matmuls (10-bit mantissas) miss the parity check's 1e-3 on an
            // encoder and would be a precision choice of their own.
            builder = builder
                .with_execution_providers([ort::ep::CUDA::default()
                    .with_device_id(0)
                    .with_tf32(false)
                    .build()
                    .error_on_failure()])
                .map_err(|e| BackendError::Unavailable(format!("no CUDA device: {e}")))?;
        }
        // ORT sets the creating thread's flags for the process's first
        // session; the scope undoes that, so they stay this thread's own.
        let denormals = denormals::Scoped::start(flush);
        let session = builder
            .with_intra_threads(options.threads)
            .map_err(e)?
            .with_inter_threads(1)
            .map_err(e)?
            .with_parallel_execution(false)
            .map_err(e)?
            .with_optimization_level(level)
            .map_err(e)?
            .commit_from_file(model.path())
            .map_err(|err| classify(err.to_string()))?;
        drop(denormals);
        let output_names = session
            .outputs()
            .iter()
            .map(|o| o.name().to_owned())
            .collect();
        Ok(Box::new(OrtPrepared {
            session,
            flush,
            inputs: Vec::new(),
            output_names,
            last: Vec::new(),
        }))
    }
}

fn classify(msg: String) -> BackendError {
    if let Some(op) = unsupported_op_from_message(&msg) {
        BackendError::Unsupported(format!("op {op}"))
    } else if msg.contains("INVALID_PROTOBUF")
        || msg.contains("Load model")
        || msg.contains("INVALID_GRAPH")
    {
        BackendError::InvalidModel(msg)
    } else {
        BackendError::Failed(msg)
    }
}

struct OrtPrepared {
    session: Session,
    /// `denormals: flush`: DAZ and FTZ on the calling thread during `run`
    /// (`keep`: both off, whatever an earlier session of the process set).
    flush: bool,
    inputs: Vec<(String, DynValue)>,
    output_names: Vec<String>,
    last: Vec<DynValue>,
}

impl Prepared for OrtPrepared {
    fn bind(&mut self, inputs: &[Tensor]) -> Result<(), BackendError> {
        let err = |e: ort::Error| BackendError::Failed(format!("input tensor: {e}"));
        self.inputs = inputs
            .iter()
            .map(|t| {
                let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                let value = match &t.data {
                    TensorData::F32(v) => dyn_value(shape, v),
                    TensorData::F16(v) => dyn_value(shape, v),
                    TensorData::I64(v) => dyn_value(shape, v),
                    TensorData::I32(v) => dyn_value(shape, v),
                    TensorData::Bool(v) => dyn_value(shape, v),
                };
                Ok((t.name.clone(), value.map_err(err)?))
            })
            .collect::<Result<_, BackendError>>()?;
        Ok(())
    }

    fn run(&mut self) -> Result<(), BackendError> {
        let inputs: Vec<(&str, &DynValue)> =
            self.inputs.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let _denormals = denormals::Scoped::start(self.flush);
        let outputs = self
            .session
            .run(inputs)
            .map_err(|e| classify(e.to_string()))?;
        // ORT's CPU outputs are complete when `run` returns; keeping the
        // values (not copying them) keeps the copy out of the clock.
        self.last = outputs.into_iter().map(|(_, v)| v).collect();
        Ok(())
    }

    fn outputs(&mut self) -> Result<Vec<Tensor>, BackendError> {
        self.last
            .iter()
            .zip(&self.output_names)
            .map(|(v, name)| to_tensor(name, v))
            .collect()
    }
}

/// An ORT tensor holding a copy of `v`.
fn dyn_value<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
    shape: Vec<i64>,
    v: &[T],
) -> Result<DynValue, ort::Error> {
    Ok(ort::value::Tensor::from_array((shape, v.to_vec()))?.into_dyn())
}

fn to_tensor(name: &str, v: &DynValue) -> Result<Tensor, BackendError> {
    let err = |e: ort::Error| BackendError::Failed(format!("output `{name}`: {e}"));
    let elem = match v.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(BackendError::Unsupported(format!(
                "output `{name}` is {other:?}, not a tensor"
            )));
        }
    };
    let (shape, data) = match elem {
        TensorElementType::Float32 => {
            let (s, d) = v.try_extract_tensor::<f32>().map_err(err)?;
            (s.to_vec(), TensorData::F32(d.to_vec()))
        }
        TensorElementType::Int64 => {
            let (s, d) = v.try_extract_tensor::<i64>().map_err(err)?;
            (s.to_vec(), TensorData::I64(d.to_vec()))
        }
        TensorElementType::Int32 => {
            let (s, d) = v.try_extract_tensor::<i32>().map_err(err)?;
            (s.to_vec(), TensorData::I32(d.to_vec()))
        }
        TensorElementType::Bool => {
            let (s, d) = v.try_extract_tensor::<bool>().map_err(err)?;
            (s.to_vec(), TensorData::Bool(d.to_vec()))
        }
        // Compared as f32, which holds every half and most double values
        // exactly; the check's tolerance is the suite's.
        TensorElementType::Float16 => as_f32(v, half::f16::to_f32).map_err(err)?,
        TensorElementType::Bfloat16 => as_f32(v, half::bf16::to_f32).map_err(err)?,
        TensorElementType::Float64 => as_f32(v, |x: f64| x as f32).map_err(err)?,
        other => {
            return Err(BackendError::Unsupported(format!(
                "output dtype {other:?} of `{name}`"
            )));
        }
    };
    Ok(Tensor {
        name: name.to_owned(),
        shape: shape.iter().map(|&d| d as usize).collect(),
        data,
    })
}

fn as_f32<T: ort::value::PrimitiveTensorElementType + Copy>(
    v: &DynValue,
    to_f32: fn(T) -> f32,
) -> Result<(Vec<i64>, TensorData), ort::Error> {
    let (s, d) = v.try_extract_tensor::<T>()?;
    Ok((
        s.to_vec(),
        TensorData::F32(d.iter().map(|&x| to_f32(x)).collect()),
    ))
}
