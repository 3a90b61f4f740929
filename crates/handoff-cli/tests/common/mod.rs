//! What the CLI test files share: running the built `handoff` binary.
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;
use std::process::{Command, Output};

use handoff_onnx::ElemType;
use handoff_onnx::builder::{D, GraphBuilder, write_model};
use handoff_runner::{ResultRecord, read_results};

/// `handoff ARGS` in `dir`, with the model cache inside `dir`.
pub fn handoff(args: &[&str], dir: &Path) -> Output {
    handoff_env(args, dir, &[])
}

/// The built `handoff`, under the workers' launcher when one is set (so a
/// test run under an emulator, `scripts/emulate_cpu.sh`, emulates the whole
/// process tree).
pub fn handoff_command() -> Command {
    let w = handoff_runner::isolate::WorkerCommand::launched(
        &handoff_runner::isolate::launcher().unwrap_or_default(),
        env!("CARGO_BIN_EXE_handoff").into(),
        &[],
    );
    let mut c = Command::new(w.program);
    c.args(w.args);
    c
}

/// [`handoff`] with extra environment variables.
pub fn handoff_env(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    handoff_command()
        .args(args)
        .current_dir(dir)
        .env("HANDOFF_MODEL_CACHE", dir.join("cache"))
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `handoff ARGS` in `dir`, which must exit 0; its stdout.
pub fn handoff_ok(args: &[&str], dir: &Path) -> String {
    let o = handoff(args, dir);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "handoff {args:?}:\n{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// `handoff run SUITE --out OUT --quiet` in `dir`, which must exit 0; the
/// records it wrote.
pub fn run_ok(dir: &Path, suite: &str, out: &str) -> Vec<ResultRecord> {
    let o = handoff(&["run", suite, "--out", out, "--quiet"], dir);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    read_results(&dir.join(out).join("results.jsonl"))
        .unwrap()
        .records
}

/// A WordLevel tokenizer.json over the tiny BERT's 100-token vocabulary.
pub fn write_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().enumerate() {
        vocab.insert((*w).into(), i.into());
    }
    for i in 4..100 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tok).unwrap(),
    )
    .unwrap();
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A `Relu` per input, each to an output of the same shape.
pub fn relu_each(g: &mut GraphBuilder, inputs: &[(&str, &[D])]) {
    for (i, (name, dims)) in inputs.iter().enumerate() {
        let x = g.input(name, ElemType::F32, dims);
        let out = format!("y{i}");
        g.node_to("Relu", &[&x], vec![], &out);
        g.output(&out, ElemType::F32, dims);
    }
}

/// The five shapes of model a user brings (`cnn`, `encoder`, `bert`,
/// `scalar`, `state`), written into `dir`.
pub fn init_models(dir: &Path) {
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

/// The case ran and its outputs agree with the reference backend.
pub fn assert_ok_and_agrees(r: &ResultRecord) {
    assert!(
        r.status == handoff_runner::Status::Ok && r.parity.as_ref().is_some_and(|p| p.ok),
        "{}: {:?} {:?} {:?}",
        r.case.id,
        r.status,
        r.reason,
        r.parity
    );
}
