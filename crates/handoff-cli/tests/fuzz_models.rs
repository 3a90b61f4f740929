//! Truncated, bit-flipped and shape-corrupted ONNX files: model validation
//! and every backend must return an error, never take the process down.

use handoff_backend::{Backend, DType, Device, Fill, ModelRef, PrepareOptions, TensorSpec};
use handoff_onnx::proto::ModelProto;
use handoff_onnx::synthetic::{Kind, SyntheticSpec};
use prost::Message;

use handoff_onnx::rng::SplitMix64 as Rng;

fn mutate(model: &ModelProto, rng: &mut Rng) -> Vec<u8> {
    let mut bytes = model.encode_to_vec();
    match rng.below(3) {
        0 => bytes.truncate(rng.below(bytes.len())),
        1 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
        }
        _ => {
            let mut m = model.clone();
            let g = m.graph.as_mut().unwrap();
            match rng.below(3) {
                0 => {
                    let i = rng.below(g.initializer.len());
                    let t = &mut g.initializer[i];
                    if !t.dims.is_empty() {
                        let d = rng.below(t.dims.len());
                        t.dims[d] = [0, 1, 3, 1 << 20, -1][rng.below(5)];
                    } else {
                        t.dims.push(7);
                    }
                }
                1 => {
                    let i = rng.below(g.node.len());
                    let n = &mut g.node[i];
                    if !n.input.is_empty() {
                        let j = rng.below(n.input.len());
                        n.input[j] = "does_not_exist".into();
                    }
                }
                _ => {
                    let i = rng.below(g.node.len());
                    g.node[i].op_type =
                        ["NoSuchOp", "Conv", "MatMul", "Reshape"][rng.below(4)].into();
                }
            }
            bytes = m.encode_to_vec();
        }
    }
    bytes
}

#[test]
fn a_thousand_mutated_models_are_errors_not_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let backends: Vec<Box<dyn Backend>> = vec![
        Box::new(handoff_ort::OrtBackend),
        Box::new(handoff_tract::TractBackend),
        Box::new(handoff_candle::CandleOnnxBackend),
    ];
    if handoff_ort::provision::locate().is_err() {
        handoff_ort::provision::fetch().expect("fetching libonnxruntime for the test");
    }
    let seeds = [
        (
            SyntheticSpec {
                kind: Kind::Mlp,
                width: 8,
                depth: 1,
                seed: 1,
            }
            .build(),
            vec![2usize, 8],
        ),
        (
            SyntheticSpec {
                kind: Kind::Encoder,
                width: 8,
                depth: 1,
                seed: 2,
            }
            .build(),
            vec![1, 3, 8],
        ),
    ];
    let mut rng = Rng::new(0x0ddba11);
    let (mut rejected, mut backend_errors, mut backend_ok, mut panics) = (0, 0, 0, 0);
    let n = 1000;
    for i in 0..n {
        let (model, shape) = &seeds[i % seeds.len()];
        let bytes = mutate(model, &mut rng);
        let path = dir.path().join(format!("m{i}.onnx"));
        std::fs::write(&path, &bytes).unwrap();
        // The plan validates every model before anything runs.
        let Ok(info) = handoff_onnx::ModelInfo::from_bytes(&path, &bytes) else {
            rejected += 1;
            continue;
        };
        let input = info
            .inputs
            .first()
            .map_or("x".to_owned(), |x| x.name.clone());
        let spec = TensorSpec {
            name: input,
            dtype: DType::F32,
            shape: shape.clone(),
            fill: Fill::Random {
                min: -1.0,
                max: 1.0,
            },
        };
        for b in &backends {
            let options = PrepareOptions {
                device: Device::Cpu,
                threads: if b.name() == "candle-onnx" {
                    threads
                } else {
                    1
                },
                inputs: vec![spec.clone()],
                options: serde_json::Value::Null,
            };
            let model = ModelRef {
                path: path.clone(),
                id: "fuzz".into(),
                hf_dir: None,
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut p = b.prepare(&model, &options)?;
                p.bind(&[spec.generate(1)])?;
                p.run()?;
                p.outputs()
            }));
            match outcome {
                Ok(Ok(_)) => backend_ok += 1,
                Ok(Err(_)) => backend_errors += 1,
                // In a real run this happens in the case's child process.
                Err(_) => panics += 1,
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    println!(
        "fuzzed {n} mutated ONNX files: {rejected} rejected by validation; on the backends {backend_errors} errors, \
         {backend_ok} ran (mutation left them valid), {panics} panics caught in-process (a child process in real runs); \
         the process survived every one"
    );
    // All three outcomes occur: files the validator rejects, files a
    // backend refuses with an error, and files that still run (so the
    // backends were really exercised, not skipped).
    assert!(
        rejected > 0 && backend_errors > 0 && backend_ok > 0,
        "{rejected} rejected, {backend_errors} errors, {backend_ok} ran"
    );
    // A panic is survivable (real runs keep each case in a child process)
    // but must stay the exception, not the way a backend says no.
    assert!(
        panics * 10 <= backend_errors + backend_ok,
        "{panics} panics against {backend_errors} errors and {backend_ok} runs"
    );
}
