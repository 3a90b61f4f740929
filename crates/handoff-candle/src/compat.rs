//! Spec-valid encodings that candle-onnx 0.11 reads wrongly, rewritten in
//! memory into equivalent ones it reads right, and the check for weights
//! in external data files, which it does not read. Each rewrite keeps the
//! computation as the ONNX spec defines it; the model file is untouched.
//! The node rewrites cover the main graph, not subgraphs.

use candle_onnx::onnx::{GraphProto, ModelProto, NodeProto, TensorProto, tensor_proto::DataType};

/// Every rewrite of this module, in order.
pub(crate) fn for_candle_onnx(model: &mut ModelProto) {
    raw_constants(model);
    if let Some(g) = model.graph.as_mut() {
        shape_slices(g);
        unsqueeze_one_axis_at_a_time(g);
    }
}

/// Whether any tensor of `g` or its subgraphs (initializers and tensor
/// attributes) keeps its bytes in an external data file.
pub(crate) fn has_external_data(g: &GraphProto) -> bool {
    let external = |t: &TensorProto| {
        t.data_location == candle_onnx::onnx::tensor_proto::DataLocation::External as i32
            || !t.external_data.is_empty()
    };
    g.initializer.iter().any(external)
        || g.node.iter().flat_map(|n| &n.attribute).any(|a| {
            a.t.iter().chain(&a.tensors).any(external)
                || a.g.iter().chain(&a.graphs).any(has_external_data)
        })
}

/// Moves tensor values stored in typed fields (`float_data`, `int64_data`,
/// `int32_data` for bool and 8/16-bit types: what older exporters write)
/// into `raw_data`. candle-onnx reads tensor attributes (`ConstantOfShape`'s
/// `value`, say) and bool or 8/16-bit tensors from `raw_data` only, so it
/// saw an empty buffer ("Shape mismatch, got buffer of size 0 which is
/// compatible with shape [1]"). The same values in the other encoding:
/// nothing about the computation changes.
fn raw_constants(model: &mut ModelProto) {
    fn graph(g: &mut GraphProto) {
        g.initializer.iter_mut().for_each(tensor);
        for node in &mut g.node {
            for attr in &mut node.attribute {
                attr.t.iter_mut().for_each(tensor);
                attr.tensors.iter_mut().for_each(tensor);
                if let Some(sub) = attr.g.as_mut() {
                    graph(sub);
                }
                attr.graphs.iter_mut().for_each(graph);
            }
        }
    }
    fn tensor(t: &mut TensorProto) {
        if !t.raw_data.is_empty() {
            return;
        }
        let raw: Vec<u8> = if !t.float_data.is_empty() {
            std::mem::take(&mut t.float_data)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        } else if !t.int64_data.is_empty() {
            std::mem::take(&mut t.int64_data)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        } else if !t.double_data.is_empty() {
            std::mem::take(&mut t.double_data)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        } else if !t.int32_data.is_empty() {
            // int32_data also carries bool, int8/16, uint8/16 and fp16
            // values, one per element, in the raw width of the type.
            use candle_onnx::onnx::tensor_proto::DataType;
            let values = std::mem::take(&mut t.int32_data);
            match DataType::try_from(t.data_type) {
                Ok(DataType::Int32) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Ok(DataType::Int8 | DataType::Uint8 | DataType::Bool) => {
                    values.iter().map(|v| *v as u8).collect()
                }
                Ok(DataType::Int16 | DataType::Uint16 | DataType::Float16 | DataType::Bfloat16) => {
                    values
                        .iter()
                        .flat_map(|v| (*v as u16).to_le_bytes())
                        .collect()
                }
                _ => {
                    t.int32_data = values;
                    return;
                }
            }
        } else {
            return;
        };
        t.raw_data = raw;
    }
    if let Some(g) = model.graph.as_mut() {
        graph(g);
    }
}

/// Rewrites each `Shape` node with a `start` or `end` (opset 15 on;
/// PyTorch's default exporter writes them for reads such as
/// `x.shape[0]`) into a plain `Shape` and a `Slice` of it: the same values
/// by the ONNX spec. candle-onnx 0.11 reads `end` as inclusive, shapes the
/// result by the input's rank and refuses an `end` equal to the rank ("axis
/// 2 is too large, tensor rank 2"), so every such node failed or was wrong.
fn shape_slices(g: &mut GraphProto) {
    let mut nodes = Vec::with_capacity(g.node.len());
    for mut node in std::mem::take(&mut g.node) {
        let bound = |name: &str| node.attribute.iter().find(|a| a.name == name).map(|a| a.i);
        let (start, end) = (bound("start"), bound("end"));
        let standard = node.domain.is_empty() || node.domain == "ai.onnx";
        if node.op_type != "Shape" || !standard || (start.is_none() && end.is_none()) {
            nodes.push(node);
            continue;
        }
        let out = node.output[0].clone();
        let whole = format!("{out}__handoff_shape");
        let mut slice_inputs = vec![whole.clone()];
        for (what, v) in [
            ("start", start.unwrap_or(0)),
            ("end", end.unwrap_or(i64::MAX)),
            ("axis", 0),
        ] {
            let name = format!("{whole}_{what}");
            g.initializer.push(i64_tensor(&name, &[v]));
            slice_inputs.push(name);
        }
        node.attribute
            .retain(|a| a.name != "start" && a.name != "end");
        node.output[0] = whole;
        let slice = NodeProto {
            name: format!("{}__handoff_slice", node.name),
            op_type: "Slice".into(),
            input: slice_inputs,
            output: vec![out],
            ..Default::default()
        };
        nodes.push(node);
        nodes.push(slice);
    }
    g.node = nodes;
}

/// Rewrites each `Unsqueeze` of two or more non-negative axes into one
/// `Unsqueeze` per axis, lowest first: the same result, as each later
/// axis lands beyond those already inserted. candle-onnx 0.11 checks
/// every axis against the input's rank rather than the output's, so
/// `Unsqueeze(x of rank 1, axes [1, 2])` (PyTorch's exporter folds
/// `x.unsqueeze(1).unsqueeze(2)` into that) failed with "axis 2 is too
/// large, tensor rank 1". Axes from a computed input or negative ones are
/// left as they are.
fn unsqueeze_one_axis_at_a_time(g: &mut GraphProto) {
    let constant = |name: &str| -> Option<Vec<i64>> {
        let t = g.initializer.iter().find(|t| t.name == name)?;
        (t.data_type == DataType::Int64 as i32).then(|| {
            if t.raw_data.is_empty() {
                t.int64_data.clone()
            } else {
                t.raw_data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect()
            }
        })
    };
    let mut nodes = Vec::with_capacity(g.node.len());
    let mut inits = Vec::new();
    for node in std::mem::take(&mut g.node) {
        let standard = node.domain.is_empty() || node.domain == "ai.onnx";
        let axes = match node.attribute.iter().find(|a| a.name == "axes") {
            Some(a) => Some(a.ints.clone()),
            None => node.input.get(1).and_then(|name| constant(name)),
        };
        let Some(mut axes) = axes.filter(|a| {
            node.op_type == "Unsqueeze" && standard && a.len() > 1 && a.iter().all(|&x| x >= 0)
        }) else {
            nodes.push(node);
            continue;
        };
        axes.sort_unstable();
        let by_attribute = node.input.len() < 2;
        let mut value = node.input[0].clone();
        for (k, axis) in axes.iter().enumerate() {
            let out = if k + 1 == axes.len() {
                node.output[0].clone()
            } else {
                format!("{}__handoff_unsqueeze_{k}", node.output[0])
            };
            let mut step = NodeProto {
                name: format!("{}__handoff_{k}", node.name),
                op_type: "Unsqueeze".into(),
                input: vec![value],
                output: vec![out.clone()],
                ..Default::default()
            };
            if by_attribute {
                step.attribute = vec![candle_onnx::onnx::AttributeProto {
                    name: "axes".into(),
                    r#type: candle_onnx::onnx::attribute_proto::AttributeType::Ints as i32,
                    ints: vec![*axis],
                    ..Default::default()
                }];
            } else {
                let name = format!("{out}_axis");
                inits.push(i64_tensor(&name, &[*axis]));
                step.input.push(name);
            }
            nodes.push(step);
            value = out;
        }
    }
    g.node = nodes;
    g.initializer.extend(inits);
}

fn i64_tensor(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.to_owned(),
        dims: vec![values.len() as i64],
        data_type: DataType::Int64 as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// External data is found where it hides: in a subgraph (an `If`
    /// branch) as well as among the top-level initializers.
    #[test]
    fn external_data_is_found_in_subgraphs() {
        use candle_onnx::onnx::AttributeProto;
        let external = TensorProto {
            data_location: candle_onnx::onnx::tensor_proto::DataLocation::External as i32,
            ..Default::default()
        };
        let branch = GraphProto {
            initializer: vec![external.clone()],
            ..Default::default()
        };
        let with_branch = |g: GraphProto| GraphProto {
            node: vec![NodeProto {
                op_type: "If".into(),
                attribute: vec![AttributeProto {
                    g: Some(g),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(has_external_data(&with_branch(branch)));
        assert!(!has_external_data(&with_branch(GraphProto::default())));
        let constant = GraphProto {
            node: vec![NodeProto {
                attribute: vec![AttributeProto {
                    t: Some(external),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(has_external_data(&constant));
    }
}
