//! A/B in one run: the suite's model entry becomes two entries, `ID.base`
//! and `ID.head`, with the same inputs (so they form one comparison group
//! and are measured in the same interleaved rounds), and the suite's other
//! models are left out. What differs between the two is a model file, an
//! ONNX Runtime library (`ort_library`), or both.

use std::path::Path;

use serde_yaml_ng::Value;

use crate::error::Problem;
use crate::locate::Locator;

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
            // One group: a head whose inputs changed (a wider input, another
            // shape) is still measured in the base's rounds.
            map.insert("group".into(), id.into());
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

/// Why the base and head cases of `plan` (an A/B suite of model `id`)
/// cannot be compared case for case, if they cannot: the two share one
/// group, so a head with other input values or widths pairs with the base,
/// but a head whose inputs have other named dims (another rank, an added
/// sequence axis) has cases at other dims, and the gate would read every
/// case as removed.
pub fn unpaired(plan: &crate::Plan, id: &str) -> Option<String> {
    let (base, head) = (base_id(id), head_id(id));
    let side = |prefix: &str| {
        plan.cases()
            .filter_map(|c| {
                let form = handoff_backend::ids::form_of(&c.model, prefix)?;
                Some((
                    (
                        form.to_owned(),
                        c.backend.clone(),
                        c.device,
                        c.threads,
                        c.batch,
                        c.dims.clone(),
                        c.scenario.label(),
                    ),
                    c.group_key(),
                ))
            })
            .collect::<Vec<_>>()
    };
    let (b, h) = (side(&base), side(&head));
    let alone = b.iter().filter(|case| !h.contains(case)).count();
    if alone == 0 {
        return None;
    }
    let inputs = |model: &str| {
        plan.model(model).map_or_else(String::new, |m| {
            let list: Vec<String> = m.info.inputs.iter().map(ToString::to_string).collect();
            format!("{} ({})", list.join(", "), m.path.display())
        })
    };
    Some(format!(
        "the base and head models take inputs with other dims, so {alone} of the {} base case(s) have no head case at the same batch and dims to compare with: base {}; head {}. `handoff ab` compares two versions of one model's interface; a change of input dims needs the consumers changed too, and a suite of its own",
        b.len(),
        inputs(&base),
        inputs(&head)
    ))
}

/// `problems` found in the A/B suite that [`ab_suite`] made from `text`,
/// told against `text` itself: the A/B suite is YAML written anew (no
/// comments, other lines), so its positions and `models[0]`/`models[1]`
/// mean nothing in the user's file. A problem of one side points at model
/// `id`'s entry and says which side (and flag) it comes from; one that
/// both sides share is said once.
pub fn relocate(
    text: &str,
    id: &str,
    problems: Vec<Problem>,
    base: Side<'_>,
    head: Side<'_>,
) -> Vec<Problem> {
    let index = serde_yaml_ng::from_str::<Value>(text).ok().and_then(|doc| {
        doc.get("models")?
            .as_sequence()?
            .iter()
            .position(|m| m.get("id").and_then(Value::as_str) == Some(id))
    });
    let locator = Locator::new(text);
    let split = |p: &Problem| -> Option<(usize, String)> {
        ["models[0]", "models[1]"]
            .iter()
            .position(|prefix| p.path.starts_with(prefix))
            .map(|side| (side, p.path["models[0]".len()..].to_owned()))
    };
    let mut out: Vec<Problem> = Vec::new();
    for (i, p) in problems.iter().enumerate() {
        let (path, message) = match (split(p), index) {
            (Some((side, rest)), Some(k)) => {
                let shared = problems.iter().enumerate().any(|(j, q)| {
                    j != i
                        && q.message == p.message
                        && split(q).is_some_and(|(s, r)| s != side && r == rest)
                });
                if shared && side == 1 {
                    continue;
                }
                let path = format!("models[{k}]{rest}");
                let message = if shared {
                    p.message.clone()
                } else {
                    let (name, flags, sd) = if side == 0 {
                        ("base", ["--base", "--base-ort"], base)
                    } else {
                        ("head", ["--head", "--head-ort"], head)
                    };
                    let label = if rest.starts_with(".source") && sd.file.is_some() {
                        flags[0].to_owned()
                    } else if rest.starts_with(".ort_library") && sd.ort_library.is_some() {
                        flags[1].to_owned()
                    } else {
                        format!("the A/B {name}")
                    };
                    format!("{label}: {}", p.message)
                };
                (path, message)
            }
            _ => (p.path.clone(), p.message.clone()),
        };
        let loc = locator.find(&path);
        out.push(Problem {
            file: p.file.clone(),
            line: loc.map(|l| l.line),
            column: loc.map(|l| l.column),
            path,
            message,
        });
    }
    out
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
        assert_eq!(
            (&models[0]["group"], &models[1]["group"]),
            (&"m".into(), &"m".into())
        );
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
    fn problems_point_at_the_users_entry_and_say_their_side() {
        let file = |p: &'static str| Side {
            file: Some(Path::new(p)),
            ort_library: None,
        };
        let problem = |path: &str, message: &str| Problem {
            file: "s.yaml".into(),
            line: Some(99),
            column: Some(9),
            path: path.into(),
            message: message.into(),
        };
        let found = relocate(
            SUITE,
            "m",
            vec![
                problem("models[1].source", "h.onnx is a Git LFS pointer"),
                problem("models[0].variants[1]", "no such variant"),
                problem("models[1].variants[1]", "no such variant"),
                problem("backends[0]", "unknown backend"),
            ],
            Side::default(),
            file("h.onnx"),
        );
        let said: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            said,
            [
                "s.yaml:6:5: models[1].source: --head: h.onnx is a Git LFS pointer",
                "s.yaml:7:22: models[1].variants[1]: no such variant",
                "s.yaml:8:12: backends[0]: unknown backend",
            ]
        );
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
