//! What a legacy-SSE instruction costs right after 256-bit AVX code on this
//! CPU. Intel's optimisation manual describes about a cycle on Skylake and
//! later cores; the Intel Xeon VMs this project runs on (KVM) charge about
//! 150 ns, a state transition, every time. Hand-written kernels that mix
//! the two encodings can then run many times slower than their arithmetic
//! suggests: tract 0.23.9's AVX2 int8 kernel loads each step with a legacy
//! `movq`, and other x86 kernels of it load scalars with `movd`/`pinsrd`.
//! The report names the cost so a reader knows why tract's figures on such
//! a machine may not carry over to another CPU.

/// Extra nanoseconds per AVX-to-legacy-SSE switch, from a loop of one
/// 256-bit add and one legacy `movd`, minus the same loop with the VEX
/// `vmovd` (best of 5 of 20,000 iterations each, about 3 ms where the
/// penalty is 150 ns). `None` off x86_64 or without AVX2.
pub fn sse_after_avx_ns() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return None;
        }
        const N: u64 = 20_000;
        let best = |legacy: bool| {
            (0..5)
                .map(|_| {
                    let start = std::time::Instant::now();
                    // Safe: AVX2 was detected above; the loop touches only
                    // the registers it declares and ends with vzeroupper.
                    #[allow(unsafe_code)]
                    unsafe {
                        switch_loop(N, legacy)
                    };
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let per = |s: f64| s * 1e9 / N as f64;
        // Warm the loop (and the clock) once before timing.
        best(false);
        Some((per(best(true)) - per(best(false))).max(0.0))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2")]
unsafe fn switch_loop(n: u64, legacy: bool) {
    // One 256-bit add, then `$mov` of a general register into xmm2. The
    // loop writes only the registers it declares and leaves the upper
    // state clean (vzeroupper), as the caller's code expects.
    macro_rules! switch_loop {
        ($mov:literal) => {
            unsafe {
                std::arch::asm!(
                    "2:",
                    "vpaddd ymm0, ymm0, ymm1",
                    concat!($mov, " xmm2, {v:e}"),
                    "dec {n}",
                    "jnz 2b",
                    "vzeroupper",
                    n = inout(reg) n => _,
                    v = in(reg) 1u32,
                    out("ymm0") _, out("ymm1") _, out("ymm2") _,
                    options(nostack, nomem),
                )
            }
        };
    }
    if legacy {
        switch_loop!("movd");
    } else {
        switch_loop!("vmovd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_probe_measures_a_finite_penalty_where_avx2_runs() {
        let ns = sse_after_avx_ns();
        if std::arch::is_x86_feature_detected!("avx2") {
            let ns = ns.expect("AVX2 is here, so the probe runs");
            assert!(ns.is_finite() && ns >= 0.0, "{ns}");
        } else {
            assert_eq!(ns, None);
        }
    }
}
