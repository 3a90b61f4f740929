//! `http` cases: a server process that loads the model once, then the
//! open-loop generator (in this process) sends it Poisson-timed requests
//! over loopback. The server is the CLI's choice ([`ServerLauncher`]):
//! `handoff serve` for the Rust backends, FastAPI for `python-onnxruntime`.
//!
//! Protocol with the server: it prints `listening on http://ADDR` on stdout
//! once the model is loaded, answers `GET /health` and `POST /embed`
//! (`{"texts": [...]}` -> `{"embeddings": [[...]]}`), exits when its stdin
//! closes, and exits with 3 (unsupported) or 4 (unavailable) when it cannot
//! load the model.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use handoff_backend::{Device, Tensor, TensorData, compare, load_tensors};
use handoff_load::http::{request, run_level, runtime};
use handoff_load::{Level, find_peak, poisson_schedule, query_count};
use handoff_suite::{Load, LoadTarget};

use crate::record::{LoadStats, Status};
use crate::worker::{Job, ReferenceFile, WorkerReport, peak_outcome};

/// What a server needs to know to serve a case.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub backend: String,
    pub model: PathBuf,
    pub hf_dir: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub device: Device,
    pub threads: u32,
    pub seq: u32,
    pub max_batch: u32,
}

/// A server command and a description for the report.
pub struct Launch {
    pub command: Command,
    /// E.g. `handoff serve (axum) + ort`.
    pub server: String,
}

/// Builds the server command of a case, or says why there is none
/// (`Unavailable`: no Python environment, ...).
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct ServerLauncher(
    pub Arc<dyn Fn(&ServerSpec) -> Result<Launch, (Status, String)> + Send + Sync>,
);

impl std::fmt::Debug for ServerLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerLauncher")
    }
}

pub const READY_PREFIX: &str = "listening on http://";

/// A server process, killed when dropped (closing its stdin first, which
/// is how it learns that this process is gone even after a crash here).
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fail(mut report: WorkerReport, status: Status, reason: String) -> WorkerReport {
    report.status = Some(status);
    report.reason = Some(reason);
    report
}

/// Runs one `http` case end to end; never panics on a server's failure.
pub fn run(
    job: &Job,
    spec: &ServerSpec,
    sentences: &[String],
    load: &Load,
    reference: Option<&ReferenceFile>,
    launcher: Option<&ServerLauncher>,
    start_timeout: Duration,
) -> WorkerReport {
    let report = WorkerReport::default();
    let Some(launcher) = launcher else {
        return fail(
            report,
            Status::Unavailable,
            "this build cannot start HTTP servers".into(),
        );
    };
    let launch = match (launcher.0)(spec) {
        Ok(l) => l,
        Err((status, reason)) => return fail(report, status, reason),
    };
    let mut command = launch.command;
    let child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut server = match child {
        Ok(c) => Server { child: c },
        Err(e) => {
            return fail(
                report,
                Status::Failed,
                format!("cannot start {}: {e}", launch.server),
            );
        }
    };
    let (addr_tx, addr_rx) = mpsc::channel();
    let stdout = server.child.stdout.take();
    std::thread::spawn(move || {
        if let Some(out) = stdout {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(a) = line.trim().strip_prefix(READY_PREFIX) {
                    let _ = addr_tx.send(a.trim_end_matches('/').to_owned());
                }
            }
        }
    });
    let stderr = server.child.stderr.take();
    let tail = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let tail_w = Arc::clone(&tail);
    std::thread::spawn(move || {
        if let Some(err) = stderr {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut t = tail_w.lock().expect("tail lock");
                t.push(line);
                if t.len() > 8 {
                    t.remove(0);
                }
            }
        }
    });
    let stderr_tail = || {
        // Give the reader a moment to take the last lines of a dead server.
        std::thread::sleep(Duration::from_millis(100));
        let t = tail.lock().expect("tail lock");
        let last: Vec<&String> = t.iter().rev().take(3).collect();
        last.into_iter()
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let started = Instant::now();
    let addr: SocketAddr = loop {
        if let Ok(a) = addr_rx.recv_timeout(Duration::from_millis(50)) {
            match a.parse() {
                Ok(a) => break a,
                Err(_) => {
                    return fail(
                        report,
                        Status::Failed,
                        format!("{} announced a bad address `{a}`", launch.server),
                    );
                }
            }
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            let (s, what) = match status.code() {
                Some(3) => (Status::Unsupported, String::new()),
                Some(4) => (Status::Unavailable, String::new()),
                _ => (Status::Failed, format!(" ({status})")),
            };
            let why = stderr_tail();
            let why = why.strip_prefix("error: ").unwrap_or(&why).to_owned();
            return fail(
                report,
                s,
                format!("{} exited before serving{what}: {why}", launch.server),
            );
        }
        if started.elapsed() > start_timeout {
            return fail(
                report,
                Status::Timeout,
                format!(
                    "{} did not start serving within {:.0}s",
                    launch.server,
                    start_timeout.as_secs_f64()
                ),
            );
        }
    };
    let mut report = report;
    report.load_ms = Some(started.elapsed().as_secs_f64() * 1e3);
    let rt = match runtime() {
        Ok(r) => r,
        Err(e) => return fail(report, Status::Failed, format!("tokio: {e}")),
    };
    let batch = job.case.batch as usize;
    let body = |i: usize| -> Vec<u8> {
        let texts: Vec<&String> = (0..batch)
            .map(|j| &sentences[(i * batch + j) % sentences.len()])
            .collect();
        serde_json::to_vec(&serde_json::json!({ "texts": texts })).unwrap_or_default()
    };
    let bodies: Vec<Vec<u8>> = (0..sentences.len().max(1)).map(body).collect();

    // Ready means answering, whatever the server printed.
    loop {
        match rt.block_on(request(addr, "GET", "/health", b"")) {
            Ok(r) if r.status == 200 => break,
            _ if started.elapsed() > start_timeout => {
                return fail(
                    report,
                    Status::Timeout,
                    format!("{} did not answer /health", launch.server),
                );
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    // The output check: request 0 holds the sentences the reference saw.
    let t = Instant::now();
    let first = rt.block_on(request(addr, "POST", "/embed", &bodies[0]));
    report.first_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    let first = match first {
        Ok(r) if r.status == 200 => r,
        Ok(r) => {
            return fail(
                report,
                Status::Failed,
                format!(
                    "{} answered {}: {}",
                    launch.server,
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ),
            );
        }
        Err(e) => return fail(report, Status::Failed, e.to_string()),
    };
    if let Some(r) = reference {
        match check_output(&first.body, r, batch) {
            Ok(parity) => {
                let ok = parity.ok;
                let detail = parity.detail.clone();
                let max_abs = parity.max_abs;
                report.parity = Some(parity);
                if !ok {
                    return fail(
                        report,
                        Status::Mismatch,
                        format!(
                            "served outputs differ from {}: {}",
                            r.backend,
                            detail.unwrap_or_else(|| format!("max abs {max_abs:.3e}"))
                        ),
                    );
                }
            }
            Err(e) => return fail(report, Status::Failed, e),
        }
    }

    // Warm-up, one request at a time: also the first guess of the service
    // time for the peak search.
    let warm_start = Instant::now();
    let mut warm = Vec::new();
    while warm.len() < 5 || warm_start.elapsed() < job.measure.warmup {
        let t = Instant::now();
        match rt.block_on(request(
            addr,
            "POST",
            "/embed",
            &bodies[warm.len() % bodies.len()],
        )) {
            Ok(r) if r.status == 200 => warm.push(t.elapsed().as_secs_f64() * 1e3),
            Ok(r) => {
                return fail(
                    report,
                    Status::Failed,
                    format!("warm-up answer {}", r.status),
                );
            }
            Err(e) => return fail(report, Status::Failed, e.to_string()),
        }
    }
    report.warmup_runs = warm.len() as u64;
    let service_ms = handoff_stats::median(&warm);

    let label = job.case.scenario.label();
    let level_at = |qps: f64, duration: Duration, min: u32| {
        let n = query_count(qps, duration, min);
        let schedule = poisson_schedule(qps, n, job.seed);
        rt.block_on(run_level(addr, "/embed", &bodies, qps, &schedule))
    };
    let outcome: Result<(Level, LoadStats), String> = match load.target {
        LoadTarget::Qps(qps) => level_at(qps, load.duration, load.min_queries)
            .map(|level| {
                let stats = LoadStats::from_level(label, &level);
                (level, stats)
            })
            .map_err(|e| e.to_string()),
        LoadTarget::Peak { p99 } => {
            let step = (load.duration / 3).max(Duration::from_secs(2));
            let min = (load.min_queries / 2).max(1);
            find_peak(
                p99.as_secs_f64() * 1e3,
                1e3 / service_ms.max(1e-3),
                7,
                |q| level_at(q, step, min),
            )
            .map(|peak| peak_outcome(&mut report, label, peak))
            .map_err(|e| e.to_string())
        }
    };
    let (level, mut stats) = match outcome {
        Ok(o) => o,
        Err(e) => return fail(report, Status::Failed, e),
    };
    if let Ok(Some(status)) = server.child.try_wait() {
        return fail(
            report,
            Status::Failed,
            format!(
                "{} died during the load ({status}): {}",
                launch.server,
                stderr_tail()
            ),
        );
    }
    stats.server = Some(launch.server);
    stats.server_rss_mb = crate::machine::process_peak_rss_mb(&server.child.id().to_string());
    report.peak_rss_mb = stats.server_rss_mb;
    report.samples_ms = level.latencies_ms;
    report.load = Some(stats);
    report.status = Some(Status::Ok);
    report
}

/// Compares the served embedding of request 0 with the reference's last
/// output.
fn check_output(
    body: &[u8],
    r: &ReferenceFile,
    batch: usize,
) -> Result<handoff_backend::Parity, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        embeddings: Vec<Vec<f32>>,
    }
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|e| format!("the server's answer is not {{\"embeddings\": [[...]]}}: {e}"))?;
    let reference = load_tensors(&r.path).map_err(|e| format!("reference outputs: {e}"))?;
    let last = reference
        .last()
        .ok_or("the reference has no outputs")?
        .clone();
    let width = answer.embeddings.first().map_or(0, Vec::len);
    if answer.embeddings.len() != batch || answer.embeddings.iter().any(|r| r.len() != width) {
        return Err(format!(
            "the server answered {} rows for {batch} texts",
            answer.embeddings.len()
        ));
    }
    let served = Tensor {
        name: last.name.clone(),
        shape: vec![batch, width],
        data: TensorData::F32(answer.embeddings.concat()),
    };
    // The reference may keep the model's own shape ([batch, 1, width]).
    let last = Tensor {
        shape: served.shape.clone(),
        ..last
    };
    Ok(compare(&[served], &[last], &r.backend, r.atol, r.rtol))
}
