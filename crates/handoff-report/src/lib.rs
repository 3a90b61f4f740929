//! Human-readable views of results: the terminal table printed after a run
//! and the Markdown summary for CI step summaries and PR comments.

pub mod html;
pub mod paired;
pub mod plots;
pub mod roofline;
pub mod summary;
pub mod write;

pub use paired::RunContext;
pub use summary::{ModelSummary, Pick, fmt_ms, fmt_rate, model_summaries, p99};
pub use write::{WriteError, write_report};

use std::fmt::Write;

use handoff_backend::ExecutionKind;
use handoff_results::{ResultRecord, Status};

/// One row per case, columns aligned; failed cells show their reason.
pub fn terminal_table(records: &[ResultRecord]) -> String {
    let header = [
        "model", "backend", "dev", "thr", "batch", "dims", "status", "p50 ms", "±95% CI", "p99 ms",
        "items/s", "parity", "notes",
    ];
    let rows: Vec<Vec<String>> = records.iter().map(|r| Row::of(r).cells()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate().take(header.len() - 1) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        let last = cells.len() - 1;
        for (i, c) in cells.iter().enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                let _ = write!(out, "{:<w$}  ", c, w = widths[i]);
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(&header.map(str::to_owned), &mut out);
    line(
        &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
        &mut out,
    );
    for r in &rows {
        line(r, &mut out);
    }
    if let Some(note) = max_time_note(records) {
        let _ = writeln!(out, "{note}");
    }
    out
}

/// Said once under a table instead of on every row: on a 2-vCPU machine
/// most cases use their whole `max_time`, and the ±CI column already shows
/// how wide each interval ended.
pub fn max_time_note(records: &[ResultRecord]) -> Option<String> {
    let n = records
        .iter()
        .filter(|r| r.status == Status::Ok && r.stop == Some(handoff_results::StopReason::MaxTime))
        .count();
    (n > 0).then(|| {
        format!(
            "{n} of {} case(s) used their `max_time` before the p50's 95% CI reached the suite's `target_ci`: their ±CI is as narrow as that time allowed.",
            records.len()
        )
    })
}

/// `seq=128`-style items of a case's symbolic dims.
pub(crate) fn dim_items(r: &ResultRecord) -> Vec<String> {
    r.case
        .dims
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

fn dims(r: &ResultRecord) -> String {
    let mut d = dim_items(r);
    if !is_steady(r) {
        d.push(r.case.scenario.clone());
    }
    if d.is_empty() {
        "-".into()
    } else {
        d.join(",")
    }
}

pub(crate) fn backend_label(r: &ResultRecord) -> String {
    match r.case.execution {
        Some(ExecutionKind::Interpreter) => format!("{} (interp.)", r.case.backend),
        _ => r.case.backend.clone(),
    }
}

fn notes(r: &ResultRecord) -> String {
    let mut n = other_notes(r);
    n.extend(accuracy_note(r));
    n.join("; ")
}

/// A precision variant's accuracy gate, as a note: the same for every row of
/// the variant unless a row's gate was recomputed elsewhere.
fn accuracy_note(r: &ResultRecord) -> Option<String> {
    let a = r.accuracy.as_ref()?;
    Some(format!(
        "{}{}: cos {:.4} vs fp32{}{}",
        if a.passed { "" } else { "ACCURACY-FAIL " },
        a.variant,
        a.min_cosine,
        if a.size_bytes > 0 {
            format!(", {:.1} MB", a.size_bytes as f64 / 1e6)
        } else {
            String::new()
        },
        a.regate_note()
            .map_or_else(String::new, |w| format!(" ({w})"))
    ))
}

/// Every note of a row but its accuracy gate's.
fn other_notes(r: &ResultRecord) -> Vec<String> {
    let mut n = Vec::new();
    if let Some(reason) = &r.reason {
        n.push(reason.clone());
    }
    if r.status == Status::Ok && r.machine.as_ref().is_some_and(|m| m.busy) {
        n.push(format!(
            "BUSY machine ({:.1} cores used by others)",
            r.machine.as_ref().map_or(0.0, |m| m.other_cpu_cores)
        ));
    }
    if let (Some(inner), Some(lat)) = (&r.inner_latency_ms, &r.latency_ms) {
        n.push(format!(
            "in-process p50 {} ms (IPC +{:.0} µs)",
            fmt_ms(inner.p50),
            (lat.p50 - inner.p50) * 1e3
        ));
    }
    // A failed check is already the reason of a `mismatch`.
    if let Some(e) = r.expected.as_ref().filter(|e| e.ok) {
        n.push(format!("{}: ok, max abs {:.0e}", e.reference, e.max_abs));
    }
    n
}

/// A case's cells as the terminal table and summary.md show them.
struct Row {
    model: String,
    backend: String,
    device: String,
    threads: String,
    batch: String,
    dims: String,
    status: String,
    p50: String,
    ci: String,
    p99: String,
    rate: String,
    parity: String,
    notes: String,
}

impl Row {
    fn of(r: &ResultRecord) -> Row {
        let lat = r.latency_ms.as_ref();
        Row {
            model: r.case.model.clone(),
            backend: backend_label(r),
            device: r.case.device.to_string(),
            threads: r.case.threads.to_string(),
            batch: r.case.batch.to_string(),
            dims: dims(r),
            status: r.status.as_str().to_owned(),
            p50: lat.map_or("-".into(), |l| fmt_ms(l.p50)),
            ci: lat.map_or("-".into(), |l| {
                let half = (l.p50_ci95[1] - l.p50_ci95[0]) / 2.0;
                format!("±{:.1}%", 100.0 * half / l.p50)
            }),
            p99: lat.map_or("-".into(), |l| fmt_ms(l.p99)),
            rate: r.throughput_items_s.map_or("-".into(), fmt_rate),
            parity: r.parity.as_ref().map_or("-".into(), |p| {
                if p.ok {
                    format!("ok {:.0e}", p.max_abs)
                } else {
                    format!("FAIL {:.1e}", p.max_abs)
                }
            }),
            notes: notes(r),
        }
    }

    /// In [`terminal_table`]'s column order.
    fn cells(self) -> Vec<String> {
        vec![
            self.model,
            self.backend,
            self.device,
            self.threads,
            self.batch,
            self.dims,
            self.status,
            self.p50,
            self.ci,
            self.p99,
            self.rate,
            self.parity,
            self.notes,
        ]
    }
}

/// Markdown summary: counts by status and a table per model.
pub fn summary_markdown(
    suite: &str,
    records: &[ResultRecord],
    torn_last_line: bool,
    ctx: &RunContext<'_>,
) -> String {
    let peak = ctx.peak;
    let mut out = String::new();
    let _ = writeln!(out, "# handoff results: {}\n", escape_md(suite));
    if records.is_empty() {
        out.push_str(
            "_No results yet: the run may have been interrupted before its first case finished._\n",
        );
        return out;
    }
    if torn_last_line {
        out.push_str("> Note: the last line of the results file was cut off (interrupted run) and is not shown.\n\n");
    }
    let mut counts: Vec<(Status, usize)> = Vec::new();
    for r in records {
        match counts.iter_mut().find(|(s, _)| *s == r.status) {
            Some((_, n)) => *n += 1,
            None => counts.push((r.status, 1)),
        }
    }
    let c: Vec<String> = counts
        .iter()
        .map(|(s, n)| format!("{n} {}", s.as_str()))
        .collect();
    let _ = writeln!(out, "{} cases: {}.\n", records.len(), c.join(", "));
    if let Some(line) = paired::machine_line(ctx) {
        let _ = writeln!(out, "{}\n", escape_md(&line));
    }
    if let Some(note) = paired::measurement_note(ctx, records) {
        let _ = writeln!(out, "{note}\n");
    }
    if let Some(note) = max_time_note(records) {
        let _ = writeln!(out, "{note}\n");
    }
    if !ctx.not_run.is_empty() {
        let _ = writeln!(
            out,
            "Not run, because the model's input shapes do not accept it:\n"
        );
        for n in ctx.not_run {
            let _ = writeln!(out, "- {}", escape_md(n));
        }
        out.push('\n');
    }
    if let Some(t) = coverage_table(records) {
        out.push_str("## Models per backend\n\n");
        out.push_str(COVERAGE_NOTE);
        out.push_str("\n\n");
        t.markdown(&mut out);
    }
    let (steady, loaded) = split_scenarios(records);
    let records = &steady[..];
    for m in summary::model_summaries(records) {
        model_markdown(&mut out, &m);
    }
    if let Some(t) = paired::handoff_gain_table(records) {
        out.push_str("## Hand-off gain: Rust ort vs Python onnxruntime\n\n");
        out.push_str(paired::GAIN_NOTE);
        out.push_str("\n\n");
        t.markdown(&mut out);
    }
    if let Some(t) = paired::torch_gain_table(records) {
        out.push_str("## Hand-off gain vs PyTorch\n\n");
        out.push_str(paired::TORCH_GAIN_NOTE);
        out.push_str("\n\n");
        t.markdown(&mut out);
    }
    if let Some(t) = paired::comparisons_table(records) {
        out.push_str("## Paired comparisons\n\n");
        out.push_str(COMPARISONS_NOTE);
        out.push_str("\n\n");
        t.markdown(&mut out);
    }
    if let Some(t) = roofline::roofline_table(records, peak) {
        out.push_str("## Roofline: achieved GFLOP/s vs the machine's matmul peak\n\n");
        out.push_str(&roofline::note(peak));
        out.push_str("\n\n");
        t.markdown(&mut out);
    }
    if let Some(t) = cold_table(records) {
        out.push_str("## Cold start\n\n");
        out.push_str(COLD_NOTE);
        out.push_str("\n\n");
        t.markdown(&mut out);
    }
    if let Some(t) = load_table(&loaded) {
        out.push_str("## Under load\n\n");
        out.push_str(LOAD_NOTE);
        out.push_str("\n\n");
        t.markdown(&mut out);
    }
    if let Some(t) = serving_gain(&loaded) {
        out.push_str("## Hand-off gain: serving (handoff serve vs FastAPI)\n\n");
        out.push_str(SERVING_NOTE);
        out.push_str("\n\n");
        t.markdown(&mut out);
        for line in serving_decisions(&loaded) {
            out.push_str(&format!("\n{line}\n"));
        }
        out.push('\n');
    }
    variants_table(&mut out, records);
    out
}

pub const COVERAGE_NOTE: &str = "A model counts for a backend where at least one of its cases ran and passed its check; its precision variants and lowered copies count with it. For the others, the first case's status and reason.";

/// How many of the run's models each backend ran, and why not the others;
/// `None` for a run of one model.
pub fn coverage_table(records: &[ResultRecord]) -> Option<Table> {
    let rows = summary::coverage(records)?
        .into_iter()
        .map(|c| {
            vec![
                c.backend.to_owned(),
                format!("{} of {}", c.ran, c.of),
                c.not
                    .iter()
                    .map(|(model, why)| format!("{model} ({})", short(why, 140)))
                    .collect::<Vec<_>>()
                    .join("; "),
            ]
        })
        .collect();
    Some(Table {
        header: vec!["backend", "models run", "not run (why)"],
        rows,
    })
}

/// `text` cut to about `max` characters at a character boundary.
fn short(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// What a section that folds in a lowered copy says of its rows
/// (`markdown`: with its emphasis; else plain text).
pub(crate) fn lowered_note(lowered: &str, markdown: bool) -> String {
    let (em, code) = if markdown { ("*", "`") } else { ("", "") };
    format!(
        "Rows marked {em}lowered copy{em} ran {code}{lowered}{code}: this model with the ops those backends lack rewritten into simpler ones, checked against ONNX Runtime on the original, and measured in the same rounds as the rest."
    )
}

/// One model's section of summary.md.
fn model_markdown(out: &mut String, m: &ModelSummary<'_>) {
    let _ = writeln!(out, "## {}\n", escape_md(m.id));
    if let Some(source) = m.random_source {
        let _ = writeln!(
            out,
            "Model `{}`: seeded random weights at a real model's size, so its outputs (and labels) mean nothing and only its speed does.\n",
            escape_md(source),
        );
    }
    if m.passed_over > 0 {
        let _ = writeln!(
            out,
            "Not considered for the recommendation: {} batch-1 case(s) measured while the CPU was busy or without an output check against the reference.\n",
            m.passed_over
        );
    }
    if let Some(lowered) = m.lowered {
        let _ = writeln!(out, "{}\n", lowered_note(&escape_md(lowered), true));
    }
    let label = |r: &ResultRecord| escape_md(&summary::row_label(r, m.id));
    if let Some(pick) = &m.lowest_p99 {
        let best = pick.case;
        // The runner-up on another backend, measured in the same rounds:
        // is the winner measurably ahead?
        let versus = pick.runner_up.as_ref().map_or(String::new(), |(r, x)| {
            format!(
                " Next best, {} at {} thread(s), p50 vs this: {}.",
                label(r),
                r.case.threads,
                paired::ratio_text(x)
            )
        });
        let _ = writeln!(
            out,
            "Lowest p99 at batch 1: **{}**, {} thread(s): p99 {} ms, p50 {} ms.{versus}\n",
            label(best),
            best.case.threads,
            fmt_ms(p99(best)),
            fmt_ms(best.latency_ms.as_ref().map_or(f64::NAN, |l| l.p50))
        );
    }
    if let Some(pick) = &m.highest_throughput {
        let best = pick.case;
        let _ = writeln!(
            out,
            "Highest throughput: **{}**, {} thread(s), batch {}: {} items/s.\n",
            label(best),
            best.case.threads,
            best.case.batch,
            best.throughput_items_s.map_or("-".into(), fmt_rate)
        );
    }
    scaling_section(out, &m.rows, m.id);
    // A variant's passed gate is one fact about its file: said once above
    // the table rather than on every row, unless rows differ. A failed gate
    // stays on every row it disqualifies.
    let gates: Vec<Option<String>> = m.rows.iter().map(|r| accuracy_note(r)).collect();
    let passed = m
        .rows
        .iter()
        .all(|r| r.accuracy.as_ref().is_some_and(|a| a.passed));
    let shared_gate = match gates.first() {
        Some(Some(first)) if passed && gates.iter().all(|g| g.as_ref() == Some(first)) => {
            let _ = writeln!(out, "Accuracy gate of every row: {}.\n", escape_md(first));
            true
        }
        _ => false,
    };
    out.push_str("| backend | threads | batch | dims | status | p50 ms | ±95% CI | p99 ms | items/s | parity max abs | notes |\n");
    out.push_str("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|\n");
    for r in &m.rows {
        let row = Row::of(r);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            label(r),
            row.threads,
            row.batch,
            escape_md(&row.dims),
            row.status,
            row.p50,
            row.ci,
            row.p99,
            row.rate,
            r.parity
                .as_ref()
                .map_or("-".into(), |p| format!("{:.1e}", p.max_abs)),
            escape_md(&if shared_gate {
                other_notes(r).join("; ")
            } else {
                row.notes
            }),
        );
    }
    out.push('\n');
}

/// The one-query-at-a-time rows (what the per-model tables and plots show)
/// apart from the load scenarios (offline, multi-stream, server, http).
pub fn split_scenarios(records: &[ResultRecord]) -> (Vec<ResultRecord>, Vec<ResultRecord>) {
    records.iter().cloned().partition(is_steady)
}

fn is_steady(r: &ResultRecord) -> bool {
    r.case.scenario == "single-stream"
}

pub const LOAD_NOTE: &str = "Latency under load is measured from each query's scheduled arrival (Poisson, open loop), so time spent queued counts. `saturated`: the system did not keep up (queries unanswered at the end, errors, or a queue still draining long after the last arrival); its achieved rate is what it managed. `peak` is the highest rate tried whose p99 met the bound. The load generator runs on the same machine.";

pub const SERVING_NOTE: &str = "The same model file, sentences, threads and load, over HTTP on loopback: `handoff serve` (Rust, axum, one model thread) against a FastAPI service (uvicorn, `tokenizers`, one request in the model at a time) running the model in Python onnxruntime (the same ONNX file: the difference is what the Python serving stack costs) or in PyTorch eager through transformers (the safetensors weights it was converted from: the difference is what the whole hand-off gains). At a fixed rate the servers of one comparison were started together and loaded in alternating blocks (A B, B A, ...; three or more rotate; idle servers paused), so drift hit both: the paired p50 ratio and its 95% CI come from the per-block medians; p99 and achieved QPS pool each server's blocks and carry no interval. Peak searches run one server after the other.";

/// A table rendered to Markdown or HTML; cells are plain text.
pub struct Table {
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn markdown(&self, out: &mut String) {
        let _ = writeln!(out, "| {} |", self.header.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            self.header.iter().map(|_| "---|").collect::<String>()
        );
        for r in &self.rows {
            let cells: Vec<String> = r.iter().map(|c| escape_md(c)).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        out.push('\n');
    }
}

fn opt(v: Option<f64>, f: fn(f64) -> String) -> String {
    v.map_or("-".into(), f)
}

pub const COLD_NOTE: &str = "Each case runs in a fresh process: times are from the moment it was started (exec, dynamic libraries, runtime start-up, model load and compilation) to the model loaded, to the first inference's outputs, and to steady state (the first 5 runs in a row within 20% of the median; the runs before it in brackets). Peak RSS is the process's high-water mark. Smallest batch of each model.";

/// Cold start per backend and thread count at each model's smallest batch.
pub fn cold_table(records: &[ResultRecord]) -> Option<Table> {
    let rows: Vec<Vec<String>> = records
        .iter()
        .filter(|r| {
            let smallest = records
                .iter()
                .filter(|o| o.case.model == r.case.model)
                .map(|o| o.case.batch)
                .min();
            r.cold.is_some() && Some(r.case.batch) == smallest
        })
        .map(|r| {
            let c = r.cold.as_ref().expect("filtered");
            vec![
                r.case.model.clone(),
                backend_label(r),
                r.case.threads.to_string(),
                r.case.batch.to_string(),
                fmt_ms(c.to_loaded_ms),
                fmt_ms(c.to_first_ms),
                match (c.to_steady_ms, c.steady_after_runs) {
                    (Some(t), Some(n)) => format!("{} ({n})", fmt_ms(t)),
                    _ => "not reached".into(),
                },
                match (r.peak_rss_mb, &r.inner_latency_ms) {
                    // A backend behind a process boundary: its own process
                    // is not this one.
                    (Some(m), Some(_)) => format!("{m:.0} + worker process (not counted)"),
                    (m, _) => opt(m, |m| format!("{m:.0}")),
                },
            ]
        })
        .collect();
    (!rows.is_empty()).then(|| Table {
        header: vec![
            "model",
            "backend",
            "threads",
            "batch",
            "start → loaded ms",
            "→ first inference ms",
            "→ steady ms (runs)",
            "peak RSS MB",
        ],
        rows,
    })
}

/// Every load-scenario row: rates, latency under load, saturation.
pub fn load_table(records: &[ResultRecord]) -> Option<Table> {
    if records.is_empty() {
        return None;
    }
    let rows = records
        .iter()
        .map(|r| {
            let l = r.load.as_ref();
            let lat = r.latency_ms.as_ref();
            vec![
                r.case.model.clone(),
                backend_label(r),
                r.case.threads.to_string(),
                r.case.batch.to_string(),
                r.case.scenario.clone(),
                l.and_then(|l| l.server.clone())
                    .unwrap_or("in-process".into()),
                r.status.as_str().to_owned(),
                opt(l.and_then(|l| l.offered_qps), fmt_rate),
                opt(l.map(|l| l.achieved_qps), fmt_rate),
                opt(lat.map(|l| l.p50), fmt_ms),
                opt(lat.map(|l| l.p99), fmt_ms),
                opt(r.throughput_items_s, fmt_rate),
                match l {
                    Some(l) if l.saturated => {
                        format!("SATURATED ({} unanswered, {} errors)", l.unserved, l.errors)
                    }
                    Some(_) => "no".into(),
                    None => "-".into(),
                },
                opt(l.and_then(|l| l.peak_qps), fmt_rate),
                match (l, r.status) {
                    (_, s) if s != Status::Ok => r.reason.clone().unwrap_or_default(),
                    (Some(l), _) if !l.per_stream_p99_ms.is_empty() => format!(
                        "per-stream p99 {} ms",
                        l.per_stream_p99_ms
                            .iter()
                            .map(|p| fmt_ms(*p))
                            .collect::<Vec<_>>()
                            .join(" / ")
                    ),
                    (Some(l), _) => {
                        let mut n = Vec::new();
                        if let Some(mb) = l.server_rss_mb {
                            n.push(format!("server RSS {mb:.0} MB"));
                        }
                        if let Some(why) = &r.reason {
                            n.push(why.clone());
                        }
                        n.join("; ")
                    }
                    (None, _) => String::new(),
                },
            ]
        })
        .collect();
    Some(Table {
        header: vec![
            "model",
            "backend",
            "threads",
            "batch",
            "scenario",
            "server",
            "status",
            "offered QPS",
            "achieved QPS",
            "p50 ms",
            "p99 ms",
            "items/s",
            "saturated",
            "peak QPS",
            "notes",
        ],
        rows,
    })
}

/// `handoff serve` on ort against the FastAPI service (on Python
/// onnxruntime, or on PyTorch), at the same load: p99 at each fixed rate,
/// and peak rate under the p99 bound.
pub fn serving_gain(records: &[ResultRecord]) -> Option<Table> {
    let http = |r: &&ResultRecord| r.case.scenario.starts_with("http ") && r.status == Status::Ok;
    let rows: Vec<Vec<String>> = records
        .iter()
        .filter(http)
        .filter(|p| p.case.backend.starts_with("python-"))
        .flat_map(|p| served_beside(records, p).filter(http).map(move |r| (p, r)))
        .filter_map(|(p, r)| {
            let (rl, pl) = (r.load.as_ref()?, p.load.as_ref()?);
            let (rp99, pp99) = (r.latency_ms.as_ref()?.p99, p.latency_ms.as_ref()?.p99);
            let sat =
                |l: &handoff_results::LoadStats| if l.saturated { " (saturated)" } else { "" };
            let peak = match (rl.peak_qps, pl.peak_qps) {
                (Some(a), Some(b)) => format!(
                    "{} vs {} ({})",
                    fmt_rate(a),
                    fmt_rate(b),
                    peak_verdict(rl, pl)
                ),
                (a, b) if rl.p99_bound_ms.is_some() => {
                    format!("{} vs {}", opt(a, fmt_rate), opt(b, fmt_rate))
                }
                _ => "-".into(),
            };
            Some(vec![
                served_model(r),
                {
                    let on = match p.case.backend.as_str() {
                        "python-torch" if p.case.scenario.starts_with("http predict") => {
                            "PyTorch pipeline".to_owned()
                        }
                        "python-torch" => "PyTorch".to_owned(),
                        other => other.trim_start_matches("python-").to_owned(),
                    };
                    match handoff_backend::ids::variant(&p.case.model) {
                        Some(variant) => format!("{on} ({variant})"),
                        None => on,
                    }
                },
                r.case.threads.to_string(),
                r.case.batch.to_string(),
                r.case.scenario.trim_start_matches("http ").to_owned(),
                format!("{}{}", fmt_ms(rp99), sat(rl)),
                format!("{}{}", fmt_ms(pp99), sat(pl)),
                format!("{:.2}x", pp99 / rp99),
                match paired::paired(r, p, false) {
                    Some(x) => paired::ratio_text(&x),
                    None if rl.p99_bound_ms.is_some() => "- (peak search)".to_owned(),
                    None if r
                        .rounds
                        .as_ref()
                        .zip(p.rounds.as_ref())
                        .is_some_and(|(a, b)| a.group == b.group) =>
                    {
                        "too few blocks for an interval".to_owned()
                    }
                    None => "not measured together".to_owned(),
                },
                format!(
                    "{} vs {}",
                    fmt_rate(rl.achieved_qps),
                    fmt_rate(pl.achieved_qps)
                ),
                peak,
            ])
        })
        .collect();
    (!rows.is_empty()).then(|| Table {
        header: vec![
            "model",
            "FastAPI on",
            "threads",
            "batch",
            "load",
            "handoff serve p99 ms",
            "FastAPI p99 ms",
            "FastAPI / handoff p99",
            "FastAPI / handoff p50 (paired, 95% CI)",
            "achieved QPS (handoff vs FastAPI)",
            "peak QPS (handoff vs FastAPI)",
        ],
        rows,
    })
}

/// How two peak searches beside each other were made. A search gives no
/// interval: each end of its bracket is one step's p99 of a few dozen
/// queries, and on a 2-vCPU VM five quickstart runs with the searches in
/// turns put handoff serve + ort against FastAPI at 1.00x to 1.58x for the
/// same servers. So two peaks are shown, never called a difference; the
/// paired p50 at a fixed rate is the comparison.
fn peak_verdict(a: &handoff_results::LoadStats, b: &handoff_results::LoadStats) -> &'static str {
    if a.alternated && b.alternated {
        "one search each, no interval; searched in turns"
    } else {
        "one search each, no interval; searched one after the other, through different drift"
    }
}

/// The `handoff serve` + ort runs of the same load as a FastAPI run `p`: on
/// the same model, or on one of its precision variants when the scenario
/// loads that too (the hand-off served with its int8 build).
fn served_beside<'a>(
    records: &'a [ResultRecord],
    p: &'a ResultRecord,
) -> impl Iterator<Item = &'a ResultRecord> + 'a {
    use paired::base_model;
    records.iter().filter(move |r| {
        r.case.backend == "ort"
            && base_model(&r.case.model) == base_model(&p.case.model)
            && (r.case.model == p.case.model || r.accuracy.is_some())
            && (r.case.threads, r.case.batch, &r.case.dims, &r.case.scenario)
                == (p.case.threads, p.case.batch, &p.case.dims, &p.case.scenario)
    })
}

/// A served model's name, with a variant's accuracy gate.
fn served_model(r: &ResultRecord) -> String {
    match &r.accuracy {
        Some(a) => format!(
            "{} (cos {:.4} vs fp32, {})",
            r.case.model,
            a.min_cosine,
            if a.passed { "passes" } else { "FAILS" }
        ),
        None => r.case.model.clone(),
    }
}

/// A peak search's bound (ms) and figures; `None` for other loads.
fn peak_search(r: &ResultRecord) -> Option<(f64, &handoff_results::LoadStats)> {
    let l = r.load.as_ref()?;
    Some((l.p99_bound_ms?, l))
}

/// One sentence per peak search run on both sides: the two peaks in the
/// terms a team asks about, said to be one search each (never a ratio).
pub fn serving_decisions(records: &[ResultRecord]) -> Vec<String> {
    let mut out = Vec::new();
    for p in records.iter().filter(|p| {
        p.case.backend.starts_with("python-")
            && p.status == Status::Ok
            && p.case.scenario.starts_with("http ")
    }) {
        let Some((bound, pl)) = peak_search(p) else {
            continue;
        };
        let python = match (p.case.backend.as_str(), p.case.scenario.contains("predict")) {
            ("python-torch", true) => "FastAPI + transformers pipeline (PyTorch)",
            ("python-torch", false) => "FastAPI + PyTorch",
            _ => "FastAPI + onnxruntime",
        };
        let rate = |q: Option<f64>| {
            q.map_or_else(|| "no rate".to_owned(), |q| format!("{} QPS", fmt_rate(q)))
        };
        // A variant below its accuracy gate is no hand-off to suggest.
        for r in served_beside(records, p)
            .filter(|r| r.status == Status::Ok && r.accuracy.as_ref().is_none_or(|a| a.passed))
        {
            let Some((_, rl)) = peak_search(r) else {
                continue;
            };
            let target = match &r.accuracy {
                Some(a) => format!(
                    "handoff serve + ort on its {} build (cos {:.4} vs fp32)",
                    a.variant, a.min_cosine
                ),
                None => "handoff serve + ort".to_owned(),
            };
            let (model, threads, batch) = (&p.case.model, p.case.threads, p.case.batch);
            let plural = if threads == 1 { "" } else { "s" };
            let how = peak_verdict(rl, pl);
            out.push(format!(
                "`{model}` ({threads} thread{plural}, batch {batch}), highest rate with p99 <= {bound} ms on this machine: {} on {python}, {} on {target} ({how}). The paired p50 at a fixed rate (a `qps:` load) is the measured comparison.",
                rate(pl.peak_qps),
                rate(rl.peak_qps),
            ));
        }
    }
    out
}

pub const COMPARISONS_NOTE: &str = "Every pair measured in the same rounds that this report compares: `backend` (each backend against the reference backend), `threads` (more threads against the fewest), `model` (another model with the same inputs, such as a precision variant or a lowered copy, against the first). `b / a` of p50 latency (below 1: b is faster); `p50-inner`: b timed by its own clock. The same lines are in comparisons.jsonl.";

/// Size, accuracy and best throughput of each precision variant beside its
/// fp32 model: the trade-off a team decides on.
fn variants_table(out: &mut String, records: &[ResultRecord]) {
    if records.iter().all(|r| r.accuracy.is_none()) {
        return;
    }
    let best = |model: &str| best_throughput(records, model);
    out.push_str("## Precision variants\n\n");
    out.push_str("Accuracy: smallest per-row cosine similarity of the last output to the fp32 model's on the check inputs (ORT, 1 thread), computed on this run's machine. Speed: best items/s of any backend and configuration.\n\n");
    out.push_str("| model | variant | size MB | % of fp32 | min cosine | gate | best items/s | x fp32 | load ms (vs fp32, same backend) |\n|---|---|---:|---:|---:|---|---:|---:|---|\n");
    let fastest_load = |model: &str, backend: Option<&str>| {
        records
            .iter()
            .filter(|r| r.case.model == model && r.status == Status::Ok)
            .filter(|r| backend.is_none_or(|b| r.case.backend == b))
            .filter_map(|r| r.load_ms.map(|l| (l, r.case.backend.as_str())))
            .min_by(|a, b| a.0.total_cmp(&b.0))
    };
    let labels = |a: &handoff_results::Accuracy| {
        a.label_agreement.map_or_else(String::new, |share| {
            format!(
                "; top label as fp32 on {:.0}% of inputs, gate 100%",
                100.0 * share
            )
        })
    };
    for (m, base, a) in variant_models(records) {
        let (mine, fp32) = (best(m), best(base));
        let load = match fastest_load(m, None) {
            Some((l, b)) => match fastest_load(base, Some(b)) {
                Some((f, _)) => format!("{l:.0} vs {f:.0} ({b})"),
                None => format!("{l:.0} ({b})"),
            },
            None => "-".into(),
        };
        let gate = format!(
            "{} ({} {}{}{}{})",
            if a.passed { "pass" } else { "**FAIL**" },
            if a.passed { ">=" } else { "<" },
            a.threshold_min_cosine,
            labels(a),
            a.regate_note()
                .map_or_else(String::new, |w| format!("; {w}")),
            a.kept_fp32
                .as_ref()
                .map_or_else(String::new, |k| format!("; {}", escape_md(k)))
        );
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.4} | {gate} | {} | {} | {} |",
            escape_md(base),
            escape_md(&a.variant),
            if a.size_bytes > 0 {
                format!("{:.1}", a.size_bytes as f64 / 1e6)
            } else {
                "(at load)".into()
            },
            if a.fp32_size_bytes > 0 && a.size_bytes > 0 {
                format!(
                    "{:.0}%",
                    100.0 * a.size_bytes as f64 / a.fp32_size_bytes as f64
                )
            } else {
                "-".into()
            },
            a.min_cosine,
            mine.map_or("-".into(), |t| format!("{t:.1}")),
            match (mine, fp32) {
                (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
                _ => "-".into(),
            },
            load
        );
    }
    out.push('\n');
}

/// Speed-up from the fewest to the most threads, per backend, batch and
/// dims, so a thread setting that does not take effect is visible.
fn scaling_section(out: &mut String, rows: &[&ResultRecord], section: &str) {
    let mut lines = Vec::new();
    let mut unexplained = false;
    for r in rows.iter().filter(|r| r.status == Status::Ok) {
        let peers: Vec<&&ResultRecord> = rows
            .iter()
            .filter(|o| {
                o.status == Status::Ok
                    && o.case.model == r.case.model
                    && o.case.backend == r.case.backend
                    && o.case.device == r.case.device
                    && o.case.batch == r.case.batch
                    && o.case.dims == r.case.dims
            })
            .collect();
        let min_t = peers
            .iter()
            .map(|o| o.case.threads)
            .min()
            .unwrap_or(r.case.threads);
        let max_t = peers
            .iter()
            .map(|o| o.case.threads)
            .max()
            .unwrap_or(r.case.threads);
        if r.case.threads != max_t || min_t == max_t {
            continue;
        }
        let Some(base) = peers.iter().find(|o| o.case.threads == min_t) else {
            continue;
        };
        let (Some(a), Some(b)) = (base.latency_ms.as_ref(), r.latency_ms.as_ref()) else {
            continue;
        };
        // Measured in the same rounds: the paired ratio's CI decides;
        // otherwise only non-overlapping CIs of the medians do.
        let (speedup, range, faster, slower) = match paired::paired(base, r, false) {
            Some(x) => (
                1.0 / x.ratio,
                format!(" [{:.2}, {:.2}]", 1.0 / x.ci95[1], 1.0 / x.ci95[0]),
                x.verdict == handoff_stats::rounds::Verdict::Faster,
                x.verdict == handoff_stats::rounds::Verdict::Slower,
            ),
            None => {
                let overlap = b.p50_ci95[1] >= a.p50_ci95[0] && a.p50_ci95[1] >= b.p50_ci95[0];
                // Measured apart: only a clear and separated change counts.
                let s = a.p50 / b.p50;
                (
                    s,
                    String::new(),
                    s >= 1.05 && !overlap,
                    s <= 0.95 && !overlap,
                )
            }
        };
        let verdict = if faster {
            "faster"
        } else if slower {
            "slower"
        } else {
            "no measurable gain"
        };
        unexplained |= !faster;
        lines.push(format!(
            "| {} | {} | {} | {min_t} -> {max_t} | {speedup:.2}x{range} | {verdict} |",
            escape_md(&summary::row_label(r, section)),
            r.case.batch,
            escape_md(&dims(r)),
        ));
    }
    if lines.is_empty() {
        return;
    }
    out.push_str("Thread scaling (p50 speed-up with its 95% CI where measured in the same rounds; ideal = thread ratio):\n\n");
    out.push_str(
        "| backend | batch | dims | threads | speed-up | |\n|---|---:|---|---|---:|---|\n",
    );
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out.push('\n');
    if unexplained {
        // The speed-up is measured; why more threads did not help is not.
        out.push_str("Where more threads did not help, the cause is not measured here: ops too small for the runtime to split profitably, ops it does not parallelise, or threads competing for this machine's CPUs with each other, the harness and the host.\n\n");
    }
}

/// Each precision-variant model (`<base>@<variant>`), in order, with its
/// base model's id and its accuracy record.
pub(crate) fn variant_models(
    records: &[ResultRecord],
) -> Vec<(&str, &str, &handoff_results::Accuracy)> {
    models(records)
        .into_iter()
        .filter_map(|m| {
            let a = records
                .iter()
                .find(|r| r.case.model == m)
                .and_then(|r| r.accuracy.as_ref())?;
            Some((m, paired::base_model(m), a))
        })
        .collect()
}

/// The highest throughput of any `ok` case of `model`.
pub(crate) fn best_throughput(records: &[ResultRecord], model: &str) -> Option<f64> {
    records
        .iter()
        .filter(|r| r.case.model == model && r.status == Status::Ok)
        .filter_map(|r| r.throughput_items_s)
        .max_by(f64::total_cmp)
}

/// Model ids in the order they first appear.
pub fn models(records: &[ResultRecord]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for r in records {
        if !out.contains(&r.case.model.as_str()) {
            out.push(&r.case.model);
        }
    }
    out
}

/// Escapes what Markdown (and HTML inside it) would interpret.
pub fn escape_md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use handoff_results::LoadStats;

    fn search(peak: f64, alternated: bool) -> LoadStats {
        LoadStats {
            p99_bound_ms: Some(150.0),
            peak_qps: Some(peak),
            alternated,
            ..Default::default()
        }
    }

    #[test]
    fn two_peaks_are_shown_with_how_they_were_searched_never_as_a_ratio() {
        let (a, b) = (search(20.2, true), search(12.8, true));
        assert_eq!(
            peak_verdict(&a, &b),
            "one search each, no interval; searched in turns"
        );
        assert!(peak_verdict(&a, &search(12.8, false)).ends_with("through different drift"));
    }
}
