//! candle backends. `candle-onnx` walks the ONNX graph node by node on every
//! call (re-materialising initializers each time): it is an interpreter and
//! results label it so.
//!
//! candle decides how many threads a matmul uses from `RAYON_NUM_THREADS`,
//! read per process, so a case asking for N threads must run in a process
//! started with that value; `prepare` refuses rather than silently measure a
//! different thread count. At two or more threads each call runs inside a
//! private pool of that size (see `run_pool`).
//!
//! With the `cuda` feature, candle-native runs on `cuda:0`; candle-onnx stays
//! CPU-only because it builds every initializer on the CPU.

mod compat;
mod models;
pub mod qbert;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType as CDType, Device as CDevice, Tensor as CTensor};
use handoff_backend::{
    Backend, BackendError, Device, ExecutionKind, ModelRef, PrepareOptions, Prepared, Probe,
    Tensor, TensorData, cpu_only_probe, require_cpu, unsupported_op_from_message,
};

pub const CANDLE_VERSION: &str = "0.11.1";

#[derive(Debug, Default)]
pub struct CandleOnnxBackend;

impl Backend for CandleOnnxBackend {
    fn name(&self) -> &'static str {
        "candle-onnx"
    }

    fn execution_kind(&self) -> ExecutionKind {
        ExecutionKind::Interpreter
    }

    fn probe(&self, device: Device) -> Probe {
        match device {
            Device::Cuda if cfg!(feature = "cuda") => Probe::Unavailable {
                reason: ONNX_CPU_ONLY.into(),
            },
            _ => cpu_only_probe(
                device,
                CANDLE_VERSION,
                "interpreter (candle-onnx simple_eval); threads from RAYON_NUM_THREADS",
                "candle CUDA support (feature `cuda`)",
            ),
        }
    }

    fn prepare(
        &self,
        model: &ModelRef,
        options: &PrepareOptions,
    ) -> Result<Box<dyn Prepared>, BackendError> {
        if cfg!(feature = "cuda") && options.device == Device::Cuda {
            return Err(BackendError::Unsupported(ONNX_CPU_ONLY.into()));
        }
        require_cpu(options.device)?;
        check_threads(options.threads)?;
        let mut proto = read_onnx(model.path())?;
        compat::for_candle_onnx(&mut proto);
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| BackendError::InvalidModel("model has no graph".into()))?;
        let output_names = graph.output.iter().map(|o| o.name.clone()).collect();
        Ok(Box::new(CandleOnnxPrepared {
            model: proto,
            inputs: HashMap::new(),
            output_names,
            last: HashMap::new(),
            pool: run_pool(options.threads, true)?,
        }))
    }
}

/// The model as candle-onnx reads it, with the weights of a model saved
/// with external data read in: candle-onnx reads only the `.onnx` file,
/// and saw empty buffers ("Shape mismatch, got buffer of size 0").
fn read_onnx(path: &Path) -> Result<candle_onnx::onnx::ModelProto, BackendError> {
    let invalid = |e: String| BackendError::InvalidModel(format!("{}: {e}", path.display()));
    let proto = candle_onnx::read_file(path).map_err(|e| invalid(message(&e)))?;
    if !proto.graph.as_ref().is_some_and(compat::has_external_data) {
        return Ok(proto);
    }
    let whole =
        handoff_onnx::external::read_model_inline(path).map_err(|e| invalid(e.to_string()))?;
    prost::Message::decode(prost::Message::encode_to_vec(&whole).as_slice())
        .map_err(|e| invalid(e.to_string()))
}

const ONNX_CPU_ONLY: &str =
    "candle-onnx runs on the CPU only (it creates every initializer on the CPU)";

/// The candle device for a case; a GPU case without a GPU is refused with the
/// reason, never moved to the CPU.
pub fn candle_device(device: Device) -> Result<CDevice, BackendError> {
    match device {
        Device::Cpu => Ok(CDevice::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda => CDevice::new_cuda(0)
            .map_err(|e| BackendError::Unavailable(format!("no CUDA device: {}", message(&e)))),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(BackendError::Unavailable(
            "no CUDA device: this build has no candle CUDA support (feature `cuda`)".into(),
        )),
    }
}

/// candle sizes its pool once per process from `RAYON_NUM_THREADS`.
pub fn check_threads(wanted: usize) -> Result<(), BackendError> {
    let have = candle_core::utils::get_num_threads();
    if have != wanted {
        return Err(BackendError::Failed(format!(
            "candle's thread pool is process-wide and has {have} threads here, not {wanted}: run with `isolation: process` (the default) so each case gets its own process"
        )));
    }
    Ok(())
}

/// candle's message without the backtrace it appends when
/// `RUST_BACKTRACE` is set: a cell says what failed, not where in candle.
fn message(e: &candle_core::Error) -> String {
    use candle_core::Error;
    match e {
        Error::WithBacktrace { inner, .. } => message(inner),
        Error::Context { inner, context } => format!("{context}: {}", message(inner)),
        Error::WithPath { inner, path } => format!("{}: {}", path.display(), message(inner)),
        e => e.to_string(),
    }
}

fn classify(e: &candle_core::Error) -> BackendError {
    let msg = message(e);
    match unsupported_op_from_message(&msg) {
        Some(op) => BackendError::Unsupported(format!("op {op}")),
        None => {
            // candle's messages embed whole NodeProto dumps: keep them short.
            let mut short: String = msg.chars().take(300).collect();
            if short.len() < msg.len() {
                short.push('…');
            }
            // e.g. "unsupported 'value' data-type Int8 for <initializer>".
            if msg.contains("unsupported") && msg.contains("data-type") {
                BackendError::Unsupported(short)
            } else {
                BackendError::Failed(short)
            }
        }
    }
}

/// The node candle-onnx stopped at, as `node NAME (OP)`: its errors name
/// the tensor or axis but not the node. simple_eval runs the nodes in file
/// order and stops at the first error, so the shortest prefix of the nodes
/// that fails with the same message ends with that node: a binary search
/// of about log2(nodes) partial runs, on failure only. `None` when the
/// search cannot tell (an unnamed output, another message).
fn failing_node(
    model: &candle_onnx::onnx::ModelProto,
    inputs: &HashMap<String, CTensor>,
    message: &str,
) -> Option<String> {
    let graph = model.graph.as_ref()?;
    // Whether the first `k` nodes fail with `message`; `None`: untestable.
    let fails = |k: usize| -> Option<bool> {
        let last = graph.node[..k].last()?;
        let out = last.output.iter().find(|o| !o.is_empty())?;
        let prefix = candle_onnx::onnx::ModelProto {
            graph: Some(candle_onnx::onnx::GraphProto {
                node: graph.node[..k].to_vec(),
                initializer: graph.initializer.clone(),
                input: graph.input.clone(),
                output: vec![candle_onnx::onnx::ValueInfoProto {
                    name: out.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            opset_import: model.opset_import.clone(),
            ..Default::default()
        };
        Some(matches!(
            candle_onnx::simple_eval(&prefix, inputs.clone()),
            Err(e) if crate::message(&e) == message
        ))
    };
    // Invariant: the first `lo` nodes run, the first `hi` fail.
    let (mut lo, mut hi) = (0, graph.node.len());
    if fails(hi)? {
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fails(mid)? {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let node = &graph.node[hi - 1];
        return Some(format!("node {} ({})", node.name, node.op_type));
    }
    None
}

struct CandleOnnxPrepared {
    model: candle_onnx::onnx::ModelProto,
    inputs: HashMap<String, CTensor>,
    output_names: Vec<String>,
    last: HashMap<String, CTensor>,
    pool: Option<rayon::ThreadPool>,
}

/// A pool of `threads` workers for each call to run inside, none at one
/// thread or off the CPU. Called from a thread outside rayon's pool, every
/// parallel matmul hands its work to the pool and puts the caller to sleep
/// until it is done: two cross-thread wake-ups a matmul, and one thread
/// more than the case's count competing for the CPUs. Inside the pool the
/// thread walking the model is one of the workers and joins in.
fn run_pool(threads: usize, on_cpu: bool) -> Result<Option<rayon::ThreadPool>, BackendError> {
    if threads < 2 || !on_cpu {
        return Ok(None);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("candle-{i}"))
        .build()
        .map(Some)
        .map_err(|e| BackendError::Failed(format!("a {threads}-thread pool: {e}")))
}

/// `f` on `pool` if there is one, else on this thread.
fn in_pool<R: Send>(pool: Option<&rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

pub fn to_candle(t: &Tensor, dev: &CDevice) -> Result<CTensor, BackendError> {
    match &t.data {
        TensorData::F32(v) => CTensor::from_slice(v, t.shape.as_slice(), dev),
        TensorData::F16(v) => CTensor::from_slice(v, t.shape.as_slice(), dev),
        TensorData::I64(v) => CTensor::from_slice(v, t.shape.as_slice(), dev),
        TensorData::I32(v) => {
            // candle has no i32: widen, as the ONNX ops it has accept i64.
            let w: Vec<i64> = v.iter().map(|&x| i64::from(x)).collect();
            CTensor::from_slice(&w, t.shape.as_slice(), dev)
        }
        // candle has no bool: u8 0/1, as candle-onnx reads bool tensors.
        TensorData::Bool(v) => {
            let b: Vec<u8> = v.iter().map(|&x| u8::from(x)).collect();
            CTensor::from_slice(&b, t.shape.as_slice(), dev)
        }
    }
    .map_err(|e| BackendError::Failed(format!("input `{}`: {}", t.name, message(&e))))
}

pub fn from_candle(name: &str, t: &CTensor) -> Result<Tensor, BackendError> {
    let err =
        |e: candle_core::Error| BackendError::Failed(format!("output `{name}`: {}", message(&e)));
    let flat = t.flatten_all().map_err(err)?;
    let data = match t.dtype() {
        CDType::F32 => TensorData::F32(flat.to_vec1::<f32>().map_err(err)?),
        CDType::I64 => TensorData::I64(flat.to_vec1::<i64>().map_err(err)?),
        // candle's bool (candle-onnx's Equal, Not, ...) and uint8: compared
        // by value, 0 and 1 against the other backends' false and true.
        CDType::U8 => TensorData::I64(
            flat.to_dtype(CDType::I64)
                .map_err(err)?
                .to_vec1::<i64>()
                .map_err(err)?,
        ),
        CDType::F16 | CDType::BF16 | CDType::F64 => TensorData::F32(
            flat.to_dtype(CDType::F32)
                .map_err(err)?
                .to_vec1::<f32>()
                .map_err(err)?,
        ),
        other => {
            return Err(BackendError::Unsupported(format!(
                "output dtype {other:?} of `{name}`"
            )));
        }
    };
    Ok(Tensor {
        name: name.to_owned(),
        shape: t.dims().to_vec(),
        data,
    })
}

impl Prepared for CandleOnnxPrepared {
    fn bind(&mut self, inputs: &[Tensor]) -> Result<(), BackendError> {
        self.inputs = inputs
            .iter()
            .map(|t| Ok((t.name.clone(), to_candle(t, &CDevice::Cpu)?)))
            .collect::<Result<_, BackendError>>()?;
        Ok(())
    }

    fn run(&mut self) -> Result<(), BackendError> {
        // candle computes eagerly on the CPU: outputs exist when this returns.
        // Only a failure is searched for its node: an unsupported op or
        // data type already names what stopped it.
        let (model, inputs) = (&self.model, &self.inputs);
        self.last = in_pool(self.pool.as_ref(), || {
            candle_onnx::simple_eval(model, inputs.clone())
        })
        .map_err(|e| match classify(&e) {
            BackendError::Failed(why) => {
                match failing_node(&self.model, &self.inputs, &message(&e)) {
                    Some(node) => BackendError::Failed(format!("{node}: {why}")),
                    None => BackendError::Failed(why),
                }
            }
            other => other,
        })?;
        Ok(())
    }

    fn outputs(&mut self) -> Result<Vec<Tensor>, BackendError> {
        self.output_names
            .iter()
            .map(|name| {
                let t = self
                    .last
                    .get(name)
                    .ok_or_else(|| BackendError::Failed(format!("no output `{name}`")))?;
                from_candle(name, t)
            })
            .collect()
    }
}

/// candle-transformers' BERT, loaded from the same safetensors the ONNX
/// model was converted from: the fair candle figure (no interpreter).
#[derive(Debug, Default)]
pub struct CandleNativeBackend;

impl Backend for CandleNativeBackend {
    fn name(&self) -> &'static str {
        "candle-native"
    }

    fn execution_kind(&self) -> ExecutionKind {
        ExecutionKind::Native
    }

    fn probe(&self, device: Device) -> Probe {
        match candle_device(device) {
            Ok(CDevice::Cpu) => Probe::Available {
                version: CANDLE_VERSION.into(),
                detail: "candle-transformers BERT from safetensors; threads from RAYON_NUM_THREADS"
                    .into(),
            },
            Ok(_) => Probe::Available {
                version: CANDLE_VERSION.into(),
                detail: "candle-transformers BERT from safetensors on cuda:0; synchronised before each clock stop".into(),
            },
            Err(e) => Probe::Unavailable {
                reason: e.to_string().trim_start_matches("unavailable: ").to_owned(),
            },
        }
    }

    fn prepare(
        &self,
        model: &ModelRef,
        options: &PrepareOptions,
    ) -> Result<Box<dyn Prepared>, BackendError> {
        use crate::models::bert::{BertModel, Config};
        let device = candle_device(options.device)?;
        if device.is_cpu() {
            check_threads(options.threads)?;
        }
        let quantized = match handoff_backend::ids::variant(&model.id) {
            None => None,
            Some(variant) => match qbert::ggml_dtype(variant) {
                Some(q) => Some(q),
                None => {
                    return Err(BackendError::Unsupported(format!(
                        "precision variant {variant} is an ONNX file; candle-native runs the safetensors (candle has no int8 tensor type; its quantised variant is candle-q8)"
                    )));
                }
            },
        };
        let dir = model.hf_dir.as_ref().ok_or_else(|| {
            BackendError::Unsupported(
                "candle-native runs safetensors models (source `hf` or `pypi`), not a bare ONNX file".into(),
            )
        })?;
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| BackendError::InvalidModel(format!("{}: {e}", cfg_path.display())))?;
        let unsupported = |e: serde_json::Error| {
            BackendError::Unsupported(format!("{}: {e}", cfg_path.display()))
        };
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(unsupported)?;
        let shape = ModelShape::of(&raw);
        if quantized.is_some() && (shape.distil || shape.labels.is_some()) {
            return Err(BackendError::Unsupported(
                "candle-q8 quantises BERT sentence encoders only".into(),
            ));
        }
        let st = dir.join("model.safetensors");
        let bytes = std::fs::read(&st)
            .map_err(|e| BackendError::InvalidModel(format!("{}: {e}", st.display())))?;
        let vb = candle_nn::VarBuilder::from_buffered_safetensors(bytes, CDType::F32, &device)
            .map_err(|e| {
                BackendError::InvalidModel(format!("{}: {}", st.display(), message(&e)))
            })?;
        let invalid = |e: candle_core::Error| {
            BackendError::InvalidModel(format!("{}: {}", st.display(), message(&e)))
        };
        let (encoder, hidden) = if shape.distil {
            use crate::models::distilbert::{Config as DConfig, DistilBertModel};
            let config: DConfig = serde_json::from_str(&text).map_err(unsupported)?;
            let hidden = config.dim;
            (
                Encoder::Distil(DistilBertModel::load(vb.clone(), &config).map_err(invalid)?),
                hidden,
            )
        } else {
            let config: Config = serde_json::from_str(&text).map_err(unsupported)?;
            let hidden = config.hidden_size;
            let encoder = match quantized {
                None => Encoder::Bert(BertModel::load(vb.clone(), &config).map_err(invalid)?),
                Some(q) => {
                    Encoder::QBert(qbert::QBert::load(vb.clone(), &config, q).map_err(invalid)?)
                }
            };
            (encoder, hidden)
        };
        let head = match shape.labels {
            None => None,
            Some(n) => {
                let pre = if shape.distil {
                    "pre_classifier"
                } else {
                    "bert.pooler.dense"
                };
                Some(ClassifierHead {
                    pre: candle_nn::linear(hidden, hidden, vb.pp(pre)).map_err(invalid)?,
                    relu: shape.distil,
                    classifier: candle_nn::linear(hidden, n, vb.pp("classifier"))
                        .map_err(invalid)?,
                })
            }
        };
        Ok(Box::new(CandleNativePrepared {
            pool: run_pool(options.threads, device.is_cpu())?,
            encoder,
            head,
            device,
            inputs: None,
            last: Vec::new(),
        }))
    }
}

/// What config.json says about the model's family and head, read the way
/// handoff's converter reads it.
struct ModelShape {
    distil: bool,
    /// `Some(n)`: a sequence classifier with `n` labels.
    labels: Option<usize>,
}

impl ModelShape {
    fn of(config: &serde_json::Value) -> Self {
        let classifier = config["architectures"].as_array().is_some_and(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .any(|n| n.ends_with("ForSequenceClassification"))
        });
        let labels = config["id2label"]
            .as_object()
            .map(serde_json::Map::len)
            .or_else(|| config["num_labels"].as_u64().map(|n| n as usize))
            .unwrap_or(2);
        Self {
            distil: config["model_type"].as_str() == Some("distilbert"),
            labels: classifier.then_some(labels),
        }
    }
}

enum Encoder {
    Bert(crate::models::bert::BertModel),
    QBert(qbert::QBert),
    Distil(crate::models::distilbert::DistilBertModel),
}

/// The sequence-classification head on the first token: BERT's pooler
/// (dense + tanh) or DistilBERT's pre-classifier (dense + ReLU), then the
/// classifier.
struct ClassifierHead {
    pre: candle_nn::Linear,
    relu: bool,
    classifier: candle_nn::Linear,
}

struct CandleNativePrepared {
    encoder: Encoder,
    head: Option<ClassifierHead>,
    device: CDevice,
    /// input_ids, token_type_ids (BERT only), attention_mask
    inputs: Option<(CTensor, Option<CTensor>, CTensor)>,
    last: Vec<CTensor>,
    pool: Option<rayon::ThreadPool>,
}

impl CandleNativePrepared {
    /// The model's outputs for the bound inputs.
    fn forward(&self) -> Result<Vec<CTensor>, BackendError> {
        use candle_core::Module;
        let (ids, types, mask) = self
            .inputs
            .as_ref()
            .ok_or_else(|| BackendError::Failed("no inputs bound".into()))?;
        let e = |e: candle_core::Error| BackendError::Failed(message(&e));
        let missing = || BackendError::Failed("token_type_ids not bound".into());
        let hidden = match &self.encoder {
            Encoder::Bert(b) => b.forward(ids, types.as_ref().ok_or_else(missing)?, Some(mask)),
            Encoder::QBert(b) => b.forward(ids, types.as_ref().ok_or_else(missing)?, mask),
            Encoder::Distil(b) => {
                // candle's DistilBERT takes the positions to mask out,
                // shaped to broadcast over heads and queries.
                let (batch, seq) = mask.dims2().map_err(e)?;
                let masked = mask
                    .eq(0i64)
                    .and_then(|m| m.reshape((batch, 1, 1, seq)))
                    .map_err(e)?;
                b.forward(ids, &masked)
            }
        }
        .map_err(e)?;
        let answer = match &self.head {
            Some(head) => {
                let first = hidden
                    .narrow(1, 0, 1)
                    .and_then(|t| t.squeeze(1))
                    .map_err(e)?;
                let pre = head.pre.forward(&first).map_err(e)?;
                let pre = if head.relu { pre.relu() } else { pre.tanh() }.map_err(e)?;
                head.classifier.forward(&pre).map_err(e)?
            }
            None => {
                // Masked mean pooling, as in the converted ONNX graph.
                let mask_f = mask.to_dtype(CDType::F32).map_err(e)?;
                let summed = mask_f
                    .unsqueeze(1)
                    .map_err(e)?
                    .matmul(&hidden)
                    .map_err(e)?
                    .squeeze(1)
                    .map_err(e)?;
                let count = mask_f
                    .sum_keepdim(1)
                    .map_err(e)?
                    .clamp(1e-9f32, f32::MAX)
                    .map_err(e)?;
                summed.broadcast_div(&count).map_err(e)?
            }
        };
        // CUDA kernels are queued asynchronously: the clock stops only once
        // they have finished (a no-op on the CPU).
        self.device.synchronize().map_err(e)?;
        Ok(vec![hidden, answer])
    }
}

impl Prepared for CandleNativePrepared {
    fn bind(&mut self, inputs: &[Tensor]) -> Result<(), BackendError> {
        let find = |name: &str| {
            inputs
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| {
                    BackendError::Failed(format!("candle-native needs an input named `{name}`"))
                })
                .and_then(|t| to_candle(t, &self.device))
        };
        let types = match self.encoder {
            Encoder::Distil(_) => None,
            _ => Some(find("token_type_ids")?),
        };
        self.inputs = Some((find("input_ids")?, types, find("attention_mask")?));
        Ok(())
    }

    fn run(&mut self) -> Result<(), BackendError> {
        let this = &*self;
        self.last = in_pool(self.pool.as_ref(), || this.forward())?;
        Ok(())
    }

    fn outputs(&mut self) -> Result<Vec<Tensor>, BackendError> {
        let names = match self.head {
            Some(_) => ["last_hidden_state", "logits"],
            None => ["last_hidden_state", "sentence_embedding"],
        };
        names
            .iter()
            .zip(&self.last)
            .map(|(n, t)| from_candle(n, t))
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
            match CandleNativeBackend.probe(Device::Cuda) {
                Probe::Available { .. } => return,
                other => panic!("a CUDA build beside an NVIDIA driver cannot use it: {other:?}"),
            }
        }
        let model = ModelRef {
            path: "/nonexistent.onnx".into(),
            id: "x".into(),
            hf_dir: Some("/nonexistent".into()),
        };
        handoff_backend::check_cuda_refused(&CandleNativeBackend, &model).unwrap();
        assert!(matches!(
            CandleOnnxBackend.probe(Device::Cuda),
            Probe::Unavailable { .. }
        ));
    }

    /// candle-onnx prepared on `model` with its input `x` ([2, 6] f32)
    /// bound to `fill`; the input as bound.
    fn bound(
        model: handoff_onnx::proto::ModelProto,
        fill: handoff_backend::Fill,
    ) -> (Box<dyn Prepared>, Tensor) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        handoff_onnx::builder::write_model(&model, &path).unwrap();
        let model = ModelRef {
            path,
            id: "m".into(),
            hf_dir: None,
        };
        let spec = handoff_backend::TensorSpec {
            name: "x".into(),
            dtype: handoff_backend::DType::F32,
            shape: vec![2, 6],
            fill,
        };
        let options = PrepareOptions {
            device: Device::Cpu,
            threads: candle_core::utils::get_num_threads(),
            inputs: vec![spec.clone()],
            options: serde_json::Value::Null,
        };
        let input = spec.generate(1);
        // candle-onnx holds the model in memory: the file may go.
        let mut p = CandleOnnxBackend.prepare(&model, &options).unwrap();
        p.bind(std::slice::from_ref(&input)).unwrap();
        (p, input)
    }

    /// candle-onnx's own messages do not say where in the graph it
    /// stopped; the cell does.
    #[test]
    fn a_failure_names_the_node_it_stopped_at() {
        use handoff_onnx::ElemType;
        use handoff_onnx::builder::{D, GraphBuilder};
        let mut g = GraphBuilder::new("bad-reshape");
        let x = g.input("x", ElemType::F32, &[D::Fixed(2), D::Fixed(6)]);
        let shape = g.init_i64("shape", &[2], vec![5, 5]);
        let a = g.node("Relu", &[&x], vec![]);
        let b = g.node("Neg", &[&a], vec![]);
        let c = g.node("Reshape", &[&b, &shape], vec![]);
        let d = g.node("Abs", &[&c], vec![]);
        g.node_to("Relu", &[&d], vec![], "y");
        g.output("y", ElemType::F32, &[D::Fixed(5), D::Fixed(5)]);
        let (mut p, _) = bound(g.finish(13), handoff_backend::Fill::Constant(1.0));
        match p.run() {
            Err(BackendError::Failed(why)) => assert!(
                why.starts_with(&format!("node {c}_node (Reshape): ")),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// `Shape` with `start` and `end` (PyTorch's exporter reading one dim,
    /// `end` equal to the rank, a negative `start`) gives the dims the ONNX
    /// spec says.
    #[test]
    fn shape_with_start_and_end_reads_the_dims_it_names() {
        use handoff_onnx::ElemType;
        use handoff_onnx::builder::{D, GraphBuilder, attr_int};
        let mut g = GraphBuilder::new("shape-slices");
        let x = g.input("x", ElemType::F32, &[D::Fixed(2), D::Fixed(6)]);
        let rows = g.node("Shape", &[&x], vec![attr_int("end", 1)]);
        let cols = g.node(
            "Shape",
            &[&x],
            vec![attr_int("start", -1), attr_int("end", 2)],
        );
        let swapped = g.node("Concat", &[&cols, &rows], vec![attr_int("axis", 0)]);
        g.node_to("Reshape", &[&x, &swapped], vec![], "y");
        g.output("y", ElemType::F32, &[D::Fixed(6), D::Fixed(2)]);
        let (mut p, input) = bound(
            g.finish(15),
            handoff_backend::Fill::Random {
                min: -1.0,
                max: 1.0,
            },
        );
        p.run().unwrap();
        let out = p.outputs().unwrap();
        assert_eq!(out[0].shape, vec![6, 2]);
        assert_eq!(out[0].data, input.data);
    }

    /// `Unsqueeze` of several axes, some beyond the input's rank, as an
    /// input (opset 13 on) and as an attribute (before).
    #[test]
    fn unsqueeze_of_several_axes_beyond_the_input_rank() {
        use handoff_onnx::ElemType;
        use handoff_onnx::builder::{D, GraphBuilder, attr_ints};
        for opset in [11, 13] {
            let mut g = GraphBuilder::new("unsqueeze");
            let x = g.input("x", ElemType::F32, &[D::Fixed(2), D::Fixed(6)]);
            let flat_shape = g.init_i64("flat", &[1], vec![12]);
            let flat = g.node("Reshape", &[&x, &flat_shape], vec![]);
            if opset >= 13 {
                let axes = g.init_i64("axes", &[2], vec![2, 1]);
                g.node_to("Unsqueeze", &[&flat, &axes], vec![], "y");
            } else {
                g.node_to("Unsqueeze", &[&flat], vec![attr_ints("axes", &[2, 1])], "y");
            }
            g.output(
                "y",
                ElemType::F32,
                &[D::Fixed(12), D::Fixed(1), D::Fixed(1)],
            );
            let (mut p, input) = bound(g.finish(opset), handoff_backend::Fill::Constant(0.5));
            p.run().unwrap();
            let out = p.outputs().unwrap();
            assert_eq!(out[0].shape, vec![12, 1, 1], "opset {opset}");
            assert_eq!(out[0].data, input.data);
        }
    }

    /// Older exporters store tensor values in `int64_data` or `float_data`;
    /// candle-onnx reads a tensor attribute from `raw_data` only.
    #[test]
    fn constants_stored_in_typed_fields_are_read() {
        use handoff_onnx::ElemType;
        use handoff_onnx::builder::{D, GraphBuilder};
        use handoff_onnx::proto::{AttributeProto, TensorProto, attribute_type};
        let constant = |name: &str, t: TensorProto| AttributeProto {
            name: name.into(),
            r#type: attribute_type::TENSOR,
            t: Some(t),
            ..Default::default()
        };
        let mut g = GraphBuilder::new("old-export");
        let x = g.input("x", ElemType::F32, &[D::Fixed(2), D::Fixed(6)]);
        let shape = TensorProto {
            dims: vec![2],
            data_type: ElemType::I64.onnx_code(),
            int64_data: vec![3, 4],
            ..Default::default()
        };
        let half = TensorProto {
            dims: vec![1],
            data_type: ElemType::F32.onnx_code(),
            float_data: vec![0.5],
            ..Default::default()
        };
        g.node_to("Constant", &[], vec![constant("value", shape)], "shape");
        // A tensor attribute: candle-onnx reads these from raw_data only.
        g.node_to(
            "ConstantOfShape",
            &["shape"],
            vec![constant("value", half)],
            "half",
        );
        let r = g.node("Reshape", &[&x, "shape"], vec![]);
        g.node_to("Mul", &[&r, "half"], vec![], "y");
        g.output("y", ElemType::F32, &[D::Fixed(3), D::Fixed(4)]);
        let (mut p, input) = bound(
            g.finish(13),
            handoff_backend::Fill::Random {
                min: -1.0,
                max: 1.0,
            },
        );
        p.run().unwrap();
        let out = p.outputs().unwrap();
        assert_eq!(out[0].shape, vec![3, 4]);
        let (TensorData::F32(got), TensorData::F32(x)) = (&out[0].data, &input.data) else {
            panic!("f32 in and out");
        };
        let want: Vec<f32> = x.iter().map(|v| v * 0.5).collect();
        assert_eq!(got, &want);
    }
}
