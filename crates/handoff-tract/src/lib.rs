//! tract backend: the ONNX model is loaded, optimised into a typed plan
//! (symbolic `batch`/`seq` kept, so one plan serves every shape) and run
//! with a private rayon pool of the case's thread count for matmuls.

use std::sync::Arc;

use handoff_backend::{
    Backend, BackendError, Device, ExecutionKind, ModelRef, PrepareOptions, Prepared, Probe,
    Tensor, TensorData, cpu_only_probe, require_cpu, unsupported_op_from_message,
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
        require_cpu(options.device)?;
        let typed = tract_onnx::onnx()
            .model_for_path(model.path())
            .map_err(|e| classify(&e, true))?
            .into_optimized()
            .map_err(|e| classify(&e, false))?;
        let executor = if options.threads > 1 {
            Executor::multithread(options.threads)
        } else {
            Executor::SingleThread
        };
        let run_options = RunOptions {
            executor: Some(executor),
            ..Default::default()
        };
        let plan: Arc<Plan> = typed
            .into_runnable_with_options(&run_options)
            .map_err(|e| classify(&e, false))?;
        let output_names = plan
            .model()
            .output_outlets()
            .map_err(|e| classify(&e, false))?
            .iter()
            .map(|o| {
                plan.model()
                    .outlet_label(*o)
                    .unwrap_or(&plan.model().node(o.node).name)
                    .to_owned()
            })
            .collect();
        let state = SimpleState::new(&plan).map_err(|e| classify(&e, false))?;
        Ok(Box::new(TractPrepared {
            state,
            inputs: TVec::new(),
            output_names,
            last: TVec::new(),
        }))
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

struct TractPrepared {
    state: State,
    inputs: TVec<TValue>,
    output_names: Vec<String>,
    last: TVec<TValue>,
}

impl Prepared for TractPrepared {
    fn bind(&mut self, inputs: &[Tensor]) -> Result<(), BackendError> {
        let err = |e: TractError| BackendError::Failed(format!("input tensor: {e}"));
        self.inputs = inputs
            .iter()
            .map(|t| {
                let tensor = match &t.data {
                    TensorData::F32(v) => tract_onnx::prelude::Tensor::from_shape(&t.shape, v),
                    TensorData::I64(v) => tract_onnx::prelude::Tensor::from_shape(&t.shape, v),
                    TensorData::I32(v) => tract_onnx::prelude::Tensor::from_shape(&t.shape, v),
                }
                .map_err(err)?;
                Ok(tensor.into_tvalue())
            })
            .collect::<Result<_, BackendError>>()?;
        Ok(())
    }

    fn run(&mut self) -> Result<(), BackendError> {
        self.last = self
            .state
            .run(self.inputs.clone())
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
                    DatumType::F32 => TensorData::F32(
                        v.to_plain_array_view::<f32>()
                            .map_err(err)?
                            .iter()
                            .copied()
                            .collect(),
                    ),
                    DatumType::I64 => TensorData::I64(
                        v.to_plain_array_view::<i64>()
                            .map_err(err)?
                            .iter()
                            .copied()
                            .collect(),
                    ),
                    DatumType::I32 => TensorData::I32(
                        v.to_plain_array_view::<i32>()
                            .map_err(err)?
                            .iter()
                            .copied()
                            .collect(),
                    ),
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
