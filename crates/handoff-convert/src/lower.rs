//! Lowering passes: rewrite an op a backend lacks into primitives every
//! backend has. Which ops a backend lacks is found by running the model on
//! it (see `handoff convert --lower-for`), not from a list kept here; this
//! module only knows how to rewrite.

use handoff_onnx::builder::{attr_int, attr_ints, tensor_f32};
use handoff_onnx::proto::{ModelProto, NodeProto, TensorProto};

#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error("no lowering for op {0} (lowerings exist for: {list})", list = LOWERABLE.join(", "))]
    NoLowering(String),
    #[error("cannot lower node `{node}` ({op}): {detail}")]
    Node {
        node: String,
        op: String,
        detail: String,
    },
    #[error("model has no graph")]
    NoGraph,
}

/// Ops this module can rewrite.
pub const LOWERABLE: [&str; 1] = ["LayerNormalization"];

/// Rewrites every node of op type `op`; returns how many were rewritten.
pub fn lower_op(model: &mut ModelProto, op: &str) -> Result<usize, LowerError> {
    if !LOWERABLE.contains(&op) {
        return Err(LowerError::NoLowering(op.to_owned()));
    }
    let graph = model.graph.as_mut().ok_or(LowerError::NoGraph)?;
    let mut out = Vec::with_capacity(graph.node.len());
    let mut inits = Vec::new();
    let mut count = 0;
    for (i, node) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        if node.op_type == op && (node.domain.is_empty() || node.domain == "ai.onnx") {
            out.extend(layer_norm(&node, i, &mut inits)?);
            count += 1;
        } else {
            out.push(node);
        }
    }
    graph.node = out;
    graph.initializer.extend(inits);
    Ok(count)
}

/// LayerNormalization(x, gamma, beta) over the last axis as
/// ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div/Mul/Add.
fn layer_norm(
    node: &NodeProto,
    index: usize,
    inits: &mut Vec<TensorProto>,
) -> Result<Vec<NodeProto>, LowerError> {
    let err = |detail: &str| LowerError::Node {
        node: node.name.clone(),
        op: node.op_type.clone(),
        detail: detail.to_owned(),
    };
    let axis = node
        .attribute
        .iter()
        .find(|a| a.name == "axis")
        .map_or(-1, |a| a.i);
    if axis != -1 {
        return Err(err("only axis -1 (the last axis) is supported"));
    }
    if node.output.len() > 1 && node.output[1..].iter().any(|o| !o.is_empty()) {
        return Err(err("the optional Mean/InvStdDev outputs are used"));
    }
    if node.input.len() < 2 {
        return Err(err("needs a scale input"));
    }
    let eps = node
        .attribute
        .iter()
        .find(|a| a.name == "epsilon")
        .map_or(1e-5, |a| a.f);
    let p = format!("lowered_ln{index}");
    let eps_name = format!("{p}_eps");
    inits.push(tensor_f32(&eps_name, &[], &[eps]));
    let x = node.input[0].clone();
    let mk = |op: &str, inputs: Vec<String>, out: String, attrs| NodeProto {
        name: format!("{out}_node"),
        op_type: op.to_owned(),
        input: inputs,
        output: vec![out],
        attribute: attrs,
        ..Default::default()
    };
    let n = |s: &str| format!("{p}_{s}");
    let mut nodes = vec![
        mk(
            "ReduceMean",
            vec![x.clone()],
            n("mean"),
            vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
        ),
        mk("Sub", vec![x, n("mean")], n("centered"), vec![]),
        mk("Mul", vec![n("centered"), n("centered")], n("sq"), vec![]),
        mk(
            "ReduceMean",
            vec![n("sq")],
            n("var"),
            vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
        ),
        mk("Add", vec![n("var"), eps_name], n("var_eps"), vec![]),
        mk("Sqrt", vec![n("var_eps")], n("std"), vec![]),
        mk("Div", vec![n("centered"), n("std")], n("normed"), vec![]),
    ];
    let has_bias = node.input.get(2).is_some_and(|b| !b.is_empty());
    let scaled = if has_bias {
        n("scaled")
    } else {
        node.output[0].clone()
    };
    nodes.push(mk(
        "Mul",
        vec![n("normed"), node.input[1].clone()],
        scaled.clone(),
        vec![],
    ));
    if has_bias {
        nodes.push(mk(
            "Add",
            vec![scaled, node.input[2].clone()],
            node.output[0].clone(),
            vec![],
        ));
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_onnx::synthetic::{Kind, SyntheticSpec};

    #[test]
    fn layer_norms_are_replaced_by_primitives() {
        let mut m = SyntheticSpec {
            kind: Kind::Encoder,
            width: 8,
            depth: 2,
            seed: 1,
        }
        .build();
        let n = lower_op(&mut m, "LayerNormalization").unwrap();
        assert_eq!(n, 4);
        let ops = m.op_types();
        assert!(!ops.contains(&"LayerNormalization"));
        assert_eq!(ops.iter().filter(|o| **o == "Sqrt").count(), 4);
        assert!(
            lower_op(&mut m, "GatherND")
                .unwrap_err()
                .to_string()
                .contains("no lowering for op GatherND")
        );
    }
}
