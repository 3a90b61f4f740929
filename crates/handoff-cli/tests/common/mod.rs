//! What the CLI test files share: running the built `handoff` binary.
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;
use std::process::{Command, Output};

use handoff_runner::{ResultRecord, read_results};

/// `handoff ARGS` in `dir`, with the model cache inside `dir`.
pub fn handoff(args: &[&str], dir: &Path) -> Output {
    handoff_env(args, dir, &[])
}

/// [`handoff`] with extra environment variables.
pub fn handoff_env(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_handoff"))
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
