//! Lowering passes: rewrite an op a backend lacks into primitives every
//! backend has. Which ops a backend lacks is found by running the model on
//! it (see `handoff convert --lower-for`), not from a list kept here; this
//! module only knows how to rewrite.

use handoff_onnx::builder::{attr_int, attr_ints, tensor_f32, tensor_i64};
use handoff_onnx::proto::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};

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
pub const LOWERABLE: [&str; 2] = ["LayerNormalization", "GlobalAveragePool"];

/// Rewrites every node of op type `op`; returns how many were rewritten.
pub fn lower_op(model: &mut ModelProto, op: &str) -> Result<usize, LowerError> {
    if !LOWERABLE.contains(&op) {
        return Err(LowerError::NoLowering(op.to_owned()));
    }
    // ReduceMean takes its axes as an attribute up to opset 17 and as an
    // input from 18.
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(1, |o| o.version);
    let graph = model.graph.as_mut().ok_or(LowerError::NoGraph)?;
    // Every node is rewritten before the graph changes, so a node that
    // cannot be lowered leaves the model as it was.
    let mut inits = Vec::new();
    let mut rewrites: Vec<Option<Vec<NodeProto>>> = Vec::with_capacity(graph.node.len());
    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type != op || !(node.domain.is_empty() || node.domain == "ai.onnx") {
            rewrites.push(None);
            continue;
        }
        let mut ctx = Lowering {
            index: i,
            opset,
            inits: &mut inits,
        };
        rewrites.push(Some(match op {
            "LayerNormalization" => layer_norm(node, &mut ctx)?,
            _ => {
                let rank = node.input.first().and_then(|x| rank_of(graph, x));
                global_average_pool(node, rank, &mut ctx)?
            }
        }));
    }
    let count = rewrites.iter().flatten().count();
    let nodes = std::mem::take(&mut graph.node);
    graph.node = nodes
        .into_iter()
        .zip(rewrites)
        .flat_map(|(node, rewrite)| rewrite.unwrap_or_else(|| vec![node]))
        .collect();
    graph.initializer.extend(inits);
    Ok(count)
}

/// What a rewrite of one node needs besides the node.
struct Lowering<'a> {
    /// The node's place in the graph, for unique names.
    index: usize,
    opset: i64,
    inits: &'a mut Vec<TensorProto>,
}

impl Lowering<'_> {
    /// `ReduceMean` of `x` over `axes`, keeping the reduced dims.
    fn reduce_mean(&mut self, x: String, axes: &[i64], out: String) -> NodeProto {
        let mut inputs = vec![x];
        let mut attrs = vec![attr_int("keepdims", 1)];
        if self.opset >= 18 {
            let name = format!("{out}_axes");
            self.inits
                .push(tensor_i64(&name, &[axes.len() as i64], axes));
            inputs.push(name);
        } else {
            attrs.push(attr_ints("axes", axes));
        }
        mk("ReduceMean", inputs, out, attrs)
    }
}

fn mk(op: &str, inputs: Vec<String>, out: String, attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: format!("{out}_node"),
        op_type: op.to_owned(),
        input: inputs,
        output: vec![out],
        attribute: attrs,
        ..Default::default()
    }
}

/// The rank of `value`, from the graph's declared shapes or, for an
/// intermediate value, by following ops that keep their first input's rank
/// back to one whose rank is known (a Conv's weight tells its own).
fn rank_of(graph: &GraphProto, value: &str) -> Option<usize> {
    const SAME_RANK: [&str; 14] = [
        "Relu",
        "Sigmoid",
        "Tanh",
        "Clip",
        "LeakyRelu",
        "HardSigmoid",
        "HardSwish",
        "Add",
        "Mul",
        "BatchNormalization",
        "Dropout",
        "MaxPool",
        "AveragePool",
        "Identity",
    ];
    let mut value = value.to_owned();
    for _ in 0..64 {
        let declared = graph
            .input
            .iter()
            .chain(&graph.value_info)
            .find(|v| v.name == value)
            .and_then(|v| v.r#type.as_ref()?.tensor_type.as_ref()?.shape.as_ref())
            .map(|s| s.dim.len());
        if declared.is_some() {
            return declared;
        }
        let producer = graph
            .node
            .iter()
            .find(|n| n.output.first() == Some(&value))?;
        if matches!(producer.op_type.as_str(), "Conv" | "ConvTranspose") {
            let weight = producer.input.get(1)?;
            return graph
                .initializer
                .iter()
                .find(|t| &t.name == weight)
                .map(|t| t.dims.len());
        }
        if !SAME_RANK.contains(&producer.op_type.as_str()) {
            return None;
        }
        value = producer.input.first()?.clone();
    }
    None
}

/// GlobalAveragePool(x) over the spatial axes (2 .. rank) as ReduceMean
/// with the dims kept: `[N, C, H, W] -> [N, C, 1, 1]`.
fn global_average_pool(
    node: &NodeProto,
    rank: Option<usize>,
    ctx: &mut Lowering<'_>,
) -> Result<Vec<NodeProto>, LowerError> {
    let err = |detail: String| LowerError::Node {
        node: node.name.clone(),
        op: node.op_type.clone(),
        detail,
    };
    let (Some(x), Some(y)) = (node.input.first(), node.output.first()) else {
        return Err(err("needs one input and one output".into()));
    };
    let rank = rank.filter(|r| *r >= 3).ok_or_else(|| {
        err(format!(
            "the rank of its input `{x}` is not declared in the graph nor implied by the ops before it"
        ))
    })?;
    let axes: Vec<i64> = (2..rank as i64).collect();
    Ok(vec![ctx.reduce_mean(x.clone(), &axes, y.clone())])
}

/// LayerNormalization(x, gamma, beta) over the last axis as
/// ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div/Mul/Add.
fn layer_norm(node: &NodeProto, ctx: &mut Lowering<'_>) -> Result<Vec<NodeProto>, LowerError> {
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
    let p = format!("lowered_ln{}", ctx.index);
    let eps_name = format!("{p}_eps");
    ctx.inits.push(tensor_f32(&eps_name, &[], &[eps]));
    let x = node.input[0].clone();
    let n = |s: &str| format!("{p}_{s}");
    let mut nodes = vec![
        ctx.reduce_mean(x.clone(), &[-1], n("mean")),
        mk("Sub", vec![x, n("mean")], n("centered"), vec![]),
        mk("Mul", vec![n("centered"), n("centered")], n("sq"), vec![]),
        ctx.reduce_mean(n("sq"), &[-1], n("var")),
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

    #[test]
    fn a_global_average_pool_becomes_a_reduce_mean_over_the_spatial_axes() {
        use handoff_onnx::ElemType;
        use handoff_onnx::builder::{D, GraphBuilder};
        let build = |opset: i64| {
            let mut g = GraphBuilder::new("cnn");
            let x = g.input(
                "x",
                ElemType::F32,
                &[D::Sym("N"), D::Fixed(3), D::Fixed(8), D::Fixed(8)],
            );
            let w = g.init_f32("w", &[4, 3, 3, 3], vec![0.1; 108]);
            let c = g.node("Conv", &[&x, &w], vec![]);
            let r = g.node("Relu", &[&c], vec![]);
            g.node_to("GlobalAveragePool", &[&r], vec![], "y");
            g.output(
                "y",
                ElemType::F32,
                &[D::Sym("N"), D::Fixed(4), D::Fixed(1), D::Fixed(1)],
            );
            g.finish(opset)
        };
        let mut old = build(9);
        assert_eq!(lower_op(&mut old, "GlobalAveragePool").unwrap(), 1);
        let g = old.graph.as_ref().unwrap();
        let rm = g.node.iter().find(|n| n.op_type == "ReduceMean").unwrap();
        let axes = rm.attribute.iter().find(|a| a.name == "axes").unwrap();
        assert_eq!(axes.ints, vec![2, 3]);
        assert_eq!(rm.output, vec!["y".to_owned()]);
        assert!(!old.op_types().contains(&"GlobalAveragePool"));
        // From opset 18 the axes are an input.
        let mut new = build(18);
        lower_op(&mut new, "GlobalAveragePool").unwrap();
        let g = new.graph.as_ref().unwrap();
        let rm = g.node.iter().find(|n| n.op_type == "ReduceMean").unwrap();
        assert_eq!(rm.input.len(), 2);
        assert!(rm.attribute.iter().all(|a| a.name != "axes"));
        let axes = g
            .initializer
            .iter()
            .find(|t| t.name == rm.input[1])
            .unwrap();
        assert_eq!(axes.dims, vec![2]);
    }

    #[test]
    fn a_global_average_pool_of_unknown_rank_is_refused_with_the_reason() {
        use handoff_onnx::ElemType;
        use handoff_onnx::builder::{D, GraphBuilder};
        let mut g = GraphBuilder::new("odd");
        let x = g.input("x", ElemType::F32, &[D::Sym("N"), D::Fixed(4)]);
        let t = g.node("Unsqueeze", &[&x], vec![attr_ints("axes", &[2, 3])]);
        g.node_to("GlobalAveragePool", &[&t], vec![], "y");
        g.output(
            "y",
            ElemType::F32,
            &[D::Sym("N"), D::Fixed(4), D::Fixed(1), D::Fixed(1)],
        );
        let mut m = g.finish(11);
        let err = lower_op(&mut m, "GlobalAveragePool")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank of its input"), "{err}");
        // A malformed node is an error, not a panic.
        m.graph.as_mut().unwrap().node[1].input.clear();
        let err = lower_op(&mut m, "GlobalAveragePool")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs one input and one output"), "{err}");
    }
}
