//! Python baselines: the same model, inputs and thread count run through
//! Python's `onnxruntime` package in a worker process (`scripts/py_worker.py`
//! in `.cache/venv-python-ort`, created from PyPI by `handoff setup`).
//!
//! Two clocks: handoff's (around the whole request: pipe, JSON, Python,
//! `session.run`, numpy) gives the row's samples, as for every backend; the
//! worker's own `perf_counter_ns` around `session.run` is reported as the
//! inner time. Inner minus the Rust `ort` row is what Python's binding costs
//! per call; round trip minus inner is this harness's IPC.

pub mod gil;
pub mod pyenv;
pub mod torch;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use handoff_backend::{
    Backend, BackendError, DType, Device, ExecutionKind, ModelRef, PrepareOptions, Prepared, Probe,
    Tensor, TensorData,
};
use serde_json::{Value, json};

/// Pinned packages of the baseline environment: the same ONNX Runtime
/// release the Rust `ort` backend loads.
/// The serving comparison's FastAPI service runs in the same environment.
pub const PYTHON_ORT_PACKAGES: [&str; 5] = [
    "onnxruntime==1.31.1",
    "numpy==2.4.6",
    "fastapi==0.163.2",
    "uvicorn==0.54.0",
    "tokenizers==0.23.3",
];
pub const PYTHON_ORT_ENV: &str = "python-ort";
/// The baseline environment: its pins and their lock.
pub const PYTHON_ORT: pyenv::EnvSpec<'static> = pyenv::EnvSpec {
    name: PYTHON_ORT_ENV,
    packages: &PYTHON_ORT_PACKAGES,
    lock: include_str!("../../../scripts/locks/python-ort.txt"),
};
const WORKER_PY: &str = include_str!("../../../scripts/py_worker.py");
/// Each worker's scratch directory is its own, also for two in one process.
static NEXT_SCRATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const FASTAPI_PY: &str = include_str!("../../../scripts/fastapi_server.py");

/// Why a Python environment or tool could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: another process has been building this environment for over {minutes} minutes; remove the directory if it died",
        path.display()
    )]
    Locked { path: PathBuf, minutes: u64 },
    #[error("{what}: cannot start: {source}")]
    Start {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed; `detail` is the end of its stderr.
    #[error("{what} failed ({status}): {detail}")]
    Failed {
        what: String,
        status: std::process::ExitStatus,
        detail: String,
    },
    #[error("{}: {source}", path.display())]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: handoff_backend::text::TextError,
    },
    #[error("{what} printed something else: {detail}")]
    Output { what: String, detail: String },
    #[error(
        "the lock of the `{env}` environment has no wheels for {platform} (it covers {covered}): run scripts/lock_python.py {env} with this Python"
    )]
    NoLock {
        env: String,
        platform: String,
        covered: String,
    },
    #[error("{what} {} is not set up: run `{command}` ({detail})", dir.display())]
    NotSetUp {
        what: &'static str,
        dir: PathBuf,
        command: &'static str,
        detail: String,
    },
}

/// What the FastAPI service is, for reports.
pub const FASTAPI_SERVER: &str = "FastAPI + uvicorn (Python) + onnxruntime";

/// The command that starts `scripts/fastapi_server.py` (the Python side of
/// the serving comparison) on a free loopback port; it prints
/// `listening on http://ADDR` once the model is loaded and exits when its
/// stdin closes. `ort_options`: the suite's `backend_options.ort`, applied
/// as the per-call Python baseline applies them.
pub fn fastapi_command(
    model: &std::path::Path,
    tokenizer: &std::path::Path,
    threads: u32,
    seq: u32,
    max_batch: u32,
    ort_options: &Value,
) -> Result<Command, PythonError> {
    let mut cmd = fastapi_in(&interpreter()?, model, tokenizer, threads, seq, max_batch);
    for key in ["optimization", "denormals"] {
        if let Some(v) = ort_options.get(key).and_then(Value::as_str) {
            cmd.arg(format!("--{key}")).arg(v);
        }
    }
    Ok(cmd)
}

/// `scripts/fastapi_server.py` in `python`, for the runtime its
/// environment holds.
fn fastapi_in(
    python: &std::path::Path,
    model: &std::path::Path,
    tokenizer: &std::path::Path,
    threads: u32,
    seq: u32,
    max_batch: u32,
) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg("-c")
        .arg(FASTAPI_PY)
        .arg("--model")
        .arg(model)
        .arg("--tokenizer")
        .arg(tokenizer)
        .args(["--threads", &threads.to_string()])
        .args(["--seq", &seq.to_string()])
        .args(["--max-batch", &max_batch.to_string()])
        .args(["--host", "127.0.0.1", "--port", "0", "--watch-stdin"])
        .env("OMP_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        // The Rust tokenizer library would otherwise start its own pool.
        .env("TOKENIZERS_PARALLELISM", "false");
    cmd
}

/// The cache directory (see [`handoff_backend::home`]).
pub fn cache_dir() -> PathBuf {
    handoff_backend::home::cache_dir()
}

/// Creates the baseline environment (no-op when it is there).
pub fn setup() -> Result<PathBuf, PythonError> {
    pyenv::ensure(&cache_dir(), &PYTHON_ORT)
}

/// The baseline environment's interpreter, or how to create it.
pub fn interpreter() -> Result<PathBuf, PythonError> {
    pyenv::existing(&cache_dir(), &PYTHON_ORT).ok_or_else(|| PythonError::NotSetUp {
        what: "python environment",
        dir: cache_dir().join(format!("venv-{PYTHON_ORT_ENV}")),
        command: "handoff setup",
        detail: format!("creates it from PyPI: {}", PYTHON_ORT_PACKAGES.join(" ")),
    })
}

#[derive(Debug, Default)]
pub struct PythonOrtBackend;

impl Backend for PythonOrtBackend {
    fn name(&self) -> &'static str {
        "python-onnxruntime"
    }

    fn execution_kind(&self) -> ExecutionKind {
        ExecutionKind::OptimisedGraph
    }

    fn probe(&self, device: Device) -> Probe {
        if device != Device::Cpu {
            return Probe::Unavailable {
                reason: "no CUDA device: the Python baseline runs onnxruntime's CPU provider"
                    .into(),
            };
        }
        match interpreter() {
            Ok(p) => Probe::Available {
                version: PYTHON_ORT_PACKAGES[0]
                    .trim_start_matches("onnxruntime==")
                    .into(),
                detail: format!("Python onnxruntime in a worker process ({})", p.display()),
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
        let python = interpreter().map_err(|e| BackendError::Unavailable(e.to_string()))?;
        // The suite's ORT settings (`backend_options.ort`), as the Rust ort
        // backend uses them; ORT's defaults otherwise.
        let setting = |key: &str, default: &'static str| {
            options
                .options
                .get(key)
                .and_then(|v| v.as_str())
                .unwrap_or(default)
                .to_owned()
        };
        let worker = Worker::start(
            &python,
            WORKER_PY,
            &json!({
                "cmd": "load",
                "model": model.path(),
                "threads": options.threads,
                "optimization": setting("optimization", "all"),
                "denormals": setting("denormals", "keep"),
            }),
        )?;
        Ok(Box::new(worker))
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    scratch: PathBuf,
    inner_ms: Option<f64>,
    /// The runtime's version as the worker reported it
    /// (`onnxruntime.__version__`, `torch.__version__`).
    version: Option<String>,
}

impl Worker {
    /// Starts `script` (a worker speaking the JSON-lines protocol of
    /// `scripts/py_worker.py`) in `python` and sends it `load`.
    fn start(python: &std::path::Path, script: &str, load: &Value) -> Result<Self, BackendError> {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| sweep_stale_scratch(&std::env::temp_dir()));
        let scratch = std::env::temp_dir().join(format!(
            "handoff-py-{}-{}",
            std::process::id(),
            NEXT_SCRATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&scratch)
            .map_err(|e| BackendError::Failed(format!("{}: {e}", scratch.display())))?;
        let mut child = Command::new(python)
            .arg("-c")
            .arg(script)
            // One thread pool, the case's: numpy's BLAS stays out of the way.
            .env("OMP_NUM_THREADS", "1")
            .env("OPENBLAS_NUM_THREADS", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| BackendError::Unavailable(format!("cannot start python: {e}")))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut worker = Worker {
            child,
            stdin,
            stdout,
            scratch,
            inner_ms: None,
            version: None,
        };
        let reply = worker.call(load)?;
        worker.version = reply
            .get("version")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        Ok(worker)
    }

    fn call(&mut self, request: &Value) -> Result<Value, BackendError> {
        let line = format!("{request}\n");
        let dead = |w: &mut Worker, what: &str| {
            let status = w
                .child
                .try_wait()
                .ok()
                .flatten()
                .map_or("still running".to_owned(), |s| s.to_string());
            BackendError::Failed(format!("python worker {what} ({status})"))
        };
        if self.stdin.write_all(line.as_bytes()).is_err() || self.stdin.flush().is_err() {
            return Err(dead(self, "closed its input"));
        }
        let mut reply = String::new();
        match self.stdout.read_line(&mut reply) {
            Ok(0) | Err(_) => return Err(dead(self, "exited")),
            Ok(_) => {}
        }
        let v: Value = serde_json::from_str(&reply)
            .map_err(|e| BackendError::Failed(format!("python worker said {reply:?}: {e}")))?;
        if v.get("ok") == Some(&Value::Bool(true)) {
            Ok(v)
        } else {
            let msg = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_owned();
            Err(classify(msg))
        }
    }
}

fn classify(msg: String) -> BackendError {
    match handoff_backend::unsupported_op_from_message(&msg) {
        Some(op) => BackendError::Unsupported(format!("op {op}")),
        None if msg.contains("INVALID_PROTOBUF") || msg.contains("NO_SUCHFILE") => {
            BackendError::InvalidModel(msg)
        }
        None => BackendError::Failed(format!("python: {msg}")),
    }
}

/// Removes the scratch directories of workers whose process is gone: a case
/// killed at its timeout or by a signal cannot run its drops. Where there is
/// no `/proc` to ask, nothing is removed; nor is a directory changed in the
/// last [`STALE_AFTER`] (a process in another PID namespace that shares
/// this `/tmp` is not in our `/proc`).
fn sweep_stale_scratch(tmp: &std::path::Path) {
    let proc = std::path::Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("handoff-py-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_AFTER);
        if old && pid != std::process::id() && !proc.join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

impl Prepared for Worker {
    fn runtime_version(&self) -> Option<String> {
        self.version.clone()
    }

    fn bind(&mut self, inputs: &[Tensor]) -> Result<(), BackendError> {
        let mut list = Vec::new();
        for (i, t) in inputs.iter().enumerate() {
            let path = self.scratch.join(format!("in{i}.bin"));
            let dtype = match t.data.dtype() {
                DType::F32 => "<f4",
                DType::F16 => "<f2",
                DType::I64 => "<i8",
                DType::I32 => "<i4",
                DType::Bool => "|b1",
            };
            std::fs::write(&path, t.data.to_le_bytes())
                .map_err(|e| BackendError::Failed(format!("{}: {e}", path.display())))?;
            list.push(json!({"name": t.name, "dtype": dtype, "shape": t.shape, "path": path}));
        }
        self.call(&json!({"cmd": "bind", "inputs": list}))?;
        Ok(())
    }

    fn run(&mut self) -> Result<(), BackendError> {
        let reply = self.call(&json!({"cmd": "run"}))?;
        self.inner_ms = reply
            .get("inner_ns")
            .and_then(Value::as_f64)
            .map(|ns| ns / 1e6);
        Ok(())
    }

    fn inner_ms(&self) -> Option<f64> {
        self.inner_ms
    }

    fn outputs(&mut self) -> Result<Vec<Tensor>, BackendError> {
        let reply = self.call(&json!({"cmd": "outputs", "dir": self.scratch}))?;
        let list = reply
            .get("outputs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        list.iter()
            .map(|o| {
                let name = o
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned();
                let path = PathBuf::from(o.get("path").and_then(Value::as_str).unwrap_or(""));
                let shape: Vec<usize> = o
                    .get("shape")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_u64)
                            .map(|d| d as usize)
                            .collect()
                    })
                    .unwrap_or_default();
                let bytes = std::fs::read(&path)
                    .map_err(|e| BackendError::Failed(format!("{}: {e}", path.display())))?;
                let dtype = o.get("dtype").and_then(Value::as_str);
                let data = match dtype {
                    Some("float32") => TensorData::from_le_bytes(DType::F32, &bytes),
                    Some("int64") => TensorData::from_le_bytes(DType::I64, &bytes),
                    Some("int32") => TensorData::from_le_bytes(DType::I32, &bytes),
                    Some("bool") => TensorData::from_le_bytes(DType::Bool, &bytes),
                    // Compared as f32, as on the Rust backends.
                    Some("float16") => TensorData::from_le_bytes(DType::F16, &bytes).map(|d| {
                        TensorData::F32(d.to_f64().into_iter().map(|x| x as f32).collect())
                    }),
                    Some("float64") => Some(TensorData::F32(
                        bytes
                            .chunks_exact(8)
                            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                            .collect(),
                    )),
                    other => {
                        return Err(BackendError::Unsupported(format!(
                            "output dtype {other:?} of `{name}`"
                        )));
                    }
                }
                .ok_or_else(|| {
                    BackendError::Failed(format!(
                        "output `{name}`: {} bytes of {}",
                        bytes.len(),
                        dtype.unwrap_or("?")
                    ))
                })?;
                Ok(Tensor { name, shape, data })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    /// A worker killed at its timeout leaves its scratch directory; a later
    /// process removes it once it is an hour old, and keeps those of live
    /// processes and recent ones.
    #[test]
    fn scratch_of_a_dead_worker_is_removed_and_a_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let gone = tmp.path().join(format!("handoff-py-{dead}-0"));
        let recent = tmp.path().join(format!("handoff-py-{dead}-1"));
        let live = tmp
            .path()
            .join(format!("handoff-py-{}-3", std::process::id()));
        let other = tmp.path().join("handoff-pyx");
        for d in [&gone, &recent, &live, &other] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("in0.bin"), b"x").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for d in [&gone, &live, &other] {
            std::fs::File::open(d)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        super::sweep_stale_scratch(tmp.path());
        assert!(!gone.exists());
        assert!(recent.exists());
        assert!(live.exists());
        assert!(other.exists());
    }
}
