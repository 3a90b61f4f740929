//! FLOPs per inference, from tract's cost model: the graph is typed at the
//! case's concrete input shapes and every node's multiply-adds are summed
//! (MatMul, Gemm, Conv, EinSum; element-wise work is not counted, as in
//! any roofline of a compute-bound model).

use std::path::Path;

use handoff_backend::TensorSpec;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::Cost;

/// Why a model's FLOPs could not be counted.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error("{}: {detail}", path.display())]
    Tract {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("{}: no shape for input `{name}`", path.display())]
    NoShape {
        path: std::path::PathBuf,
        name: String,
    },
    #[error(
        "{}: {dtype} multiply-adds (node {node}) are not comparable with a floating-point peak",
        path.display()
    )]
    IntegerMultiplyAdds {
        path: std::path::PathBuf,
        dtype: String,
        node: String,
    },
    #[error("{}: a symbolic FLOP count ({count})", path.display())]
    Symbolic {
        path: std::path::PathBuf,
        count: String,
    },
}

/// 2 x multiply-adds of one inference on inputs of these shapes; an error
/// for graphs with integer multiply-adds (quantised models).
pub fn flops(path: &Path, inputs: &[TensorSpec]) -> Result<f64, CostError> {
    let e = |e: TractError| CostError::Tract {
        path: path.to_owned(),
        detail: format!("{e:#}"),
    };
    let mut model = tract_onnx::onnx().model_for_path(path).map_err(e)?;
    let outlets = model.input_outlets().map_err(e)?.to_vec();
    for (i, outlet) in outlets.iter().enumerate() {
        let name = model.node(outlet.node).name.clone();
        let spec = inputs
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| CostError::NoShape {
                path: path.to_owned(),
                name: name.clone(),
            })?;
        let dt = crate::datum_type(spec.dtype);
        model = model
            .with_input_fact(i, InferenceFact::dt_shape(dt, spec.shape.iter().copied()))
            .map_err(e)?;
    }
    let typed = model
        .into_typed()
        .map_err(e)?
        .into_decluttered()
        .map_err(e)?;
    let mut fma = 0i64;
    for id in typed.eval_order().map_err(e)? {
        let node = typed.node(id);
        let facts = typed.node_input_facts(id).map_err(e)?;
        for (cost, count) in node.op.cost(&facts).map_err(e)? {
            if let Cost::FMA(dt) = cost {
                // An int8 graph's multiply-adds are not floating-point
                // operations: set against an f32 peak they would read as
                // more than 100% of the machine.
                if !dt.is_float() {
                    return Err(CostError::IntegerMultiplyAdds {
                        path: path.to_owned(),
                        dtype: format!("{dt:?}"),
                        node: node.name.clone(),
                    });
                }
                fma += count.to_i64().map_err(|_| CostError::Symbolic {
                    path: path.to_owned(),
                    count: count.to_string(),
                })?;
            }
        }
    }
    Ok(2.0 * fma as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_backend::{DType, Fill};
    use handoff_onnx::synthetic::{Kind, SyntheticSpec};

    #[test]
    fn counts_the_matmuls_of_a_generated_mlp() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SyntheticSpec {
            kind: Kind::Mlp,
            width: 64,
            depth: 2,
            seed: 1,
        };
        let path = dir.path().join("mlp.onnx");
        handoff_onnx::builder::write_model(&spec.build(), &path).unwrap();
        let info = handoff_onnx::ModelInfo::load(&path).unwrap();
        let input = &info.inputs[0];
        let width = match input.dims.as_ref().unwrap()[1] {
            handoff_onnx::Dim::Fixed(w) => w as usize,
            ref other => panic!("{other:?}"),
        };
        let at = |batch: usize| {
            flops(
                &path,
                &[TensorSpec {
                    name: input.name.clone(),
                    dtype: DType::F32,
                    shape: vec![batch, width],
                    fill: Fill::Constant(0.0),
                }],
            )
            .unwrap()
        };
        // Linear in the batch, and 2 x the weights' element count per row:
        // every weight is one multiply-add per row.
        let one = at(1);
        assert_eq!(at(8), 8.0 * one);
        assert!(one >= 2.0 * (64.0 * 64.0), "{one}");
        assert!((one / 2.0).fract() == 0.0);
    }
}
