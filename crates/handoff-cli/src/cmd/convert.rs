//! `handoff convert`: an HF model to ONNX, checked against candle's native model.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use handoff_backend::Registry;

use crate::backends::ensure_ort;
use crate::out::outln;
use handoff_prepare as tools;

/// Convert an HF BERT-family model (config.json + model.safetensors) to
/// ONNX, check it against candle's native BERT on 32 tokenised sentences,
/// and write a provenance sidecar. Optionally lower it for backends.
#[derive(clap::Args)]
pub struct ConvertCmd {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    pub hf_dir: PathBuf,
    /// Output ONNX file; `<out>.provenance.json` is written beside it.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Also write `<out stem>.lowered-<backend>.onnx`, with the ops the
    /// backend lacks rewritten into primitives (found by running it).
    #[arg(long)]
    pub lower_for: Vec<String>,
    /// Sequence length of the check inputs.
    #[arg(long, default_value_t = 128)]
    pub seq: u32,
}

impl ConvertCmd {
    pub fn run(self, registry: &Arc<Registry>) -> Result<ExitCode> {
        let Self {
            hf_dir,
            out,
            lower_for,
            seq,
        } = self;
        convert(registry, &hf_dir, &out, &lower_for, seq)?;
        Ok(ExitCode::SUCCESS)
    }
}

fn convert(
    registry: &Arc<Registry>,
    hf_dir: &Path,
    out: &Path,
    lower_for: &[String],
    seq: u32,
) -> Result<()> {
    use handoff_backend::{DType, Fill, TensorSpec};
    let prov = handoff_convert::bert::convert(&handoff_convert::bert::HfDir::new(hf_dir), out)?;
    outln!(
        "wrote {} ({:.1} MB, sha256 {})",
        out.display(),
        prov.size_bytes as f64 / 1e6,
        &prov.output_sha256[..16]
    )?;
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
        // Lowered files go beside the output the user named.
        model_cache: out
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_owned),
        ensure_ort: || ensure_ort(false),
    };
    let check = tools.check_conversion(out, hf_dir, &specs)?;
    outln!(
        "conversion check ({}): max abs {:.2e} (<= {:e}), min cosine {:.8} (>= {}): {}",
        check.inputs,
        check.max_abs,
        check.threshold_max_abs,
        check.min_cosine,
        check.threshold_min_cosine,
        if check.passed { "passed" } else { "FAILED" }
    )?;
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
        match tools.lower(out, backend, &batch1)? {
            Some(l) => outln!(
                "lowered for {backend}: {} ({})",
                l.path.display(),
                l.ops.join(", ")
            )?,
            None => outln!("{backend} runs the model as it is: nothing to lower")?,
        }
    }
    Ok(())
}
