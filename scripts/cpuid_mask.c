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
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static int profile; /* 0: avx2, 1: avx512 */
static unsigned long traps; /* cpuid executions answered, all threads */

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

/* The program's own SIGSEGV disposition. A program that installs a
 * handler (Rust's stack-overflow guard, LLVM's crash handler, Python's
 * faulthandler) would otherwise take the trapped cpuid for a crash:
 * sigaction and signal are interposed so that ours stays installed and
 * theirs is kept here and called for every fault that is not a cpuid. */
static struct sigaction app;
static int installed;

static int (*real_sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static int real_sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction_fn)
        real_sigaction_fn = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    return real_sigaction_fn(sig, act, old);
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV || !installed)
        return real_sigaction(sig, act, old);
    if (old)
        *old = app;
    if (act)
        app = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    static sighandler_t (*real_signal)(int, sighandler_t);
    if (sig != SIGSEGV || !installed) {
        if (!real_signal)
            real_signal = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
        return real_signal(sig, handler);
    }
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    if (sigaction(sig, &act, &old) != 0)
        return SIG_ERR;
    return old.sa_handler;
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
        __atomic_fetch_add(&traps, 1, __ATOMIC_RELAXED);
        return;
    }
    if (app.sa_flags & SA_SIGINFO) {
        app.sa_sigaction(sig, si, ctx);
    } else if (app.sa_handler != SIG_DFL && app.sa_handler != SIG_IGN) {
        app.sa_handler(sig);
    } else {
        /* Default action: uninstall and return; the fault repeats and
         * kills the process as it would have without the mask. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        installed = 0;
        real_sigaction(sig, &dfl, 0);
    }
}

static void die(const char *m) {
    (void)!write(2, m, strlen(m));
    _exit(97);
}

/* HANDOFF_CPUID_MASK_COUNT=FILE: each process appends how many cpuid it
 * executed. Each costs a signal and two system calls (microseconds), which
 * a program that asks cpuid in a hot loop pays on every call. */
__attribute__((destructor)) static void report(void) {
    const char *path = getenv("HANDOFF_CPUID_MASK_COUNT");
    FILE *f = path ? fopen(path, "a") : 0;
    if (f) {
        fprintf(f, "pid %d: %lu cpuid\n", (int)getpid(), traps);
        fclose(f);
    }
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
    /* SA_ONSTACK: a stack overflow is handled on the thread's alternate
     * stack, where the program (Rust's guard) set one up. */
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    app.sa_handler = SIG_DFL;
    sigemptyset(&app.sa_mask);
    if (real_sigaction(SIGSEGV, &sa, 0) != 0)
        die("cpuid_mask: cannot install the SIGSEGV handler\n");
    installed = 1;
    /* No faulting, no mask: fail rather than run unmasked unnoticed. */
    if (cpuid_faulting(1) != 0)
        die("cpuid_mask: this kernel or CPU has no CPUID faulting (flag cpuid_fault)\n");
}
