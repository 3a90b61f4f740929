//! `handoff init`: a runnable starter suite for a model, read off the model
//! itself, with a comment on every choice a user should check. The output
//! is what `handoff validate` accepts unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::Path;

use handoff_onnx::{Dim, ElemType, ModelInfo};

/// The backends a starter suite lists for an ONNX file: the ones that run
/// ONNX (candle-native and python-torch need an HF directory).
pub fn onnx_backends(available: &[String]) -> Vec<String> {
    available
        .iter()
        .filter(|b| !b.starts_with("mock") && *b != "candle-native" && *b != "python-torch")
        .cloned()
        .collect()
}

/// Why a starter suite could not be written for a model file.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Onnx(#[from] handoff_onnx::inspect::OnnxError),
    #[error("input `{name}` is {dtype}: handoff feeds f32, f16, i64, i32 and bool inputs only")]
    InputType { name: String, dtype: String },
    #[error("input `{name}` declares no shape: write its `inputs` entry by hand")]
    NoShape { name: String },
}

/// A starter suite for the ONNX file at `model`, which the suite will name
/// as `model_in_suite` (relative to where the suite is written).
///
/// Recorded data beside the model (`test_data_set_N/`, the ONNX model zoo
/// layout) becomes `check: {expected: ...}`: the suite runs that data and
/// checks every backend against its outputs. `lower_for`: backends found to
/// lack an op handoff can rewrite (the CLI probes them).
pub fn onnx_suite(
    model: &Path,
    model_in_suite: &str,
    backends: &[String],
    lower_for: &[String],
) -> Result<String, InitError> {
    // Read once: the summary and the graph come from the same bytes.
    let bytes = std::fs::read(model).map_err(|source| InitError::Read {
        path: model.to_owned(),
        source,
    })?;
    let info = ModelInfo::from_bytes(model, &bytes)?;
    let graph = handoff_onnx::inspect::decode(model, &bytes)?
        .graph
        .unwrap_or_default();
    let vocab = embedding_rows(&graph);
    let id = model_id(model);

    // Symbols that lead some input are its batch, wherever they appear
    // (a recurrent state [layers, batch, hidden] included).
    let batch_symbols: BTreeSet<String> = info
        .inputs
        .iter()
        .filter_map(|i| i.dims.as_ref()?.first())
        .filter_map(|d| match d {
            Dim::Symbolic(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let mut dims: BTreeMap<String, u32> = BTreeMap::new();
    let mut has_batch = false;
    let mut fixed_batch: Option<i64> = None;
    let mut lines = Vec::new();
    for input in &info.inputs {
        let (dtype, kind) = match input.elem {
            ElemType::F32 => ("f32", "float"),
            ElemType::F16 => ("f16", "float"),
            ElemType::I64 => ("i64", "int"),
            ElemType::I32 => ("i32", "int"),
            ElemType::Bool => ("bool", "bool"),
            other => {
                return Err(InitError::InputType {
                    name: input.name.clone(),
                    dtype: other.to_string(),
                });
            }
        };
        let Some(model_dims) = &input.dims else {
            return Err(InitError::NoShape {
                name: input.name.clone(),
            });
        };
        let mut shape = Vec::new();
        for (k, d) in model_dims.iter().enumerate() {
            match d {
                Dim::Fixed(v) => {
                    if k == 0 && model_dims.len() > 1 {
                        fixed_batch.get_or_insert(*v);
                    }
                    shape.push(v.to_string());
                }
                Dim::Symbolic(s) if batch_symbols.contains(s) => {
                    has_batch = true;
                    shape.push("batch".into());
                }
                Dim::Unknown if k == 0 => {
                    has_batch = true;
                    shape.push("batch".into());
                }
                Dim::Symbolic(s) => {
                    let name = symbol(s);
                    dims.entry(name.clone())
                        .or_insert_with(|| default_dim(&name));
                    shape.push(name);
                }
                Dim::Unknown => {
                    let name = symbol(&format!("{}_dim{k}", input.name));
                    dims.entry(name.clone()).or_insert(1);
                    shape.push(name);
                }
            }
        }
        let lower = input.name.to_lowercase();
        let (fill, why) = if model_dims.is_empty() {
            (
                "{constant: 1}".to_owned(),
                "CHECK: a scalar input; set the value the model expects (a sample rate, a threshold, a step)".to_owned(),
            )
        } else if kind == "float"
            && (lower.contains("state")
                || lower.starts_with('h') && model_dims.len() == 3
                || lower.contains("cache")
                || lower.contains("past"))
        {
            (
                "{constant: 0}".to_owned(),
                "CHECK: looks like a recurrent or cached state: zeros, as at the first step"
                    .to_owned(),
            )
        } else if kind == "bool" && lower.contains("padding") {
            (
                "{constant: 0}".to_owned(),
                "a padding mask: no position padded".to_owned(),
            )
        } else if kind == "bool" {
            (
                "{constant: 1}".to_owned(),
                "CHECK: a bool input, all true (an HF-style mask: every position attended); a mask where true means ignore wants {constant: 0}".to_owned(),
            )
        } else if kind == "float" {
            (
                "{random: {min: -1, max: 1}}".to_owned(),
                "uniform noise: fine for speed; use real data to check accuracy".to_owned(),
            )
        } else if lower.contains("mask") {
            (
                "{constant: 1}".to_owned(),
                "a mask: every position attended".to_owned(),
            )
        } else if lower.contains("type") || lower.contains("segment") {
            (
                "{constant: 0}".to_owned(),
                "token types: one segment".to_owned(),
            )
        } else if lower.contains("id") || lower.contains("token") {
            match vocab.get(&input.name) {
                Some(rows) => (
                    format!("{{random_int: {{min: 0, max: {rows}}}}}"),
                    format!("token ids below the {rows} rows of the embedding table the graph gathers from"),
                ),
                None => (
                    "{random_int: {min: 0, max: 1000}}".to_owned(),
                    "CHECK: token ids; no embedding table found in the graph, so the bound is a guess".to_owned(),
                ),
            }
        } else {
            (
                "{constant: 0}".to_owned(),
                "CHECK: an integer input handoff could not classify; set a value the model accepts"
                    .to_owned(),
            )
        };
        let declared: Vec<String> = model_dims.iter().map(ToString::to_string).collect();
        lines.push(format!(
            "      # {}: {} [{}] in the model; {why}\n      - {{name: {}, dtype: {dtype}, shape: [{}], fill: {fill}}}\n",
            input.name,
            input.elem,
            declared.join(", "),
            yaml_str(&input.name),
            shape.join(", ")
        ));
    }
    let data_dir = model.parent().unwrap_or(Path::new("."));
    let recorded = if data_dir.join("test_data_set_0").is_dir() {
        Some(
            crate::expected::load(data_dir, &info, 1e-4, 1e-3)
                .map(|(e, _)| e.sets[0].inputs.clone()),
        )
    } else {
        None
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Starter suite written by `handoff init` for {} (opset {}, {} parameters,\n# inputs read from the model). Lines marked CHECK are guesses to confirm.\n# Run: handoff validate <this file>, then handoff run <this file>.",
        model.display(),
        info.opset,
        info.parameter_count
    );
    let _ = writeln!(out, "name: {}", yaml_str(&id));
    out.push_str("models:\n");
    let _ = writeln!(out, "  - id: {}", yaml_str(&id));
    let _ = writeln!(out, "    source: {{onnx: {}}}", yaml_str(model_in_suite));
    if !lower_for.is_empty() {
        let _ = writeln!(
            out,
            "    # Run here, {} lacked an op handoff rewrites into primitives: the\n    # model also runs as `{id}+lowered` (checked against the original on ort).\n    lower_for: [{}]",
            lower_for.join(" and "),
            lower_for.join(", ")
        );
    }
    let data_batch = match &recorded {
        Some(Ok(inputs)) => {
            let dir = Path::new(model_in_suite)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| ".".to_owned(), |p| p.display().to_string());
            let _ = writeln!(
                out,
                "    # The model ships recorded data (test_data_set_N/, the ONNX test-data\n    # layout): its inputs are what runs, and every backend is checked\n    # against its recorded outputs.\n    check: {{expected: {}}}",
                yaml_str(&dir)
            );
            // As the plan counts items of fixed-shape inputs: their shared
            // leading dim, else one.
            let leading: Vec<usize> = inputs
                .iter()
                .filter_map(|t| t.shape.first().copied())
                .collect();
            Some(match leading.first() {
                Some(&b) if leading.iter().all(|&l| l == b) => b as u32,
                _ => 1,
            })
        }
        other => {
            if let Some(Err(e)) = other {
                let _ = writeln!(
                    out,
                    "    # test_data_set_0/ beside the model does not fit it, so the inputs\n    # below are generated: {}",
                    e.replace('\n', " ")
                );
            }
            out.push_str("    inputs:\n");
            for l in lines {
                out.push_str(&l);
            }
            None
        }
    };
    let _ = writeln!(
        out,
        "# The backends `handoff list-backends` finds here that run ONNX files."
    );
    let _ = writeln!(out, "backends: [{}]", backends.join(", "));
    out.push_str("threads: [1, 2]\n");
    if let Some(b) = data_batch {
        let _ = writeln!(
            out,
            "batch: [{b}]                     # the batch of the recorded inputs"
        );
    } else if has_batch {
        out.push_str("batch: [1, 8]                  # the model's batch dim is dynamic\n");
    } else {
        let b = fixed_batch.unwrap_or(1).max(1);
        let _ = writeln!(
            out,
            "batch: [{b}]                     # no dynamic batch dim: the model runs one fixed batch"
        );
    }
    if !dims.is_empty() && data_batch.is_none() {
        out.push_str("dims:\n");
        for (name, v) in &dims {
            let _ = writeln!(
                out,
                "  {name}: [{v}]{}",
                if *v == 128 {
                    "                # a sequence length; try the lengths you serve"
                } else {
                    "                # CHECK: a symbolic dim of the model; set the sizes you run"
                }
            );
        }
    }
    out.push_str("measure:\n  warmup: 300ms\n  min_time: 1s\n  max_time: 3s\n  target_ci: 0.01\n");
    // bfloat16 has no ElemType of its own (ONNX code 16).
    let half: Vec<&str> = info
        .outputs
        .iter()
        .filter(|o| matches!(o.elem, ElemType::F16 | ElemType::Other(16)))
        .map(|o| o.name.as_str())
        .collect();
    if half.is_empty() {
        out.push_str("check: {reference: ort, atol: 1e-4, rtol: 1e-3}\n");
    } else {
        let _ = writeln!(
            out,
            "# {} in half precision (about 3 significant digits): runtimes that\n# compute in it differ by a few of its units, so the check allows 1%.\ncheck: {{reference: ort, atol: 1e-2, rtol: 1e-2}}",
            half.join(", ")
        );
    }
    out.push_str("timeout: 60s\n");
    Ok(out)
}

/// A starter suite for an HF directory (config.json, model.safetensors,
/// tokenizer.json): handoff converts it, tokenises text for it, and runs
/// the native backends on it too.
pub fn hf_suite(dir: &Path, dir_in_suite: &str, backends: &[String]) -> String {
    let id = model_id(dir);
    // 128 tokens, or fewer where the model has fewer positions.
    let seq = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c["max_position_embeddings"].as_u64())
        .map_or(128, |p| p.min(128));
    let backends: Vec<&String> = backends.iter().filter(|b| !b.starts_with("mock")).collect();
    let list: Vec<&str> = backends.iter().map(|b| b.as_str()).collect();
    format!(
        "# Starter suite written by `handoff init` for the HF directory {}.\n# handoff converts it to ONNX, checks the conversion against candle-native,\n# and feeds every backend the same tokenised sentences (32 built-in ones;\n# `text: {{file: sentences.txt}}` for yours).\n# Run: handoff validate <this file>, then handoff run <this file>.\nname: {}\nmodels:\n  - id: {}\n    source: {{hf: {}}}\n# The backends `handoff list-backends` finds here.\nbackends: [{}]\nthreads: [1, 2]\nbatch: [1, 8]\ndims:\n  seq: [{seq}]                     # tokens per text (padding and truncation)\nmeasure:\n  warmup: 300ms\n  min_time: 1s\n  max_time: 3s\n  target_ci: 0.01\ncheck: {{reference: ort, atol: 1e-4, rtol: 1e-3}}\ntimeout: 60s\n",
        dir.display(),
        yaml_str(&id),
        yaml_str(&id),
        yaml_str(dir_in_suite),
        list.join(", "),
    )
}

/// Rows of the embedding table each input indexes: `Gather(table, input)`,
/// directly or through a `Cast`.
fn embedding_rows(graph: &handoff_onnx::proto::GraphProto) -> BTreeMap<String, i64> {
    let tables: BTreeMap<&str, i64> = graph
        .initializer
        .iter()
        .filter(|t| t.dims.len() == 2)
        .map(|t| (t.name.as_str(), t.dims[0]))
        .collect();
    let mut out = BTreeMap::new();
    for input in &graph.input {
        let mut names = vec![input.name.clone()];
        names.extend(
            graph
                .node
                .iter()
                .filter(|n| n.op_type == "Cast" && n.input.first() == Some(&input.name))
                .filter_map(|n| n.output.first().cloned()),
        );
        let rows = graph
            .node
            .iter()
            .filter(|n| n.op_type == "Gather" && n.input.len() == 2 && names.contains(&n.input[1]))
            .filter_map(|n| tables.get(n.input[0].as_str()).copied())
            .max();
        if let Some(r) = rows {
            out.insert(input.name.clone(), r);
        }
    }
    out
}

fn model_id(path: &Path) -> String {
    let mut stem = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    // Model zoo directories hold a `model.onnx`: the directory names it.
    if stem == "model"
        && let Some(dir) = path.canonicalize().ok().and_then(|p| {
            p.parent()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
    {
        stem = dir;
    }
    symbol(&stem).replace('_', "-")
}

/// A suite symbol: letters, digits and `_`.
fn symbol(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() || t.starts_with(|c: char| c.is_ascii_digit()) {
        format!("d_{t}")
    } else {
        t
    }
}

fn default_dim(name: &str) -> u32 {
    let n = name.to_lowercase();
    if n.contains("seq") || n.contains("len") || n.contains("token") {
        128
    } else {
        16
    }
}

/// A YAML scalar, quoted when it needs to be.
fn yaml_str(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c))
        && !s.starts_with('-')
    {
        s.to_owned()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}
