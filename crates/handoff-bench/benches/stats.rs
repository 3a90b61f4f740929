use criterion::{Criterion, criterion_group, criterion_main};

fn summary(c: &mut Criterion) {
    let s = handoff_stats::synth::exponential(10_000, 1.0, 1);
    c.bench_function("summarize 10k samples (1000 bootstrap resamples)", |b| {
        b.iter(|| handoff_stats::summarize(std::hint::black_box(&s)))
    });
}

criterion_group!(benches, summary);
criterion_main!(benches);
