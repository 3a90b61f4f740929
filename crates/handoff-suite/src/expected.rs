//! Outputs a model's author recorded, in the ONNX test-data layout
//! (`test_data_set_N/input_K.pb`, `output_K.pb`, as the ONNX model zoo
//! ships them). The inputs of the first data set become the model's inputs,
//! and every backend's outputs on every data set are compared with the
//! recorded ones: a check against the truth, not only between backends.

use std::path::{Path, PathBuf};

use handoff_backend::{Fill, TensorSpec};
use handoff_onnx::{Dim, ModelInfo};
use serde::{Deserialize, Serialize};

use crate::plan::{InputTemplate, TemplateFill};
use crate::raw::RawDim;

/// The recorded data sets of a model and the tolerance they are held to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Expected {
    /// The directory the suite named, for messages.
    pub dir: PathBuf,
    pub atol: f64,
    pub rtol: f64,
    pub sets: Vec<ExpectedSet>,
}

/// One `test_data_set_N`: inputs in the model's input order, and the
/// outputs recorded for them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpectedSet {
    /// `test_data_set_0`, or `.` when the directory itself holds the files.
    pub name: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<ExpectedOutput>,
}

/// A recorded output and the model output it stands for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpectedOutput {
    /// Position among the model's outputs.
    pub index: usize,
    pub name: String,
    pub path: PathBuf,
}

/// Reads every data set under `dir` and checks it against the model:
/// input count, names, dtypes and shapes; outputs the model has. Returns
/// the sets and the model's inputs (the first set's files, fixed shapes).
pub fn load(
    dir: &Path,
    info: &ModelInfo,
    atol: f64,
    rtol: f64,
) -> Result<(Expected, Vec<InputTemplate>), String> {
    let set_dirs = data_sets(dir)?;
    let mut sets = Vec::new();
    for set_dir in &set_dirs {
        let name = if set_dir == dir {
            ".".to_owned()
        } else {
            set_dir
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        };
        let set = load_set(set_dir, name, info)?;
        if let Some(first) = sets.first()
            && shapes(first) != shapes(&set)
        {
            return Err(format!(
                "{} has inputs of other shapes than {} ({:?} vs {:?}): one model entry runs one shape; give the other data sets a model entry of their own",
                set.name,
                first.name,
                shapes(&set),
                shapes(first)
            ));
        }
        sets.push(set);
    }
    let inputs = sets[0]
        .inputs
        .iter()
        .map(|t| InputTemplate {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.iter().map(|&d| RawDim::Fixed(d as u32)).collect(),
            fill: TemplateFill::Fill(t.fill.clone()),
        })
        .collect();
    Ok((
        Expected {
            dir: dir.to_owned(),
            atol,
            rtol,
            sets,
        },
        inputs,
    ))
}

fn shapes(set: &ExpectedSet) -> Vec<Vec<usize>> {
    set.inputs.iter().map(|t| t.shape.clone()).collect()
}

/// `dir/test_data_set_*` in numeric order, or `dir` itself when it holds
/// `input_0.pb`.
fn data_sets(dir: &Path) -> Result<Vec<PathBuf>, String> {
    if dir.join("input_0.pb").is_file() {
        return Ok(vec![dir.to_owned()]);
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut sets: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix("test_data_set_")?.parse().ok()?;
            e.path().is_dir().then(|| (n, e.path()))
        })
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err(format!(
            "{} holds no test_data_set_N directory and no input_0.pb (the ONNX test-data layout)",
            dir.display()
        ));
    }
    Ok(sets.into_iter().map(|(_, p)| p).collect())
}

/// `prefix_0.pb`, `prefix_1.pb`, ... while they exist.
fn numbered(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    (0..)
        .map(|k| dir.join(format!("{prefix}_{k}.pb")))
        .take_while(|p| p.is_file())
        .collect()
}

fn load_set(dir: &Path, name: String, info: &ModelInfo) -> Result<ExpectedSet, String> {
    let input_files = numbered(dir, "input");
    if input_files.len() != info.inputs.len() {
        return Err(format!(
            "{} holds {} input_K.pb files; the model has {} inputs ({})",
            dir.display(),
            input_files.len(),
            info.inputs.len(),
            names(&info.inputs)
        ));
    }
    let mut inputs: Vec<Option<TensorSpec>> = vec![None; info.inputs.len()];
    for (k, path) in input_files.iter().enumerate() {
        let t = handoff_backend::read_pb(path).map_err(|e| e.to_string())?;
        let at = slot(path, &t.name, k, &info.inputs, "inputs")?;
        let io = &info.inputs[at];
        if inputs[at].is_some() {
            return Err(format!(
                "{} gives input `{}` a second time",
                path.display(),
                io.name
            ));
        }
        let dtype = t.data.dtype();
        if crate::plan::dtype_of(io.elem) != Some(dtype) {
            return Err(format!(
                "{} holds {dtype}; input `{}` is {}",
                path.display(),
                io.name,
                io.elem
            ));
        }
        if let Some(dims) = &io.dims {
            let fits = dims.len() == t.shape.len()
                && dims.iter().zip(&t.shape).all(|(d, &n)| match d {
                    Dim::Fixed(v) => *v == n as i64,
                    _ => true,
                });
            if !fits {
                return Err(format!(
                    "{} has shape {:?}; input `{io}` does not take it",
                    path.display(),
                    t.shape
                ));
            }
        }
        inputs[at] = Some(TensorSpec {
            name: io.name.clone(),
            dtype,
            shape: t.shape,
            fill: Fill::File(std::path::absolute(path).unwrap_or_else(|_| path.to_owned())),
        });
    }
    let output_files = numbered(dir, "output");
    if output_files.is_empty() || output_files.len() > info.outputs.len() {
        return Err(format!(
            "{} holds {} output_K.pb files; the model has {} outputs ({})",
            dir.display(),
            output_files.len(),
            info.outputs.len(),
            names(&info.outputs)
        ));
    }
    let mut outputs = Vec::new();
    for (k, path) in output_files.iter().enumerate() {
        let t = handoff_backend::read_pb(path).map_err(|e| e.to_string())?;
        let index = slot(path, &t.name, k, &info.outputs, "outputs")?;
        outputs.push(ExpectedOutput {
            index,
            name: info.outputs[index].name.clone(),
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
        });
    }
    Ok(ExpectedSet {
        name,
        inputs: inputs
            .into_iter()
            .map(|i| i.expect("one file per input"))
            .collect(),
        outputs,
    })
}

/// Which of the model's inputs or outputs (`what`) the `k`-th file
/// `path`, holding tensor `name`, stands for: the one of that name, or by
/// position when the tensor is unnamed.
fn slot(
    path: &Path,
    name: &str,
    k: usize,
    io: &[handoff_onnx::IoInfo],
    what: &str,
) -> Result<usize, String> {
    if name.is_empty() {
        return Ok(k);
    }
    io.iter().position(|i| i.name == name).ok_or_else(|| {
        format!(
            "{} is tensor `{name}`; the model's {what} are {}",
            path.display(),
            names(io)
        )
    })
}

fn names(io: &[handoff_onnx::IoInfo]) -> String {
    io.iter()
        .map(|i| format!("`{}`", i.name))
        .collect::<Vec<_>>()
        .join(", ")
}
