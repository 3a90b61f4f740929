//! The JSON sidecar next to every model handoff produces: where it came
//! from, what was done to it, and how far it is from its source.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub tool: String,
    /// Source files and their sha256.
    pub sources: Vec<SourceFile>,
    /// Each transformation, in order, with its parameters.
    pub steps: Vec<Step>,
    pub output_sha256: String,
    pub size_bytes: u64,
    /// Numerical checks against the source (filled by `handoff convert`).
    #[serde(default)]
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    pub path: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub params: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    /// What was compared with what, e.g. `ort(onnx) vs candle-native(safetensors)`.
    pub compared: String,
    pub inputs: String,
    #[serde(deserialize_with = "null_is_nan")]
    pub max_abs: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub min_cosine: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub threshold_max_abs: f64,
    #[serde(deserialize_with = "null_is_nan")]
    pub threshold_min_cosine: f64,
    /// For a classifier (`logits`): the share of inputs whose top label
    /// is the same; the gate needs all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_agreement: Option<f64>,
    pub passed: bool,
    /// The int8 class of the CPU the check ran on ([`crate::isa::CpuClass`]):
    /// an int8 file can compute differently on another class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_class: Option<String>,
}

/// JSON has no NaN: serde_json writes it (a figure that does not apply) as
/// `null`, and reads it back here.
fn null_is_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Provenance {
    pub fn sidecar_path(model: &Path) -> PathBuf {
        let mut p = model.as_os_str().to_owned();
        p.push(".provenance.json");
        PathBuf::from(p)
    }

    pub fn load(model: &Path) -> Option<Provenance> {
        let text = std::fs::read_to_string(Self::sidecar_path(model)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes atomically next to the model.
    pub fn save(&self, model: &Path) -> std::io::Result<()> {
        let path = Self::sidecar_path(model);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }
}
