//! Harness overhead per timed iteration: the timing loop around a run that
//! does nothing. Target: well under 1 µs (two clock reads and a push).

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use handoff_runner::measure::timed_loop;
use handoff_suite::Measure;

fn overhead(c: &mut Criterion) {
    let policy = Measure {
        warmup: Duration::ZERO,
        min_iterations: 10_000,
        max_iterations: 10_000,
        min_time: Duration::ZERO,
        max_time: Duration::from_secs(60),
        target_ci: 1e-9,
        rounds: 10,
        processes: 1,
        settle: Duration::ZERO,
    };
    let mut g = c.benchmark_group("harness");
    g.throughput(criterion::Throughput::Elements(10_000));
    g.bench_function("timed loop, 10k no-op runs", |b| {
        b.iter(|| timed_loop(|| Ok(()), std::hint::black_box(&policy)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
