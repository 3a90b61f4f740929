//! Numbers side by side come from interleaved rounds: the ratio of two
//! cases' medians with its 95% CI from their per-round block medians (the
//! same computation as `comparisons.jsonl`), and how much the machine's
//! speed moved during the run (the drift canary).

use handoff_results::{CanaryPoint, ResultRecord, Status};
use handoff_stats::rounds::{PairedRatio, Verdict};

use crate::{Table, dims, escape_md, fmt_ms};

/// What a report knows about its run beyond the result lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunContext<'a> {
    /// The matmul peak per thread count, for the roofline.
    pub peak: Option<&'a crate::roofline::MachinePeak>,
    /// The drift canary between rounds.
    pub canary: &'a [CanaryPoint],
    /// `interleaved` or `sequential` (run.json); empty when unknown.
    pub measurement: &'a str,
    /// The run's env.json (machine fingerprint), when there is one.
    pub env: Option<&'a serde_json::Value>,
    /// What the suite asked for that its models' shapes do not accept.
    pub not_run: &'a [String],
}

/// `Machine: <CPU>, N logical CPUs, int8 class <class> (<flags>).`: every
/// figure in a report is of this machine, and int8 results depend on the
/// class (see `handoff_convert::isa`).
pub fn machine_line(ctx: &RunContext<'_>) -> Option<String> {
    let env = ctx.env?;
    let text = |k: &str| {
        env.get(k)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    };
    let cpu = text("cpu_model")?;
    let cores = env.get("logical_cores").and_then(serde_json::Value::as_u64);
    let words = |k: &str| -> Vec<&str> {
        env.get(k)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
            .unwrap_or_default()
    };
    let flags = words("cpu_flags");
    let mut line = format!("Machine: {cpu}");
    if let Some(n) = cores {
        line.push_str(&format!(", {n} logical CPUs"));
    }
    if let Some(class) = text("cpu_class") {
        line.push_str(&format!(", int8 class `{class}`"));
    }
    if !flags.is_empty() {
        line.push_str(&format!(" ({})", flags.join(" ")));
    }
    line.push('.');
    let hidden = words("cpu_hidden");
    if !hidden.is_empty() {
        line.push_str(&format!(
            " `cpuid` hid {} (listed in /proc/cpuinfo: a cpuid mask or an emulator), so the runtimes ran the int8 class's kernels on this CPU: their numerics are the class's, their timings this CPU's, not a real CPU of the class.",
            hidden.join(" ")
        ));
    }
    // Named where tract ran or could have: its kernels are the ones that pay.
    let has_tract = env.get("backends").and_then(|b| b.get("tract")).is_some();
    if let Some(ns) = env
        .get("sse_after_avx_ns")
        .and_then(serde_json::Value::as_f64)
        .filter(|ns| has_tract && *ns > handoff_results::SSE_AFTER_AVX_NOTABLE_NS)
    {
        line.push_str(&format!(
            " Each switch from AVX to legacy-SSE instructions costs {ns:.0} ns on this CPU (probe); tract 0.23.9's x86 kernels make such switches (its AVX2 int8 kernel in every step), so tract's figures here include that cost (see docs/backends.md in handoff)."
        ));
    }
    // Named where ORT ran: its softmax is what writes subnormals.
    let has_ort = env
        .get("backends")
        .is_some_and(|b| b.get("ort").is_some() || b.get("python-onnxruntime").is_some());
    if let Some(ns) = env
        .get("subnormal_ns")
        .and_then(serde_json::Value::as_f64)
        .filter(|ns| has_ort && *ns > handoff_results::SUBNORMAL_NOTABLE_NS)
    {
        line.push_str(&format!(
            " A multiply on subnormal floats costs {ns:.0} ns more than on normal ones on this CPU (probe); ORT's softmax writes subnormals where an attention mask hides positions, so padded batches on ORT include that cost unless the suite sets `backend_options: {{ort: {{denormals: flush}}}}` (see docs/backends.md in handoff)."
        ));
    }
    let var = |k: &str| {
        env.get("env_vars")
            .and_then(|v| v.get(k))
            .and_then(|v| v.as_str())
            .filter(|s| !s.trim().is_empty())
    };
    if let Some(target) = var("HANDOFF_TARGET_CPU") {
        line.push_str(&format!(
            " Variants built for CPU class `{target}` (HANDOFF_TARGET_CPU)."
        ));
    }
    // An emulator's or a profiler's timings must not pass for this machine's.
    if let Some(launcher) = var("HANDOFF_WORKER_LAUNCHER") {
        line.push_str(&format!(
            " Workers ran under `{launcher}` (HANDOFF_WORKER_LAUNCHER): the timings are the launcher's, not this machine's."
        ));
    }
    Some(line)
}

/// `b / a` of two cases measured in the same rounds (same group and
/// repeat); `inner_b`: `b` by its own clock (the Python baseline inside
/// Python). `None` when they were not measured together.
pub fn paired(a: &ResultRecord, b: &ResultRecord, inner_b: bool) -> Option<PairedRatio> {
    let (ra, rb) = (a.rounds.as_ref()?, b.rounds.as_ref()?);
    if ra.group != rb.group
        || a.repeat != b.repeat
        || a.status != Status::Ok
        || b.status != Status::Ok
    {
        return None;
    }
    handoff_results::pairs::ratio_of(a, b, inner_b)
}

/// `0.412x [0.405, 0.420]`, or `no measurable difference (±1.2%)`.
pub fn ratio_text(r: &PairedRatio) -> String {
    match r.verdict {
        Verdict::NoMeasurableDifference => {
            format!("no measurable difference (±{:.1}%)", 100.0 * r.half_width())
        }
        _ => format!("{:.3}x [{:.3}, {:.3}]", r.ratio, r.ci95[0], r.ci95[1]),
    }
}

/// One sentence on how the run was measured and how much the machine's
/// speed moved while it ran.
pub fn measurement_note(ctx: &RunContext<'_>, records: &[ResultRecord]) -> Option<String> {
    let interleaved = records.iter().any(|r| r.rounds.is_some());
    let how = if interleaved {
        "Measured in interleaved rounds: the cases a table compares (same inputs, batch and dims; every backend, thread count and variant) were prepared together and each round ran a block of every one in a fresh random order; a case's ±CI comes from the spread of its block medians, and ratios between cases from their per-round ratios (Hodges-Lehmann, Wilcoxon signed-rank 95% CI)."
    } else if ctx.measurement == "sequential" || !records.is_empty() {
        "Measured one case after another (`--sequential`): two cases side by side were measured minutes apart and may differ by the machine's drift, so no ratio between them is claimed."
    } else {
        return None;
    };
    let processes = records
        .iter()
        .filter_map(|r| r.rounds.as_ref())
        .map(|i| i.processes)
        .max()
        .unwrap_or(1);
    let spread: Vec<f64> = records
        .iter()
        .filter_map(|r| r.rounds.as_ref()?.process_var)
        .map(f64::sqrt)
        .collect();
    let processes = if processes > 1 {
        format!(
            " Each case ran on {processes} worker processes in turn; the speed difference between its processes, measured for each case (largest here: {:.1}% sd), widens its intervals.",
            100.0 * spread.iter().copied().fold(0.0, f64::max)
        )
    } else if interleaved {
        " Each case ran on one worker process (`measure.processes: 1`): the intervals cannot show how much a process's own speed differs from another's (1-3% on small VMs).".to_owned()
    } else {
        String::new()
    };
    let canary: Vec<f64> = ctx.canary.iter().filter_map(|c| c.ms).collect();
    let missing = ctx.canary.len() - canary.len();
    let drift = handoff_stats::rounds::relative_range(&canary).map(|(lo, hi)| {
        format!(
            " Machine speed during this run (drift canary: a 128³ f32 matmul on CPU 0 between rounds, {} readings{}): median {:.3} ms, {:+.0}% to {:+.0}%.",
            canary.len(),
            if missing > 0 {
                format!(", {missing} missing")
            } else {
                String::new()
            },
            handoff_stats::median(&canary),
            100.0 * lo,
            100.0 * hi
        )
    });
    Some(format!("{how}{processes}{}", drift.unwrap_or_default()))
}

/// Every pair measured together that a report compares: each backend
/// against the reference backend, more threads against the fewest, each
/// other model against its group's first.
pub fn comparisons_table(records: &[ResultRecord]) -> Option<Table> {
    let reference = records
        .iter()
        .find_map(|r| r.parity.as_ref().map(|p| p.reference.clone()))
        .unwrap_or_else(|| "ort".into());
    let mut groups: Vec<(&str, u32)> = Vec::new();
    for r in records {
        if let Some(i) = &r.rounds
            && !groups.contains(&(i.group.as_str(), r.repeat))
        {
            groups.push((i.group.as_str(), r.repeat));
        }
    }
    let id_of = |id: &str| {
        records
            .iter()
            .find(|r| r.case.id == id)
            .map_or(id.to_owned(), short)
    };
    let mut rows = Vec::new();
    for (g, rep) in groups {
        let members: Vec<ResultRecord> = records
            .iter()
            .filter(|r| r.repeat == rep && r.rounds.as_ref().is_some_and(|i| i.group == g))
            .cloned()
            .collect();
        for c in handoff_results::pairs::group_comparisons(&members, &reference) {
            rows.push(vec![
                serde_json::to_value(c.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                id_of(&c.b),
                id_of(&c.a),
                c.metric.clone(),
                format!("{:.3}", c.ratio),
                format!("[{:.3}, {:.3}]", c.ci95[0], c.ci95[1]),
                c.rounds.to_string(),
                c.verdict.as_str().to_owned(),
            ]);
        }
    }
    if rows.is_empty() {
        return None;
    }
    Some(Table {
        header: vec![
            "pair", "b", "a", "metric", "b / a", "95% CI", "rounds", "b is",
        ],
        rows,
    })
}

/// `model backend tN bN dims`.
fn short(r: &ResultRecord) -> String {
    let d = dims(r);
    format!(
        "{} {} t{} b{}{}",
        r.case.model,
        r.case.backend,
        r.case.threads,
        r.case.batch,
        if d.is_empty() {
            String::new()
        } else {
            format!(" {d}")
        }
    )
}

pub const GAIN_NOTE: &str = "Same ONNX Runtime release, model file, inputs, threads and batch, measured in the same rounds. Python p50 is timed inside Python around `session.run` (numpy in and out); Rust p50 around `Session::run`. The ratio and its 95% CI come from the per-round medians; an overhead is printed only where the CI excludes 1.";

/// What handing off from Python gains per call: Python's onnxruntime (timed
/// inside Python) against Rust `ort` on the same model, inputs, threads and
/// batch.
pub fn handoff_gain_table(records: &[ResultRecord]) -> Option<Table> {
    let mut rows = Vec::new();
    for p in records
        .iter()
        .filter(|p| p.case.backend == "python-onnxruntime" && p.passes())
    {
        let Some(r) = records
            .iter()
            .find(|r| r.case.backend == "ort" && r.passes() && same_call(r, p))
        else {
            continue;
        };
        let (Some(py), Some(rs)) = (p.inner_latency_ms.as_ref(), r.latency_ms.as_ref()) else {
            continue;
        };
        let (ratio, overhead) = match paired(r, p, true) {
            Some(x) => (
                ratio_text(&x),
                match x.verdict {
                    Verdict::NoMeasurableDifference => "none measurable".to_owned(),
                    _ => format!(
                        "{:+.0} µs [{:+.0}, {:+.0}]",
                        (x.ratio - 1.0) * rs.p50 * 1e3,
                        (x.ci95[0] - 1.0) * rs.p50 * 1e3,
                        (x.ci95[1] - 1.0) * rs.p50 * 1e3
                    ),
                },
            ),
            None => (
                "not measured together".to_owned(),
                "- (run without --sequential)".to_owned(),
            ),
        };
        rows.push(vec![
            escape_md(&p.case.model),
            p.case.threads.to_string(),
            p.case.batch.to_string(),
            escape_md(&dims(p)),
            fmt_ms(rs.p50),
            fmt_ms(py.p50),
            ratio,
            overhead,
        ]);
    }
    if rows.is_empty() {
        return None;
    }
    Some(Table {
        header: vec![
            "model",
            "threads",
            "batch",
            "dims",
            "Rust ort p50 ms",
            "Python p50 ms",
            "Python / Rust (95% CI)",
            "Python overhead per call",
        ],
        rows,
    })
}

/// [`same_call`] on any form of the same model: the model itself or one of
/// its precision variants or lowered copies.
fn same_call_of_base(a: &ResultRecord, b: &ResultRecord) -> bool {
    base_model(&a.case.model) == base_model(&b.case.model) && call(a) == call(b)
}

/// The model a precision variant (`id@variant`) or lowered copy
/// (`id+lowered`) was made from.
pub(crate) fn base_model(id: &str) -> &str {
    handoff_backend::ids::split(id).0
}

/// The same call on another backend: model, threads, batch, dims, device,
/// scenario and repeat.
fn same_call(a: &ResultRecord, b: &ResultRecord) -> bool {
    a.case.model == b.case.model && call(a) == call(b)
}

/// What makes two cases the same call, but the model.
fn call(
    r: &ResultRecord,
) -> (
    u32,
    &str,
    u32,
    u32,
    &std::collections::BTreeMap<String, u32>,
    handoff_backend::Device,
) {
    (
        r.repeat,
        r.case.scenario.as_str(),
        r.case.threads,
        r.case.batch,
        &r.case.dims,
        r.case.device,
    )
}

pub const TORCH_GAIN_NOTE: &str = "The model as a team runs it before the hand-off, PyTorch eager through transformers (`torch.inference_mode()`, the case's intra-op threads, 1 inter-op thread), against each Rust backend on the same safetensors weights or the ONNX file converted from them, with the same tokens, measured in the same rounds. A `@torch-bf16` row (PyTorch under bf16 autocast) stands beside every Rust form of the model, its precision variants included. PyTorch p50 is timed inside Python around the forward call and pooling; each Rust p50 around the backend's run. The ratio and its 95% CI come from the per-round medians: above 1, the Rust backend is that many times faster.";

/// What handing off from PyTorch gains per call: `python-torch` (timed
/// inside Python) against every Rust backend that ran the same call.
pub fn torch_gain_table(records: &[ResultRecord]) -> Option<Table> {
    let mut rows = Vec::new();
    for p in records
        .iter()
        .filter(|p| p.case.backend == "python-torch" && p.passes())
    {
        let Some(py) = p.inner_latency_ms.as_ref() else {
            continue;
        };
        // PyTorch in bf16 stands beside every Rust form of the model (fp32
        // and each precision variant that passed): the choice is between
        // them. Eager fp32 beside the same fp32 model.
        let bf16 = p.case.model.ends_with("@torch-bf16");
        for r in records.iter().filter(|r| {
            !r.case.backend.starts_with("python-")
                && r.passes()
                && if bf16 {
                    same_call_of_base(r, p)
                } else {
                    same_call(r, p)
                }
        }) {
            let Some(rs) = r.latency_ms.as_ref() else {
                continue;
            };
            let x = paired(r, p, true);
            rows.push(vec![
                escape_md(&p.case.model),
                p.case.threads.to_string(),
                p.case.batch.to_string(),
                escape_md(&dims(p)),
                escape_md(&match handoff_backend::ids::variant(&r.case.model) {
                    Some(variant) if bf16 => format!("{} ({variant})", r.case.backend),
                    _ => r.case.backend.clone(),
                }),
                fmt_ms(rs.p50),
                fmt_ms(py.p50),
                x.as_ref()
                    .map_or_else(|| "not measured together".to_owned(), ratio_text),
                match &x {
                    Some(x) if x.verdict != Verdict::NoMeasurableDifference => {
                        if x.ratio >= 1.0 {
                            format!("{:.2}x faster than PyTorch", x.ratio)
                        } else {
                            format!("{:.2}x slower than PyTorch", 1.0 / x.ratio)
                        }
                    }
                    Some(_) => "as fast as PyTorch, within the CI".to_owned(),
                    None => "-".to_owned(),
                },
            ]);
        }
    }
    if rows.is_empty() {
        return None;
    }
    Some(Table {
        header: vec![
            "model",
            "threads",
            "batch",
            "dims",
            "Rust backend",
            "Rust p50 ms",
            "PyTorch p50 ms",
            "PyTorch / Rust (95% CI)",
            "the Rust backend is",
        ],
        rows,
    })
}

/// The canary's readings in one row: how many, their median and range.
pub fn canary_table(canary: &[CanaryPoint]) -> Option<Table> {
    let ms: Vec<f64> = canary.iter().filter_map(|c| c.ms).collect();
    let (lo, hi) = handoff_stats::rounds::relative_range(&ms)?;
    Some(Table {
        header: vec![
            "canary readings",
            "missing",
            "median ms",
            "fastest",
            "slowest",
        ],
        rows: vec![vec![
            ms.len().to_string(),
            (canary.len() - ms.len()).to_string(),
            format!("{:.3}", handoff_stats::median(&ms)),
            format!("{:+.1}%", 100.0 * lo),
            format!("{:+.1}%", 100.0 * hi),
        ]],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_line_names_what_cpuid_hid() {
        let env = serde_json::json!({"cpu_model": "Intel Xeon", "logical_cores": 2,
            "cpu_class": "x86-avx2", "cpu_flags": ["avx2", "avx512f", "avx512_vnni"],
            "cpu_hidden": ["avx512f", "avx512_vnni"]});
        let line = machine_line(&RunContext {
            env: Some(&env),
            ..Default::default()
        })
        .unwrap();
        assert!(
            line.starts_with("Machine: Intel Xeon, 2 logical CPUs, int8 class `x86-avx2` (avx2 avx512f avx512_vnni). `cpuid` hid avx512f avx512_vnni (listed in /proc/cpuinfo"),
            "{line}"
        );
        assert!(line.contains("their timings this CPU's"), "{line}");
    }

    #[test]
    fn the_machine_line_names_a_costly_switch_from_avx_to_sse_only() {
        let line_with = |ns: f64, backends: serde_json::Value| {
            let env = serde_json::json!({"cpu_model": "Intel Xeon", "logical_cores": 2,
                "cpu_class": "x86-avx512-vnni", "cpu_flags": ["avx2"], "sse_after_avx_ns": ns,
                "backends": backends});
            machine_line(&RunContext {
                env: Some(&env),
                ..Default::default()
            })
            .unwrap()
        };
        let line = |ns: f64| line_with(ns, serde_json::json!({"ort": "1.31.1", "tract": "0.23.9"}));
        assert!(
            line(154.2).ends_with(" Each switch from AVX to legacy-SSE instructions costs 154 ns on this CPU (probe); tract 0.23.9's x86 kernels make such switches (its AVX2 int8 kernel in every step), so tract's figures here include that cost (see docs/backends.md in handoff)."),
            "{}",
            line(154.2)
        );
        assert!(!line(0.3).contains("legacy-SSE"), "{}", line(0.3));
        // A build without tract has nothing that pays it.
        let slim = line_with(154.2, serde_json::json!({"ort": "1.31.1"}));
        assert!(!slim.contains("legacy-SSE"), "{slim}");
    }

    #[test]
    fn the_machine_line_names_costly_subnormals_where_ort_ran() {
        let line = |ns: f64, backends: serde_json::Value| {
            let env = serde_json::json!({"cpu_model": "Intel Xeon", "logical_cores": 2,
                "cpu_class": "x86-amx", "cpu_flags": ["avx2"], "subnormal_ns": ns,
                "backends": backends});
            machine_line(&RunContext {
                env: Some(&env),
                ..Default::default()
            })
            .unwrap()
        };
        let ort = serde_json::json!({"ort": "1.31.1"});
        let with = line(37.4, ort.clone());
        assert!(
            with.ends_with(" A multiply on subnormal floats costs 37 ns more than on normal ones on this CPU (probe); ORT's softmax writes subnormals where an attention mask hides positions, so padded batches on ORT include that cost unless the suite sets `backend_options: {ort: {denormals: flush}}` (see docs/backends.md in handoff)."),
            "{with}"
        );
        assert!(!line(0.8, ort).contains("subnormal"));
        let tract_only = line(37.4, serde_json::json!({"tract": "0.23.9"}));
        assert!(!tract_only.contains("subnormal"), "{tract_only}");
    }

    #[test]
    fn the_machine_line_says_when_workers_ran_under_a_launcher() {
        let mut env = serde_json::json!({"cpu_model": "Intel Xeon", "logical_cores": 2,
            "cpu_class": "x86-avx512-vnni", "cpu_flags": ["avx2", "avx512_vnni"]});
        let line = |env: &serde_json::Value| {
            machine_line(&RunContext {
                env: Some(env),
                ..Default::default()
            })
            .unwrap()
        };
        assert_eq!(
            line(&env),
            "Machine: Intel Xeon, 2 logical CPUs, int8 class `x86-avx512-vnni` (avx2 avx512_vnni)."
        );
        env["env_vars"] = serde_json::json!({"HANDOFF_WORKER_LAUNCHER": "qemu-x86_64 -cpu EPYC-Milan",
            "HANDOFF_TARGET_CPU": "avx2"});
        let l = line(&env);
        assert!(
            l.contains("built for CPU class `avx2`")
                && l.contains("Workers ran under `qemu-x86_64 -cpu EPYC-Milan`")
                && l.contains("not this machine's"),
            "{l}"
        );
    }
}
