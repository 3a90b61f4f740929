//! Running a job in a child process: fresh thread pools per case, and a
//! crash, abort or hang in a runtime becomes a result instead of taking the
//! suite down.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use handoff_backend::Registry;

use crate::record::Status;
use crate::worker::{Job, WorkerReport, execute_job};

/// Prefix of the report line on a worker's stdout; runtimes may print their
/// own lines there too.
pub const REPORT_PREFIX: &str = "HANDOFF-REPORT ";

/// How to start a worker: normally the `handoff` binary itself with its
/// hidden `__worker` subcommand.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// Reads a job from stdin, runs it, prints the report. The body of
/// `handoff __worker`.
pub fn worker_main(registry: &Registry) -> i32 {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("worker: cannot read job: {e}");
        return 2;
    }
    let job: Job = match serde_json::from_str(&input) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("worker: bad job: {e}");
            return 2;
        }
    };
    if let Some(mb) = job.memory_limit_mb {
        limit_memory(mb);
    }
    let report = run_in_process(&job, registry);
    let line = serde_json::to_string(&report).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{REPORT_PREFIX}{line}");
    let _ = out.flush();
    0
}

/// Caps this process's data segment (heap and private mappings), so a case
/// that would take the machine down fails its allocation instead.
fn limit_memory(mb: u64) {
    let bytes = mb.saturating_mul(1 << 20);
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: setrlimit reads a valid, initialised struct; no memory is shared.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_DATA, &lim) };
    if rc != 0 {
        eprintln!("worker: could not set the memory limit ({mb} MiB)");
    }
}

/// Runs the job in this process, turning a panic into a `failed` report.
pub fn run_in_process(job: &Job, registry: &Registry) -> WorkerReport {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute_job(job, registry))) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".into());
            WorkerReport {
                status: Some(Status::Failed),
                reason: Some(format!("panic in backend: {msg}")),
                ..Default::default()
            }
        }
    }
}

/// Runs the job in a child process, killing it after `timeout`.
pub fn run_in_child(
    cmd: &WorkerCommand,
    job: &Job,
    timeout: Duration,
    stop: Option<&AtomicBool>,
) -> WorkerReport {
    let spawned_at = crate::worker::unix_now_s();
    let mut child = match Command::new(&cmd.program)
        .args(&cmd.args)
        .env("RAYON_NUM_THREADS", job.case.threads.to_string())
        // Keep the stderr tail quoted in a failed cell readable.
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return failed(format!(
                "cannot start worker {}: {e}",
                cmd.program.display()
            ));
        }
    };
    let mut job = job.clone();
    job.spawned_unix_s = Some(spawned_at);
    let payload = serde_json::to_vec(&job).unwrap_or_default();
    if let Some(mut stdin) = child.stdin.take() {
        // A worker that dies before reading its job shows up below.
        let _ = stdin.write_all(&payload);
    }
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut report = None;
        if let Some(s) = stdout {
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                if let Some(json) = line.strip_prefix(REPORT_PREFIX) {
                    report = serde_json::from_str::<WorkerReport>(json).ok();
                }
            }
        }
        report
    });
    let err_thread = std::thread::spawn(move || {
        let mut tail: Vec<String> = Vec::new();
        let mut out_of_memory = false;
        if let Some(s) = stderr {
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                out_of_memory |= line.contains("memory allocation of");
                tail.push(line);
                if tail.len() > 12 {
                    tail.remove(0);
                }
            }
        }
        (tail.join("\n"), out_of_memory)
    });
    let start = Instant::now();
    let exit = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None)
                if start.elapsed() >= timeout || stop.is_some_and(|s| s.load(Ordering::SeqCst)) =>
            {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return failed(format!("waiting for worker: {e}")),
        }
    };
    let report = out_thread.join().ok().flatten();
    let (stderr_tail, out_of_memory) = err_thread.join().unwrap_or_default();
    match (exit, report) {
        (None, _) => WorkerReport {
            status: Some(Status::Timeout),
            reason: Some(format!(
                "killed after {:.0}s{}",
                timeout.as_secs_f64(),
                tail_note(&stderr_tail)
            )),
            ..Default::default()
        },
        (Some(_), Some(r)) => r,
        (Some(status), None) if out_of_memory => failed(format!(
            "exceeded memory_limit ({} MiB): {}{}",
            job.memory_limit_mb.unwrap_or(0),
            describe_exit(status),
            tail_note(&stderr_tail)
        )),
        (Some(status), None) => failed(format!(
            "worker crashed ({}){}",
            describe_exit(status),
            tail_note(&stderr_tail)
        )),
    }
}

fn failed(reason: String) -> WorkerReport {
    WorkerReport {
        status: Some(Status::Failed),
        reason: Some(reason),
        ..Default::default()
    }
}

fn tail_note(tail: &str) -> String {
    let t = tail.trim();
    if t.is_empty() {
        String::new()
    } else {
        let last: Vec<&str> = t.lines().rev().take(3).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        format!("; stderr: {}", last.join(" | "))
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT",
            libc::SIGKILL => "SIGKILL (out of memory?)",
            libc::SIGBUS => "SIGBUS",
            libc::SIGILL => "SIGILL",
            libc::SIGFPE => "SIGFPE",
            _ => "signal",
        };
        format!("{name} ({sig})")
    } else {
        format!("exit status {}", status.code().unwrap_or(-1))
    }
}
