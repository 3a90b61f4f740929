//! Weights kept outside the `.onnx` file (ONNX external data): what
//! `onnx.save(..., save_as_external_data=True)` and exporters write for
//! large models, one or more data files beside the model that initializers
//! point into by `location`, `offset` and `length`.
//!
//! handoff reads them in three places: the model's identity (its sha256
//! and size cover the data files, so new weights under an unchanged graph
//! are a changed model, and a cached variant of the old weights is never
//! reused), rewriting a model (quantising, lowering: the rewritten file
//! lands in the cache, where a relative `location` would point at nothing,
//! so the weights are read in first) and the runtimes that cannot follow
//! the references themselves (candle-onnx).

use std::collections::BTreeMap;
use std::path::{Component, Path};

use crate::inspect::{OnnxError, check_initializer, read_model, sha256_hex};
use crate::proto::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};

/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

/// Whether a tensor's values live in a data file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == EXTERNAL || !t.external_data.is_empty()
}

/// Where a tensor's bytes are: `(location, offset, length)`, the length
/// `None` when the tensor runs to the end of the file.
fn reference(t: &TensorProto) -> Result<(String, u64, Option<u64>), String> {
    let entry = |key: &str| t.external_data.iter().find(|e| e.key == key);
    let number = |key: &str| -> Result<Option<u64>, String> {
        entry(key)
            .map(|e| {
                e.value.parse::<u64>().map_err(|_| {
                    format!(
                        "initializer `{}`: external data {key} `{}` is not a byte count",
                        t.name, e.value
                    )
                })
            })
            .transpose()
    };
    let location = entry("location")
        .map(|e| e.value.clone())
        .ok_or_else(|| format!("initializer `{}`: external data without a location", t.name))?;
    let inside = !location.is_empty()
        && Path::new(&location)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        return Err(format!(
            "initializer `{}`: external data location `{location}` is not a file inside the model's directory",
            t.name
        ));
    }
    Ok((location, number("offset")?.unwrap_or(0), number("length")?))
}

fn graph_tensors<'a>(g: &'a GraphProto, out: &mut Vec<&'a TensorProto>) {
    out.extend(&g.initializer);
    for attr in g.node.iter().flat_map(|n| &n.attribute) {
        out.extend(&attr.t);
        out.extend(&attr.tensors);
        attr.g.iter().for_each(|sub| graph_tensors(sub, out));
        attr.graphs.iter().for_each(|sub| graph_tensors(sub, out));
    }
}

fn graph_tensors_mut<'a>(g: &'a mut GraphProto, out: &mut Vec<&'a mut TensorProto>) {
    out.extend(&mut g.initializer);
    for attr in g.node.iter_mut().flat_map(|n| &mut n.attribute) {
        out.extend(&mut attr.t);
        out.extend(&mut attr.tensors);
        attr.g
            .iter_mut()
            .for_each(|sub| graph_tensors_mut(sub, out));
        attr.graphs
            .iter_mut()
            .for_each(|sub| graph_tensors_mut(sub, out));
    }
}

/// The data files a model's tensors point into, each with the first tensor
/// that does (for messages), sorted by file name.
pub fn data_files(model: &ModelProto) -> Result<BTreeMap<String, String>, String> {
    let mut tensors = Vec::new();
    if let Some(g) = &model.graph {
        graph_tensors(g, &mut tensors);
    }
    let mut files = BTreeMap::new();
    for t in tensors.into_iter().filter(|t| is_external(t)) {
        let (location, _, _) = reference(t)?;
        files.entry(location).or_insert_with(|| t.name.clone());
    }
    Ok(files)
}

/// The sha256 and size of the model at `path` (its bytes, decoded as
/// `model`) and every data file it points into, read from beside it: the
/// plain sha256 of the `.onnx` bytes when it has none, else the sha256 of
/// those bytes' sha256 and each file's name and sha256, so a change to
/// either is a change of model.
pub fn content_sha256(
    path: &Path,
    bytes: &[u8],
    model: &ModelProto,
) -> Result<(String, u64), OnnxError> {
    let invalid = |detail: String| OnnxError::Invalid {
        path: path.to_owned(),
        detail,
    };
    let files = data_files(model).map_err(invalid)?;
    let onnx = sha256_hex(bytes);
    if files.is_empty() {
        return Ok((onnx, bytes.len() as u64));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut key = format!("onnx {onnx}");
    let mut size = bytes.len() as u64;
    for (file, first) in &files {
        let data = read_data_file(path, dir, file, first)?;
        size += data.len() as u64;
        key.push_str(&format!("\n{file} {}", sha256_hex(&data)));
    }
    Ok((sha256_hex(key.as_bytes()), size))
}

/// [`content_sha256`] of the model file at `path`.
pub fn file_sha256(path: &Path) -> Result<String, OnnxError> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Read {
        path: path.to_owned(),
        source,
    })?;
    let model = crate::inspect::decode(path, &bytes)?;
    Ok(content_sha256(path, &bytes, &model)?.0)
}

fn read_data_file(path: &Path, dir: &Path, file: &str, first: &str) -> Result<Vec<u8>, OnnxError> {
    let data = std::fs::read(dir.join(file)).map_err(|e| OnnxError::Invalid {
        path: path.to_owned(),
        detail: format!(
            "cannot read external data file {} (weights of initializer `{first}` and maybe others): {e}",
            dir.join(file).display()
        ),
    })?;
    crate::inspect::not_a_pointer(&dir.join(file), &data)?;
    Ok(data)
}

/// Reads a model with every external tensor's bytes moved into
/// `raw_data`, checked against its declared shape: a model that stands
/// alone, to rewrite or to hand to a runtime that reads only the `.onnx`.
pub fn read_model_inline(path: &Path) -> Result<ModelProto, OnnxError> {
    let mut model = read_model(path)?;
    inline(&mut model, path)?;
    Ok(model)
}

/// [`read_model_inline`] for a model already decoded from `path`.
pub fn inline(model: &mut ModelProto, path: &Path) -> Result<(), OnnxError> {
    let invalid = |detail: String| OnnxError::Invalid {
        path: path.to_owned(),
        detail,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tensors = Vec::new();
    if let Some(g) = model.graph.as_mut() {
        graph_tensors_mut(g, &mut tensors);
    }
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for t in tensors.into_iter().filter(|t| is_external(t)) {
        let (location, offset, length) = reference(t).map_err(invalid)?;
        if !files.contains_key(&location) {
            let data = read_data_file(path, dir, &location, &t.name)?;
            files.insert(location.clone(), data);
        }
        let data = &files[&location];
        let end = length.map_or(data.len() as u64, |l| offset.saturating_add(l));
        if offset > end || end > data.len() as u64 {
            return Err(invalid(format!(
                "initializer `{}` wants bytes {offset}..{end} of {location}, which holds {}",
                t.name,
                data.len()
            )));
        }
        t.raw_data = data[offset as usize..end as usize].to_vec();
        t.external_data.clear();
        t.data_location = 0;
        check_initializer(t).map_err(invalid)?;
    }
    Ok(())
}

/// Initializers at least this big go to the data file
/// (`onnx.save`'s default threshold).
const EXTERNAL_MIN_BYTES: usize = 1024;

/// Writes `model` to `path` the way `onnx.save(...,
/// save_as_external_data=True)` does: initializers of 1 KiB or more in
/// `<file name>.data` beside it, each at a 4 KiB-aligned offset. Both
/// files are written to temporary names and renamed, the data file first,
/// so a crash never leaves a model pointing at missing weights.
pub fn write_with_external_data(model: &ModelProto, path: &Path) -> Result<(), OnnxError> {
    let err = |source| OnnxError::Write {
        path: path.to_owned(),
        source,
    };
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".data");
    let location = name.to_string_lossy().into_owned();
    let data_path = path.with_file_name(&name);
    let mut split = model.clone();
    let mut data = Vec::new();
    if let Some(g) = split.graph.as_mut() {
        for t in g
            .initializer
            .iter_mut()
            .filter(|t| t.raw_data.len() >= EXTERNAL_MIN_BYTES)
        {
            let offset = data.len().next_multiple_of(4096);
            data.resize(offset, 0);
            data.append(&mut t.raw_data);
            let entry = |key: &str, value: String| StringStringEntryProto {
                key: key.into(),
                value,
            };
            t.external_data = vec![
                entry("location", location.clone()),
                entry("offset", offset.to_string()),
                entry("length", (data.len() - offset).to_string()),
            ];
            t.data_location = EXTERNAL;
        }
    }
    let tmp = data_path.with_file_name(format!("{location}.tmp{}", std::process::id()));
    std::fs::write(&tmp, &data).map_err(err)?;
    std::fs::rename(&tmp, &data_path).map_err(err)?;
    crate::builder::write_model(&split, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::{D, GraphBuilder};
    use crate::inspect::{ElemType, ModelInfo};

    fn mlp() -> ModelProto {
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Fixed(64)]);
        let w = g.init_f32(
            "w",
            &[64, 32],
            (0..64 * 32).map(|i| i as f32 * 1e-3).collect(),
        );
        let b = g.init_f32("b", &[32], vec![0.5; 32]);
        let y = g.node("MatMul", &[&x, &w], vec![]);
        g.node_to("Add", &[&y, &b], vec![], "y");
        g.output("y", ElemType::F32, &[D::Sym("batch"), D::Fixed(32)]);
        g.finish(13)
    }

    #[test]
    fn a_split_model_reads_back_whole_and_its_identity_covers_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        let model = mlp();
        write_with_external_data(&model, &path).unwrap();
        let data = dir.path().join("m.onnx.data");
        // The 8 KiB weight moved out, the 128-byte bias stayed.
        let stored = read_model(&path).unwrap();
        assert_eq!(
            data_files(&stored).unwrap(),
            BTreeMap::from([("m.onnx.data".to_owned(), "w".to_owned())])
        );
        assert!(!is_external(&stored.graph.as_ref().unwrap().initializer[1]));
        assert_eq!(read_model_inline(&path).unwrap(), model);
        let info = ModelInfo::load(&path).unwrap();
        let onnx_len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            info.size_bytes,
            onnx_len + std::fs::metadata(&data).unwrap().len()
        );
        assert_ne!(info.sha256, sha256_hex(&std::fs::read(&path).unwrap()));
        // New weights, same graph file: another model.
        let mut bytes = std::fs::read(&data).unwrap();
        bytes[5] ^= 1;
        std::fs::write(&data, &bytes).unwrap();
        assert_ne!(ModelInfo::load(&path).unwrap().sha256, info.sha256);
        // A model without external data keeps the plain sha256 of its file.
        let whole = dir.path().join("whole.onnx");
        crate::builder::write_model(&model, &whole).unwrap();
        let info = ModelInfo::load(&whole).unwrap();
        assert_eq!(info.sha256, sha256_hex(&std::fs::read(&whole).unwrap()));
    }

    #[test]
    fn missing_short_or_escaping_data_is_an_error_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        write_with_external_data(&mlp(), &path).unwrap();
        let data = dir.path().join("m.onnx.data");
        let bytes = std::fs::read(&data).unwrap();
        std::fs::write(&data, &bytes[..100]).unwrap();
        let e = read_model_inline(&path).unwrap_err().to_string();
        assert!(
            e.contains("`w` wants bytes 0..8192 of m.onnx.data, which holds 100"),
            "{e}"
        );
        std::fs::remove_file(&data).unwrap();
        let e = ModelInfo::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("cannot read external data file") && e.contains("initializer `w`"),
            "{e}"
        );
        let mut model = read_model(&path).unwrap();
        let g = model.graph.as_mut().unwrap();
        g.initializer[0].external_data[0].value = "../m.onnx.data".into();
        let e = inline(&mut model, &path).unwrap_err().to_string();
        assert!(
            e.contains("`../m.onnx.data` is not a file inside the model's directory"),
            "{e}"
        );
    }
}
