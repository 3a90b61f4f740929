//! Comparing a base run with a head run, case by case.
//!
//! A case is `regressed` only when the change is both statistically
//! significant (the 95% CI of the head/base ratio excludes 1) and larger
//! than the threshold, which is `max(floor, k x run-to-run noise)` when the
//! runs carry repeats (`handoff run --repeat N`) to measure that noise.

pub mod rerun;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use handoff_results::Fingerprint;
use handoff_results::{ResultRecord, Status, read_results};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    P50,
    /// Tail metrics: p90 and p95 sit in the body of a one-thread latency
    /// distribution on a shared VM, p99 often where the host's hiccups
    /// begin (a few percent of runs), so it moves with how many there were.
    P90,
    P95,
    P99,
    Mean,
}

impl Metric {
    /// The quantile the metric reads (`None` for the mean).
    fn quantile(self) -> Option<f64> {
        match self {
            Metric::P50 => Some(0.5),
            Metric::P90 => Some(0.90),
            Metric::P95 => Some(0.95),
            Metric::P99 => Some(0.99),
            Metric::Mean => None,
        }
    }

    /// The quantile of a tail metric (`None` for p50 and the mean).
    fn tail_quantile(self) -> Option<f64> {
        self.quantile().filter(|q| *q > 0.5)
    }

    fn name(self) -> &'static str {
        match self {
            Metric::P50 => "p50",
            Metric::P90 => "p90",
            Metric::P95 => "p95",
            Metric::P99 => "p99",
            Metric::Mean => "mean",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub metric: Metric,
    /// Smallest change that counts (0.05 = 5%).
    pub threshold: f64,
    /// Per-case thresholds: the first whose text is in the case id wins.
    pub case_thresholds: Vec<(String, f64)>,
    /// Threshold >= k x observed run-to-run noise, when repeats exist.
    pub noise_k: f64,
    pub allow_env_mismatch: bool,
    /// A case missing from head is a deliberate removal, not a regression.
    pub allow_missing: bool,
    /// Keep the rounds with a host stall in a tail metric of an
    /// interleaved run (by default they are left out: [`STALL_RUNS`]).
    pub keep_stalls: bool,
}

impl Options {
    /// The threshold of case `id`: the first per-case threshold whose text
    /// is in the id, else `threshold`.
    fn threshold_for(&self, id: &str) -> f64 {
        self.case_thresholds
            .iter()
            .find(|(pat, _)| id.contains(pat.as_str()))
            .map_or(self.threshold, |(_, t)| *t)
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            metric: Metric::P50,
            threshold: 0.05,
            case_thresholds: Vec::new(),
            noise_k: 3.0,
            allow_env_mismatch: false,
            allow_missing: false,
            keep_stalls: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Regressed,
    Improved,
    Unchanged,
    Inconclusive,
    New,
    Missing,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Regressed => "regressed",
            Verdict::Improved => "improved",
            Verdict::Unchanged => "unchanged",
            Verdict::Inconclusive => "inconclusive",
            Verdict::New => "new",
            Verdict::Missing => "missing",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub verdict: Verdict,
    pub base_ms: Option<f64>,
    pub head_ms: Option<f64>,
    pub ratio: Option<f64>,
    pub ratio_ci95: Option<[f64; 2]>,
    pub threshold: f64,
    /// Run-to-run noise (stddev of log medians over repeats), if measured.
    pub noise: Option<f64>,
    pub note: Option<String>,
    /// For a tail metric: the share of base's and head's runs beyond
    /// [`OUTLIER_FACTOR`] x their own median.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outliers: Option<[f64; 2]>,
    /// For a tail metric of an interleaved run that left out rounds with a
    /// host stall ([`STALL_RUNS`]): the stalls base and head met, and the
    /// rounds each caused to be left out (`None` with `--keep-stalls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalls: Option<[Stalls; 2]>,
    /// With `stalls`: the paired rounds with a host stall on either side,
    /// of all paired rounds, and whether they were left out (not when
    /// they were more than [`MAX_STALLED_SHARE`] of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_rounds: Option<StalledRounds>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub metric: Metric,
    pub rows: Vec<Row>,
    /// Environment differences that were allowed with the override.
    pub env_differences: Vec<String>,
    /// Base and head were measured in one run, in interleaved rounds
    /// (`handoff ab`): the ratios are paired.
    #[serde(default)]
    pub interleaved: bool,
}

impl Comparison {
    pub fn regressions(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.verdict == Verdict::Regressed)
            .count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error(transparent)]
    Read(#[from] handoff_results::record::ReadError),
    #[error("{0} holds no results")]
    Empty(PathBuf),
    #[error(
        "base and head ran in different environments; their numbers are not comparable:\n  {}\n(pass --allow-env-mismatch to compare anyway)",
        .0.join("\n  ")
    )]
    EnvMismatch(Vec<String>),
}

/// A results file and the fingerprints beside it.
pub struct Run {
    pub path: PathBuf,
    pub records: Vec<ResultRecord>,
    pub fingerprint: Option<Fingerprint>,
}

impl Run {
    /// Several runs of the same cases as one, each taken as a repeat (for
    /// the noise estimate); the fingerprint is the first's.
    pub fn as_repeats(runs: Vec<Run>) -> Option<Run> {
        let mut it = runs.into_iter();
        let mut first = it.next()?;
        for (k, mut r) in it.enumerate() {
            for rec in &mut r.records {
                rec.repeat += (k as u32 + 1) * 1000;
            }
            first.records.extend(r.records);
        }
        Some(first)
    }

    /// Loads `results.jsonl` (or a run directory holding it) and `env.json`.
    pub fn load(path: &Path) -> Result<Self, CompareError> {
        let file = if path.is_dir() {
            path.join("results.jsonl")
        } else {
            path.to_owned()
        };
        let records = read_results(&file)?.records;
        if records.is_empty() {
            return Err(CompareError::Empty(file));
        }
        let fingerprint = file
            .parent()
            .map(|d| d.join("env.json"))
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok());
        Ok(Self {
            path: file,
            records,
            fingerprint,
        })
    }
}

/// A case's logical identity: what a user names (model id and variant,
/// backend, device, threads, batch, dims, scenario). What changed underneath
/// (the model file, the runtime version) is the change being gated: shown
/// beside the verdict, never a reason to stop comparing.
fn identity(r: &ResultRecord) -> String {
    let c = &r.case;
    let dims: Vec<String> = c.dims.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{}|{}|{}|t{}|b{}|{}|{}",
        c.model,
        c.backend,
        c.device,
        c.threads,
        c.batch,
        dims.join(","),
        c.scenario
    )
}

/// What changed underneath a case between base and head.
fn changes(base: &ResultRecord, head: &ResultRecord) -> Vec<String> {
    let mut out = Vec::new();
    let (b, h) = (&base.case, &head.case);
    if b.model_sha256 != h.model_sha256 {
        let short = |s: &str| s.chars().take(8).collect::<String>();
        let size = |r: &ResultRecord| {
            r.accuracy
                .as_ref()
                .filter(|a| a.size_bytes > 0)
                .map(|a| format!(", {:.1} MB", a.size_bytes as f64 / 1e6))
                .unwrap_or_default()
        };
        out.push(format!(
            "model file changed (sha {}.. -> {}..{}{})",
            short(&b.model_sha256),
            short(&h.model_sha256),
            size(base),
            if size(head).is_empty() {
                String::new()
            } else {
                format!(" ->{}", size(head).trim_start_matches(','))
            }
        ));
    }
    if let (Some(x), Some(y)) = (&b.backend_version, &h.backend_version)
        && x != y
    {
        out.push(format!("{} {x} -> {y}", h.backend));
    }
    out
}

fn env_differences(base: &Run, head: &Run) -> Vec<String> {
    match (&base.fingerprint, &head.fingerprint) {
        (Some(a), Some(b)) => {
            let mut d = Vec::new();
            let mut field = |name: &str, x: String, y: String| {
                if x != y {
                    d.push(format!("{name}: base {x}, head {y}"));
                }
            };
            field("CPU model", a.cpu_model.clone(), b.cpu_model.clone());
            field(
                "logical cores",
                a.logical_cores.to_string(),
                b.logical_cores.to_string(),
            );
            field("CPU flags", a.cpu_flags.join(" "), b.cpu_flags.join(" "));
            // Runs recorded before the class was kept have none.
            if !a.cpu_class.is_empty() && !b.cpu_class.is_empty() {
                field("int8 CPU class", a.cpu_class.clone(), b.cpu_class.clone());
            }
            field(
                "build profile",
                a.build_profile.clone(),
                b.build_profile.clone(),
            );
            // Runtime versions may differ: an upgrade is what such a gate
            // checks. Each case's row names the version change.
            for k in a.env_vars.keys().chain(b.env_vars.keys()) {
                field(
                    &format!("${k}"),
                    a.env_vars.get(k).cloned().unwrap_or_default(),
                    b.env_vars.get(k).cloned().unwrap_or_default(),
                );
            }
            d.sort();
            d.dedup();
            d
        }
        _ => {
            let hashes = |r: &Run| {
                let mut h: Vec<&str> = r.records.iter().map(|x| x.env.as_str()).collect();
                h.sort_unstable();
                h.dedup();
                h.join(",")
            };
            let (a, b) = (hashes(base), hashes(head));
            if a == b {
                Vec::new()
            } else {
                vec![format!(
                    "environment hash: base {a}, head {b} (no env.json beside the results to say which fields)"
                )]
            }
        }
    }
}

/// Compares head with base.
pub fn compare(base: &Run, head: &Run, opts: &Options) -> Result<Comparison, CompareError> {
    let mut c = compare_rows(base, head, opts)?;
    add_tail_notes(&mut c);
    Ok(c)
}

/// [`compare`] before the tail notes, which are written last from each
/// row's final outlier shares.
fn compare_rows(base: &Run, head: &Run, opts: &Options) -> Result<Comparison, CompareError> {
    let env_differences = env_differences(base, head);
    if !env_differences.is_empty() && !opts.allow_env_mismatch {
        return Err(CompareError::EnvMismatch(env_differences));
    }
    let (b, h) = (group(base), group(head));
    let mut rows = Vec::new();
    let mut order: Vec<(&String, usize)> = h.iter().map(|(k, v)| (k, v[0].index)).collect();
    order.extend(
        b.iter()
            .filter(|(k, _)| !h.contains_key(*k))
            .map(|(k, v)| (k, v[0].index)),
    );
    order.sort_by_key(|(_, i)| *i);
    for (key, _) in order {
        rows.push(compare_case(
            b.get(key).map(Vec::as_slice),
            h.get(key).map(Vec::as_slice),
            opts,
        ));
    }
    Ok(Comparison {
        metric: opts.metric,
        rows,
        env_differences,
        interleaved: false,
    })
}

fn group(run: &Run) -> BTreeMap<String, Vec<&ResultRecord>> {
    let mut g: BTreeMap<String, Vec<&ResultRecord>> = BTreeMap::new();
    for r in &run.records {
        g.entry(identity(r)).or_default().push(r);
    }
    g
}

fn metric_of(samples: &[f64], metric: Metric) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match metric.quantile() {
        Some(q) => handoff_stats::quantile_sorted(&s, q),
        None => s.iter().sum::<f64>() / s.len() as f64,
    }
}

/// Stddev of the log of each repeat's metric: the run-to-run noise.
fn noise(records: &[&ResultRecord], metric: Metric) -> Option<f64> {
    let logs: Vec<f64> = records
        .iter()
        .filter(|r| r.status == Status::Ok && !r.samples_ms.is_empty())
        .map(|r| metric_of(&r.samples_ms, metric).ln())
        .collect();
    if logs.len() < 2 {
        return None;
    }
    let mean = logs.iter().sum::<f64>() / logs.len() as f64;
    Some((logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (logs.len() - 1) as f64).sqrt())
}

fn compare_case(
    base: Option<&[&ResultRecord]>,
    head: Option<&[&ResultRecord]>,
    opts: &Options,
) -> Row {
    let any = head
        .or(base)
        .and_then(|v| v.first())
        .expect("one side exists");
    let id = any.case.id.clone();
    let floor = opts.threshold_for(&id);
    let mut row = Row {
        id,
        verdict: Verdict::Inconclusive,
        base_ms: None,
        head_ms: None,
        ratio: None,
        ratio_ci95: None,
        threshold: floor,
        noise: None,
        note: None,
        outliers: None,
        stalls: None,
        stalled_rounds: None,
    };
    let (Some(base), Some(head)) = (base, head) else {
        row.verdict = if head.is_some() {
            Verdict::New
        } else if opts.allow_missing {
            Verdict::Missing
        } else {
            row.note = Some(
                "missing from head (pass --allow-missing if it was removed on purpose)".into(),
            );
            Verdict::Regressed
        };
        return row;
    };
    let notes = changes(base[0], head[0]);
    let with_changes = |note: String| -> Option<String> {
        let mut all = notes.clone();
        if !note.is_empty() {
            all.insert(0, note);
        }
        (!all.is_empty()).then(|| all.join("; "))
    };
    row.note = with_changes(String::new());
    // A head that crashed, hung or disagrees with its reference in any
    // repeat fails the gate, whatever its other repeats measured.
    let broken = |r: &&&ResultRecord| {
        matches!(
            r.status,
            Status::Failed | Status::Timeout | Status::Mismatch
        )
    };
    if let Some(bad) = head.iter().find(broken) {
        let base_same = base.iter().all(|r| r.status == bad.status);
        row.verdict = if base_same {
            Verdict::Inconclusive
        } else {
            Verdict::Regressed
        };
        row.note = with_changes(format!(
            "head is `{}`{}: {}",
            bad.status.as_str(),
            if base_same { " (as in base)" } else { "" },
            bad.reason.as_deref().unwrap_or("")
        ));
        return row;
    }
    let passed = |rs: &[&ResultRecord]| {
        rs.iter()
            .all(|r| r.accuracy.as_ref().is_none_or(|a| a.passed))
    };
    if passed(base) && !passed(head) {
        let a = head
            .iter()
            .find_map(|r| r.accuracy.as_ref())
            .expect("a failed accuracy gate");
        row.verdict = Verdict::Regressed;
        row.note = with_changes(format!(
            "accuracy gate failed in head: min cosine {:.4} < {} (passed in base)",
            a.min_cosine, a.threshold_min_cosine
        ));
        return row;
    }
    let ok = |rs: &[&ResultRecord]| -> Vec<f64> {
        rs.iter()
            .filter(|r| r.status == Status::Ok)
            .flat_map(|r| r.samples_ms.iter().copied())
            .collect()
    };
    let (bs, hs) = (ok(base), ok(head));
    if hs.is_empty() {
        let status = head[0].status.as_str();
        row.verdict = if bs.is_empty() {
            Verdict::Inconclusive
        } else {
            Verdict::Regressed
        };
        row.note = with_changes(format!(
            "head is `{status}`: {}",
            head[0].reason.as_deref().unwrap_or("")
        ));
        return row;
    }
    if bs.is_empty() {
        row.verdict = Verdict::New;
        row.note = with_changes(format!("base was `{}`", base[0].status.as_str()));
        return row;
    }
    let (bv, hv) = (metric_of(&bs, opts.metric), metric_of(&hs, opts.metric));
    row.base_ms = Some(bv);
    row.head_ms = Some(hv);
    let noise = match (noise(base, opts.metric), noise(head, opts.metric)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    row.noise = noise;
    let threshold = noise.map_or(floor, |n| floor.max(opts.noise_k * n));
    row.threshold = threshold;
    let est = match opts.metric {
        Metric::P50 => handoff_stats::compare::hodges_lehmann_ratio(&bs, &hs, 1.96),
        _ => {
            handoff_stats::compare::bootstrap_ratio(&bs, &hs, |s| metric_of(s, opts.metric), 0x5eed)
        }
    };
    let Some(est) = est else {
        row.note = with_changes("too few samples".into());
        return row;
    };
    let ratio = if opts.metric == Metric::P50 {
        est.ratio
    } else {
        hv / bv
    };
    row.ratio = Some(ratio);
    row.ratio_ci95 = Some([est.lo, est.hi]);
    row.verdict = decide(ratio, [est.lo, est.hi], threshold);
    if let Some(busy) = busy_note(base.iter().chain(head).copied()) {
        row.verdict = decide_busy(ratio, [est.lo, est.hi], threshold);
        row.note = with_changes(busy);
    }
    if opts.metric.tail_quantile().is_some() {
        row.outliers = Some([outlier_share(&bs), outlier_share(&hs)]);
    }
    row
}

/// Appends to each row of a tail metric why its quantile cannot be
/// trusted, when [`tail_note`] finds that outliers set it.
fn add_tail_notes(c: &mut Comparison) {
    for row in &mut c.rows {
        if let Some(t) = row.outliers.and_then(|o| tail_note(c.metric, o)) {
            row.note = Some(match row.note.take() {
                Some(n) => format!("{n}; {t}"),
                None => t,
            });
        }
    }
}

/// Runs slower than this multiple of their case's median are outliers for
/// the tail check: on the 2-vCPU VMs measured, a one-thread encoder's runs
/// that the host interrupted start there (0.4-1.9% of runs in a busy hour,
/// under 0.1% in a quiet one).
pub const OUTLIER_FACTOR: f64 = 1.3;

/// The share of `samples` beyond [`OUTLIER_FACTOR`] x their median.
fn outlier_share(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let cut = OUTLIER_FACTOR * handoff_stats::median(samples);
    samples.iter().filter(|x| **x > cut).count() as f64 / samples.len() as f64
}

/// Why a tail metric cannot be trusted: when outliers make up more
/// than half of the runs above it, the quantile sits where they begin and
/// moves with how many each side happened to meet (a p99 gate here raised a
/// false alarm at 1.9% and missed 10% more work at intervals of +-6-15%),
/// not with the model.
fn tail_note(metric: Metric, [base, head]: [f64; 2]) -> Option<String> {
    let q = metric.tail_quantile()?;
    // 1e-9: 1 - 0.9 is a little under 0.1 in binary.
    (base.max(head) > (1.0 - q) / 2.0 + 1e-9).then(|| {
        let m = metric.name();
        format!(
            "{m} lies among outliers: {:.1}% of base's and {:.1}% of head's runs took over {OUTLIER_FACTOR}x their median (a shared host's hiccups, or the model's own), so {m} moves with how many each side met; a lower quantile (e.g. `--metric p90`) is steadier",
            base * 100.0,
            head * 100.0
        )
    })
}

/// How much a load from other processes can slow one side of a comparison
/// on these machines (a parallel build doubles latencies).
const BUSY_FACTOR: f64 = 2.0;

/// Why a measured change is judged only beyond [`BUSY_FACTOR`]: some of its
/// cases were timed while other processes used the CPU, which does not hit
/// both sides alike.
fn busy_note<'a>(records: impl Iterator<Item = &'a ResultRecord>) -> Option<String> {
    let most = records
        .filter_map(|r| r.machine.as_ref().filter(|m| m.busy))
        .map(|m| m.other_cpu_cores)
        .reduce(f64::max)?;
    Some(format!(
        "busy: measured while other processes used up to {most:.2} cores, so a change within {BUSY_FACTOR}x either way is not judged; re-run on a quiet machine"
    ))
}

/// The verdict on a busy machine: only a change whose whole CI lies beyond
/// what the load could have done to one side, and (as on a quiet one) that
/// is beyond the threshold.
fn decide_busy(ratio: f64, [lo, hi]: [f64; 2], threshold: f64) -> Verdict {
    let (up, down) = (lo > BUSY_FACTOR, hi < 1.0 / BUSY_FACTOR);
    if up && ratio > 1.0 + threshold {
        Verdict::Regressed
    } else if down && ratio < 1.0 - threshold {
        Verdict::Improved
    } else if up || down {
        // Beyond the load, within what the gate tolerates.
        Verdict::Unchanged
    } else {
        Verdict::Inconclusive
    }
}

/// The verdict on a head/base ratio with its 95% CI: a change counts when
/// the CI excludes 1 and the ratio is beyond the threshold.
fn decide(ratio: f64, [lo, hi]: [f64; 2], threshold: f64) -> Verdict {
    let significant_up = lo > 1.0;
    let significant_down = hi < 1.0;
    if significant_up && ratio > 1.0 + threshold {
        Verdict::Regressed
    } else if significant_down && ratio < 1.0 - threshold {
        Verdict::Improved
    } else if lo >= 1.0 - threshold && hi <= 1.0 + threshold {
        Verdict::Unchanged
    } else if (significant_up || significant_down) && (ratio - 1.0).abs() <= threshold {
        // A real but small change: within what the gate tolerates.
        Verdict::Unchanged
    } else {
        Verdict::Inconclusive
    }
}

/// The gate on one run that measured two files of a model side by side
/// (`handoff ab`): models named `{id}.base...` against `{id}.head...`
/// (variants included), matched by the rest of their identity. Failures,
/// missing cases and accuracy are judged as in [`compare`]; the p50 ratio
/// and its CI are the paired ones from the interleaved rounds (drift
/// cancels in them), widened by the between-process variance; other
/// metrics come from a paired bootstrap over the same rounds, widened
/// alike. A case without rounds both sides ran keeps the unpaired estimate
/// of [`compare`].
pub fn compare_ab(run: &Run, id: &str, opts: &Options) -> Comparison {
    let (base_id, head_id) = (format!("{id}.base"), format!("{id}.head"));
    let side = |prefix: &str| -> Run {
        let records = run
            .records
            .iter()
            .filter_map(|r| {
                let rest = handoff_backend::ids::form_of(&r.case.model, prefix)?;
                let mut r = r.clone();
                r.case.model = format!("{id}{rest}");
                r.case.id = r.case.id.replacen(prefix, id, 1);
                Some(r)
            })
            .collect();
        Run {
            path: run.path.clone(),
            records,
            fingerprint: run.fingerprint.clone(),
        }
    };
    let (base, head) = (side(&base_id), side(&head_id));
    let mut c = compare_rows(
        &base,
        &head,
        &Options {
            allow_env_mismatch: true,
            ..opts.clone()
        },
    )
    .expect("one run has one environment");
    c.env_differences.clear();
    c.interleaved = true;
    let original = |id_of_case: &str, prefix: &str| {
        run.records
            .iter()
            .find(|r| r.repeat == 0 && r.case.id == id_of_case.replacen(id, prefix, 1))
    };
    for row in &mut c.rows {
        if row.ratio.is_none() {
            continue;
        }
        let (Some(a), Some(b)) = (original(&row.id, &base_id), original(&row.id, &head_id)) else {
            continue;
        };
        let same_rounds =
            matches!((&a.rounds, &b.rounds), (Some(x), Some(y)) if x.group == y.group);
        let paired = same_rounds
            .then(|| paired_estimate(a, b, opts.metric, opts.keep_stalls))
            .flatten();
        let Some(Paired {
            ratio,
            ci95,
            stalls,
        }) = paired
        else {
            continue;
        };
        row.ratio = Some(ratio);
        row.ratio_ci95 = Some(ci95);
        if let Some(stalls) = stalls {
            restate_tail(row, opts.metric, stalls);
        }
        row.noise = None;
        let floor = opts.threshold_for(&row.id);
        row.threshold = floor;
        row.verdict = decide(ratio, ci95, floor);
        // compare() has put the busy note on the row: it saw these records
        // (and any repeats).
        if busy_note([a, b].into_iter()).is_some() {
            row.verdict = decide_busy(ratio, ci95, floor);
        }
    }
    add_tail_notes(&mut c);
    c
}

/// A stretch of at least this many consecutive runs of one block, each
/// beyond [`OUTLIER_FACTOR`] x the case's median, is a host stall: the
/// shared host slowed the VM for that window (tens of milliseconds), not
/// the model, whose own slow runs come one at a time. A tail metric of an
/// interleaved run leaves every round in which either side met one out on
/// both sides ([`handoff_stats::compare::without_stalled_rounds`]) while
/// such rounds are at most [`MAX_STALLED_SHARE`] of them; on the
/// 2-vCPU VMs measured, stalls otherwise set a one-thread encoder's p99 on
/// whichever side met them and hid a 10% change in 1-4 of 20 runs
/// (docs/regression-gate.md). `--keep-stalls` keeps them: a model that
/// stalls in bursts of its own would have them left out, so the row counts
/// each side's and says when head met many more.
pub const STALL_RUNS: usize = 3;

/// Stalled rounds are left out only while they are at most this share of
/// the paired rounds. Beyond it the host is stalling all the time, and the
/// calm rounds that would remain are a selection (each side's cut sits at
/// its own median) whose interval is too narrow: in an hour when 15-20% of
/// all runs were outliers and 30-60% of rounds held a stall, leaving them
/// out raised 4 false alarms in 20 A/A runs and keeping them none, while
/// below a fifth leaving them out raised none and found more
/// (docs/regression-gate.md).
pub const MAX_STALLED_SHARE: f64 = 0.2;

/// How many paired rounds met a host stall and what the gate did with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StalledRounds {
    /// Paired rounds in which either side met a host stall.
    pub stalled: usize,
    /// Paired rounds in all.
    pub rounds: usize,
    /// Whether the stalled rounds were left out (false when they were more
    /// than [`MAX_STALLED_SHARE`] of the rounds: every round was kept).
    pub left_out: bool,
}

pub use handoff_stats::compare::Stalls;

/// A paired estimate; `stalls`: what a tail metric left out for host
/// stalls.
struct Paired {
    ratio: f64,
    ci95: [f64; 2],
    stalls: Option<StallsAside>,
}

/// The host stalls each side met, the rounds they stalled of those both
/// sides ran, and the outlier shares of the rounds kept.
struct StallsAside {
    met: [Stalls; 2],
    rounds: StalledRounds,
    shares: [f64; 2],
}

/// `b / a` of the metric with its 95% CI from rounds both ran: p50 from the
/// per-round medians, other metrics by a paired bootstrap over rounds (the
/// rounds with a host stall left out unless `keep_stalls`), both widened
/// by the between-process variance.
fn paired_estimate(
    a: &ResultRecord,
    b: &ResultRecord,
    metric: Metric,
    keep_stalls: bool,
) -> Option<Paired> {
    if metric == Metric::P50 {
        let r = handoff_results::pairs::ratio_of(a, b, false)?;
        return Some(Paired {
            ratio: r.ratio,
            ci95: r.ci95,
            stalls: None,
        });
    }
    let (ra, rb) = (
        handoff_results::pairs::round_samples(a)?,
        handoff_results::pairs::round_samples(b)?,
    );
    let paired = |x: &[&[f64]], y: &[&[f64]]| {
        x.iter()
            .zip(y)
            .filter(|(p, q)| !p.is_empty() && !q.is_empty())
            .count()
    };
    let rounds = paired(&ra, &rb);
    let (ka, kb, stalls) = if keep_stalls {
        (ra, rb, None)
    } else {
        let (ka, kb, met) =
            handoff_stats::compare::without_stalled_rounds(&ra, &rb, OUTLIER_FACTOR, STALL_RUNS);
        let stalled = rounds - paired(&ka, &kb);
        let left_out = stalled as f64 <= MAX_STALLED_SHARE * rounds as f64;
        let info = StalledRounds {
            stalled,
            rounds,
            left_out,
        };
        if left_out {
            (ka, kb, Some((met, info)))
        } else {
            (ra, rb, Some((met, info)))
        }
    };
    let stat = |s: &[f64]| metric_of(s, metric);
    // Each side's speed also depends on its worker processes (where their
    // memory landed), a shift of the whole distribution that the rounds of
    // so few processes cannot show: the interval carries it as p50's does.
    let est = handoff_stats::compare::paired_round_bootstrap(&ka, &kb, stat, 0x5eed)?
        .widened(a.process_term().plus(b.process_term()));
    let share = |k: &[&[f64]]| outlier_share(&k.concat());
    Some(Paired {
        ratio: est.ratio,
        ci95: [est.lo, est.hi],
        stalls: stalls.map(|(met, rounds)| StallsAside {
            met,
            rounds,
            shares: [share(&ka), share(&kb)],
        }),
    })
}

/// Puts what a tail metric of an interleaved run measured on `row`: the
/// rounds it left out for host stalls and the outliers among the runs it
/// kept (from which the tail note is written last).
fn restate_tail(row: &mut Row, metric: Metric, aside: StallsAside) {
    let mut parts: Vec<String> = row.note.take().into_iter().collect();
    let StallsAside {
        met,
        rounds,
        shares,
    } = aside;
    let StalledRounds {
        stalled,
        rounds: all,
        left_out,
    } = rounds;
    if stalled > 0 {
        let side = |s: Stalls| match s.stretches {
            0 => "none".to_string(),
            1 => format!("1 stall ({} runs)", s.runs),
            n => format!("{n} stalls ({} runs)", s.runs),
        };
        let what = format!(
            "host stalls ({STALL_RUNS}+ consecutive runs over {OUTLIER_FACTOR}x the median): base met {}, head {}",
            side(met[0]),
            side(met[1])
        );
        parts.push(if left_out {
            format!("{stalled} of {all} rounds left out on both sides for {what}")
        } else {
            format!(
                "every round kept: {stalled} of {all} held {what}; beyond {:.0}% of the rounds, the calm rest would be a selection too narrow to judge from",
                MAX_STALLED_SHARE * 100.0
            )
        });
        // The host stalls both sides alike; many more on head's side may be
        // the model's own (memory pressure, a background thread).
        let [b, h] = met.map(|s| s.stretches);
        if left_out && h >= 3 && h >= 3 * b.max(1) {
            parts.push(format!(
                "head met {h} stalls against base's {b}: if the model causes them, gate with `--keep-stalls`"
            ));
        }
    }
    if metric.tail_quantile().is_some() {
        row.outliers = Some(shares);
    }
    row.stalls = Some(met);
    row.stalled_rounds = Some(rounds);
    row.note = (!parts.is_empty()).then(|| parts.join("; "));
}

/// Markdown for PR comments and `$GITHUB_STEP_SUMMARY`.
pub fn markdown(c: &Comparison) -> String {
    let mut out = String::new();
    let count = |v: Verdict| c.rows.iter().filter(|r| r.verdict == v).count();
    let head = if c.regressions() > 0 {
        format!(":x: **{} regression(s)**", c.regressions())
    } else {
        ":white_check_mark: **no regression**".to_owned()
    };
    let _ = writeln!(
        out,
        "## handoff {}: {head}\n\n{} cases ({:?}): {} regressed, {} improved, {} unchanged, {} inconclusive, {} new, {} missing.\n",
        if c.interleaved { "ab" } else { "compare" },
        c.rows.len(),
        c.metric,
        count(Verdict::Regressed),
        count(Verdict::Improved),
        count(Verdict::Unchanged),
        count(Verdict::Inconclusive),
        count(Verdict::New),
        count(Verdict::Missing)
    );
    if !c.env_differences.is_empty() {
        let _ = writeln!(
            out,
            "> Compared across different environments (override): {}\n",
            c.env_differences.join("; ")
        );
    }
    if c.interleaved && c.metric == Metric::P50 {
        out.push_str("> Base and head were measured in one run, in interleaved rounds: the change and its 95% CI come from the per-round head/base ratios (the machine's drift cancels in them), widened by the speed spread between worker processes. A change counts when the CI excludes 0 and it is beyond the threshold.\n\n");
    } else if c.interleaved {
        out.push_str("> Base and head were measured in one run, in interleaved rounds, so the machine's drift hit both alike: the change and its 95% CI are a paired bootstrap over rounds (each draw takes the same rounds' samples on both sides, so drift cancels and a slow stretch that hit whole blocks counts as one draw, not as many independent samples), widened by the speed spread between worker processes. A change counts when the CI excludes 0 and it is beyond the threshold.\n\n");
        if c.rows.iter().any(|r| r.stalls.is_some()) {
            let _ = writeln!(
                out,
                "> Rounds with a host stall are left out on both sides while they are at most {:.0}% of the rounds: a stretch of {STALL_RUNS} or more consecutive runs of one block, each over {OUTLIER_FACTOR}x its case's median, is the shared host slowing the machine for that moment (and the runs around it less visibly), not the model, whose own slow runs come one at a time and are kept. The note counts them; `--keep-stalls` keeps them.\n",
                MAX_STALLED_SHARE * 100.0
            );
        }
    } else {
        out.push_str("> Base and head were measured in separate runs: the machine's speed drifts between them, so a change smaller than the run-to-run noise (the threshold column, from `--repeat`) cannot be told apart from drift. For a gate that can, measure both in one interleaved run (`handoff ab`).\n\n");
    }
    out.push_str("| case | verdict | base ms | head ms | change | 95% CI | threshold | note |\n|---|---|---:|---:|---:|---|---:|---|\n");
    let pct = |x: f64| format!("{:+.1}%", (x - 1.0) * 100.0);
    for r in &c.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | ±{:.1}% | {} |",
            r.id.replace('|', "\\|"),
            if r.verdict == Verdict::Regressed {
                "**regressed**"
            } else {
                r.verdict.as_str()
            },
            r.base_ms.map_or("-".into(), |v| format!("{v:.4}")),
            r.head_ms.map_or("-".into(), |v| format!("{v:.4}")),
            r.ratio.map_or("-".into(), pct),
            r.ratio_ci95
                .map_or("-".into(), |[a, b]| format!("{} … {}", pct(a), pct(b))),
            r.threshold * 100.0,
            r.note.as_deref().unwrap_or("").replace('|', "\\|"),
        );
    }
    out
}
