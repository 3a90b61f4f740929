//! The `python-torch` baseline: the model in PyTorch eager through
//! transformers, what a team runs before it hands off. It loads the HF
//! directory (config.json + model.safetensors) the ONNX file was converted
//! from, in a worker process (`scripts/py_torch_worker.py`) in
//! `.cache/venv-python-torch`, which `handoff setup --torch` creates from
//! PyPI. Timed like python-onnxruntime: handoff's clock around the round
//! trip, the worker's around the forward call.

use std::path::PathBuf;

use handoff_backend::{
    Backend, BackendError, Device, ExecutionKind, ModelRef, PrepareOptions, Prepared, Probe,
};
use serde_json::json;

use crate::{PythonError, Worker, cache_dir, pyenv};

/// Pinned packages of the PyTorch environment. PyPI's Linux torch wheel
/// depends on the CUDA runtime wheels, so the environment is large (about
/// 3 GB downloaded, 5.6 GB on disk) even where it only runs on the CPU.
pub const PYTHON_TORCH_PACKAGES: [&str; 7] = [
    "torch==2.15.0",
    "transformers==5.24.0",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "tokenizers==0.23.3",
    "fastapi==0.163.2",
    "uvicorn==0.54.0",
];
pub const PYTHON_TORCH_ENV: &str = "python-torch";
/// The PyTorch environment: its pins and their lock.
pub const PYTHON_TORCH: pyenv::EnvSpec<'static> = pyenv::EnvSpec {
    name: PYTHON_TORCH_ENV,
    packages: &PYTHON_TORCH_PACKAGES,
    lock: include_str!("../../../scripts/locks/python-torch.txt"),
};
/// What `handoff setup --torch` prints before it downloads.
pub const DOWNLOAD_NOTE: &str =
    "PyTorch from PyPI with its CUDA runtime wheels: about 3 GB to download, 5.6 GB on disk";
const TORCH_WORKER_PY: &str = include_str!("../../../scripts/py_torch_worker.py");

/// Creates the PyTorch environment (no-op when it is there).
pub fn setup() -> Result<PathBuf, PythonError> {
    pyenv::ensure(&cache_dir(), &PYTHON_TORCH)
}

/// The PyTorch environment's interpreter, or how to create it.
pub fn interpreter() -> Result<PathBuf, PythonError> {
    pyenv::existing(&cache_dir(), &PYTHON_TORCH).ok_or_else(|| PythonError::NotSetUp {
        what: "the PyTorch environment",
        dir: cache_dir().join(format!("venv-{PYTHON_TORCH_ENV}")),
        command: "handoff setup --torch",
        detail: DOWNLOAD_NOTE.into(),
    })
}

/// What the FastAPI + PyTorch service is, for reports.
pub const FASTAPI_TORCH_SERVER: &str = "FastAPI + uvicorn (Python) + PyTorch eager (transformers)";

/// The FastAPI service with the model in PyTorch (`--runtime torch`), the
/// Python side of a serving comparison for `python-torch`; `classify`:
/// the transformers text-classification pipeline behind `POST /predict`.
pub fn fastapi_command(
    model: &std::path::Path,
    hf_dir: &std::path::Path,
    tokenizer: &std::path::Path,
    threads: u32,
    seq: u32,
    max_batch: u32,
    classify: bool,
) -> Result<std::process::Command, PythonError> {
    let mut cmd = crate::fastapi_in(&interpreter()?, model, tokenizer, threads, seq, max_batch);
    cmd.args(["--runtime", "torch", "--hf-dir"]).arg(hf_dir);
    if classify {
        cmd.args(["--task", "text-classification"]);
    }
    Ok(cmd)
}

/// What the FastAPI service runs with `classify`.
pub const FASTAPI_PIPELINE_SERVER: &str =
    "FastAPI + uvicorn (Python) + transformers text-classification pipeline (PyTorch eager)";

#[derive(Debug, Default)]
pub struct PythonTorchBackend;

impl Backend for PythonTorchBackend {
    fn name(&self) -> &'static str {
        "python-torch"
    }

    fn execution_kind(&self) -> ExecutionKind {
        ExecutionKind::Native
    }

    fn probe(&self, device: Device) -> Probe {
        if device != Device::Cpu {
            return Probe::Unavailable {
                reason: "the PyTorch baseline runs on the CPU only (its CUDA run is not built)"
                    .into(),
            };
        }
        match interpreter() {
            Ok(p) => Probe::Available {
                version: PYTHON_TORCH_PACKAGES[0]
                    .trim_start_matches("torch==")
                    .into(),
                detail: format!(
                    "PyTorch eager via transformers in a worker process ({})",
                    p.display()
                ),
            },
            Err(e) => Probe::Unavailable {
                reason: e.to_string(),
            },
        }
    }

    fn prepare(
        &self,
        model: &ModelRef,
        options: &PrepareOptions,
    ) -> Result<Box<dyn Prepared>, BackendError> {
        handoff_backend::require_cpu(options.device)?;
        // bf16 autocast is PyTorch's own precision variant; the others are
        // ONNX rewrites.
        let precision = match handoff_backend::ids::split(&model.id).1 {
            "" => "fp32",
            "@torch-bf16" => "bf16",
            form => {
                return Err(BackendError::Unsupported(format!(
                    "`{}` is an ONNX rewrite; python-torch runs the safetensors model (in fp32, or bf16 autocast as the torch-bf16 variant)",
                    &form[1..]
                )));
            }
        };
        let dir = model.hf_dir.as_ref().ok_or_else(|| {
            BackendError::Unsupported(
                "python-torch runs safetensors models (source `hf` or `pypi`), not a bare ONNX file"
                    .into(),
            )
        })?;
        let python = interpreter().map_err(|e| BackendError::Unavailable(e.to_string()))?;
        let worker = Worker::start(
            &python,
            TORCH_WORKER_PY,
            &json!({"cmd": "load", "hf_dir": dir, "threads": options.threads, "precision": precision}),
        )?;
        Ok(Box::new(worker))
    }
}
