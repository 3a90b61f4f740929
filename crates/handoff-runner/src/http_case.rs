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
use handoff_load::{Level, PeakSearch, find_peak, poisson_schedule, query_count};
use handoff_suite::{Endpoint, Load, LoadTarget};
use std::os::unix::process::CommandExt;

use crate::record::{LoadStats, Status};
use crate::rounds::RoundsInfo;
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
    /// What the requests will ask (`/embed`, or `/predict` of a classifier).
    pub endpoint: Endpoint,
    /// Dynamic batching wait of the server (`None`: each request alone).
    pub batch_wait: Option<Duration>,
    /// The backend's settings for this model (`backend_options`), as the
    /// per-call cases use them; `Null`: its defaults.
    pub backend_options: serde_json::Value,
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
/// It runs in a process group of its own, so it can be paused whole while
/// another server's block runs.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        crate::machine::signal_group(self.child.id(), libc::SIGCONT);
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

/// A dead server's last three stderr lines, joined.
fn last_lines(tail: &std::sync::Mutex<Vec<String>>) -> String {
    // Give the reader a moment to take the last lines of a dead server.
    std::thread::sleep(Duration::from_millis(100));
    let t = tail.lock().expect("tail lock");
    let last: Vec<&String> = t.iter().rev().take(3).collect();
    last.into_iter()
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join(" | ")
}

fn failed(report: WorkerReport, status: Status, reason: String) -> Box<WorkerReport> {
    Box::new(fail(report, status, reason))
}

/// A started server that answered its output check and its warm-up: ready
/// for load.
pub struct Served {
    server: Server,
    name: String,
    addr: SocketAddr,
    rt: handoff_load::http::Runtime,
    bodies: Vec<Vec<u8>>,
    /// `/embed` or `/predict`.
    path: &'static str,
    tail: Arc<std::sync::Mutex<Vec<String>>>,
    /// What is known so far (load time, first answer, parity, warm-up).
    report: WorkerReport,
    /// Median warm-up latency, one request at a time, ms.
    service_ms: f64,
}

impl Served {
    /// The server's last stderr lines, for the reason of a failed cell.
    fn stderr_tail(&self) -> String {
        last_lines(&self.tail)
    }

    /// Poisson arrivals at `qps`: `queries` of them, drawn with `seed`.
    fn level(&self, qps: f64, queries: usize, seed: u64) -> Result<Level, String> {
        let schedule = poisson_schedule(qps, queries, seed);
        self.rt
            .block_on(run_level(
                self.addr,
                self.path,
                &self.bodies,
                qps,
                &schedule,
            ))
            .map_err(|e| e.to_string())
    }

    /// Freezes the idle server (SIGSTOP to its group) so that nothing it
    /// does between its blocks (a runtime's spinning threads, a collector)
    /// runs during another server's block; `false` wakes it.
    fn pause(&self, paused: bool) {
        let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        crate::machine::signal_group(self.server.child.id(), signal);
    }

    /// `Some(reason)` when the server has died.
    fn died(&mut self) -> Option<String> {
        match self.server.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} died during the load ({status}): {}",
                self.name,
                self.stderr_tail()
            )),
            _ => None,
        }
    }

    /// The cell: `level`'s samples with `stats`, unless the server died.
    fn finish(mut self, level: Level, mut stats: LoadStats) -> WorkerReport {
        if let Some(why) = self.died() {
            return fail(self.report, Status::Failed, why);
        }
        let mut report = std::mem::take(&mut self.report);
        stats.server = Some(self.name.clone());
        stats.server_rss_mb =
            crate::machine::process_peak_rss_mb(&self.server.child.id().to_string());
        report.peak_rss_mb = stats.server_rss_mb;
        report.samples_ms = level.latencies_ms;
        report.load = Some(stats);
        report.status = Some(Status::Ok);
        report
    }
}

/// Starts the case's server and checks it: ready (`/health`), the output
/// of request 0 against the reference, a warm-up one request at a time.
/// `Err` is the case's cell.
pub fn start(
    job: &Job,
    spec: &ServerSpec,
    sentences: &[String],
    reference: Option<&ReferenceFile>,
    launcher: Option<&ServerLauncher>,
    start_timeout: Duration,
) -> Result<Served, Box<WorkerReport>> {
    let report = WorkerReport::default();
    let Some(launcher) = launcher else {
        return Err(failed(
            report,
            Status::Unavailable,
            "this build cannot start HTTP servers".into(),
        ));
    };
    let launch = match (launcher.0)(spec) {
        Ok(l) => l,
        Err((status, reason)) => return Err(failed(report, status, reason)),
    };
    let mut command = launch.command;
    let child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut server = match child {
        Ok(c) => Server { child: c },
        Err(e) => {
            return Err(failed(
                report,
                Status::Failed,
                format!("cannot start {}: {e}", launch.server),
            ));
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
    let started = Instant::now();
    let addr: SocketAddr = loop {
        if let Ok(a) = addr_rx.recv_timeout(Duration::from_millis(50)) {
            match a.parse() {
                Ok(a) => break a,
                Err(_) => {
                    return Err(failed(
                        report,
                        Status::Failed,
                        format!("{} announced a bad address `{a}`", launch.server),
                    ));
                }
            }
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            let (s, what) = match status.code() {
                Some(3) => (Status::Unsupported, String::new()),
                Some(4) => (Status::Unavailable, String::new()),
                _ => (Status::Failed, format!(" ({status})")),
            };
            let why = last_lines(&tail);
            let why = why.strip_prefix("error: ").unwrap_or(&why).to_owned();
            return Err(failed(
                report,
                s,
                format!("{} exited before serving{what}: {why}", launch.server),
            ));
        }
        if started.elapsed() > start_timeout {
            return Err(failed(
                report,
                Status::Timeout,
                format!(
                    "{} did not start serving within {:.0}s",
                    launch.server,
                    start_timeout.as_secs_f64()
                ),
            ));
        }
    };
    let mut report = report;
    report.load_ms = Some(started.elapsed().as_secs_f64() * 1e3);
    let rt = match runtime() {
        Ok(r) => r,
        Err(e) => return Err(failed(report, Status::Failed, format!("tokio: {e}"))),
    };
    let batch = job.case.batch as usize;
    let endpoint = job
        .case
        .scenario
        .load()
        .map_or(Endpoint::Embed, |l| l.endpoint);
    let body = |i: usize| -> Vec<u8> {
        let texts: Vec<&String> = (0..batch)
            .map(|j| &sentences[(i * batch + j) % sentences.len()])
            .collect();
        let body = match endpoint {
            Endpoint::Embed => serde_json::json!({ "texts": texts }),
            Endpoint::Predict => serde_json::json!({ "text": texts[0] }),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    };
    let bodies: Vec<Vec<u8>> = (0..sentences.len().max(1)).map(body).collect();
    let path = endpoint.path();

    // Ready means answering, whatever the server printed.
    loop {
        match rt.block_on(request(addr, "GET", "/health", b"")) {
            Ok(r) if r.status == 200 => break,
            _ if started.elapsed() > start_timeout => {
                return Err(failed(
                    report,
                    Status::Timeout,
                    format!("{} did not answer /health", launch.server),
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    // The output check: request 0 holds the sentences the reference saw.
    let t = Instant::now();
    let first = rt.block_on(request(addr, "POST", path, &bodies[0]));
    report.first_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    let first = match first {
        Ok(r) if r.status == 200 => r,
        Ok(r) => {
            return Err(failed(
                report,
                Status::Failed,
                format!(
                    "{} answered {}: {}",
                    launch.server,
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ),
            ));
        }
        Err(e) => return Err(failed(report, Status::Failed, e.to_string())),
    };
    if let Some(r) = reference {
        let checked = match endpoint {
            Endpoint::Embed => check_output(&first.body, r, batch),
            // Label names live beside the tokenizer (the HF directory), for
            // a variant's ONNX file too.
            Endpoint::Predict => check_prediction(&first.body, r, spec.tokenizer.parent()),
        };
        match checked {
            Ok(parity) => {
                let ok = parity.ok;
                let detail = parity.detail.clone();
                let max_abs = parity.max_abs;
                report.parity = Some(parity);
                if !ok {
                    return Err(failed(
                        report,
                        Status::Mismatch,
                        format!(
                            "served outputs differ from {}: {}",
                            r.backend,
                            detail.unwrap_or_else(|| format!("max abs {max_abs:.3e}"))
                        ),
                    ));
                }
            }
            Err(e) => return Err(failed(report, Status::Failed, e)),
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
            path,
            &bodies[warm.len() % bodies.len()],
        )) {
            Ok(r) if r.status == 200 => warm.push(t.elapsed().as_secs_f64() * 1e3),
            Ok(r) => {
                return Err(failed(
                    report,
                    Status::Failed,
                    format!("warm-up answer {}", r.status),
                ));
            }
            Err(e) => return Err(failed(report, Status::Failed, e.to_string())),
        }
    }
    report.warmup_runs = warm.len() as u64;
    Ok(Served {
        server,
        name: launch.server,
        addr,
        rt,
        bodies,
        path,
        tail,
        report,
        service_ms: handoff_stats::median(&warm),
    })
}

/// One `http` case on its own: its server started and checked, then one
/// fixed rate for the load's duration, or a peak search.
pub fn run(
    job: &Job,
    spec: &ServerSpec,
    sentences: &[String],
    load: &Load,
    reference: Option<&ReferenceFile>,
    launcher: Option<&ServerLauncher>,
    start_timeout: Duration,
) -> WorkerReport {
    let mut served = match start(job, spec, sentences, reference, launcher, start_timeout) {
        Ok(s) => s,
        Err(report) => return *report,
    };
    let label = job.case.scenario.label();
    let mut reason = None;
    let outcome = Alternation::of(load).serve(served.service_ms, label, &mut reason, |q, n| {
        served.level(q, n, job.seed)
    });
    if reason.is_some() {
        served.report.reason = reason;
    }
    match outcome {
        Ok((level, stats)) => served.finish(level, stats),
        Err(e) => fail(std::mem::take(&mut served.report), Status::Failed, e),
    }
}

/// How many blocks the alternation splits a rate's queries into: at least
/// 8 queries a block, at most 12 blocks, so each block's median means
/// something and the paired interval has rounds enough.
pub fn blocks_for(queries: usize) -> usize {
    (queries / 8).clamp(2, 12)
}

/// The servers' order in round `round`, from the seeded `first`: two
/// servers alternate A B, B A, A B, ... (ABBA: a drift linear over two rounds
/// hits both alike); more rotate (A B C, B C A, C A B, ...), so every server
/// takes every place equally often, which reversing would not do for the
/// middle ones.
pub fn block_order(first: &[usize], round: usize) -> Vec<usize> {
    let n = first.len();
    if n <= 2 {
        let mut o = first.to_vec();
        if round % 2 == 1 {
            o.reverse();
        }
        return o;
    }
    (0..n).map(|k| first[(k + round) % n]).collect()
}

/// What a load asks of a server: one fixed rate or a peak search. The
/// servers of an alternated `http` comparison take these in turns; a lone
/// server (`http`, or the in-process `server` scenario) runs them at once.
#[derive(Debug, Clone, Copy)]
pub enum Alternation {
    /// One fixed rate: `queries` in all per server, split into blocks.
    Rate { qps: f64, queries: usize },
    /// A peak search per server ([`PeakSearch`]), one step each in turn:
    /// steps of `step` (at least `min_queries` queries), at most
    /// `max_steps` of them.
    Peak {
        p99_bound_ms: f64,
        step: Duration,
        min_queries: u32,
        max_steps: usize,
    },
}

impl Alternation {
    /// What a load asks of each server: its rate and query count, or its
    /// peak search (steps of a third of `duration`, at least 2 s and half
    /// of `min_queries`; at most 7).
    pub fn of(load: &Load) -> Self {
        match load.target {
            LoadTarget::Qps(qps) => Self::Rate {
                qps,
                queries: query_count(qps, load.duration, load.min_queries),
            },
            LoadTarget::Peak { p99 } => Self::Peak {
                p99_bound_ms: p99.as_secs_f64() * 1e3,
                step: (load.duration / 3).max(Duration::from_secs(2)),
                min_queries: (load.min_queries / 2).max(1),
                max_steps: 7,
            },
        }
    }

    /// One server under this load, whose warm-up took `service_ms` a query:
    /// the level at the fixed rate, or the peak search's chosen level (see
    /// [`peak_outcome`], which writes `reason` when no rate met the bound),
    /// with its stats. `level_at(qps, queries)` serves one level.
    pub(crate) fn serve<E>(
        self,
        service_ms: f64,
        label: String,
        reason: &mut Option<String>,
        mut level_at: impl FnMut(f64, usize) -> Result<Level, E>,
    ) -> Result<(Level, LoadStats), E> {
        match self {
            Self::Rate { qps, queries } => level_at(qps, queries).map(|level| {
                let stats = LoadStats::from_level(label, &level);
                (level, stats)
            }),
            Self::Peak {
                p99_bound_ms,
                step,
                min_queries,
                max_steps,
            } => {
                let hint = handoff_load::serial_capacity_qps(service_ms);
                find_peak(p99_bound_ms, hint, max_steps, |q| {
                    level_at(q, query_count(q, step, min_queries))
                })
                .map(|peak| peak_outcome(reason, label, peak))
            }
        }
    }
}

/// What one server has gathered so far, with what its turns are.
enum Gathered {
    /// Fixed-rate blocks of `per_block` queries at `qps`, `blocks` of them.
    Blocks {
        qps: f64,
        per_block: usize,
        blocks: usize,
        levels: Vec<Level>,
    },
    /// A peak search, whose steps last `step` (at least `min_queries`).
    Search {
        search: Box<PeakSearch>,
        step: Duration,
        min_queries: u32,
    },
}

impl Gathered {
    /// Nothing yet; `hint_qps` is the server's first guess of its capacity.
    fn new(what: Alternation, hint_qps: f64) -> Self {
        match what {
            Alternation::Rate { qps, queries } => {
                let blocks = blocks_for(queries);
                Self::Blocks {
                    qps,
                    per_block: queries.div_ceil(blocks),
                    blocks,
                    levels: Vec::new(),
                }
            }
            Alternation::Peak {
                p99_bound_ms,
                step,
                min_queries,
                max_steps,
            } => Self::Search {
                search: Box::new(PeakSearch::new(p99_bound_ms, hint_qps, max_steps)),
                step,
                min_queries,
            },
        }
    }

    /// The rate and query count of this server's turn in `round`, if it
    /// has one.
    fn next(&self, round: usize) -> Option<(f64, usize)> {
        match self {
            Self::Blocks {
                qps,
                per_block,
                blocks,
                ..
            } => (round < *blocks).then_some((*qps, *per_block)),
            Self::Search {
                search,
                step,
                min_queries,
            } => search
                .next_qps()
                .map(|q| (q, query_count(q, *step, *min_queries))),
        }
    }

    fn record(&mut self, level: Level) {
        match self {
            Self::Blocks { levels, .. } => levels.push(level),
            Self::Search { search, .. } => search.record(level),
        }
    }

    /// Everything run so far, as samples for a cell that failed later.
    fn samples(&self) -> Vec<f64> {
        match self {
            Self::Blocks { levels, .. } => levels
                .iter()
                .flat_map(|l| l.latencies_ms.iter().copied())
                .collect(),
            Self::Search { .. } => Vec::new(),
        }
    }
}

/// `http` cases of one comparison (the same model, load and batch on
/// different servers, backends or threads) measured in alternating turns:
/// every server is started and checked first, then each round gives each
/// server one turn ([`block_order`]: two alternate A B, B A, ...; more
/// rotate; the first order seeded), the idle servers paused. At a fixed
/// rate a turn is a block of Poisson arrivals: drift then hits every server
/// alike, the per-block medians give paired ratios as the
/// one-query-at-a-time groups do, and each case gets as many queries in
/// all as it would alone. In a peak search a turn is one step of that
/// server's own search, so the searches run side by side through the same
/// stretch of the machine's drift instead of one after the other (their
/// steps are at different rates, so there is no paired ratio). `None` when
/// stopped.
pub fn alternate(
    cases: Vec<Result<Served, Box<WorkerReport>>>,
    what: Alternation,
    labels: &[String],
    group: &str,
    seed: u64,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Option<Vec<(WorkerReport, Option<RoundsInfo>)>> {
    let n = cases.len();
    let mut live: Vec<Option<Served>> = Vec::with_capacity(n);
    let mut out: Vec<Option<WorkerReport>> = Vec::with_capacity(n);
    let mut gathered: Vec<Gathered> = Vec::with_capacity(n);
    for c in cases {
        gathered.push(Gathered::new(
            what,
            c.as_ref()
                .map_or(1.0, |s| handoff_load::serial_capacity_qps(s.service_ms)),
        ));
        match c {
            Ok(s) => {
                s.pause(true);
                live.push(Some(s));
                out.push(None);
            }
            Err(report) => {
                live.push(None);
                out.push(Some(*report));
            }
        }
    }
    let mut info: Vec<RoundsInfo> = (0..n)
        .map(|_| RoundsInfo {
            group: group.to_owned(),
            order_seed: seed,
            processes: 1,
            ..Default::default()
        })
        .collect();
    let first = crate::rounds::RoundOrder::new(seed).shuffle(n);
    for round in 0.. {
        let turns: Vec<Option<(f64, usize)>> = (0..n)
            .map(|i| live[i].as_ref().and(gathered[i].next(round)))
            .collect();
        if turns.iter().all(Option::is_none) {
            break;
        }
        if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
            return None;
        }
        for (slot, &i) in block_order(&first, round).iter().enumerate() {
            info[i].slots.push(slot);
            info[i].process.push(0);
            let (Some(s), Some((qps, queries))) = (live[i].as_mut(), turns[i]) else {
                // A server that is gone (or whose search is over) keeps
                // its place in the round, empty.
                info[i].block_runs.push(0);
                info[i].block_medians_ms.push(None);
                continue;
            };
            s.pause(false);
            // A fixed rate draws a fresh schedule per block; a search keeps
            // one, as it does alone.
            let level_seed = match what {
                Alternation::Rate { .. } => seed ^ ((round as u64) << 32 | i as u64),
                Alternation::Peak { .. } => seed,
            };
            let level = s.level(qps, queries, level_seed);
            s.pause(true);
            match level.and_then(|l| s.died().map_or(Ok(l), Err)) {
                Ok(l) => {
                    info[i].block_runs.push(l.completed as usize);
                    info[i].block_medians_ms.push(l.p50_ms);
                    gathered[i].record(l);
                }
                Err(why) => {
                    info[i].block_runs.push(0);
                    info[i].block_medians_ms.push(None);
                    let s = live[i].take().expect("live");
                    let mut report = s.report.clone();
                    report.samples_ms = gathered[i].samples();
                    out[i] = Some(fail(report, Status::Failed, why));
                }
            }
        }
    }
    // A Ctrl-C reaches the servers too: one that it ended in the last
    // round would otherwise be recorded as failed.
    if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
        return None;
    }
    Some(
        live.into_iter()
            .zip(out)
            .zip(gathered)
            .zip(info)
            .zip(labels)
            .map(|((((served, done), gathered), info), label)| {
                // A search's steps are at rates of its own: nothing to pair.
                let info = matches!(what, Alternation::Rate { .. }).then_some(info);
                match (served, done, gathered) {
                    (_, Some(report), _) => {
                        let ran = info
                            .as_ref()
                            .is_some_and(|i| i.block_runs.iter().any(|r| *r > 0));
                        (report, info.filter(|_| ran))
                    }
                    (Some(s), None, Gathered::Blocks { qps, levels, .. }) => {
                        let level = Level::merge(qps, &levels);
                        let stats = LoadStats::from_level(label.clone(), &level);
                        (s.finish(level, stats), info)
                    }
                    (Some(mut s), None, Gathered::Search { search, .. }) => {
                        let (level, mut stats) =
                            peak_outcome(&mut s.report.reason, label.clone(), search.finish());
                        stats.alternated = true;
                        (s.finish(level, stats), None)
                    }
                    (None, None, _) => unreachable!("every case is live or done"),
                }
            })
            .collect(),
    )
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

/// Checks a `/predict` answer against the reference's logits for the same
/// text: the same top label (named from the HF directory's `config.json`)
/// and a softmax probability within 1e-3.
fn check_prediction(
    body: &[u8],
    r: &ReferenceFile,
    hf_dir: Option<&std::path::Path>,
) -> Result<handoff_backend::Parity, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        label: String,
        score: f64,
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|e| {
        format!("the server's answer is not {{\"label\": ..., \"score\": ...}}: {e}")
    })?;
    let reference = load_tensors(&r.path).map_err(|e| format!("reference outputs: {e}"))?;
    let logits = reference
        .last()
        .ok_or("the reference has no outputs")?
        .data
        .to_f64();
    let width = reference
        .last()
        .and_then(|t| t.shape.last().copied())
        .unwrap_or(logits.len())
        .max(1);
    let row = &logits[..width.min(logits.len())];
    let (best, top) = row
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or("the reference logits are empty")?;
    let score = 1.0 / row.iter().map(|l| (l - top).exp()).sum::<f64>();
    let id2label: Option<serde_json::Value> = hf_dir
        .and_then(|d| std::fs::read(d.join("config.json")).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|c| c.get("id2label").cloned());
    let label = id2label
        .as_ref()
        .and_then(|m| m.get(best.to_string()))
        .and_then(|v| v.as_str())
        .map_or_else(|| format!("LABEL_{best}"), str::to_owned);
    let diff = (answer.score - score).abs();
    let ok = answer.label == label && diff <= 1e-3;
    Ok(handoff_backend::Parity {
        reference: r.backend.clone(),
        max_abs: diff,
        max_rel: diff / score.abs().max(f64::MIN_POSITIVE),
        atol: 1e-3,
        rtol: 0.0,
        ok,
        detail: (answer.label != label).then(|| {
            format!(
                "label `{}` (score {:.4}) where the reference gives `{label}` ({score:.4})",
                answer.label, answer.score
            )
        }),
        min_cosine: None,
    })
}

#[cfg(test)]
mod tests {
    use super::block_order;

    #[test]
    fn two_servers_alternate_and_more_take_every_place_in_turn() {
        let two: Vec<Vec<usize>> = (0..4).map(|r| block_order(&[1, 0], r)).collect();
        assert_eq!(two, [[1, 0], [0, 1], [1, 0], [0, 1]]);
        // Three: each server first, middle and last once every three rounds.
        let three: Vec<Vec<usize>> = (0..3).map(|r| block_order(&[2, 0, 1], r)).collect();
        assert_eq!(three, [[2, 0, 1], [0, 1, 2], [1, 2, 0]]);
        for server in 0..3 {
            let mut places: Vec<usize> = three
                .iter()
                .map(|o| o.iter().position(|s| *s == server).unwrap())
                .collect();
            places.sort_unstable();
            assert_eq!(places, [0, 1, 2]);
        }
    }
}
