//! What arithmetic on subnormal floats costs on this CPU. Many x86 cores
//! handle a subnormal operand or result in microcode, hundreds of cycles
//! where a normal multiply takes four. ONNX Runtime's softmax never returns
//! 0 (its exp clamps its input near -104), so every position an attention
//! mask hides becomes a subnormal probability that the next MatMul reads:
//! padded batches on ORT pay this cost unless the thread flushes
//! subnormals (`backend_options: {ort: {denormals: flush}}`).

/// Extra nanoseconds per multiply whose operand and result are subnormal,
/// against the same chain of normal numbers (best of 5 of 20,000 dependent
/// multiplies each, about a millisecond where the cost is 50 ns). `None`
/// where the thread already flushes them (the probe would read nothing).
pub fn subnormal_ns() -> Option<f64> {
    const N: u32 = 20_000;
    let chain = |start: f32| {
        (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                let mut x = std::hint::black_box(start);
                for _ in 0..N {
                    // x * 1 stays x: a subnormal in, a subnormal out.
                    x = std::hint::black_box(x * std::hint::black_box(1.0_f32));
                }
                std::hint::black_box(x);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let tiny = std::hint::black_box(1e-40_f32);
    if tiny * std::hint::black_box(1.0_f32) == 0.0 {
        return None;
    }
    chain(1.0);
    let per = |s: f64| s * 1e9 / f64::from(N);
    Some((per(chain(tiny)) - per(chain(1.0))).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_measures_a_finite_cost() {
        let ns = subnormal_ns().expect("threads keep subnormals by default");
        assert!(ns.is_finite() && ns >= 0.0, "{ns}");
        eprintln!("subnormal multiply: +{ns:.1} ns");
    }
}
