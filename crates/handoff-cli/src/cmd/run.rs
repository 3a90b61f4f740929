//! `handoff run`, `handoff validate` and `handoff prepare`: a suite
//! measured, its cases listed, or its models made ready.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use handoff_backend::Registry;
use handoff_runner::isolate::WorkerCommand;
use handoff_runner::{Observer, ResultRecord, RunOptions, Runner};
use handoff_suite::{Case, Plan, Preparation};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backends::{ensure_ort, ensure_python, plan_options};
use crate::out::{errln, outln};

/// Run a suite: every case, streamed to <out>/results.jsonl, then a table.
#[derive(clap::Args)]
pub struct RunCmd {
    /// Suite file (YAML).
    pub suite: PathBuf,
    /// Print the expanded cases and exit without measuring.
    #[arg(long)]
    pub dry_run: bool,
    /// Override the suite's seed (inputs, the order workers start in
    /// and the order of every round): another draw of the same run.
    #[arg(long)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub run: RunArgs,
}

impl RunCmd {
    pub fn run(self, registry: &Arc<Registry>) -> Result<ExitCode> {
        let Self {
            suite,
            dry_run,
            seed,
            run,
        } = self;
        // A dry run shows what the run would do without doing any of it.
        let preparation = if dry_run {
            Preparation::Describe
        } else {
            Preparation::Build
        };
        let mut plan = Plan::from_file(&suite, &plan_options(registry, preparation))?;
        if let Some(seed) = seed {
            plan.seed = seed;
        }
        if dry_run {
            print_plan(&plan, false, &|c| {
                handoff_runner::run::is_selected(c, &run.filter, run.shard)
            })?;
            if !run.sequential {
                let preview = Runner::new(
                    &plan,
                    registry,
                    RunOptions {
                        filters: run.filter.clone(),
                        shard: run.shard,
                        ..RunOptions::new(PathBuf::new())
                    },
                )
                .group_preview();
                outln!("measured in interleaved rounds (--sequential: one case at a time):")?;
                for (key, ids, mb) in &preview.0 {
                    outln!(
                        "  group {key}: {} cases, ~{mb:.0} MB with every session alive",
                        ids.len()
                    )?;
                }
                for note in &preview.1 {
                    outln!("  warning: {note}")?;
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        run_plan(&plan, registry, &suite, run).map(|(code, _)| code)
    }
}

/// Check a suite and print its expanded cases (like `run --dry-run`).
/// Downloads, converts, quantises and runs nothing: what `handoff run`
/// would still build is listed, and its cases with it once it is built
/// (`handoff prepare`).
#[derive(clap::Args)]
pub struct ValidateCmd {
    pub suite: PathBuf,
    /// One JSON object per case instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ValidateCmd {
    pub fn run(self, registry: &Arc<Registry>) -> Result<ExitCode> {
        let Self { suite, json } = self;
        let plan = Plan::from_file(&suite, &plan_options(registry, Preparation::Describe))?;
        print_plan(&plan, json, &|_| true)?;
        // On stderr: `--json` keeps stdout for the plan.
        let runner = Runner::new(&plan, registry, RunOptions::new(PathBuf::new()));
        if let Some(note) = runner.oversubscription() {
            errln!("warning: {note}");
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Make everything a suite's cases need - download, convert, generate,
/// quantise, lower and check each model - without measuring, then print
/// the cases. `handoff run` does the same first; a CI job can prepare in
/// one step (and cache `.cache/models`) and measure in the next.
#[derive(clap::Args)]
pub struct PrepareCmd {
    pub suite: PathBuf,
}

impl PrepareCmd {
    pub fn run(self, registry: &Arc<Registry>) -> Result<ExitCode> {
        ensure_ort(false);
        let plan = Plan::from_file(&self.suite, &plan_options(registry, Preparation::Build))?;
        print_plan(&plan, false, &|_| true)?;
        Ok(ExitCode::SUCCESS)
    }
}

/// How `handoff run` (and `handoff ab`) measure a plan.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Only cases whose id contains this text (repeatable; any matches).
    /// Ids look like `mlp/ort/cpu/t2/b8`.
    #[arg(long, short)]
    pub filter: Vec<String>,
    /// Results directory (default: reports/<suite>-<UTC timestamp>).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// No progress bar and no table; errors only.
    #[arg(long, short)]
    pub quiet: bool,
    /// Run every case N times (results carry `repeat`); `compare` then
    /// measures run-to-run noise and widens its threshold to match.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Run shard I of N (`--shard 2/4`): cases with index % N == I-1, so a
    /// CI matrix spreads a suite over machines; join with `handoff merge`.
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(u32, u32)>,
    /// Continue an interrupted run in DIR: cases already there are
    /// skipped (refused if the suite or environment changed).
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// Measure each case to completion, one after another. By default
    /// the cases a report compares (same inputs, batch, dims; every
    /// backend, thread count and variant) are measured in interleaved
    /// rounds, so machine drift hits them alike.
    #[arg(long)]
    pub sequential: bool,
}

fn parse_shard(s: &str) -> Result<(u32, u32), String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 1/4")?;
    let (i, n): (u32, u32) = (
        i.parse().map_err(|_| "I is not a number")?,
        n.parse().map_err(|_| "N is not a number")?,
    );
    if n == 0 || i == 0 || i > n {
        return Err(format!("shard {i}/{n}: need 1 <= I <= N"));
    }
    Ok((i, n))
}

/// Measures `plan` and writes its report; the exit code and the run
/// directory.
pub fn run_plan(
    plan: &Plan,
    registry: &Arc<Registry>,
    suite: &Path,
    args: RunArgs,
) -> Result<(ExitCode, PathBuf)> {
    let RunArgs {
        filter,
        out,
        quiet,
        repeat,
        shard,
        resume,
        sequential,
    } = args;
    if plan.backends.iter().any(|b| b == "ort") || plan.check.reference == "ort" {
        ensure_ort(quiet);
    }
    if plan.backends.iter().any(|b| b == "python-onnxruntime") {
        ensure_python(quiet);
    }
    let out = resume
        .clone()
        .or(out)
        .unwrap_or_else(|| PathBuf::from("reports").join(format!("{}-{}", plan.name, timestamp())));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        // First Ctrl-C / SIGTERM: stop after killing the case in
        // flight (nothing half-written); second: exit at once.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
                std::process::exit(130);
            }
            errln!(
                "\ninterrupted: stopping after killing the case in flight (Ctrl-C again to quit now)"
            );
        });
    }
    let launcher = handoff_runner::isolate::launcher();
    if let Some(l) = &launcher {
        errln!(
            "warning: workers run under `{l}` ({}): their timings are the launcher's, not this machine's, so there is no roofline",
            handoff_runner::isolate::LAUNCHER_VAR
        );
    }
    let options = RunOptions {
        out_dir: out.clone(),
        worker: Some(WorkerCommand::handoff(
            std::env::current_exe().context("cannot find the handoff executable")?,
        )),
        filters: filter,
        repeat,
        shard,
        resume: resume.is_some(),
        stop: Some(Arc::clone(&stop)),
        servers: Some(server_launcher()?),
        flops: flop_counter(),
        sequential,
    };
    // The roofline's ceiling, measured before the cases while the
    // machine is as quiet as it will be (kept on --resume).
    let peak_file = out.join(handoff_report::roofline::MachinePeak::FILE);
    let real = plan.backends.iter().any(|b| !b.starts_with("mock"));
    if real
        && launcher.is_none()
        && !peak_file.is_file()
        && plan.isolation == handoff_suite::Isolation::Process
    {
        std::fs::create_dir_all(&out)?;
        match crate::roofline::measure_peak(
            registry,
            &plan.threads,
            &handoff_backend::home::model_cache_dir(),
        ) {
            Ok(p) => std::fs::write(&peak_file, serde_json::to_vec_pretty(&p)?)?,
            Err(e) => errln!("warning: no matmul peak for the roofline: {e}"),
        }
    }
    let runner = Runner::new(plan, registry, options);
    let mut progress = Progress::new(quiet);
    let summary = runner.run(&mut progress)?;
    progress.finish();
    let read = handoff_runner::read_results(&summary.results)?;
    crate::cmd::report::write_report(&out, &out, &plan.name, &read)?;
    if !quiet {
        outln!("{}", handoff_report::terminal_table(&read.records))?;
        let counts: Vec<String> = summary
            .counts
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        outln!("{} cases: {}", read.records.len(), counts.join(", "))?;
        for n in plan.not_run() {
            outln!("not run: {n}")?;
        }
        if summary.busy_cases > 0 {
            outln!(
                "warning: {} case(s) ran while other processes used CPU; their numbers are marked BUSY",
                summary.busy_cases
            )?;
        }
        if summary.resumed > 0 {
            outln!(
                "resumed: {} case(s) were already in {}",
                summary.resumed,
                out.display()
            )?;
        }
        outln!("results: {}", summary.results.display())?;
        outln!(
            "summary: {} and {}",
            out.join("summary.md").display(),
            out.join("report.html").display()
        )?;
    }
    if summary.suite_timeout {
        errln!(
            "suite_timeout reached: remaining cases not run; resume with `handoff run {} --resume {}`",
            suite.display(),
            out.display()
        );
        return Ok((ExitCode::SUCCESS, out));
    }
    if summary.interrupted {
        errln!(
            "interrupted: resume with `handoff run {} --resume {}`",
            suite.display(),
            out.display()
        );
        return Ok((ExitCode::from(130), out));
    }
    Ok((ExitCode::SUCCESS, out))
}

/// The plan's models and settings, then the cases `keep` selects.
fn print_plan(plan: &Plan, json: bool, keep: &dyn Fn(&Case) -> bool) -> Result<()> {
    let mut out = std::io::BufWriter::new(crate::out::Out);
    if json {
        for case in plan.cases().filter(|c| keep(c)) {
            serde_json::to_writer(&mut out, &case)?;
            writeln!(out)?;
        }
        return Ok(out.flush()?);
    }
    let kept = plan.cases().filter(|c| keep(c)).count();
    let of = if kept == plan.case_count() {
        String::new()
    } else {
        format!(" ({kept} selected)")
    };
    writeln!(
        out,
        "suite {} ({}): {} cases{of}",
        plan.name,
        plan.suite_path.display(),
        plan.case_count()
    )?;
    for m in &plan.models {
        let inputs: Vec<String> = m.info.inputs.iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "  model {}: {} ({}, {:.1} MB, {} params, opset {}; inputs {})",
            m.id,
            m.path.display(),
            m.source,
            m.info.size_bytes as f64 / 1e6,
            m.info.parameter_count,
            m.info.opset,
            inputs.join(", ")
        )?;
    }
    for n in plan.not_run() {
        writeln!(out, "  not run: {n}")?;
    }
    for o in &plan.outside {
        writeln!(out, "  reads from outside the suite's directory: {o}")?;
    }
    if !plan.pending.is_empty() {
        writeln!(
            out,
            "  still to prepare (`handoff run` or `handoff prepare` does it; this command does not):"
        )?;
        for p in &plan.pending {
            writeln!(out, "    - {p}")?;
        }
    }
    writeln!(
        out,
        "  measure: warm-up {:?}, {}..{} iterations, {:?}..{:?}, target CI ±{}%; check vs {} (atol {:e}, rtol {:e}); isolation {:?}, timeout {:?}",
        plan.measure.warmup,
        plan.measure.min_iterations,
        plan.measure.max_iterations,
        plan.measure.min_time,
        plan.measure.max_time,
        plan.measure.target_ci * 100.0,
        plan.check.reference,
        plan.check.atol,
        plan.check.rtol,
        plan.isolation,
        plan.timeout
    )?;
    for case in plan.cases().filter(|c| keep(c)) {
        writeln!(out, "{:>5}  {:<40} {}", case.index, case.id, shapes(&case))?;
    }
    Ok(out.flush()?)
}

fn shapes(case: &Case) -> String {
    case.inputs
        .iter()
        .map(|t| format!("{}:{}{:?}", t.name, t.dtype, t.shape))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Self {
            bar: (!quiet).then(|| {
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} ETA {eta} {wide_msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar
            }),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Observer for Progress {
    fn started(&mut self, total: usize) {
        if let Some(b) = &self.bar {
            b.set_length(total as u64);
        }
    }

    fn case_started(&mut self, case: &Case) {
        if let Some(b) = &self.bar {
            b.set_message(case.id.clone());
        }
    }

    fn case_finished(&mut self, record: &ResultRecord) {
        if let Some(b) = &self.bar {
            if record.status != handoff_runner::Status::Ok {
                b.println(format!(
                    "{}: {} {}",
                    record.case.id,
                    record.status.as_str(),
                    record.reason.as_deref().unwrap_or("")
                ));
            }
            b.inc(1);
        }
    }

    fn warning(&mut self, note: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| errln!("warning: {note}")),
            None => errln!("warning: {note}"),
        }
    }
}

/// UTC `YYYYMMDD-HHMMSS`, without a date crate.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A server's backend settings for its description (` (denormals: flush)`),
/// so a report says what each side ran.
fn settings(options: &serde_json::Value) -> String {
    let fields: Vec<String> = options
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}: {v}")))
        .collect();
    if fields.is_empty() {
        String::new()
    } else {
        format!(" ({})", fields.join(", "))
    }
}

/// How `handoff run` starts the server of an `http` case: FastAPI for
/// python-onnxruntime, this binary's `serve` for every other backend.
fn server_launcher() -> Result<handoff_runner::ServerLauncher> {
    let exe = std::env::current_exe().context("cannot find the handoff executable")?;
    Ok(handoff_runner::ServerLauncher(Arc::new(
        move |spec: &handoff_runner::ServerSpec| {
            if spec.backend.starts_with("python-") && spec.batch_wait.is_some() {
                return Err((
                    handoff_runner::Status::Unsupported,
                    "dynamic batching (`batch_wait`) is handoff serve's; the FastAPI services run each request alone".into(),
                ));
            }
            if spec.backend == "python-torch" {
                let Some(hf_dir) = &spec.hf_dir else {
                    return Err((
                        handoff_runner::Status::Unsupported,
                        "python-torch serves safetensors models (source `hf` or `pypi`)".into(),
                    ));
                };
                let classify = spec.endpoint == handoff_suite::Endpoint::Predict;
                let cmd = handoff_python::torch::fastapi_command(
                    &spec.model,
                    hf_dir,
                    &spec.tokenizer,
                    spec.threads,
                    spec.seq,
                    spec.max_batch,
                    classify,
                )
                .map_err(|e| (handoff_runner::Status::Unavailable, e.to_string()))?;
                return Ok(handoff_runner::Launch {
                    command: cmd,
                    server: if classify {
                        handoff_python::torch::FASTAPI_PIPELINE_SERVER
                    } else {
                        handoff_python::torch::FASTAPI_TORCH_SERVER
                    }
                    .into(),
                });
            }
            if spec.backend == "python-onnxruntime"
                && spec.endpoint == handoff_suite::Endpoint::Predict
            {
                return Err((
                    handoff_runner::Status::Unsupported,
                    "the onnxruntime FastAPI service answers /embed only; the text-classification pipeline is python-torch's".into(),
                ));
            }
            if spec.backend == "python-onnxruntime" {
                let cmd = handoff_python::fastapi_command(
                    &spec.model,
                    &spec.tokenizer,
                    spec.threads,
                    spec.seq,
                    spec.max_batch,
                    &spec.backend_options,
                )
                .map_err(|e| (handoff_runner::Status::Unavailable, e.to_string()))?;
                return Ok(handoff_runner::Launch {
                    command: cmd,
                    server: format!(
                        "{}{}",
                        handoff_python::FASTAPI_SERVER,
                        settings(&spec.backend_options)
                    ),
                });
            }
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("serve")
                .arg(&spec.model)
                .arg("--tokenizer")
                .arg(&spec.tokenizer)
                .args(["--backend", &spec.backend])
                .args(["--device", &spec.device.to_string()])
                .args(["--threads", &spec.threads.to_string()])
                .args(["--seq", &spec.seq.to_string()])
                .args(["--max-batch", &spec.max_batch.to_string()])
                .args(["--port", "0", "--watch-stdin"])
                .env("RAYON_NUM_THREADS", spec.threads.to_string())
                .env("TOKENIZERS_PARALLELISM", "false")
                .env("RUST_BACKTRACE", "0");
            if let Some(d) = &spec.hf_dir {
                cmd.arg("--hf-dir").arg(d);
            }
            if spec
                .backend_options
                .as_object()
                .is_some_and(|o| !o.is_empty())
            {
                cmd.arg("--backend-options")
                    .arg(spec.backend_options.to_string());
            }
            let mut server = format!(
                "handoff serve (Rust, axum) + {}{}",
                spec.backend,
                settings(&spec.backend_options)
            );
            if let Some(w) = spec.batch_wait {
                let ms = w.as_secs_f64() * 1e3;
                cmd.args(["--batch-wait-ms", &ms.to_string()]);
                server.push_str(&format!(", dynamic batching (wait {ms} ms)"));
            }
            Ok(handoff_runner::Launch {
                command: cmd,
                server,
            })
        },
    )))
}

/// FLOPs per case from tract's cost model (for the roofline); a build
/// without tract has none, and the report leaves the roofline out.
fn flop_counter() -> Option<handoff_runner::FlopCounter> {
    #[cfg(feature = "tract")]
    return Some(handoff_runner::FlopCounter(Arc::new(|path, inputs| {
        handoff_tract::flops(path, inputs).ok()
    })));
    #[cfg(not(feature = "tract"))]
    None
}
