//! Facts about the machine: what else was running while a case was timed,
//! peak memory, and the environment fingerprint stored with every run.

use std::collections::BTreeMap;
use std::time::Instant;

pub use handoff_results::{Fingerprint, MachineLoad};

/// More than a quarter of a core used by others during timing marks a case.
pub const BUSY_THRESHOLD_CORES: f64 = 0.25;

/// The busy threshold in cores: `HANDOFF_BUSY_CORES` where a known, steady
/// background load is accepted (a test harness running other tests beside
/// wall-clock mock cases), else [`BUSY_THRESHOLD_CORES`].
pub fn busy_threshold_cores() -> f64 {
    std::env::var("HANDOFF_BUSY_CORES")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .unwrap_or(BUSY_THRESHOLD_CORES)
}

/// CPU counters at one instant.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    system_busy_ticks: u64,
    self_ticks: u64,
    loadavg: f64,
    at: Instant,
}

impl CpuSnapshot {
    pub fn now() -> Self {
        Self {
            system_busy_ticks: system_busy_ticks().unwrap_or(0),
            self_ticks: self_ticks().unwrap_or(0),
            loadavg: loadavg().unwrap_or(0.0),
            at: Instant::now(),
        }
    }

    /// Load between `self` and `later`.
    pub fn load_until(&self, later: &CpuSnapshot) -> MachineLoad {
        let wall = (later.at - self.at).as_secs_f64();
        let ticks_per_s = clock_ticks_per_second();
        let system = later
            .system_busy_ticks
            .saturating_sub(self.system_busy_ticks) as f64;
        let own = later.self_ticks.saturating_sub(self.self_ticks) as f64;
        let other = if wall > 0.0 {
            ((system - own).max(0.0) / ticks_per_s) / wall
        } else {
            0.0
        };
        MachineLoad {
            loadavg_before: self.loadavg,
            loadavg_after: later.loadavg,
            other_cpu_cores: (other * 100.0).round() / 100.0,
            busy: other > busy_threshold_cores(),
        }
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY-free: sysconf is exposed safely through libc's signature but is
    // an FFI call, so the workspace's unsafe ban is lifted for this line.
    #[allow(unsafe_code)]
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn system_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()?
        + v.get(1)?
        + v.get(2)?
        + v.get(5).unwrap_or(&0)
        + v.get(6).unwrap_or(&0)
        + v.get(7).unwrap_or(&0);
    Some(busy)
}

/// CPU ticks of this process and its children (live ones read from /proc,
/// reaped ones from cutime/cstime): a backend's own worker process (the
/// Python baseline) is part of the case, not "other" load.
fn self_ticks() -> Option<u64> {
    let me = std::process::id();
    let (own, _) = proc_ticks("self")?;
    // Children and grandchildren: interleaved rounds keep a worker per case
    // alive, and a Python baseline's interpreter is a worker's child.
    let mut procs: Vec<(u32, u64, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if let (Ok(p), Some((ticks, ppid))) = (pid.parse::<u32>(), proc_ticks(pid)) {
                procs.push((p, ticks, ppid));
            }
        }
    }
    let children: Vec<u32> = procs
        .iter()
        .filter(|(_, _, ppid)| *ppid == me)
        .map(|(p, _, _)| *p)
        .collect();
    Some(
        own + procs
            .iter()
            .filter(|(_, _, ppid)| *ppid == me || children.contains(ppid))
            .map(|(_, t, _)| t)
            .sum::<u64>(),
    )
}

/// `MemAvailable` of /proc/meminfo, in MB.
pub fn available_memory_mb() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Sends `signal` to the process group led by `pgid`.
pub fn signal_group(pgid: u32, signal: i32) -> bool {
    let Ok(pgid) = i32::try_from(pgid) else {
        return false;
    };
    // SAFETY: killpg takes plain integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::killpg(pgid, signal) };
    rc == 0
}

/// Online CPUs.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Pins every thread of process `pid` (0: this process's calling thread
/// only) to `cpus`. Best effort: a thread that exits meanwhile is skipped.
pub fn pin(pid: u32, cpus: &[usize]) -> bool {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it and
    // sched_setaffinity only reads it.
    #[allow(unsafe_code)]
    let set_for = |tid: i32| unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for c in cpus {
            libc::CPU_SET(*c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    if pid == 0 {
        return set_for(0);
    }
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in dir.flatten() {
        if let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        {
            any |= set_for(tid);
        }
    }
    any
}

/// CPU time of every thread of a process so far, in nanoseconds (from the
/// scheduler's per-thread statistics, finer than clock ticks).
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in dir.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat"))
            && let Some(ns) = text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        {
            total += ns;
        }
    }
    Some(total)
}

/// utime+stime+cutime+cstime and the parent pid of /proc/<pid>/stat.
fn proc_ticks(pid: &str) -> Option<(u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 4 (ppid) and 14-17 (utime, stime, cutime, cstime) of the full
    // line are 1 and 11-14 here.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let ppid = f.get(1)?.parse::<u32>().ok()?;
    Some((n(11)? + n(12)? + n(13)? + n(14)?, ppid))
}

fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Peak resident set size of this process, in MiB.
pub fn peak_rss_mb() -> Option<f64> {
    process_peak_rss_mb("self")
}

/// Peak resident set of process `pid` (`"self"` for this one) in MiB, from
/// VmHWM in /proc (Linux; `None` elsewhere or once it has been reaped).
pub fn process_peak_rss_mb(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// This machine's fingerprint, with the backends' versions as probed.
pub fn collect_fingerprint(backends: BTreeMap<String, String>) -> Fingerprint {
    {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        };
        let interesting = [
            "avx2",
            "fma",
            "avx512f",
            "avx512bw",
            "avx512_vnni",
            "avx512_bf16",
            "avx_vnni",
            "amx_tile",
            "amx_int8",
            "neon",
            "asimd",
            "asimddp",
            "i8mm",
        ];
        let flags = field("flags")
            .or_else(|| field("Features"))
            .unwrap_or_default();
        let cpu_flags = interesting
            .iter()
            .filter(|f| flags.split_whitespace().any(|x| x == **f))
            .map(|f| (*f).to_owned())
            .collect();
        let os = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| {
                    l.trim_start_matches("PRETTY_NAME=")
                        .trim_matches('"')
                        .to_owned()
                })
            })
            .unwrap_or_else(|| std::env::consts::OS.to_owned());
        let env_vars = [
            "OMP_NUM_THREADS",
            "RAYON_NUM_THREADS",
            "ORT_DYLIB_PATH",
            "MKL_NUM_THREADS",
            crate::isolate::LAUNCHER_VAR,
            handoff_convert::isa::TARGET_CPU_VAR,
            handoff_convert::isa::CPUID_MASK_VAR,
        ]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
        Fingerprint {
            cpu_model: field("model name").unwrap_or_else(|| "unknown".into()),
            logical_cores: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_flags,
            // The class the runtimes' int8 kernels see (`cpuid` on x86),
            // which decides which variants are reused.
            cpu_class: handoff_convert::isa::Isa::detect()
                .class
                .as_str()
                .to_owned(),
            cpu_hidden: handoff_convert::isa::Isa::hidden(),
            sse_after_avx_ns: crate::avx_sse::sse_after_avx_ns(),
            subnormal_ns: crate::subnormal::subnormal_ns(),
            os,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            handoff_version: env!("CARGO_PKG_VERSION").into(),
            rustc: option_env!("HANDOFF_RUSTC_VERSION")
                .unwrap_or("unknown")
                .into(),
            build_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .into(),
            git_commit: git_commit(),
            backends,
            env_vars,
        }
    }
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let commit = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_cpu_excludes_our_own_time() {
        let t0 = Instant::now();
        let a = CpuSnapshot {
            system_busy_ticks: 1000,
            self_ticks: 100,
            loadavg: 0.5,
            at: t0,
        };
        let tps = clock_ticks_per_second();
        // One second: the system was busy 1.5 s of CPU, 1.0 s of it ours.
        let b = CpuSnapshot {
            system_busy_ticks: 1000 + (1.5 * tps) as u64,
            self_ticks: 100 + tps as u64,
            loadavg: 1.5,
            at: t0 + std::time::Duration::from_secs(1),
        };
        let load = a.load_until(&b);
        assert!((load.other_cpu_cores - 0.5).abs() < 0.02, "{load:?}");
        assert!(load.busy);
        let quiet = CpuSnapshot {
            system_busy_ticks: 1000 + tps as u64,
            ..b.clone()
        };
        assert!(!a.load_until(&quiet).busy);
    }

    #[test]
    fn the_fingerprint_hash_leaves_out_what_is_measured() {
        let a = collect_fingerprint(BTreeMap::new());
        let b = Fingerprint {
            sse_after_avx_ns: Some(a.sse_after_avx_ns.unwrap_or(0.0) + 100.0),
            subnormal_ns: Some(a.subnormal_ns.unwrap_or(0.0) + 100.0),
            ..a.clone()
        };
        assert_eq!(a.hash(), b.hash());
        let other_cpu = Fingerprint {
            cpu_model: format!("{} (another)", a.cpu_model),
            ..a.clone()
        };
        assert_ne!(a.hash(), other_cpu.hash());
    }

    #[test]
    fn counters_are_read_from_proc() {
        assert!(system_busy_ticks().unwrap() > 0);
        assert!(self_ticks().is_some());
        assert!(peak_rss_mb().unwrap() > 0.0);
    }
}
