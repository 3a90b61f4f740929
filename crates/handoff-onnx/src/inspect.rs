//! Reading a model's interface without running it, so that a suite can be
//! validated (input names, dtypes, ranks) before any backend is touched.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::proto::{DimensionValue, ModelProto, TensorProto, ValueInfoProto};

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read model {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid ONNX model (protobuf decode failed: {detail})")]
    Decode { path: PathBuf, detail: String },
    #[error("{path} is {pointer}")]
    LfsPointer {
        path: PathBuf,
        pointer: crate::lfs::LfsPointer,
    },
    #[error("{path} is not a valid ONNX model: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("cannot write model {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// ONNX `TensorProto.DataType`, limited to what handoff feeds or reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElemType {
    F32,
    U8,
    I8,
    I32,
    I64,
    Bool,
    F16,
    F64,
    Other(i32),
}

impl ElemType {
    pub fn from_onnx(code: i32) -> Self {
        match code {
            1 => Self::F32,
            2 => Self::U8,
            3 => Self::I8,
            6 => Self::I32,
            7 => Self::I64,
            9 => Self::Bool,
            10 => Self::F16,
            11 => Self::F64,
            other => Self::Other(other),
        }
    }

    pub fn onnx_code(self) -> i32 {
        match self {
            Self::F32 => 1,
            Self::U8 => 2,
            Self::I8 => 3,
            Self::I32 => 6,
            Self::I64 => 7,
            Self::Bool => 9,
            Self::F16 => 10,
            Self::F64 => 11,
            Self::Other(c) => c,
        }
    }

    /// Bytes per element, when fixed.
    pub fn size(self) -> Option<usize> {
        match self {
            Self::U8 | Self::I8 | Self::Bool => Some(1),
            Self::F16 => Some(2),
            Self::F32 | Self::I32 => Some(4),
            Self::I64 | Self::F64 => Some(8),
            Self::Other(_) => None,
        }
    }
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::F32 => f.write_str("f32"),
            Self::U8 => f.write_str("u8"),
            Self::I8 => f.write_str("i8"),
            Self::I32 => f.write_str("i32"),
            Self::I64 => f.write_str("i64"),
            Self::Bool => f.write_str("bool"),
            Self::F16 => f.write_str("f16"),
            Self::F64 => f.write_str("f64"),
            Self::Other(c) => write!(f, "onnx-type-{c}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
    Unknown,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Symbolic(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoInfo {
    pub name: String,
    pub elem: ElemType,
    /// `None` when the model declares no shape at all.
    pub dims: Option<Vec<Dim>>,
}

impl fmt::Display for IoInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.elem)?;
        if let Some(dims) = &self.dims {
            let d: Vec<String> = dims.iter().map(ToString::to_string).collect();
            write!(f, "[{}]", d.join(", "))?;
        }
        Ok(())
    }
}

/// What handoff needs to know about a model file before running it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub path: PathBuf,
    /// Of the file, and of its external data files if it has any
    /// ([`crate::external::content_sha256`]).
    pub sha256: String,
    /// The file's size plus its external data files'.
    pub size_bytes: u64,
    pub opset: i64,
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    /// Op types used, `domain::Op` for ops outside the default domain.
    pub ops: BTreeSet<String>,
    pub node_count: usize,
    pub parameter_count: u64,
}

impl ModelInfo {
    pub fn load(path: &Path) -> Result<Self, OnnxError> {
        let bytes = std::fs::read(path).map_err(|source| OnnxError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(path, &bytes)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, OnnxError> {
        let model = decode(path, bytes)?;
        let invalid = |detail: String| OnnxError::Invalid {
            path: path.to_owned(),
            detail,
        };
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| invalid("the model has no graph".into()))?;
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .ok_or_else(|| invalid("no opset_import for the default domain".into()))?;
        let mut parameter_count = 0u64;
        let mut init_names = BTreeSet::new();
        for t in &graph.initializer {
            parameter_count += check_initializer(t).map_err(&invalid)?;
            init_names.insert(t.name.as_str());
        }
        let io = |v: &ValueInfoProto| -> Result<IoInfo, OnnxError> { io_info(v).map_err(&invalid) };
        let inputs = graph
            .input
            .iter()
            .filter(|i| !init_names.contains(i.name.as_str()))
            .map(io)
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = graph.output.iter().map(io).collect::<Result<Vec<_>, _>>()?;
        if outputs.is_empty() {
            return Err(invalid("the graph declares no outputs".into()));
        }
        let ops = graph
            .node
            .iter()
            .map(|n| {
                if n.domain.is_empty() || n.domain == "ai.onnx" {
                    n.op_type.clone()
                } else {
                    format!("{}::{}", n.domain, n.op_type)
                }
            })
            .collect();
        let (sha256, size_bytes) = crate::external::content_sha256(path, bytes, &model)?;
        Ok(Self {
            path: path.to_owned(),
            sha256,
            size_bytes,
            opset,
            inputs,
            outputs,
            ops,
            node_count: graph.node.len(),
            parameter_count,
        })
    }

    pub fn input(&self, name: &str) -> Option<&IoInfo> {
        self.inputs.iter().find(|i| i.name == name)
    }
}

pub fn decode(path: &Path, bytes: &[u8]) -> Result<ModelProto, OnnxError> {
    not_a_pointer(path, bytes)?;
    ModelProto::decode(bytes).map_err(|e| OnnxError::Decode {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

pub fn read_model(path: &Path) -> Result<ModelProto, OnnxError> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Read {
        path: path.to_owned(),
        source,
    })?;
    decode(path, &bytes)
}

/// An error naming `path` if `bytes` are a Git LFS pointer.
pub fn not_a_pointer(path: &Path, bytes: &[u8]) -> Result<(), OnnxError> {
    match crate::lfs::LfsPointer::parse(bytes) {
        Some(pointer) => Err(OnnxError::LfsPointer {
            path: path.to_owned(),
            pointer,
        }),
        None => Ok(()),
    }
}

/// A serialised `TensorProto`, as in the ONNX test-data layout
/// (`test_data_set_N/input_K.pb`), checked like an initializer.
pub fn read_tensor(path: &Path) -> Result<TensorProto, OnnxError> {
    let bytes = std::fs::read(path).map_err(|source| OnnxError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |detail: String| OnnxError::Invalid {
        path: path.to_owned(),
        detail,
    };
    not_a_pointer(path, &bytes)?;
    let t = TensorProto::decode(bytes.as_slice()).map_err(|e| OnnxError::Decode {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Err(invalid("the tensor's data is in an external file".into()));
    }
    check_initializer(&t).map_err(invalid)?;
    Ok(t)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_info(v: &ValueInfoProto) -> Result<IoInfo, String> {
    let tensor = v
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| format!("graph input/output `{}` is not a tensor", v.name))?;
    let dims = tensor.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(DimensionValue::DimValue(v)) => Dim::Fixed(*v),
                Some(DimensionValue::DimParam(p)) if !p.is_empty() => Dim::Symbolic(p.clone()),
                _ => Dim::Unknown,
            })
            .collect()
    });
    Ok(IoInfo {
        name: v.name.clone(),
        elem: ElemType::from_onnx(tensor.elem_type),
        dims,
    })
}

/// Checks that an initializer's payload matches its declared shape, so a
/// truncated or shape-corrupted file is reported here, naming the tensor,
/// rather than as whatever a runtime makes of it.
pub(crate) fn check_initializer(t: &TensorProto) -> Result<u64, String> {
    let mut count: u64 = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(format!("initializer `{}` has negative dim {d}", t.name));
        }
        count = count.checked_mul(d as u64).ok_or_else(|| {
            format!(
                "initializer `{}` has an overflowing shape {:?}",
                t.name, t.dims
            )
        })?;
    }
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Ok(count);
    }
    let elem = ElemType::from_onnx(t.data_type);
    let stored = if !t.raw_data.is_empty() {
        match elem.size() {
            Some(size) => {
                if t.raw_data.len() as u64 != count * size as u64 {
                    return Err(format!(
                        "initializer `{}` declares shape {:?} of {elem} ({} bytes) but holds {} bytes",
                        t.name,
                        t.dims,
                        count * size as u64,
                        t.raw_data.len()
                    ));
                }
                count
            }
            None => count,
        }
    } else {
        (t.float_data.len() + t.int32_data.len() + t.int64_data.len() + t.double_data.len()) as u64
    };
    if stored != count && !(stored == 0 && count == 0) {
        return Err(format!(
            "initializer `{}` declares shape {:?} ({count} values) but holds {stored}",
            t.name, t.dims
        ));
    }
    Ok(count)
}
