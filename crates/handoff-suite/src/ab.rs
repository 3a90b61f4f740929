//! A/B in one run: the suite's model entry becomes two entries, `ID.base`
//! and `ID.head`, with the same inputs (so they form one comparison group
//! and are measured in the same interleaved rounds), and the suite's other
//! models are left out. What differs between the two is a model file, an
//! ONNX Runtime library (`ort_library`), or both.

use std::path::Path;

use serde_yaml_ng::Value;

/// The id the base file gets.
pub fn base_id(id: &str) -> String {
    format!("{id}.base")
}

/// The id the head file gets.
pub fn head_id(id: &str) -> String {
    format!("{id}.head")
}

/// Why a suite cannot be turned into an A/B suite.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AbError {
    #[error("the suite is not valid YAML: {0}")]
    Yaml(String),
    #[error("the suite has no `models` list")]
    NoModels,
    #[error("the suite has no model `{id}` (it has: {known})")]
    UnknownModel { id: String, known: String },
}

/// One side of an A/B: its model file (`None`: the suite's source) and its
/// ONNX Runtime library (`None`: the provisioned one). Paths absolute or
/// relative to the suite's directory, as any path in a suite.
#[derive(Debug, Clone, Copy, Default)]
pub struct Side<'a> {
    pub file: Option<&'a Path>,
    pub ort_library: Option<&'a Path>,
}

/// The suite `text` with model `id` measured twice: `base` first, then
/// `head`, every other field of the entry (inputs, variants, backends) kept
/// for both.
pub fn ab_suite(text: &str, id: &str, base: Side<'_>, head: Side<'_>) -> Result<String, AbError> {
    let mut doc: Value = serde_yaml_ng::from_str(text).map_err(|e| AbError::Yaml(e.to_string()))?;
    let models = doc
        .get_mut("models")
        .and_then(Value::as_sequence_mut)
        .ok_or(AbError::NoModels)?;
    let ids: Vec<String> = models
        .iter()
        .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let entry = models
        .iter()
        .find(|m| m.get("id").and_then(Value::as_str) == Some(id))
        .cloned()
        .ok_or_else(|| AbError::UnknownModel {
            id: id.to_owned(),
            known: ids.join(", "),
        })?;
    let side = |new_id: String, side: Side<'_>| {
        let mut m = entry.clone();
        if let Some(map) = m.as_mapping_mut() {
            map.insert("id".into(), new_id.into());
            if let Some(path) = side.file {
                let mut source = serde_yaml_ng::Mapping::new();
                source.insert("onnx".into(), path.display().to_string().into());
                map.insert("source".into(), Value::Mapping(source));
            }
            if let Some(lib) = side.ort_library {
                map.insert("ort_library".into(), lib.display().to_string().into());
            }
        }
        m
    };
    *models = vec![side(base_id(id), base), side(head_id(id), head)];
    serde_yaml_ng::to_string(&doc).map_err(|e| AbError::Yaml(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUITE: &str = "name: s
models:
  - id: other
    source: {synthetic: {kind: mlp, width: 8, depth: 1}}
  - id: m
    source: {onnx: m.onnx}
    variants: [fp32, int8-dynamic]
backends: [ort]
";

    #[test]
    fn the_model_becomes_base_then_head_and_others_are_left_out() {
        let file = |p: &'static str| Side {
            file: Some(Path::new(p)),
            ort_library: None,
        };
        let out = ab_suite(SUITE, "m", file("a/m.onnx"), file("/abs/m2.onnx")).unwrap();
        let doc: Value = serde_yaml_ng::from_str(&out).unwrap();
        let models = doc["models"].as_sequence().unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(models[0]["id"], "m.base");
        assert_eq!(models[0]["source"]["onnx"], "a/m.onnx");
        assert_eq!(models[1]["id"], "m.head");
        assert_eq!(models[1]["source"]["onnx"], "/abs/m2.onnx");
        assert_eq!(models[1]["variants"][1], "int8-dynamic");
        assert_eq!(doc["backends"][0], "ort");
    }

    #[test]
    fn two_libraries_keep_the_source_and_set_ort_library() {
        let lib = |p: &'static str| Side {
            file: None,
            ort_library: Some(Path::new(p)),
        };
        let out = ab_suite(SUITE, "m", lib("old/libonnxruntime.so"), lib("/new/lib.so")).unwrap();
        let doc: Value = serde_yaml_ng::from_str(&out).unwrap();
        let models = doc["models"].as_sequence().unwrap();
        assert_eq!(models[0]["source"]["onnx"], "m.onnx");
        assert_eq!(models[1]["source"]["onnx"], "m.onnx");
        assert_eq!(models[0]["ort_library"], "old/libonnxruntime.so");
        assert_eq!(models[1]["ort_library"], "/new/lib.so");
    }

    #[test]
    fn an_unknown_model_names_the_known_ones() {
        let e = ab_suite(SUITE, "x", Side::default(), Side::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the suite has no model `x` (it has: other, m)"
        );
        assert_eq!(
            ab_suite("name: s\n", "m", Side::default(), Side::default()).unwrap_err(),
            AbError::NoModels
        );
    }
}
