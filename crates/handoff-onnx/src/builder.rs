//! A small builder for ONNX graphs, used by the synthetic models, the tests
//! and (later) the converters.

use std::path::Path;

use prost::Message;

use crate::inspect::{ElemType, OnnxError};
use crate::proto::{
    AttributeProto, Dimension, DimensionValue, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
    attribute_type,
};

/// An initializer held as little-endian raw bytes.
pub fn tensor(name: &str, elem: ElemType, dims: &[i64], raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.to_owned(),
        dims: dims.to_vec(),
        data_type: elem.onnx_code(),
        raw_data,
        ..Default::default()
    }
}

pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor(name, ElemType::F32, dims, raw)
}

pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor(name, ElemType::I64, dims, raw)
}

pub fn tensor_i8(name: &str, dims: &[i64], data: &[i8]) -> TensorProto {
    tensor(
        name,
        ElemType::I8,
        dims,
        data.iter().map(|&v| v as u8).collect(),
    )
}

pub fn tensor_u8(name: &str, dims: &[i64], data: &[u8]) -> TensorProto {
    tensor(name, ElemType::U8, dims, data.to_vec())
}

/// A node with its own name and any number of outputs (graph rewrites).
pub fn named_node(
    op: &str,
    name: String,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: outputs.iter().map(|s| (*s).to_owned()).collect(),
        name,
        op_type: op.to_owned(),
        attribute,
        ..Default::default()
    }
}

/// One dimension of a graph input or output.
#[derive(Debug, Clone)]
pub enum D {
    Fixed(i64),
    Sym(&'static str),
}

#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    counter: usize,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        Self {
            graph: GraphProto {
                name: name.to_owned(),
                ..Default::default()
            },
            counter: 0,
        }
    }

    pub fn input(&mut self, name: &str, elem: ElemType, dims: &[D]) -> String {
        self.graph.input.push(value_info(name, elem, dims));
        name.to_owned()
    }

    pub fn output(&mut self, name: &str, elem: ElemType, dims: &[D]) {
        self.graph.output.push(value_info(name, elem, dims));
    }

    /// Declares the type and shape of an intermediate value, as exporters
    /// do (`value_info`).
    pub fn value_info(&mut self, name: &str, elem: ElemType, dims: &[D]) {
        self.graph.value_info.push(value_info(name, elem, dims));
    }

    /// Adds an initializer; a second call with the same name and contents
    /// reuses the first (ONNX Runtime warns about duplicates and stops
    /// treating them as constants, which costs it constant folding).
    pub fn init_f32(&mut self, name: &str, dims: &[i64], data: Vec<f32>) -> String {
        debug_assert_eq!(dims.iter().product::<i64>() as usize, data.len());
        self.add_initializer(tensor_f32(name, dims, &data))
    }

    pub fn init_i64(&mut self, name: &str, dims: &[i64], data: Vec<i64>) -> String {
        self.add_initializer(tensor_i64(name, dims, &data))
    }

    fn add_initializer(&mut self, t: TensorProto) -> String {
        let name = t.name.clone();
        match self.graph.initializer.iter().find(|i| i.name == name) {
            Some(existing) => assert!(
                *existing == t,
                "initializer `{name}` added twice with different contents"
            ),
            None => self.graph.initializer.push(t),
        }
        name
    }

    /// Adds a node with one output, named after the op and a counter.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.counter += 1;
        let out = format!("{}_{}", op.to_lowercase(), self.counter);
        self.node_to(op, inputs, attrs, &out);
        out
    }

    /// Adds a node whose output has a given name (a graph output, say).
    pub fn node_to(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, out: &str) {
        self.graph
            .node
            .push(named_node(op, format!("{out}_node"), inputs, &[out], attrs));
    }

    pub fn finish(self, opset: i64) -> ModelProto {
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            producer_name: "handoff".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph),
            ..Default::default()
        }
    }
}

fn value_info(name: &str, elem: ElemType, dims: &[D]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: elem.onnx_code(),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                D::Fixed(v) => DimensionValue::DimValue(*v),
                                D::Sym(s) => DimensionValue::DimParam((*s).to_owned()),
                            }),
                            denotation: String::new(),
                        })
                        .collect(),
                }),
            }),
        }),
        doc_string: String::new(),
    }
}

pub fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INT,
        i,
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::FLOAT,
        f,
        ..Default::default()
    }
}

/// protobuf cannot encode a message of 2 GiB or more.
const PROTOBUF_LIMIT: usize = (2 << 30) - 1;

/// Writes a model atomically (temp file + rename), so a crash never leaves a
/// half-written model behind that a later run would trust. A model whose
/// encoding would pass protobuf's 2 GiB limit is refused: no reader could
/// load it.
pub fn write_model(model: &ModelProto, path: &Path) -> Result<(), OnnxError> {
    let err = |source| OnnxError::Write {
        path: path.to_owned(),
        source,
    };
    let len = model.encoded_len();
    if len >= PROTOBUF_LIMIT {
        return Err(err(std::io::Error::other(format!(
            "the model would be {:.2} GB, over protobuf's 2 GiB limit for one file",
            len as f64 / 1e9
        ))));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension(format!("onnx.tmp{}", std::process::id()));
    std::fs::write(&tmp, model.encode_to_bytes()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
