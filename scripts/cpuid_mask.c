/*
 * Makes this machine's CPU look like another int8 class to every program
 * that asks `cpuid`, at native speed: loaded with LD_PRELOAD, it turns on
 * the kernel's CPUID faulting (arch_prctl ARCH_SET_CPUID, flag `cpuid_fault`
 * in /proc/cpuinfo), so each `cpuid` traps, and answers it with the real
 * result less the features of the profile in HANDOFF_CPUID_MASK:
 *
 *   avx2    no AVX-512, no AVX-VNNI, no AMX (an AMD EPYC Zen 3, a Haswell
 *           to Cascade Lake-less server: int8 GEMMs in saturating 16-bit
 *           pair sums, `vpmaddubsw`)
 *   avx512  AVX-512 without VNNI (Skylake-SP: the same saturation, 512 bits)
 *
 * ONNX Runtime's MLAS, tract and PyTorch choose their kernels from `cpuid`
 * when they load, so they run the kernels of that class on this machine's
 * cores: the numerics are that class's exactly, the speed is that code on
 * this microarchitecture, not a real CPU of the class. The setting survives
 * fork and clone (every thread and child is masked) and execve resets it;
 * LD_PRELOAD, inherited, masks the new program again. The C library picks
 * its own string routines before this runs; they do not touch int8.
 * Built and used by scripts/as-cpu.sh.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static int profile; /* 0: avx2, 1: avx512 */

static long cpuid_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, !on); }

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F DQ IFMA PF ER CD BW VL; ECX: VBMI VBMI2 VNNI BITALG
         * VPOPCNTDQ; EDX: 4VNNIW 4FMAPS VP2INTERSECT AMX-BF16 FP16 AMX-TILE
         * AMX-INT8. */
        uint32_t b = BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31);
        uint32_t c = BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14);
        uint32_t d = BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25);
        if (profile == 1) {
            /* keep F DQ CD BW VL; hide VNNI, VP2INTERSECT, FP16 and AMX */
            b = BIT(21) | BIT(26) | BIT(27);
            c = BIT(11);
        }
        r[1] &= ~b;
        r[2] &= ~c;
        r[3] &= ~d;
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI, AVX512-BF16, AVX-IFMA; EDX: AVX-VNNI-INT8,
         * AVX-NE-CONVERT */
        r[0] &= ~(BIT(4) | BIT(5) | BIT(23));
        r[3] &= ~(BIT(4) | BIT(5));
    }
}

static void on_segv(int sig, siginfo_t *si, void *ctx) {
    greg_t *g = ((ucontext_t *)ctx)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    /* A faulting cpuid is a general-protection fault (SI_KERNEL) at its
     * own two bytes; anything else is a real crash: default action. */
    if (si->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t r[4], leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX];
        cpuid_faulting(0);
        real_cpuid(leaf, sub, r);
        cpuid_faulting(1);
        mask(leaf, sub, r);
        g[REG_RAX] = r[0];
        g[REG_RBX] = r[1];
        g[REG_RCX] = r[2];
        g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        return;
    }
    signal(sig, SIG_DFL);
}

static void die(const char *m) {
    (void)!write(2, m, strlen(m));
    _exit(97);
}

__attribute__((constructor)) static void init(void) {
    const char *p = getenv("HANDOFF_CPUID_MASK");
    if (!p || !strcmp(p, "avx2"))
        profile = 0;
    else if (!strcmp(p, "avx512"))
        profile = 1;
    else
        die("cpuid_mask: HANDOFF_CPUID_MASK must be avx2 or avx512\n");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, 0) != 0)
        die("cpuid_mask: cannot install the SIGSEGV handler\n");
    /* No faulting, no mask: fail rather than run unmasked unnoticed. */
    if (cpuid_faulting(1) != 0)
        die("cpuid_mask: this kernel or CPU has no CPUID faulting (flag cpuid_fault)\n");
}
