//! `handoff gil`: what the GIL does to CPU-bound preprocessing, measured.
//!
//! The same texts are tokenised (padded to `seq`) with 1..N workers three
//! ways: Rust threads calling the `tokenizers` crate; Python threads calling
//! the `tokenizers` package (Rust inside, so the GIL is only held around each
//! call); and Python threads running a WordPiece tokenizer written in Python
//! (`scripts/gil_tokenize.py`, checked to give the same ids), which holds
//! the GIL throughout. Each figure is the best of `reps` passes.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use handoff_backend::text::load_fixed_length as load;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::PythonError;
use crate::pyenv::io;

const GIL_PY: &str = include_str!("../../../scripts/gil_tokenize.py");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GilReport {
    pub texts: usize,
    pub seq: usize,
    pub cores: usize,
    pub python: String,
    pub gil_enabled: bool,
    /// Texts whose pure-Python ids equal the `tokenizers` ids, `a/b`.
    pub pure_python_agrees: String,
    pub workers: Vec<usize>,
    /// Texts per second at each worker count.
    pub rust_threads: Vec<f64>,
    pub python_threads_tokenizers: Vec<f64>,
    pub python_threads_pure_python: Vec<f64>,
}

#[derive(Deserialize)]
struct PyOut {
    python: String,
    gil_enabled: bool,
    pure_python_agrees: String,
    tokenizers: std::collections::BTreeMap<String, f64>,
    pure_python: std::collections::BTreeMap<String, f64>,
}

/// Best-of-`reps` texts/s of Rust threads, each encoding its share one text
/// at a time (no batch parallelism inside the library).
pub fn rust_rate(tok: &Tokenizer, texts: &[String], workers: usize, reps: usize) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        std::thread::scope(|s| {
            for w in 0..workers {
                let tok = tok.clone();
                s.spawn(move || {
                    for text in texts.iter().skip(w).step_by(workers) {
                        let _ = std::hint::black_box(tok.encode(text.as_str(), true));
                    }
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    texts.len() as f64 / best
}

/// Runs all three; `python` is the baseline environment's interpreter.
pub fn measure(
    python: &Path,
    tokenizer: &Path,
    texts: &[String],
    seq: usize,
    workers: &[usize],
    reps: usize,
    scratch: &Path,
) -> Result<GilReport, PythonError> {
    let tok = load(tokenizer, seq).map_err(|source| PythonError::Tokenizer {
        path: tokenizer.to_owned(),
        source,
    })?;
    let rust_threads = workers
        .iter()
        .map(|&w| rust_rate(&tok, texts, w, reps))
        .collect();
    std::fs::create_dir_all(scratch).map_err(io(scratch))?;
    let file = scratch.join(format!("gil-texts-{}.txt", std::process::id()));
    std::fs::write(&file, texts.join("\n")).map_err(io(&file))?;
    let list: Vec<String> = workers.iter().map(ToString::to_string).collect();
    let out = Command::new(python)
        .arg("-c")
        .arg(GIL_PY)
        .arg("--tokenizer")
        .arg(tokenizer)
        .arg("--texts")
        .arg(&file)
        .args(["--seq", &seq.to_string()])
        .args(["--workers", &list.join(",")])
        .args(["--reps", &reps.to_string()])
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .map_err(|source| PythonError::Start {
            what: python.display().to_string(),
            source,
        });
    let _ = std::fs::remove_file(&file);
    let out = out?;
    if !out.status.success() {
        return Err(PythonError::Failed {
            what: "gil_tokenize.py".into(),
            status: out.status,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let py: PyOut = serde_json::from_slice(&out.stdout).map_err(|e| PythonError::Output {
        what: "gil_tokenize.py".into(),
        detail: e.to_string(),
    })?;
    let pick = |m: &std::collections::BTreeMap<String, f64>| -> Vec<f64> {
        workers
            .iter()
            .map(|w| m.get(&w.to_string()).copied().unwrap_or(f64::NAN))
            .collect()
    };
    Ok(GilReport {
        texts: texts.len(),
        seq,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        python: py.python,
        gil_enabled: py.gil_enabled,
        pure_python_agrees: py.pure_python_agrees,
        workers: workers.to_vec(),
        rust_threads,
        python_threads_tokenizers: pick(&py.tokenizers),
        python_threads_pure_python: pick(&py.pure_python),
    })
}

impl GilReport {
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "Tokenising {} texts (seq {}) on {} cores; Python {} (GIL {}); the pure-Python tokenizer agrees with `tokenizers` on {} distinct texts.\n",
            self.texts,
            self.seq,
            self.cores,
            self.python,
            if self.gil_enabled { "on" } else { "off" },
            self.pure_python_agrees
        );
        o.push_str("| workers | Rust threads texts/s | x | Python threads + tokenizers texts/s | x | Python threads + pure-Python texts/s | x |\n|---:|---:|---:|---:|---:|---:|---:|\n");
        let base = |v: &[f64]| v.first().copied().unwrap_or(f64::NAN);
        for (i, w) in self.workers.iter().enumerate() {
            let cell = |v: &[f64]| format!("{:.0} | {:.2}x", v[i], v[i] / base(v));
            let _ = writeln!(
                o,
                "| {w} | {} | {} | {} |",
                cell(&self.rust_threads),
                cell(&self.python_threads_tokenizers),
                cell(&self.python_threads_pure_python)
            );
        }
        o
    }
}
