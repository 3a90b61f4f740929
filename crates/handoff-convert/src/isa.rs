//! The CPU features that decide which int8 kernels a runtime uses, and so
//! what an int8 model computes.
//!
//! x86 integer GEMM kernels without VNNI multiply u8 x s8 pairs into
//! saturating 16-bit sums (`vpmaddubsw`): with 8-bit weights two products
//! can reach 2 x 255 x 127 = 64770 and clip at 32767, so the same int8 file
//! gives different outputs on an AVX2 machine than on one with
//! AVX512-VNNI / AVX-VNNI / AMX, which accumulate in 32 bits. Weights kept
//! within 7 bits (|q| <= 63: 2 x 255 x 63 = 32130) cannot saturate, which is
//! what ONNX Runtime's `reduce_range` is for. ARM's `sdot`/`udot`
//! (dotprod) and `i8mm` accumulate in 32 bits.

use serde::{Deserialize, Serialize};

/// The int8-relevant class of a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuClass {
    /// x86 with AMX int8 tiles (also has VNNI).
    X86Amx,
    /// x86 with AVX512-VNNI.
    X86Avx512Vnni,
    /// x86 with AVX-VNNI (256-bit VNNI, e.g. Alder Lake, Zen 5 client).
    X86AvxVnni,
    /// x86 with AVX2 but no VNNI (Zen 2/3, Haswell-Skylake client, most
    /// CI runners): saturating 16-bit int8 products.
    X86Avx2,
    /// x86 without AVX2.
    X86,
    /// arm64 with dotprod (`asimddp`) or i8mm.
    Arm64Dot,
    /// arm64 without dot products.
    Arm64,
    Other,
}

impl CpuClass {
    pub fn as_str(self) -> &'static str {
        match self {
            CpuClass::X86Amx => "x86-amx",
            CpuClass::X86Avx512Vnni => "x86-avx512-vnni",
            CpuClass::X86AvxVnni => "x86-avx-vnni",
            CpuClass::X86Avx2 => "x86-avx2",
            CpuClass::X86 => "x86",
            CpuClass::Arm64Dot => "arm64-dotprod",
            CpuClass::Arm64 => "arm64",
            CpuClass::Other => "other",
        }
    }

    /// Whether int8 products of 8-bit weights can saturate in this class's
    /// kernels (16-bit pair sums).
    pub fn saturates_int8(self) -> bool {
        matches!(self, CpuClass::X86Avx2 | CpuClass::X86)
    }

    /// Bits of the int8 weights a model built for this class should use:
    /// 7 where products of 8-bit weights would saturate, else 8.
    pub fn weight_bits(self) -> u8 {
        if self.saturates_int8() { 7 } else { 8 }
    }

    /// Why [`CpuClass::weight_bits`] chose what it did, for provenance.
    pub fn weight_bits_reason(self) -> &'static str {
        if self.saturates_int8() {
            "7-bit weights (|q| <= 63): this CPU class has no VNNI, and its u8 x s8 kernels sum pairs of products in saturating 16 bits, which 8-bit weights can overflow (ONNX Runtime's reduce_range)"
        } else {
            "8-bit weights: this CPU class accumulates int8 products in 32 bits (VNNI, AMX or dot products), so nothing saturates"
        }
    }
}

impl std::fmt::Display for CpuClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The environment variable that overrides `native` (see [`TargetCpu::class`]).
pub const TARGET_CPU_VAR: &str = "HANDOFF_TARGET_CPU";

/// Set by scripts/as-cpu.sh to the profile its cpuid mask hides features
/// for (`avx2`, `avx512`); recorded with the machine, read by the mask.
pub const CPUID_MASK_VAR: &str = "HANDOFF_CPUID_MASK";

/// `--target-cpu`: a class to build for, or `native` (this machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetCpu {
    Native,
    Class(CpuClass),
}

impl TargetCpu {
    /// The class this target stands for on this machine. `native` is this
    /// machine's class, unless `HANDOFF_TARGET_CPU` names another (e.g. to
    /// build a suite's variants for the AVX2 runners that will measure
    /// them); the class used is recorded in each variant's provenance.
    pub fn class(self) -> CpuClass {
        match self {
            TargetCpu::Native => match std::env::var(TARGET_CPU_VAR)
                .ok()
                .filter(|v| !v.is_empty() && v != "native")
                .and_then(|v| v.parse::<TargetCpu>().ok())
            {
                Some(TargetCpu::Class(c)) => c,
                _ => Isa::detect().class,
            },
            TargetCpu::Class(c) => c,
        }
    }
}

impl std::str::FromStr for TargetCpu {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "native" => TargetCpu::Native,
            "avx2" | "x86-avx2" => TargetCpu::Class(CpuClass::X86Avx2),
            "avx512-vnni" | "x86-avx512-vnni" => TargetCpu::Class(CpuClass::X86Avx512Vnni),
            "avx-vnni" | "x86-avx-vnni" => TargetCpu::Class(CpuClass::X86AvxVnni),
            "amx" | "x86-amx" => TargetCpu::Class(CpuClass::X86Amx),
            "arm64-dotprod" => TargetCpu::Class(CpuClass::Arm64Dot),
            _ => {
                return Err(format!(
                    "target CPU `{s}`: use native, avx2, avx512-vnni, avx-vnni, amx or arm64-dotprod"
                ));
            }
        })
    }
}

/// The int8-deciding features of a CPU and its class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isa {
    pub class: CpuClass,
    /// The features found among [`INT8_FLAGS`], in that order.
    pub flags: Vec<String>,
}

/// The /proc/cpuinfo flags that decide int8 kernels (x86 `flags`, arm64
/// `Features`: `asimddp` is dotprod).
pub const INT8_FLAGS: [&str; 9] = [
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "asimd",
    "asimddp",
    "i8mm",
];

impl Isa {
    /// This machine's. On x86 from the `cpuid` instruction and the OS's
    /// enabled register state (`xgetbv`), which is what the runtimes' int8
    /// dispatchers read, so the class is the kernels' even where
    /// /proc/cpuinfo says otherwise (an emulator presenting another CPU, a
    /// kernel that hides a feature); elsewhere from /proc/cpuinfo.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Self::from_x86_flags(&x86::flags())
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            Self::parse(&text, std::env::consts::ARCH)
        }
    }

    /// The [`INT8_FLAGS`] /proc/cpuinfo lists (the kernel's view of the
    /// CPU) that this process's `cpuid` does not report: hidden by a cpuid
    /// mask (scripts/as-cpu.sh) or an emulator presenting another CPU, so
    /// the runtimes run [`Isa::detect`]'s class of kernels on a CPU that has
    /// more. Empty where the two agree, and off x86.
    pub fn hidden() -> Vec<String> {
        #[cfg(target_arch = "x86_64")]
        {
            let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            Self::hidden_from(&Self::parse(&text, "x86_64"), &Self::detect())
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Vec::new()
        }
    }

    /// The flags of `kernel` (from /proc/cpuinfo) missing from `seen` (from
    /// `cpuid`).
    pub fn hidden_from(kernel: &Isa, seen: &Isa) -> Vec<String> {
        kernel
            .flags
            .iter()
            .filter(|f| !seen.flags.contains(f))
            .cloned()
            .collect()
    }

    /// From x86 feature names as /proc/cpuinfo spells them.
    pub fn from_x86_flags(flags: &[&str]) -> Self {
        Self::parse(&format!("flags\t: {}\n", flags.join(" ")), "x86_64")
    }

    /// From the text of /proc/cpuinfo on architecture `arch`
    /// (`std::env::consts::ARCH`).
    pub fn parse(cpuinfo: &str, arch: &str) -> Self {
        let line = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags") || l.starts_with("Features"))
            .and_then(|l| l.split_once(':'))
            .map_or("", |(_, v)| v);
        let has = |f: &str| line.split_whitespace().any(|x| x == f);
        let flags: Vec<String> = INT8_FLAGS
            .iter()
            .filter(|f| has(f))
            .map(|f| (*f).to_owned())
            .collect();
        let class = match arch {
            "x86_64" | "x86" => {
                if has("amx_int8") {
                    CpuClass::X86Amx
                } else if has("avx512_vnni") {
                    CpuClass::X86Avx512Vnni
                } else if has("avx_vnni") {
                    CpuClass::X86AvxVnni
                } else if has("avx2") {
                    CpuClass::X86Avx2
                } else {
                    CpuClass::X86
                }
            }
            "aarch64" => {
                if has("asimddp") || has("i8mm") {
                    CpuClass::Arm64Dot
                } else {
                    CpuClass::Arm64
                }
            }
            _ => CpuClass::Other,
        };
        Self { class, flags }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::is_x86_feature_detected as has;

    /// The [`super::INT8_FLAGS`] this CPU has and the OS has enabled (the
    /// standard library checks `xgetbv` for the AVX and AVX-512 registers),
    /// named as /proc/cpuinfo names them. AMX int8 has no stable detection
    /// in the standard library: it is read from /proc/cpuinfo, and only on a
    /// CPU whose `cpuid` shows AVX512-VNNI, which every AMX CPU has.
    pub fn flags() -> Vec<&'static str> {
        let mut out = Vec::new();
        for (found, name) in [
            (has!("avx2"), "avx2"),
            (has!("avx512f"), "avx512f"),
            (has!("avx512bw"), "avx512bw"),
            (has!("avx512vnni"), "avx512_vnni"),
            (has!("avxvnni"), "avx_vnni"),
        ] {
            if found {
                out.push(name);
            }
        }
        if out.contains(&"avx512_vnni")
            && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|t| {
                super::Isa::parse(&t, "x86_64")
                    .flags
                    .iter()
                    .any(|f| f == "amx_int8")
            })
        {
            out.push("amx_int8");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZEN4: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni avx512_bitalg\n";
    const ZEN3: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7R13\nflags\t\t: fpu sse2 avx avx2 fma bmi2 adx sha_ni vaes\n";
    const ALDER: &str = "flags\t\t: fpu sse2 avx avx2 fma avx_vnni\n";
    const SAPPHIRE: &str =
        "flags\t\t: avx2 avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8\n";
    const GRAVITON3: &str = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp sve i8mm bf16\n";
    const A72: &str = "Features\t: fp asimd evtstrm crc32 cpuid\n";
    const OLD_X86: &str = "flags\t\t: fpu sse2 sse4_2 avx\n";

    #[test]
    fn features_the_kernel_lists_but_cpuid_hides_are_named() {
        let kernel = Isa::parse(ZEN4, "x86_64");
        let masked = Isa::from_x86_flags(&["avx2"]);
        assert_eq!(
            Isa::hidden_from(&kernel, &masked),
            ["avx512f", "avx512bw", "avx512_vnni"]
        );
        assert!(Isa::hidden_from(&kernel, &kernel).is_empty());
    }

    #[test]
    fn each_cpu_class_is_read_from_its_cpuinfo() {
        let class = |text: &str, arch: &str| Isa::parse(text, arch).class;
        assert_eq!(class(ZEN4, "x86_64"), CpuClass::X86Avx512Vnni);
        assert_eq!(class(ZEN3, "x86_64"), CpuClass::X86Avx2);
        assert_eq!(class(ALDER, "x86_64"), CpuClass::X86AvxVnni);
        assert_eq!(class(SAPPHIRE, "x86_64"), CpuClass::X86Amx);
        assert_eq!(class(OLD_X86, "x86_64"), CpuClass::X86);
        assert_eq!(class(GRAVITON3, "aarch64"), CpuClass::Arm64Dot);
        assert_eq!(class(A72, "aarch64"), CpuClass::Arm64);
        assert_eq!(class("", "riscv64"), CpuClass::Other);
        assert_eq!(
            Isa::parse(ZEN4, "x86_64").flags,
            ["avx2", "avx512f", "avx512bw", "avx512_vnni"]
        );
        assert_eq!(
            Isa::parse(GRAVITON3, "aarch64").flags,
            ["asimd", "asimddp", "i8mm"]
        );
    }

    #[test]
    fn x86_feature_names_give_the_class_cpuinfo_would() {
        let class = |f: &[&str]| Isa::from_x86_flags(f).class;
        assert_eq!(class(&["avx2"]), CpuClass::X86Avx2);
        assert_eq!(
            class(&["avx2", "avx512f", "avx512bw", "avx512_vnni"]),
            CpuClass::X86Avx512Vnni
        );
        assert_eq!(class(&["avx2", "avx_vnni"]), CpuClass::X86AvxVnni);
        assert_eq!(class(&[]), CpuClass::X86);
        assert_eq!(
            Isa::from_x86_flags(&["avx2", "avx512f"]).flags,
            ["avx2", "avx512f"]
        );
    }

    #[test]
    fn only_classes_without_32_bit_int8_accumulation_get_7_bit_weights() {
        assert_eq!(CpuClass::X86Avx2.weight_bits(), 7);
        assert_eq!(CpuClass::X86.weight_bits(), 7);
        for c in [
            CpuClass::X86Avx512Vnni,
            CpuClass::X86AvxVnni,
            CpuClass::X86Amx,
            CpuClass::Arm64Dot,
        ] {
            assert_eq!(c.weight_bits(), 8, "{c}");
        }
        // The largest pair sum of u8 activations and 7-bit weights fits in
        // a signed 16-bit sum; with 8-bit weights it does not.
        assert!(2 * 255 * 63 <= i16::MAX as i32);
        assert!(2 * 255 * 127 > i16::MAX as i32);
    }

    #[test]
    fn target_cpu_names_parse() {
        assert_eq!("native".parse::<TargetCpu>(), Ok(TargetCpu::Native));
        assert_eq!(
            "avx2".parse::<TargetCpu>().map(TargetCpu::class),
            Ok(CpuClass::X86Avx2)
        );
        assert!(
            "avx3"
                .parse::<TargetCpu>()
                .unwrap_err()
                .contains("avx512-vnni")
        );
    }
}
