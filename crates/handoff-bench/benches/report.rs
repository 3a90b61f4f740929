//! Report generation for a 200-case run (target: under 10 s):
//! summary.md, one set of 1200x800 PNG plots per model and the
//! self-contained HTML, from results shaped like a real suite's (5 models x
//! 4 backends x 2 threads x 5 batch sizes, 1,000 raw samples each).

use criterion::{Criterion, criterion_group, criterion_main};
use handoff_results::ResultRecord;

fn records() -> Vec<ResultRecord> {
    let template: ResultRecord = serde_json::from_str(
        include_str!("../../handoff-report/tests/fixtures/results.jsonl")
            .lines()
            .find(|l| l.contains("\"status\": \"ok\""))
            .expect("an ok record in the fixture"),
    )
    .unwrap();
    let mut out = Vec::new();
    for m in 0..5 {
        for (bi, backend) in ["ort", "tract", "candle-onnx", "candle-native"]
            .iter()
            .enumerate()
        {
            for threads in [1, 2] {
                for batch in [1, 2, 4, 8, 16] {
                    let mut r = template.clone();
                    r.index = out.len();
                    r.case.model = format!("model-{m}");
                    r.case.backend = (*backend).into();
                    r.case.threads = threads;
                    r.case.batch = batch;
                    r.case.id = format!("model-{m}/{backend}/t{threads}/b{batch}");
                    let base = (1.0 + m as f64) * (1.0 + bi as f64) * f64::from(batch)
                        / f64::from(threads);
                    r.samples_ms = (0..1000)
                        .map(|i| base * (1.0 + 0.05 * ((i * 7919 % 100) as f64 / 100.0)))
                        .collect();
                    r.latency_ms = handoff_stats::summarize(&r.samples_ms);
                    r.throughput_items_s = r
                        .latency_ms
                        .as_ref()
                        .map(|l| f64::from(batch) / (l.p50 / 1e3));
                    out.push(r);
                }
            }
        }
    }
    assert_eq!(out.len(), 200);
    out
}

fn report(c: &mut Criterion) {
    let records = records();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("report");
    group.sample_size(10);
    group.bench_function("200 cases: summary.md + PNG plots + report.html", |b| {
        b.iter(|| {
            handoff_report::write_report(
                dir.path(),
                "bench",
                &records,
                None,
                false,
                &handoff_report::RunContext::default(),
            )
            .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, report);
criterion_main!(benches);
