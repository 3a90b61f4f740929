//! Variants built through the plan's tools, on real ONNX Runtime: where the
//! file goes, the accuracy gate, and the cache.

use std::path::Path;
use std::sync::Arc;

use handoff_backend::{DType, Fill, Registry, TensorSpec};
use handoff_onnx::synthetic::{Kind, SyntheticSpec};
use handoff_prepare::{PrepareError, Tools};
use handoff_suite::ModelTools;

fn ensure_ort() {
    handoff_ort::provision::fetch().expect("libonnxruntime from PyPI");
}

fn tools(cache: &Path) -> Tools {
    Tools {
        registry: Arc::new(Registry::new().with(Box::new(handoff_ort::OrtBackend))),
        model_cache: cache.to_owned(),
        ensure_ort,
    }
}

/// The provenance step `name` of the variant at `path`.
fn step_of(path: &Path, name: &str) -> handoff_convert::provenance::Step {
    handoff_convert::provenance::Provenance::load(path)
        .unwrap()
        .steps
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {}'s provenance", path.display()))
}

fn mlp(dir: &Path) -> std::path::PathBuf {
    let spec = SyntheticSpec {
        kind: Kind::Mlp,
        width: 256,
        depth: 3,
        seed: 1,
    };
    let path = dir.join("mlp.onnx");
    handoff_onnx::builder::write_model(&spec.build(), &path).unwrap();
    path
}

fn inputs(batch: usize) -> Vec<TensorSpec> {
    vec![TensorSpec {
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![batch, 256],
        fill: Fill::Random {
            min: -1.0,
            max: 1.0,
        },
    }]
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn a_variant_of_a_file_outside_the_cache_is_built_under_derived_gated_and_reused() {
    let outside = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let model = mlp(outside.path());
    let tools = tools(cache.path());
    let (specs, calibration) = (inputs(4), inputs(4));

    assert!(
        tools
            .cached_variant(&model, "int8-dynamic", 0.99, &specs)
            .is_none(),
        "nothing is built yet"
    );
    let v = tools
        .make_variant(&model, None, "int8-dynamic", 0.99, &specs, &calibration)
        .unwrap();
    assert!(
        v.path.starts_with(cache.path().join("derived")),
        "{}",
        v.path.display()
    );
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        1,
        "nothing written beside the model"
    );
    assert!(v.accuracy.passed, "{:?}", v.accuracy);
    assert!(v.accuracy.min_cosine > 0.99 && v.accuracy.min_cosine <= 1.0);
    assert!(std::fs::metadata(&v.path).unwrap().len() < std::fs::metadata(&model).unwrap().len());

    // Described from the cache without running anything, and reused.
    let cached = tools
        .cached_variant(&model, "int8-dynamic", 0.99, &specs)
        .expect("the built variant is in the cache");
    assert_eq!(cached.path, v.path);
    let before = mtime(&v.path);
    let again = tools
        .make_variant(&model, None, "int8-dynamic", 0.99, &specs, &calibration)
        .unwrap();
    assert_eq!(
        (again.path.clone(), mtime(&again.path)),
        (v.path.clone(), before)
    );

    // Other check inputs or another gate are another request.
    assert!(
        tools
            .cached_variant(&model, "int8-dynamic", 0.99, &inputs(2))
            .is_none()
    );
    assert!(
        tools
            .cached_variant(&model, "int8-dynamic", 0.995, &specs)
            .is_none()
    );
}

#[test]
fn an_unknown_variant_and_a_missing_backend_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = mlp(dir.path());
    let tools = tools(dir.path());
    let err = tools
        .variant(&model, None, "int3", 0.99, &inputs(1), &inputs(1))
        .unwrap_err();
    assert!(
        matches!(&err, PrepareError::UnknownVariant { name, .. } if name == "int3"),
        "{err}"
    );
    assert!(err.to_string().contains("known: "), "{err}");
    let err = tools.lower(&model, "tract", &inputs(1)).unwrap_err();
    assert_eq!(err.to_string(), "backend tract is not in this build");
}

#[test]
fn the_quantiser_environment_lock_was_written_from_its_pins() {
    let spec = handoff_prepare::QUANT_ENV;
    assert_eq!(spec.lock_drift(), None);
    assert!(spec.platforms().contains(&"cp311-x86_64"));
}

#[test]
fn onnx_runtimes_own_quantiser_runs_from_its_locked_environment_and_is_gated() {
    let dir = tempfile::tempdir().unwrap();
    let model = mlp(dir.path());
    let tools = tools(dir.path());
    let v = tools
        .variant(
            &model,
            None,
            "ort-int8-dynamic",
            0.99,
            &inputs(4),
            &inputs(4),
        )
        .unwrap();
    assert!(v.accuracy.passed, "{:?}", v.accuracy);
    assert!(std::fs::metadata(&v.path).unwrap().len() < std::fs::metadata(&model).unwrap().len());
    let step = step_of(&v.path, "quantize:ort-int8-dynamic");
    assert_eq!(
        step.params["tool"],
        "onnxruntime.quantization.quantize_dynamic"
    );
}

/// x -> MatMul -> h -> MatMul (a down-projection) -> y -> MatMul -> z, where
/// `wide` of h's channels are 200x the others: h's one per-tensor int8
/// scale leaves the other channels a level or two, and smoothing does not
/// touch a down-projection's input. One such channel is split off as an
/// outlier; sixteen are too many for that.
fn outlier_model(dir: &Path, wide: usize) -> std::path::PathBuf {
    use handoff_onnx::builder::{D, GraphBuilder};
    use handoff_onnx::inspect::ElemType;
    let mut seed = 7u64;
    let mut draw = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    };
    // Columns 0..wide of w1 (so channels 0..wide of h) are large, and rows
    // 0..wide of w2 small, so the large channels add little to y.
    let mut w1 = draw(256 * 256, 0.1);
    for (i, v) in w1.iter_mut().enumerate() {
        if i % 256 < wide {
            *v *= 200.0;
        }
    }
    let mut w2 = draw(256 * 64, 0.1);
    w2[..wide * 64].iter_mut().for_each(|v| *v *= 0.001);
    let w3 = draw(64 * 64, 0.1);
    let mut g = GraphBuilder::new("outlier");
    let x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Fixed(256)]);
    let w1 = g.init_f32("w1", &[256, 256], w1);
    let w2 = g.init_f32("w2", &[256, 64], w2);
    let w3 = g.init_f32("w3", &[64, 64], w3);
    g.node_to("MatMul", &[&x, &w1], vec![], "h");
    g.node_to("MatMul", &["h", &w2], vec![], "y");
    g.node_to("MatMul", &["y", &w3], vec![], "z");
    g.output("z", ElemType::F32, &[D::Sym("batch"), D::Fixed(64)]);
    let path = dir.join("outlier.onnx");
    handoff_onnx::builder::write_model(&g.finish(17), &path).unwrap();
    path
}

#[test]
fn one_outlier_channel_is_split_off_and_every_matmul_stays_int8() {
    let dir = tempfile::tempdir().unwrap();
    let model = outlier_model(dir.path(), 1);
    let (specs, calibration) = (inputs(16), inputs(16));
    let v = tools(dir.path())
        .make_variant(&model, None, "int8-dynamic", 0.99, &specs, &calibration)
        .unwrap();
    assert!(v.accuracy.passed, "{:?}", v.accuracy);
    assert_eq!(
        v.kept_fp32.as_deref(),
        Some("1 outlier channel of 1 MatMul multiplied in fp32 beside the int8 product")
    );
    let step = step_of(&v.path, "quantize:int8-dynamic");
    let split = &step.params["outlier_split"]["activations"];
    assert_eq!(split[0]["activation"], "h", "{split}");
    assert_eq!(split[0]["channels"], serde_json::json!([0]), "{split}");
    assert_eq!(
        split[0]["matmuls"],
        serde_json::json!(["y_node"]),
        "{split}"
    );
    assert_eq!(step.params["report"]["quantized"]["MatMul"], 3, "{step:?}");
    // Without the split, the same model misses the gate with every MatMul
    // in int8 and keeps the down-projection in fp32.
    let mut request = handoff_prepare::VariantRequest::new("int8-dynamic", 0.99);
    request.dynamic.split_outliers = None;
    let unsplit = dir.path().join("unsplit.onnx");
    let registry = tools(dir.path()).registry;
    let gated =
        handoff_prepare::build_variant(&registry, &model, &unsplit, &request, &specs, &calibration)
            .unwrap();
    assert!(gated.check.passed, "{:?}", gated.check);
    let step = step_of(&unsplit, "quantize:int8-dynamic");
    assert!(step.params["outlier_split"].is_null(), "{step:?}");
    assert!(step.params["sensitivity"]["all_int8"].as_f64().unwrap() < 0.99);
    assert_eq!(
        step.params["sensitivity"]["chosen"],
        serde_json::json!(["y_node"])
    );
}

#[test]
fn an_int8_model_below_its_gate_keeps_only_the_matmul_that_costs_the_accuracy_in_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let model = outlier_model(dir.path(), 16);
    let tools = tools(dir.path());
    let (specs, calibration) = (inputs(16), inputs(16));
    let v = tools
        .make_variant(&model, None, "int8-dynamic", 0.99, &specs, &calibration)
        .unwrap();
    assert!(v.accuracy.passed, "{:?}", v.accuracy);
    let note = Some("1 of 3 MatMuls kept fp32 for accuracy (measured)".to_owned());
    assert_eq!(v.kept_fp32, note);

    let step = step_of(&v.path, "quantize:int8-dynamic");
    assert_eq!(
        step.params["options"]["exclude"],
        serde_json::json!(["y_node"])
    );
    assert_eq!(
        step.params["report"]["skipped"],
        serde_json::json!(["y_node (MatMul): excluded"])
    );
    let found = &step.params["sensitivity"];
    assert_eq!(found["chosen"], serde_json::json!(["y_node"]));
    let ranked = found["ranked"].as_array().unwrap();
    assert_eq!(ranked.len(), 3, "{found}");
    assert_eq!(ranked[0][0], "y_node", "{found}");
    let all_int8 = found["all_int8"].as_f64().unwrap();
    assert!(all_int8 < 0.99, "{found}");
    // The other two MatMuls in fp32 would not have helped.
    for r in &ranked[1..] {
        assert!(r[1].as_f64().unwrap() < 0.99, "{found}");
    }
    assert!(
        found["inputs"].as_str().unwrap().contains("seed 1"),
        "measured on the calibration inputs, not the check's: {found}"
    );

    // The stand-in answers for the request that failed, without measuring again.
    let before = mtime(&v.path);
    let cached = tools
        .cached_variant(&model, "int8-dynamic", 0.99, &specs)
        .expect("the fallback build is in the cache");
    assert_eq!((&cached.path, &cached.kept_fp32), (&v.path, &note));
    let again = tools
        .make_variant(&model, None, "int8-dynamic", 0.99, &specs, &calibration)
        .unwrap();
    assert_eq!(mtime(&again.path), before);
    assert!(again.accuracy.passed);
    assert_eq!(again.kept_fp32, note);
}
