//! Exact rewrites that put graphs from other exporters (torch.onnx,
//! optimum, tf2onnx, the model zoo) in the form the quantiser reads: a
//! weight is a 2-D float initializer that a `MatMul` reads as its second
//! input. Exporters also write a weight as a `Constant` node, behind a
//! `Transpose`, or as a `Gemm` (a `Linear` on 2-D input: `transB = 1`);
//! each is rewritten here without changing what the graph computes (up to
//! float rounding of `alpha`/`beta` folded into constants). Anything else
//! is left as it is, and the quantiser names what it left in fp32.

use std::collections::{BTreeSet, HashMap};

use handoff_onnx::builder::{named_node as node, tensor_f32};
use handoff_onnx::inspect::ElemType;
use handoff_onnx::proto::{GraphProto, ModelProto, NodeProto, TensorProto};

use crate::quantize::{QuantError, f32_values};

/// The default-domain opset `model` imports (ONNX's default, 1, when it
/// names none).
pub fn opset(model: &ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(1, |o| o.version)
}

/// Rewrites `model` so that every float weight of at least `min_elements`
/// values that a `MatMul` or `Gemm` multiplies by is an initializer read by
/// a `MatMul`. Returns one line per rewrite, for the provenance. Errors
/// leave the model unchanged.
pub fn for_int8(model: &mut ModelProto, min_elements: usize) -> Result<Vec<String>, QuantError> {
    let graph = model.graph.as_ref().ok_or(QuantError::NoGraph)?;
    let mut g = graph.clone();
    let mut done = Vec::new();
    let mut replaced = BTreeSet::new();
    lift_constants(&mut g, min_elements, &mut done);
    fold_transposes(&mut g, min_elements, &mut done, &mut replaced)?;
    gemm_to_matmul(&mut g, min_elements, &mut done, &mut replaced)?;
    if !done.is_empty() {
        drop_replaced(&mut g, &replaced);
        model.graph = Some(g);
    }
    Ok(done)
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a handoff_onnx::proto::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// Each initializer's position, by name.
pub(crate) fn initializer_index(g: &GraphProto) -> HashMap<String, usize> {
    g.initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect()
}

/// `scale * v^T` of a row-major `rows x cols` matrix, row-major `cols x rows`.
fn transposed(v: &[f32], rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    (0..rows * cols)
        .map(|k| scale * v[(k % rows) * cols + k / rows])
        .collect()
}

fn is_float_of(t: &TensorProto, min_elements: usize) -> bool {
    t.data_type == ElemType::F32.onnx_code()
        && t.dims.iter().product::<i64>() as usize >= min_elements
}

/// `Constant` nodes holding a large float tensor become initializers of
/// the same name.
fn lift_constants(g: &mut GraphProto, min_elements: usize, done: &mut Vec<String>) {
    let mut kept = Vec::with_capacity(g.node.len());
    for n in std::mem::take(&mut g.node) {
        let value = (n.op_type == "Constant" && n.domain.is_empty() && n.output.len() == 1)
            .then(|| attr(&n, "value").and_then(|a| a.t.clone()))
            .flatten()
            .filter(|t| is_float_of(t, min_elements));
        match value {
            Some(mut t) => {
                t.name = n.output[0].clone();
                done.push(format!("Constant `{}` -> initializer", t.name));
                g.initializer.push(t);
            }
            None => kept.push(n),
        }
    }
    g.node = kept;
}

/// `Transpose` (2-D, perm [1, 0]) of a large float initializer becomes the
/// transposed initializer, named as the Transpose's output.
fn fold_transposes(
    g: &mut GraphProto,
    min_elements: usize,
    done: &mut Vec<String>,
    replaced: &mut BTreeSet<String>,
) -> Result<(), QuantError> {
    let inits = initializer_index(g);
    let mut added = Vec::new();
    let mut kept = Vec::with_capacity(g.node.len());
    for n in std::mem::take(&mut g.node) {
        let w = (n.op_type == "Transpose" && n.domain.is_empty() && n.output.len() == 1)
            .then(|| n.input.first().and_then(|x| inits.get(x)))
            .flatten()
            .map(|&i| &g.initializer[i])
            .filter(|t| t.dims.len() == 2 && is_float_of(t, min_elements));
        let perm_ok = attr(&n, "perm").is_none_or(|a| a.ints == [1, 0]);
        match w {
            Some(w) if perm_ok => {
                let (rows, cols) = (w.dims[0] as usize, w.dims[1] as usize);
                let t = transposed(&f32_values(w)?, rows, cols, 1.0);
                done.push(format!(
                    "Transpose of `{}` folded into `{}`",
                    w.name, n.output[0]
                ));
                replaced.insert(w.name.clone());
                added.push(tensor_f32(&n.output[0], &[cols as i64, rows as i64], &t));
            }
            _ => kept.push(n),
        }
    }
    g.node = kept;
    g.initializer.extend(added);
    Ok(())
}

/// `Gemm(A, B, C)` with a large float initializer `B` and `transA = 0`
/// becomes `MatMul(A, alpha * op(B))`, then `Add(., beta * C)` when there
/// is a `C`. A `C` that is not an initializer with `beta != 1` is left.
fn gemm_to_matmul(
    g: &mut GraphProto,
    min_elements: usize,
    done: &mut Vec<String>,
    replaced: &mut BTreeSet<String>,
) -> Result<(), QuantError> {
    let inits = initializer_index(g);
    let taken: BTreeSet<String> = g
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .chain(g.node.iter().flat_map(|n| n.output.iter().cloned()))
        .collect();
    let fresh = |base: String| {
        let mut name = base.clone();
        let mut k = 1;
        while taken.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        name
    };
    let mut added = Vec::new();
    let mut out = Vec::with_capacity(g.node.len());
    for n in std::mem::take(&mut g.node) {
        let int = |name: &str, default: i64| attr(&n, name).map_or(default, |a| a.i);
        let float = |name: &str| attr(&n, name).map_or(1.0, |a| a.f);
        let b = (n.op_type == "Gemm" && n.domain.is_empty() && int("transA", 0) == 0)
            .then(|| n.input.get(1).and_then(|x| inits.get(x)))
            .flatten()
            .map(|&i| &g.initializer[i])
            .filter(|t| t.dims.len() == 2 && is_float_of(t, min_elements));
        let c = n
            .input
            .get(2)
            .filter(|c| !c.is_empty())
            .map(|c| (c, inits.get(c).map(|&i| &g.initializer[i])));
        let (alpha, beta) = (float("alpha"), float("beta"));
        let (Some(b), true) = (
            b,
            c.as_ref().is_none_or(|(_, t)| t.is_some() || beta == 1.0),
        ) else {
            out.push(n);
            continue;
        };
        let (rows, cols) = (b.dims[0] as usize, b.dims[1] as usize);
        let v = f32_values(b)?;
        let (w, dims) = if int("transB", 0) == 1 {
            (
                transposed(&v, rows, cols, alpha),
                [cols as i64, rows as i64],
            )
        } else {
            (
                v.iter().map(|x| alpha * x).collect(),
                [rows as i64, cols as i64],
            )
        };
        let label = if n.name.is_empty() {
            n.output[0].clone()
        } else {
            n.name.clone()
        };
        let w_name = fresh(format!("{label}_weight"));
        added.push(tensor_f32(&w_name, &dims, &w));
        let y = n.output[0].clone();
        match c {
            None => out.push(node(
                "MatMul",
                label.clone(),
                &[&n.input[0], &w_name],
                &[&y],
                vec![],
            )),
            Some((c_name, c_init)) => {
                let mm = fresh(format!("{label}_matmul"));
                out.push(node(
                    "MatMul",
                    label.clone(),
                    &[&n.input[0], &w_name],
                    &[&mm],
                    vec![],
                ));
                let c_name = match c_init.filter(|_| beta != 1.0) {
                    Some(t) => {
                        replaced.insert(t.name.clone());
                        let scaled: Vec<f32> = f32_values(t)?.iter().map(|x| beta * x).collect();
                        let name = fresh(format!("{label}_bias"));
                        added.push(tensor_f32(&name, &t.dims, &scaled));
                        name
                    }
                    None => c_name.clone(),
                };
                out.push(node(
                    "Add",
                    format!("{label}_add"),
                    &[&mm, &c_name],
                    &[&y],
                    vec![],
                ));
            }
        }
        replaced.insert(b.name.clone());
        done.push(format!("Gemm `{label}` -> MatMul + Add"));
    }
    g.node = out;
    g.initializer.extend(added);
    Ok(())
}

/// Removes the initializers in `replaced` that nothing reads any more, in
/// this graph or a subgraph (an `If` branch may read an outer weight).
/// Older exporters list every initializer as a graph input too (IR < 4, or
/// `keep_initializers_as_inputs`): such an input goes with its initializer,
/// or a caller would have to feed it.
pub(crate) fn drop_replaced(g: &mut GraphProto, replaced: &BTreeSet<String>) {
    fn reads(g: &GraphProto, into: &mut BTreeSet<String>) {
        for n in &g.node {
            into.extend(n.input.iter().cloned());
            for a in &n.attribute {
                for sub in a.g.iter().map(|b| &**b).chain(a.graphs.iter()) {
                    reads(sub, into);
                }
            }
        }
        into.extend(g.output.iter().map(|o| o.name.clone()));
    }
    let mut read = BTreeSet::new();
    reads(g, &mut read);
    let gone: BTreeSet<&String> = replaced.iter().filter(|r| !read.contains(*r)).collect();
    g.initializer.retain(|t| !gone.contains(&t.name));
    g.input.retain(|i| !gone.contains(&i.name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_onnx::builder::{D, GraphBuilder, attr_float, attr_int, attr_ints};

    fn values(m: &ModelProto, name: &str) -> Vec<f32> {
        let t = m
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no initializer `{name}`"));
        f32_values(t).unwrap()
    }

    fn ops(m: &ModelProto) -> Vec<&str> {
        m.graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type.as_str())
            .collect()
    }

    #[test]
    fn gemm_with_trans_b_alpha_and_beta_becomes_matmul_and_add() {
        let mut g = GraphBuilder::new("gemm");
        let x = g.input("x", ElemType::F32, &[D::Sym("n"), D::Fixed(3)]);
        // B is [out 2, in 3] with transB = 1.
        let b = g.init_f32("b", &[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let c = g.init_f32("c", &[2], vec![10.0, 20.0]);
        g.node_to(
            "Gemm",
            &[&x, &b, &c],
            vec![
                attr_int("transB", 1),
                attr_float("alpha", 2.0),
                attr_float("beta", 0.5),
            ],
            "y",
        );
        g.output("y", ElemType::F32, &[D::Sym("n"), D::Fixed(2)]);
        let mut m = g.finish(13);
        let done = for_int8(&mut m, 1).unwrap();
        assert_eq!(done, ["Gemm `y_node` -> MatMul + Add"]);
        assert_eq!(ops(&m), ["MatMul", "Add"]);
        // alpha * B^T, [in 3, out 2].
        assert_eq!(
            values(&m, "y_node_weight"),
            [2.0, 8.0, 4.0, 10.0, 6.0, 12.0]
        );
        assert_eq!(values(&m, "y_node_bias"), [5.0, 10.0]);
        let graph = m.graph.as_ref().unwrap();
        assert!(graph.initializer.iter().all(|t| t.name != "b"), "B dropped");
        // The output keeps its name.
        assert_eq!(graph.node[1].output, ["y"]);
    }

    #[test]
    fn constant_weights_and_transposed_initializers_become_plain_initializers() {
        let mut g = GraphBuilder::new("exporter");
        let x = g.input("x", ElemType::F32, &[D::Sym("n"), D::Fixed(2)]);
        // An older exporter: the weight is also listed as a graph input.
        g.input("w", ElemType::F32, &[D::Fixed(3), D::Fixed(2)]);
        let w = g.init_f32("w", &[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let wt = g.node("Transpose", &[&w], vec![attr_ints("perm", &[1, 0])]);
        let h = g.node("MatMul", &[&x, &wt], vec![]);
        let mut m = g.finish(13);
        let graph = m.graph.as_mut().unwrap();
        graph.node.push(node(
            "Constant",
            "k".into(),
            &[],
            &["k_out"],
            vec![handoff_onnx::proto::AttributeProto {
                name: "value".into(),
                r#type: handoff_onnx::proto::attribute_type::TENSOR,
                t: Some(tensor_f32("", &[3, 1], &[1.0, 0.0, -1.0])),
                ..Default::default()
            }],
        ));
        graph
            .node
            .push(node("MatMul", "m2".into(), &[&h, "k_out"], &["y"], vec![]));
        let done = for_int8(&mut m, 1).unwrap();
        assert_eq!(
            done,
            [
                "Constant `k_out` -> initializer",
                "Transpose of `w` folded into `transpose_1`"
            ]
        );
        assert_eq!(ops(&m), ["MatMul", "MatMul"]);
        assert_eq!(values(&m, "transpose_1"), [1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        assert_eq!(values(&m, "k_out"), [1.0, 0.0, -1.0]);
        let graph = m.graph.as_ref().unwrap();
        assert!(graph.initializer.iter().all(|t| t.name != "w"));
        assert_eq!(
            graph
                .input
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            ["x"],
            "the dropped weight is no longer an input"
        );
    }

    #[test]
    fn what_cannot_be_rewritten_exactly_is_left_alone() {
        let mut g = GraphBuilder::new("left");
        let x = g.input("x", ElemType::F32, &[D::Fixed(3), D::Sym("n")]);
        let c_in = g.input("c", ElemType::F32, &[D::Fixed(2)]);
        let b = g.init_f32("b", &[3, 2], vec![1.0; 6]);
        // transA = 1, and a runtime C with beta != 1.
        let y1 = g.node("Gemm", &[&x, &b], vec![attr_int("transA", 1)]);
        let y2 = g.node("Gemm", &[&y1, &b, &c_in], vec![attr_float("beta", 2.0)]);
        // A 3-D permutation is not a weight transpose.
        let w3 = g.init_f32("w3", &[1, 2, 2], vec![1.0; 4]);
        g.node("Transpose", &[&w3], vec![attr_ints("perm", &[0, 2, 1])]);
        g.output(&y2, ElemType::F32, &[D::Sym("n"), D::Fixed(2)]);
        let mut m = g.finish(13);
        let before = m.clone();
        assert!(for_int8(&mut m, 1).unwrap().is_empty());
        assert_eq!(m, before);
    }

    #[test]
    fn the_opset_is_the_default_domains() {
        let m = GraphBuilder::new("o").finish(12);
        assert_eq!(opset(&m), 12);
        assert_eq!(opset(&ModelProto::default()), 1);
    }
}
