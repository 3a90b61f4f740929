//! `handoff init`: a starter suite read off a model.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use crate::out::{errln, out};
use anyhow::{Context, Result};
use handoff_backend::{Probe, Registry};

/// Write a starter suite for a model (an ONNX file or an HF directory):
/// inputs, dims and fills read off the model, every guess commented.
///
///   handoff init models/resnet.onnx --out suites/resnet.yaml
#[derive(clap::Args)]
pub struct InitCmd {
    /// An ONNX file, or an HF directory (config.json, model.safetensors,
    /// tokenizer.json).
    pub model: PathBuf,
    /// Where to write the suite (default: print it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing --out file.
    #[arg(long)]
    pub force: bool,
}

impl InitCmd {
    pub fn run(self, registry: &Arc<Registry>) -> Result<ExitCode> {
        init(registry, &self.model, self.out.as_deref(), self.force)
    }
}

/// `handoff init`: the starter suite for `model`, printed or written.
fn init(
    registry: &Arc<Registry>,
    model: &Path,
    out: Option<&Path>,
    force: bool,
) -> Result<ExitCode> {
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
        let text = handoff_suite::init::onnx_suite(model, &in_suite, &backends, &[])?;
        let (lower_for, concrete) = probe_backends(registry, model, out, &text)?;
        let text = if lower_for.is_empty() {
            text
        } else {
            handoff_suite::init::onnx_suite(model, &in_suite, &backends, &lower_for)?
        };
        if concrete {
            text + "# Run here, tract could not plan the model with its symbolic dims and ran it\n\
                    # with each input pinned to the case's shape: one plan per case.\n\
                    backend_options: {tract: {shapes: concrete}}\n"
        } else {
            text
        }
    };
    match out {
        None => out!("{text}")?,
        Some(out) => {
            if out.exists() && !force {
                anyhow::bail!("{} exists; pass --force to replace it", out.display());
            }
            std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
            errln!(
                "wrote {}; next: handoff validate {0}, then handoff run {0}",
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The suite's backends that stop at an op handoff can lower, and whether
/// tract needs concrete shapes, found by running each once on the suite's
/// first case (read as the suite will be, building nothing).
fn probe_backends(
    registry: &Arc<Registry>,
    model: &Path,
    out: Option<&Path>,
    suite: &str,
) -> Result<(Vec<String>, bool)> {
    let options = crate::backends::plan_options(registry, handoff_suite::Preparation::Describe);
    // The suite names files relative to where it will be written.
    let at = out.unwrap_or(Path::new("handoff-init.yaml"));
    let plan = handoff_suite::Plan::from_str(at, suite, &options)?;
    let mut found = Vec::new();
    let mut concrete = false;
    for backend in &plan.backends {
        let Some(case) = plan.cases().find(|c| &c.backend == backend) else {
            continue;
        };
        match handoff_prepare::init_gap(registry, backend, model, &case.inputs) {
            handoff_prepare::InitGap::Lowerable(op) => {
                errln!("{backend} lacks {op}, which handoff lowers: adding lower_for: [{backend}]");
                found.push(backend.clone());
            }
            handoff_prepare::InitGap::TractConcreteShapes => {
                errln!(
                    "tract cannot plan the model with its symbolic dims: adding backend_options: {{tract: {{shapes: concrete}}}}"
                );
                concrete = true;
            }
            handoff_prepare::InitGap::None => {}
        }
    }
    Ok((found, concrete))
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
