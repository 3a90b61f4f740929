//! `handoff init` on five differently shaped models: the suites it writes
//! validate unchanged and run, and no case claims a batch the model did
//! not run.

mod common;

use std::path::Path;

use common::handoff;
use handoff_onnx::ElemType;
use handoff_onnx::builder::{D, GraphBuilder, write_model};
use handoff_runner::{Status, read_results};

fn relu_each(g: &mut GraphBuilder, inputs: &[(&str, &[D])]) {
    for (i, (name, dims)) in inputs.iter().enumerate() {
        let x = g.input(name, ElemType::F32, dims);
        let out = format!("y{i}");
        g.node_to("Relu", &[&x], vec![], &out);
        g.output(&out, ElemType::F32, dims);
    }
}

/// The five shapes of model a user brings, written into `dir`.
fn models(dir: &Path) {
    // A CNN exported with a fixed batch of 1.
    let mut g = GraphBuilder::new("cnn");
    relu_each(
        &mut g,
        &[(
            "image",
            &[D::Fixed(1), D::Fixed(3), D::Fixed(8), D::Fixed(8)],
        )],
    );
    write_model(&g.finish(13), &dir.join("cnn.onnx")).unwrap();
    // An encoder with an exporter's dim names.
    let mut g = GraphBuilder::new("enc");
    relu_each(
        &mut g,
        &[(
            "features",
            &[
                D::Sym("batch_size"),
                D::Sym("sequence_length"),
                D::Fixed(16),
            ],
        )],
    );
    write_model(&g.finish(13), &dir.join("encoder.onnx")).unwrap();
    // Token ids into an embedding table, a mask and token types.
    let mut g = GraphBuilder::new("bert");
    let bs = [D::Sym("batch"), D::Sym("seq")];
    let ids = g.input("input_ids", ElemType::I64, &bs);
    let mask = g.input("attention_mask", ElemType::I64, &bs);
    let types = g.input("token_type_ids", ElemType::I64, &bs);
    let table = g.init_f32("word_embeddings", &[50, 4], vec![0.5; 200]);
    g.node_to("Gather", &[&table, &ids], vec![], "emb");
    g.output(
        "emb",
        ElemType::F32,
        &[D::Sym("batch"), D::Sym("seq"), D::Fixed(4)],
    );
    let to_f32 = vec![handoff_onnx::builder::attr_int("to", 1)];
    g.node_to("Cast", &[&mask], to_f32.clone(), "mask_f");
    g.output("mask_f", ElemType::F32, &bs);
    g.node_to("Cast", &[&types], to_f32, "types_f");
    g.output("types_f", ElemType::F32, &bs);
    write_model(&g.finish(13), &dir.join("bert.onnx")).unwrap();
    // A scalar input beside the batch.
    let mut g = GraphBuilder::new("scale");
    let x = g.input("x", ElemType::F32, &[D::Sym("N"), D::Fixed(4)]);
    let k = g.input("gain", ElemType::F32, &[]);
    g.node_to("Mul", &[&x, &k], vec![], "y");
    g.output("y", ElemType::F32, &[D::Sym("N"), D::Fixed(4)]);
    write_model(&g.finish(13), &dir.join("scalar.onnx")).unwrap();
    // A recurrent state [layers, batch, hidden] beside the step input.
    let mut g = GraphBuilder::new("rnn");
    let x = g.input("x", ElemType::F32, &[D::Sym("batch"), D::Fixed(8)]);
    let h = g.input(
        "state",
        ElemType::F32,
        &[D::Fixed(2), D::Sym("batch"), D::Fixed(8)],
    );
    g.node_to("Add", &[&h, &x], vec![], "h_next");
    g.output(
        "h_next",
        ElemType::F32,
        &[D::Fixed(2), D::Sym("batch"), D::Fixed(8)],
    );
    write_model(&g.finish(13), &dir.join("state.onnx")).unwrap();
}

#[test]
fn init_writes_suites_that_validate_and_run_for_five_kinds_of_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("models")).unwrap();
    std::fs::create_dir_all(d.join("suites")).unwrap();
    models(&d.join("models"));
    for name in ["cnn", "encoder", "bert", "scalar", "state"] {
        let suite = format!("suites/{name}.yaml");
        let o = handoff(
            &["init", &format!("models/{name}.onnx"), "--out", &suite],
            d,
        );
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = std::fs::read_to_string(d.join(&suite)).unwrap();
        // It names the model relative to itself, and says what it guessed.
        assert!(
            text.contains(&format!("source: {{onnx: ../models/{name}.onnx}}")),
            "{text}"
        );
        let o = handoff(&["validate", &suite], d);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{name}:\n{text}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Short measurements, two backends: the run itself is the check.
        let quick = text
            .replace("backends: [", "backends: [ort, tract] # was: [")
            .replace("min_time: 1s", "min_time: 20ms")
            .replace("max_time: 3s", "max_time: 100ms")
            .replace("warmup: 300ms", "warmup: 10ms")
            .replace("threads: [1, 2]", "threads: [1]")
            .replace("measure:\n", "measure:\n  processes: 1\n  rounds: 5\n");
        std::fs::write(d.join(&suite), &quick).unwrap();
        let out = format!("out-{name}");
        let o = handoff(&["run", &suite, "--out", &out, "--quiet"], d);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let records = read_results(&d.join(&out).join("results.jsonl"))
            .unwrap()
            .records;
        assert!(!records.is_empty(), "{name}");
        for r in &records {
            assert_eq!(r.status, Status::Ok, "{name} {}: {:?}", r.case.id, r.reason);
        }
        let batches: Vec<u32> = records.iter().map(|r| r.case.batch).collect();
        match name {
            // Fixed at 1 by the model: never a b8 case.
            "cnn" => {
                assert!(batches.iter().all(|b| *b == 1), "{batches:?}");
                assert!(text.contains("batch: [1] "), "{text}");
            }
            _ => assert!(batches.contains(&8), "{name}: {batches:?}"),
        }
        match name {
            "encoder" => {
                assert!(
                    text.contains("shape: [batch, sequence_length, 16]"),
                    "{text}"
                );
                assert!(text.contains("sequence_length: [128]"), "{text}");
            }
            "bert" => {
                assert!(
                    text.contains("fill: {random_int: {min: 0, max: 50}}"),
                    "{text}"
                );
                assert!(
                    text.contains(
                        "name: attention_mask, dtype: i64, shape: [batch, seq], fill: {constant: 1}"
                    ),
                    "{text}"
                );
                assert!(
                    text.contains(
                        "name: token_type_ids, dtype: i64, shape: [batch, seq], fill: {constant: 0}"
                    ),
                    "{text}"
                );
            }
            "scalar" => {
                assert!(text.contains("CHECK: a scalar input"), "{text}");
                assert!(text.contains("shape: [], fill: {constant: 1}"), "{text}");
            }
            "state" => {
                assert!(
                    text.contains("shape: [2, batch, 8], fill: {constant: 0}"),
                    "{text}"
                );
                assert!(text.contains("recurrent or cached state"), "{text}");
            }
            _ => {}
        }
    }
    // An existing file is kept unless --force.
    let o = handoff(&["init", "models/cnn.onnx", "--out", "suites/cnn.yaml"], d);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("pass --force"));
}

#[test]
fn init_on_an_hf_directory_writes_a_text_suite_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    let bert = dir.path().join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 16, 1, 2, 3).unwrap();
    common::write_tokenizer(&bert);
    let o = handoff(&["init", "bert", "--out", "s.yaml"], dir.path());
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(dir.path().join("s.yaml")).unwrap();
    assert!(text.contains("source: {hf: bert}"), "{text}");
    // tiny BERT has 64 positions: the suite's seq fits them.
    assert!(text.contains("seq: [64]"), "{text}");
    let o = handoff(&["validate", "s.yaml"], dir.path());
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("/candle-native/"));
}
