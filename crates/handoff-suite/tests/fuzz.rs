//! Mutation fuzzing of the suite parser and plan builder: no input may
//! panic, and every error must say where it is (line:column or field path).

use std::path::Path;

use handoff_suite::{Plan, PlanOptions, SuiteError};

const SEEDS: [&str; 3] = [
    "name: a
models:
  - id: m
    source: {onnx: tiny.onnx}
backends: [mock, mock-ref]
threads: [1, 2]
batch: [1, 4]
measure: {warmup: 10ms, min_iterations: 5, min_time: 1s, max_time: 2s, target_ci: 0.01}
check: {reference: mock-ref, atol: 1e-4, rtol: 1e-3}
",
    "name: b
models:
  - id: m
    source:
      onnx: tiny.onnx
    inputs:
      - name: x
        dtype: f32
        shape: [batch, 8]
        fill: {random: {min: -1, max: 1}}
    batch: [2]
    backends: [mock]
backends: [mock]
devices: [cpu, cuda]
isolation: none
timeout: 30s
seed: 7
check: {reference: mock}
",
    "name: c
description: \"quoted: text\"
models: [{id: x, source: {onnx: tiny.onnx}}, {id: y, source: {onnx: tiny.onnx}}]
backends: [mock]
dims: {seq: [4, 8]}
backend_options: {mock: {latency_us: 5, slowdown: 1.1}}
memory_limit_mb: 512
check: {reference: mock}
",
];

const ALPHABET: &[u8] = b" :-[]{},\n\t\"'&*!#|>0123456789abcxyz_.%@`";

use handoff_onnx::rng::SplitMix64 as Rng;

fn mutate(seed: &str, rng: &mut Rng) -> String {
    let mut b: Vec<u8> = seed.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len().max(1);
        match rng.below(7) {
            0 => {
                let i = rng.below(len);
                let j = (i + 1 + rng.below(12)).min(b.len());
                b.drain(i.min(b.len())..j);
            }
            1 => {
                let i = rng.below(len);
                b.insert(i.min(b.len()), ALPHABET[rng.below(ALPHABET.len())]);
            }
            2 => {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] = ALPHABET[rng.below(ALPHABET.len())];
                }
            }
            3 => {
                let lines: Vec<&[u8]> = b.split(|c| *c == b'\n').collect();
                let i = rng.below(lines.len());
                let mut out = Vec::new();
                for (k, l) in lines.iter().enumerate() {
                    out.extend_from_slice(l);
                    out.push(b'\n');
                    if k == i {
                        out.extend_from_slice(l);
                        out.push(b'\n');
                    }
                }
                b = out;
            }
            4 => b.truncate(rng.below(len)),
            5 => {
                // A key typo: drop one letter of a word.
                let i = rng.below(len);
                if i < b.len() && b[i].is_ascii_alphabetic() {
                    b.remove(i);
                }
            }
            _ => {
                let i = rng.below(len);
                for c in b"\n  - ".iter().rev() {
                    b.insert(i.min(b.len()), *c);
                }
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// A temp dir with the `tiny.onnx` the seeds name, and plan options.
fn setup() -> (tempfile::TempDir, PlanOptions) {
    let dir = tempfile::tempdir().unwrap();
    let model = handoff_onnx::synthetic::SyntheticSpec {
        kind: handoff_onnx::synthetic::Kind::Mlp,
        width: 8,
        depth: 1,
        seed: 1,
    }
    .build();
    handoff_onnx::builder::write_model(&model, &dir.path().join("tiny.onnx")).unwrap();
    let options = PlanOptions {
        model_cache: dir.path().join("cache"),
        known_backends: vec!["mock".into(), "mock-ref".into()],
        tools: None,
        preparation: handoff_suite::Preparation::Build,
    };
    (dir, options)
}

#[test]
fn ten_thousand_mutated_suites_never_panic_and_every_error_is_located() {
    let (dir, options) = setup();
    let file = dir.path().join("fuzz.yaml");
    let (mut ok, mut invalid, mut problems) = (0, 0, 0);
    let mut rng = Rng::new(0xF022);
    let n = 10_000;
    for i in 0..n {
        let text = mutate(SEEDS[i % SEEDS.len()], &mut rng);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Plan::from_str(&file, &text, &options)
        }));
        match result {
            Err(_) => panic!("panic on input #{i}:\n{text}"),
            Ok(Ok(plan)) => {
                ok += 1;
                // An accepted plan expands without panicking.
                assert_eq!(plan.cases().count(), plan.case_count());
            }
            Ok(Err(SuiteError::Invalid(ps))) => {
                invalid += 1;
                for p in &ps {
                    problems += 1;
                    assert!(
                        p.line.is_some() || !p.path.is_empty(),
                        "unlocated error on input #{i}: {p}\n{text}"
                    );
                    assert_eq!(p.file, file.as_path() as &Path);
                }
            }
            Ok(Err(e)) => panic!("unexpected error kind on #{i}: {e}"),
        }
    }
    println!(
        "fuzzed {n} mutated suites: {ok} accepted, {invalid} rejected with {problems} located problems, 0 panics"
    );
    // The mutations must exercise both paths, or the test proves little:
    // a mutator that broke every suite (or none) would pass the loop above.
    assert!(
        ok >= n / 100 && invalid >= n / 20,
        "{ok} accepted, {invalid} rejected of {n}"
    );
    // Every rejection says at least one thing.
    assert!(
        problems >= invalid,
        "{problems} problems for {invalid} rejections"
    );
}

#[test]
fn the_seed_suites_are_valid() {
    let (dir, options) = setup();
    for seed in SEEDS {
        if let Err(e) = Plan::from_str(&dir.path().join("s.yaml"), seed, &options) {
            panic!("{e}\n{seed}");
        }
    }
}
