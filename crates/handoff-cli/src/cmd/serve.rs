//! `handoff serve`: a text model over HTTP.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use handoff_backend::Registry;

use crate::cmd::DeviceArg;

/// Serve a text model over HTTP, loaded once at start-up.
///
/// POST /embed with {"texts": ["...", ...]} answers {"embeddings":
/// [[...], ...]} (the model's last output per text, tokenised padded to
/// --seq); GET /health answers once the model is loaded. One model
/// thread serves requests in arrival order (or, with --batch-wait-ms,
/// those arriving together as one batch). Suites measure it with the
/// `http` scenario, beside a FastAPI service for python-onnxruntime.
///
///   handoff serve models/cache/hf/<hash>/model.onnx --hf-dir DIR --port 8080
///   curl -s localhost:8080/embed -d '{"texts": ["hello"]}' -H 'content-type: application/json'
#[derive(clap::Args)]
pub struct ServeCmd {
    /// The ONNX model (e.g. what `handoff convert` wrote).
    pub model: PathBuf,
    /// The HF directory: tokenizer.json, and the safetensors native
    /// backends (candle-native) load.
    #[arg(long)]
    pub hf_dir: Option<PathBuf>,
    /// tokenizer.json (default: the one in --hf-dir, else next to MODEL).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Backend (`handoff list-backends` says which run here).
    #[arg(long, default_value = "ort", value_parser = crate::backends::name_parser())]
    pub backend: String,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Intra-op threads of the session.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Tokens per text (padding and truncation).
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Most texts in one request. A session per power of two up to it is
    /// loaded before the server is ready.
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Requests waiting for the model; more are answered 503 with
    /// Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Longest text in bytes (422 beyond).
    #[arg(long, default_value_t = 16 << 10)]
    pub max_text_bytes: usize,
    /// Milliseconds before an unanswered request gets 504.
    #[arg(long, default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Dynamic batching: after a request, wait up to this many
    /// milliseconds for more and run them in one call (at most
    /// --max-batch texts). 0: each request runs alone.
    #[arg(long, default_value_t = 0.0)]
    pub batch_wait_ms: f64,
    /// The backend's settings as JSON, the fields of a suite's
    /// `backend_options` for it (ort: `{"denormals": "flush"}`).
    #[arg(long, value_name = "JSON")]
    pub backend_options: Option<String>,
    /// Address to listen on. Only loopback is allowed unless
    /// --allow-remote: this is a benchmark server, not a hardened one.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[arg(long)]
    pub allow_remote: bool,
    /// Exit when stdin closes (how `handoff run` stops its servers).
    #[arg(long, hide = true)]
    pub watch_stdin: bool,
}

/// `--backend-options`, checked as a suite's `backend_options` entry for
/// the backend is (unknown fields and values are errors).
#[cfg(feature = "serve")]
fn backend_options(backend: &str, text: &str) -> Result<serde_json::Value> {
    use handoff_suite::raw::{OrtOptions, TractOptions};
    let value: serde_json::Value = serde_json::from_str(text)?;
    anyhow::ensure!(value.is_object(), "not a JSON object");
    match backend {
        "ort" => {
            serde_json::from_value::<OrtOptions>(value.clone())?;
        }
        "tract" => {
            serde_json::from_value::<TractOptions>(value.clone())?;
        }
        _ => {}
    }
    Ok(value)
}

/// Exit codes of `handoff serve` that `handoff run` reads as a cell status.
#[cfg(feature = "serve")]
const SERVE_EXIT_UNSUPPORTED: u8 = 3;
const SERVE_EXIT_UNAVAILABLE: u8 = 4;

impl ServeCmd {
    pub fn run(self, registry: &Registry) -> Result<ExitCode> {
        #[cfg(feature = "serve")]
        return serve(registry, self);
        #[cfg(not(feature = "serve"))]
        {
            let _ = registry;
            eprintln!(
                "error: {}",
                handoff_backend::NotBuilt {
                    name: "serve",
                    kind: handoff_backend::ExecutionKind::OptimisedGraph,
                    feature: "serve",
                }
                .reason()
            );
            Ok(ExitCode::from(SERVE_EXIT_UNAVAILABLE))
        }
    }
}

#[cfg(feature = "serve")]
fn serve(registry: &Registry, a: ServeCmd) -> Result<ExitCode> {
    use anyhow::Context;
    use handoff_backend::Probe;
    use std::io::Write;
    let addr = std::net::SocketAddr::new(a.host, a.port);
    let limits = handoff_serve::Limits {
        queue: a.queue,
        body_bytes: a.max_body_bytes,
        text_bytes: a.max_text_bytes,
        timeout: std::time::Duration::from_millis(a.request_timeout_ms),
    };
    if !addr.ip().is_loopback() && !a.allow_remote {
        anyhow::bail!(
            "--host {} is not a loopback address; pass --allow-remote to listen there anyway",
            addr.ip()
        );
    }
    let device = handoff_backend::Device::from(a.device);
    let backend_options = match &a.backend_options {
        None => serde_json::Value::Null,
        Some(text) => backend_options(&a.backend, text)
            .with_context(|| format!("--backend-options {text}"))?,
    };
    let backend = registry.get(&a.backend).with_context(|| {
        format!(
            "unknown backend `{}` (known: {})",
            a.backend,
            registry.names().join(", ")
        )
    })?;
    if let Probe::Unavailable { reason } = backend.probe(device) {
        eprintln!("error: {} is unavailable: {reason}", a.backend);
        return Ok(ExitCode::from(SERVE_EXIT_UNAVAILABLE));
    }
    let tokenizer = a
        .tokenizer
        .or_else(|| a.hf_dir.as_ref().map(|d| d.join("tokenizer.json")))
        .unwrap_or_else(|| a.model.with_file_name("tokenizer.json"));
    if a.watch_stdin {
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
    }
    let config = handoff_serve::ServeConfig {
        model: handoff_backend::ModelRef {
            id: a
                .model
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
            path: a.model.clone(),
            hf_dir: a.hf_dir.clone(),
        },
        device,
        threads: a.threads,
        seq: a.seq,
        tokenizer,
        addr,
        max_batch: a.max_batch,
        limits,
        batch_wait: std::time::Duration::try_from_secs_f64(a.batch_wait_ms / 1e3)
            .context("--batch-wait-ms must be a duration of 0 or more")?,
        backend_options,
    };
    // Before loading: a port in use fails in a millisecond, not after.
    let listener = handoff_serve::bind(addr)?;
    let result = handoff_serve::serve(backend, &config, listener, |addr| {
        println!("{}{addr}", handoff_runner::http_case::READY_PREFIX);
        let _ = std::io::stdout().flush();
    });
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(handoff_serve::ServeError::Backend(e)) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(match e {
                handoff_backend::BackendError::Unsupported(_) => SERVE_EXIT_UNSUPPORTED,
                handoff_backend::BackendError::Unavailable(_) => SERVE_EXIT_UNAVAILABLE,
                _ => 1,
            }))
        }
        Err(e) => Err(e.into()),
    }
}
