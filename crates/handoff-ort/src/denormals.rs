//! Subnormal floats on the thread that calls `Session::run`.
//!
//! ORT's `session.set_denormal_as_zero` sets DAZ and FTZ on the session's
//! intra-op pool threads, and on the calling thread only while creating the
//! first session of the process (once per process, whatever later sessions
//! ask). At one thread ORT has no pool and the caller does all the work, so
//! whether a session flushes would depend on which session the process
//! made first. Each run therefore sets the caller's flags to what its suite
//! asks and restores them after, so the other backends of an in-process
//! run keep theirs.

/// This thread's DAZ and FTZ flags as a suite asks, until dropped.
pub struct Scoped {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

/// Whether this build can set the calling thread's flags.
pub const SUPPORTED: bool = cfg!(target_arch = "x86_64");

#[cfg(target_arch = "x86_64")]
mod mxcsr {
    /// Denormals are zero (read as zero).
    pub const DAZ: u32 = 1 << 6;
    /// Flush to zero (written as zero).
    pub const FTZ: u32 = 1 << 15;

    pub fn get() -> u32 {
        let mut v: u32 = 0;
        // SAFETY: stores the 32-bit MXCSR into a local we own.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut v, options(nostack, preserves_flags));
        }
        v
    }

    pub fn set(v: u32) {
        // SAFETY: loads MXCSR from a local; only DAZ and FTZ differ from
        // the value read by `get`, and reserved bits are never set.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &v, options(nostack, readonly, preserves_flags));
        }
    }
}

impl Scoped {
    /// Subnormals flushed (`flush`) or kept, on this thread. `None` where
    /// this build cannot set them ([`SUPPORTED`] is false).
    pub fn start(flush: bool) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = mxcsr::get();
            let bits = mxcsr::DAZ | mxcsr::FTZ;
            mxcsr::set(if flush { saved | bits } else { saved & !bits });
            Some(Self { saved })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = flush;
            None
        }
    }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        mxcsr::set(self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_product() -> f32 {
        std::hint::black_box(1e-30_f32) * std::hint::black_box(1e-10_f32)
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn set_while_held_and_restored_after() {
        assert!(tiny_product() > 0.0, "subnormal kept by default");
        {
            let _f = Scoped::start(true).unwrap();
            assert_eq!(tiny_product(), 0.0);
            {
                let _k = Scoped::start(false).unwrap();
                assert!(tiny_product() > 0.0, "kept inside a flushed scope");
            }
            assert_eq!(tiny_product(), 0.0, "flushed again");
        }
        assert!(tiny_product() > 0.0, "restored");
    }
}
