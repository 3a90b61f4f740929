//! Running a job in a child process: fresh thread pools per case, and a
//! crash, abort or hang in a runtime becomes a result instead of taking the
//! suite down.

// A case that ends early hands back its final cell (a WorkerReport) as the
// error: once per case, next to a process start, so its size does not matter.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use handoff_backend::Registry;

use crate::record::Status;
use crate::worker::{BlockCommand, BlockLink, BlockResult, Job, WorkerReport, execute_job_linked};

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

/// A command (split at whitespace) to start every worker under, e.g.
/// `qemu-x86_64-static -cpu EPYC-Milan` to compute what an int8 model gives
/// on a CPU class this machine is not (`scripts/emulate_cpu.sh`). Its
/// timings are the launcher's, not this machine's.
pub const LAUNCHER_VAR: &str = "HANDOFF_WORKER_LAUNCHER";

/// [`LAUNCHER_VAR`]'s command, unless it is unset or blank.
pub fn launcher() -> Option<String> {
    std::env::var(LAUNCHER_VAR)
        .ok()
        .filter(|l| !l.trim().is_empty())
}

impl WorkerCommand {
    /// `exe __worker`, under [`launcher`] when there is one.
    pub fn handoff(exe: PathBuf) -> Self {
        Self::launched(&launcher().unwrap_or_default(), exe, &["__worker"])
    }

    /// `exe args`, under `launcher` (a command split at whitespace) unless
    /// it is blank.
    pub fn launched(launcher: &str, exe: PathBuf, args: &[&str]) -> Self {
        let mut words = launcher.split_whitespace().map(str::to_owned);
        let args = args.iter().map(|a| (*a).to_owned());
        match words.next() {
            Some(program) => Self {
                program: program.into(),
                args: words
                    .chain(std::iter::once(exe.to_string_lossy().into_owned()))
                    .chain(args)
                    .collect(),
            },
            None => Self {
                program: exe,
                args: args.collect(),
            },
        }
    }
}

/// Prefix of the line a worker measuring in rounds prints once warmed up.
pub const READY_PREFIX: &str = "HANDOFF-READY";
/// Prefix of a block's samples on a worker's stdout.
pub const BLOCK_PREFIX: &str = "HANDOFF-BLOCK ";

/// Reads a job (one JSON line) from stdin, runs it, prints the report; a
/// job measured in rounds reads its block commands from the following
/// lines. The body of `handoff __worker`.
pub fn worker_main(registry: &Registry) -> i32 {
    let mut stdin = BufReader::new(std::io::stdin());
    let mut input = String::new();
    if let Err(e) = stdin.read_line(&mut input) {
        let _ = writeln!(std::io::stderr(), "worker: cannot read job: {e}");
        return 2;
    }
    let job: Job = match serde_json::from_str(&input) {
        Ok(j) => j,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "worker: bad job: {e}");
            return 2;
        }
    };
    if let Some(mb) = job.memory_limit_mb {
        limit_memory(mb);
    }
    let mut link = StdioLink { stdin };
    let report = run_in_process_linked(&job, registry, Some(&mut link));
    let line = serde_json::to_string(&report).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{REPORT_PREFIX}{line}");
    let _ = out.flush();
    0
}

/// The worker's end of the rounds conversation over stdin/stdout.
struct StdioLink<R> {
    stdin: R,
}

impl<R: BufRead> BlockLink for StdioLink<R> {
    fn ready(&mut self) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{READY_PREFIX}");
        let _ = out.flush();
    }

    fn next(&mut self) -> Option<BlockCommand> {
        let mut line = String::new();
        match self.stdin.read_line(&mut line) {
            Ok(n) if n > 0 => serde_json::from_str(&line).ok(),
            _ => None,
        }
    }

    fn send(&mut self, block: &BlockResult) {
        let line = serde_json::to_string(block).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{BLOCK_PREFIX}{line}");
        let _ = out.flush();
    }
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
        let _ = writeln!(
            std::io::stderr(),
            "worker: could not set the memory limit ({mb} MiB)"
        );
    }
}

/// Runs the job in this process, turning a panic into a `failed` report.
pub fn run_in_process(job: &Job, registry: &Registry) -> WorkerReport {
    run_in_process_linked(job, registry, None)
}

/// [`run_in_process`] for a job that may measure in rounds.
pub fn run_in_process_linked(
    job: &Job,
    registry: &Registry,
    link: Option<&mut dyn BlockLink>,
) -> WorkerReport {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        execute_job_linked(job, registry, link)
    })) {
        Ok(r) => r,
        Err(panic) => {
            let msg = handoff_backend::with_cuda_hint(handoff_backend::panic_message(&*panic));
            WorkerReport {
                status: Some(Status::Failed),
                reason: Some(format!("panic in backend: {msg}")),
                ..Default::default()
            }
        }
    }
}

/// What a worker says on its stdout.
enum Message {
    Ready,
    Block(BlockResult),
    Report(Box<WorkerReport>),
}

/// How waiting for a worker's next message ended.
enum Waited {
    Message(Message),
    /// The worker exited, timed out or was stopped: its cell.
    Ended(WorkerReport),
}

/// A worker process and the threads reading its output.
struct Spawned {
    child: Child,
    stdin: Option<ChildStdin>,
    messages: Receiver<Message>,
    stderr: Option<JoinHandle<(String, bool)>>,
    memory_limit_mb: Option<u64>,
}

impl Spawned {
    fn start(cmd: &WorkerCommand, job: &Job) -> Result<Self, WorkerReport> {
        let spawned_at = crate::worker::unix_now_s();
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            // A process group of its own, so the worker and its children
            // (a Python baseline's interpreter) can be paused together.
            .process_group(0)
            .env("RAYON_NUM_THREADS", job.case.threads.to_string())
            // Keep the stderr tail quoted in a failed cell readable.
            .env("RUST_BACKTRACE", "0")
            .envs(&job.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                failed(format!(
                    "cannot start worker {}: {e}",
                    cmd.program.display()
                ))
            })?;
        let mut job = job.clone();
        job.spawned_unix_s = Some(spawned_at);
        let mut payload = serde_json::to_vec(&job).unwrap_or_default();
        payload.push(b'\n');
        let mut stdin = child.stdin.take();
        if let Some(s) = stdin.as_mut() {
            // A worker that dies before reading its job shows up below.
            let _ = s.write_all(&payload);
            let _ = s.flush();
        }
        let (tx, messages) = std::sync::mpsc::channel();
        if let Some(s) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    let msg = if line.trim_end() == READY_PREFIX {
                        Some(Message::Ready)
                    } else if let Some(json) = line.strip_prefix(BLOCK_PREFIX) {
                        serde_json::from_str(json).ok().map(Message::Block)
                    } else if let Some(json) = line.strip_prefix(REPORT_PREFIX) {
                        serde_json::from_str(json)
                            .ok()
                            .map(|r| Message::Report(Box::new(r)))
                    } else {
                        None
                    };
                    if let Some(m) = msg
                        && tx.send(m).is_err()
                    {
                        break;
                    }
                }
            });
        }
        let stderr = child.stderr.take().map(|s| {
            std::thread::spawn(move || {
                let mut tail: Vec<String> = Vec::new();
                let mut out_of_memory = false;
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    out_of_memory |= line.contains("memory allocation of");
                    tail.push(line);
                    if tail.len() > 12 {
                        tail.remove(0);
                    }
                }
                (tail.join("\n"), out_of_memory)
            })
        });
        Ok(Self {
            child,
            stdin,
            messages,
            stderr,
            memory_limit_mb: job.memory_limit_mb,
        })
    }

    /// The next message, or the cell of a worker that exited without one,
    /// ran past `timeout` (killed) or was stopped (killed).
    fn wait(&mut self, timeout: Duration, stop: Option<&AtomicBool>) -> Waited {
        let start = Instant::now();
        loop {
            match self.messages.recv_timeout(Duration::from_millis(10)) {
                Ok(m) => return Waited::Message(m),
                Err(RecvTimeoutError::Disconnected) => {
                    // Output closed: the worker is exiting.
                    let status = self.child.wait().ok();
                    return Waited::Ended(self.exit_report(status));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let stopped = stop.is_some_and(|s| s.load(Ordering::SeqCst));
            if start.elapsed() >= timeout || stopped {
                self.kill();
                let tail = self.stderr_tail().0;
                // An interrupted case is not recorded (a resume runs it
                // again); its reason still says why it was killed.
                let why = if stopped {
                    "killed: the run was interrupted".to_owned()
                } else {
                    format!("killed after {:.0}s", timeout.as_secs_f64())
                };
                return Waited::Ended(WorkerReport {
                    status: Some(Status::Timeout),
                    reason: Some(format!("{why}{}", tail_note(&tail))),
                    ..Default::default()
                });
            }
        }
    }

    fn kill(&mut self) {
        // The whole group: a paused Python interpreter under the worker too.
        crate::machine::signal_group(self.child.id(), libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stderr_tail(&mut self) -> (String, bool) {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    fn exit_report(&mut self, status: Option<std::process::ExitStatus>) -> WorkerReport {
        let (tail, out_of_memory) = self.stderr_tail();
        let how = status.map_or("unknown exit".into(), describe_exit);
        if out_of_memory {
            failed(format!(
                "exceeded memory_limit ({} MiB): {how}{}",
                self.memory_limit_mb.unwrap_or(0),
                tail_note(&tail)
            ))
        } else {
            failed(format!("worker crashed ({how}){}", tail_note(&tail)))
        }
    }

    /// Waits for the final report, then for the process to exit.
    fn report(&mut self, timeout: Duration, stop: Option<&AtomicBool>) -> WorkerReport {
        loop {
            match self.wait(timeout, stop) {
                Waited::Message(Message::Report(r)) => {
                    let _ = self.child.wait();
                    return *r;
                }
                Waited::Message(_) => {}
                Waited::Ended(r) => return r,
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
    let mut spawned = match Spawned::start(cmd, job) {
        Ok(s) => s,
        Err(r) => return r,
    };
    drop(spawned.stdin.take());
    spawned.report(timeout, stop)
}

/// A case's worker while its group is measured in rounds.
pub trait CaseWorker {
    /// Runs one block; `Err` is the case's final cell (crashed, timed out,
    /// failed).
    fn block(&mut self, time_ms: f64, max_runs: u64) -> Result<BlockResult, WorkerReport>;
    /// Ends measuring; the final report (its samples are the parent's).
    fn finish(self: Box<Self>) -> WorkerReport;
    /// The worker's process, when it has one of its own.
    fn pid(&self) -> Option<u32>;
    /// Freezes the worker between its blocks (SIGSTOP to its process
    /// group): a runtime whose threads spin after a run, as ONNX Runtime's
    /// intra-op pool does, would otherwise compete with the next case's
    /// block. Workers without a process of their own are idle anyway.
    fn pause(&mut self) {}
    /// Undoes [`CaseWorker::pause`].
    fn resume(&mut self) {}
}

/// A worker process kept alive between its blocks.
pub struct LiveChild {
    spawned: Spawned,
    /// Where the worker leaves a block's samples so far.
    partial: Option<PathBuf>,
    timeout: Duration,
    stop: Option<std::sync::Arc<AtomicBool>>,
}

impl LiveChild {
    /// Starts the worker without waiting for it to load, check and warm up
    /// its model ([`StartingChild::ready`] waits): several can load side by
    /// side.
    pub fn spawn(
        cmd: &WorkerCommand,
        job: &Job,
        timeout: Duration,
        stop: Option<std::sync::Arc<AtomicBool>>,
    ) -> Result<StartingChild, WorkerReport> {
        Ok(StartingChild(Self {
            spawned: Spawned::start(cmd, job)?,
            partial: job.partial_path.clone(),
            timeout,
            stop,
        }))
    }

    fn send(&mut self, command: &BlockCommand) -> bool {
        let mut line = serde_json::to_vec(command).unwrap_or_default();
        line.push(b'\n');
        self.spawned
            .stdin
            .as_mut()
            .is_some_and(|s| s.write_all(&line).and_then(|()| s.flush()).is_ok())
    }
}

/// A worker process that is loading, checking and warming up its model.
pub struct StartingChild(LiveChild);

impl StartingChild {
    /// Waits until the worker is ready for blocks; `Err` is the case's cell
    /// when it got no further (the timeout counts from this call).
    pub fn ready(mut self) -> Result<LiveChild, WorkerReport> {
        let child = &mut self.0;
        loop {
            match child.spawned.wait(child.timeout, child.stop.as_deref()) {
                Waited::Message(Message::Ready) => return Ok(self.0),
                Waited::Message(Message::Report(r)) => {
                    let _ = child.spawned.child.wait();
                    return Err(*r);
                }
                Waited::Message(Message::Block(_)) => {}
                Waited::Ended(r) => return Err(r),
            }
        }
    }
}

impl CaseWorker for LiveChild {
    fn block(&mut self, time_ms: f64, max_runs: u64) -> Result<BlockResult, WorkerReport> {
        // A failed write means the worker is gone: waiting says how.
        self.send(&BlockCommand::Block { time_ms, max_runs });
        loop {
            match self.spawned.wait(self.timeout, self.stop.as_deref()) {
                Waited::Message(Message::Block(b)) => return Ok(b),
                Waited::Message(Message::Report(r)) => {
                    let _ = self.spawned.child.wait();
                    return Err(*r);
                }
                Waited::Message(Message::Ready) => {}
                Waited::Ended(mut r) => {
                    // The block in flight when it was killed: its samples so far.
                    r.samples_ms = crate::worker::take_partial(self.partial.as_deref());
                    return Err(r);
                }
            }
        }
    }

    fn finish(mut self: Box<Self>) -> WorkerReport {
        self.resume();
        self.send(&BlockCommand::Finish);
        drop(self.spawned.stdin.take());
        let (timeout, stop) = (self.timeout, self.stop.clone());
        self.spawned.report(timeout, stop.as_deref())
    }

    fn pid(&self) -> Option<u32> {
        Some(self.spawned.child.id())
    }

    fn pause(&mut self) {
        crate::machine::signal_group(self.spawned.child.id(), libc::SIGSTOP);
    }

    fn resume(&mut self) {
        crate::machine::signal_group(self.spawned.child.id(), libc::SIGCONT);
    }
}

impl Drop for LiveChild {
    fn drop(&mut self) {
        // A group abandoned half-way (interrupted) leaves no worker behind.
        if matches!(self.spawned.child.try_wait(), Ok(None)) {
            self.spawned.kill();
        }
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

/// The in-process worker's messages.
enum ThreadMessage {
    Ready,
    Block(BlockResult),
}

/// The worker's end of an in-process rounds conversation.
struct ChannelLink {
    tx: std::sync::mpsc::Sender<ThreadMessage>,
    rx: Receiver<BlockCommand>,
}

impl BlockLink for ChannelLink {
    fn ready(&mut self) {
        let _ = self.tx.send(ThreadMessage::Ready);
    }

    fn next(&mut self) -> Option<BlockCommand> {
        self.rx.recv().ok()
    }

    fn send(&mut self, block: &BlockResult) {
        let _ = self.tx.send(ThreadMessage::Block(block.clone()));
    }
}

/// A case measured in rounds on a thread of this process (`isolation:
/// none`): the same conversation as a worker process, over channels.
pub struct ThreadWorker<'s> {
    tx: Option<std::sync::mpsc::Sender<BlockCommand>>,
    rx: Receiver<ThreadMessage>,
    handle: Option<std::thread::ScopedJoinHandle<'s, WorkerReport>>,
}

impl<'s> ThreadWorker<'s> {
    /// Starts the job on a thread of `scope` and waits until it is warmed
    /// up; `Err` is the case's cell when it got no further.
    pub fn start<'e>(
        scope: &'s std::thread::Scope<'s, 'e>,
        job: Job,
        registry: &'e Registry,
    ) -> Result<Self, WorkerReport> {
        let (command_tx, command_rx) = std::sync::mpsc::channel();
        let (message_tx, message_rx) = std::sync::mpsc::channel();
        let handle = scope.spawn(move || {
            let mut link = ChannelLink {
                tx: message_tx,
                rx: command_rx,
            };
            run_in_process_linked(&job, registry, Some(&mut link))
        });
        let mut worker = Self {
            tx: Some(command_tx),
            rx: message_rx,
            handle: Some(handle),
        };
        match worker.rx.recv() {
            Ok(ThreadMessage::Ready) => Ok(worker),
            _ => Err(worker.join()),
        }
    }

    fn join(&mut self) -> WorkerReport {
        drop(self.tx.take());
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_else(|| failed("worker thread ended without a report".into()))
    }
}

impl CaseWorker for ThreadWorker<'_> {
    fn block(&mut self, time_ms: f64, max_runs: u64) -> Result<BlockResult, WorkerReport> {
        if let Some(tx) = &self.tx {
            let _ = tx.send(BlockCommand::Block { time_ms, max_runs });
        }
        match self.rx.recv() {
            Ok(ThreadMessage::Block(b)) => Ok(b),
            _ => Err(self.join()),
        }
    }

    fn finish(mut self: Box<Self>) -> WorkerReport {
        if let Some(tx) = &self.tx {
            let _ = tx.send(BlockCommand::Finish);
        }
        self.join()
    }

    fn pid(&self) -> Option<u32> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::WorkerCommand;

    #[test]
    fn a_launcher_goes_in_front_of_the_worker_and_a_blank_one_is_none() {
        let w = WorkerCommand::launched(
            " qemu-x86_64  -cpu EPYC-Milan ",
            "/x/handoff".into(),
            &["__worker"],
        );
        assert_eq!(w.program.to_str(), Some("qemu-x86_64"));
        assert_eq!(w.args, ["-cpu", "EPYC-Milan", "/x/handoff", "__worker"]);
        let w = WorkerCommand::launched("  ", "/x/handoff".into(), &["__worker"]);
        assert_eq!(w.program.to_str(), Some("/x/handoff"));
        assert_eq!(w.args, ["__worker"]);
    }
}
