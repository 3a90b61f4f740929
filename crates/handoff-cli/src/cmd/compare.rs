//! `handoff compare`, `handoff ab` and `handoff baseline`: the regression gate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use handoff_backend::Registry;
use handoff_suite::{Plan, SuiteError};

use crate::backends::plan_options;
use crate::cmd::run::{RunArgs, run_plan, timestamp};
use crate::out::{errln, out, outln};

/// Compare two runs case by case; exit 1 if any case regressed.
///
/// BASE and HEAD are results.jsonl files or run directories; BASE may be
/// `@NAME` for a baseline saved with `handoff baseline save NAME`.
/// A case regresses when the 95% CI of the head/base ratio excludes 1
/// and the change exceeds the threshold: max(--threshold, --noise-k x
/// run-to-run noise) where runs were made with --repeat.
#[derive(clap::Args)]
pub struct CompareCmd {
    pub base: String,
    pub head: PathBuf,
    /// p50 (Hodges-Lehmann ratio), p90, p95, p99 or mean (bootstrap CI).
    #[arg(long, value_enum, default_value_t = MetricArg::P50)]
    pub metric: MetricArg,
    /// Smallest change that counts, as a fraction.
    #[arg(long, default_value_t = 0.05)]
    pub threshold: f64,
    /// Per-case threshold, `TEXT=0.1`: cases whose id contains TEXT.
    #[arg(long = "case-threshold", value_parser = parse_case_threshold)]
    pub case_thresholds: Vec<(String, f64)>,
    #[arg(long, default_value_t = 3.0)]
    pub noise_k: f64,
    /// Compare runs from different machines (CPU model, flags, cores,
    /// thread settings) anyway, with a warning. Runtime versions may
    /// differ without it: each case's note names the change.
    #[arg(long)]
    pub allow_env_mismatch: bool,
    /// A case missing from HEAD was removed on purpose (otherwise a
    /// missing case is a regression).
    #[arg(long)]
    pub allow_missing: bool,
    /// Write the comparison as JSON here (`-` for stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the Markdown summary here too (e.g. $GITHUB_STEP_SUMMARY).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Confirm suspected regressions before failing: rerun just those
    /// cases of SUITE with both builds in ABBA order (base, head, head,
    /// base) and fail only if the rerun agrees.
    #[arg(long, value_name = "SUITE", requires = "base_bin")]
    pub rerun: Option<PathBuf>,
    /// The base build's handoff binary, for --rerun.
    #[arg(long, value_name = "PATH")]
    pub base_bin: Option<PathBuf>,
    /// The head build's handoff binary (default: this one).
    #[arg(long, value_name = "PATH")]
    pub head_bin: Option<PathBuf>,
}

/// `--metric`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum MetricArg {
    P50,
    P90,
    P95,
    P99,
    Mean,
}

impl From<MetricArg> for handoff_compare::Metric {
    fn from(m: MetricArg) -> Self {
        match m {
            MetricArg::P50 => Self::P50,
            MetricArg::P90 => Self::P90,
            MetricArg::P95 => Self::P95,
            MetricArg::P99 => Self::P99,
            MetricArg::Mean => Self::Mean,
        }
    }
}

impl CompareCmd {
    pub fn run(self) -> Result<ExitCode> {
        let Self {
            base,
            head,
            metric,
            threshold,
            case_thresholds,
            noise_k,
            allow_env_mismatch,
            allow_missing,
            json,
            markdown,
            rerun,
            base_bin,
            head_bin,
        } = self;
        let base = match base.strip_prefix('@') {
            Some(name) => baselines_dir().join(name),
            None => PathBuf::from(base),
        };
        let opts = handoff_compare::Options {
            metric: metric.into(),
            threshold,
            case_thresholds,
            noise_k,
            allow_env_mismatch,
            allow_missing,
            // Separate runs have no paired rounds to leave out.
            keep_stalls: false,
        };
        let b = handoff_compare::Run::load(&base)?;
        let h = handoff_compare::Run::load(&head)?;
        let mut c = handoff_compare::compare(&b, &h, &opts)?;
        if let (Some(suite), Some(base_bin), true) = (&rerun, &base_bin, c.regressions() > 0) {
            let head_bin = match head_bin {
                Some(p) => p,
                None => std::env::current_exe()?,
            };
            c = handoff_compare::rerun::confirm(c, suite, base_bin, &head_bin, &opts)?;
        }
        let md = handoff_compare::markdown(&c);
        if !c.env_differences.is_empty() {
            errln!(
                "warning: comparing across environments: {}",
                c.env_differences.join("; ")
            );
        }
        match json.as_deref() {
            Some(p) if p == Path::new("-") => outln!("{}", serde_json::to_string_pretty(&c)?)?,
            Some(p) => std::fs::write(p, serde_json::to_vec_pretty(&c)?)?,
            None => {}
        }
        if json.as_deref() != Some(Path::new("-")) {
            out!("{md}")?;
        }
        if let Some(p) = markdown {
            std::fs::write(p, &md)?;
        }
        Ok(ExitCode::from(u8::from(c.regressions() > 0)))
    }
}

/// A/B in one run: two files of one model (--base/--head), two ONNX
/// Runtime libraries (--base-ort/--head-ort), or both. The suite's model
/// ID becomes ID.base and ID.head, measured in the same interleaved rounds
/// on every backend, thread count, batch and variant of the suite; exit 1
/// if any case regressed.
///
/// A case regresses when the paired 95% CI of head/base excludes 1 and
/// the change exceeds --threshold, or when head failed, hung, disagreed
/// with its reference or failed its accuracy gate where base did not.
///
///   handoff ab perf.yaml --model enc --base main.onnx --head pr.onnx
///   handoff ab perf.yaml --model enc --base-ort old/libonnxruntime.so --head-ort new/libonnxruntime.so
#[derive(clap::Args)]
pub struct AbCmd {
    /// Suite file (YAML) that lists the model.
    pub suite: PathBuf,
    /// The model's id in the suite.
    #[arg(long)]
    pub model: String,
    /// The base ONNX file (e.g. the model on the main branch).
    #[arg(long, requires = "head")]
    pub base: Option<PathBuf>,
    /// The head ONNX file (e.g. the model in the pull request).
    #[arg(long, requires = "base")]
    pub head: Option<PathBuf>,
    /// The base ONNX Runtime library (libonnxruntime.so) for the model's
    /// `ort` cases (e.g. the release in production).
    #[arg(long, requires = "head_ort", required_unless_present = "base")]
    pub base_ort: Option<PathBuf>,
    /// The head ONNX Runtime library (e.g. the upgrade under review).
    #[arg(long, requires = "base_ort")]
    pub head_ort: Option<PathBuf>,
    /// Smallest change that counts, as a fraction.
    #[arg(long, default_value_t = 0.02)]
    pub threshold: f64,
    /// p50: paired ratio of the rounds' medians (drift cancels); p90, p95,
    /// p99 or mean: paired bootstrap over rounds (each draw pools the same
    /// rounds' samples on both sides).
    #[arg(long, value_enum, default_value_t = MetricArg::P50)]
    pub metric: MetricArg,
    /// Only cases whose id contains this text (repeatable).
    #[arg(long, short)]
    pub filter: Vec<String>,
    /// Results directory (default: reports/ab-<model>-<UTC timestamp>).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Write the Markdown summary here too (e.g. $GITHUB_STEP_SUMMARY).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write the comparison as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar and no table.
    #[arg(long, short)]
    pub quiet: bool,
    /// Measure nothing: gate the run already in --out again (e.g. with
    /// another --metric or --threshold); its ab.md is left as it was.
    #[arg(long, requires = "out")]
    pub gate_only: bool,
    /// With a tail metric (p90, p95, p99, mean): keep the rounds in which
    /// either side met a host stall (3+ consecutive runs of a block over
    /// 1.3x the median), which are otherwise left out on both sides.
    #[arg(long)]
    pub keep_stalls: bool,
    /// Stalled rounds are left out by default; accepted so that existing
    /// scripts keep working.
    #[arg(long, hide = true, conflicts_with = "keep_stalls")]
    pub set_stalls_aside: bool,
}

impl AbCmd {
    pub fn run(self, registry: &Arc<Registry>) -> Result<ExitCode> {
        let Self {
            suite,
            model,
            base,
            head,
            base_ort,
            head_ort,
            threshold,
            metric,
            filter,
            out,
            markdown,
            json,
            quiet,
            gate_only,
            keep_stalls,
            set_stalls_aside,
        } = self;
        if (keep_stalls || set_stalls_aside) && matches!(metric, MetricArg::P50) {
            // p50 comes from per-round medians, which a stall of a few runs
            // barely moves: the flag would do nothing, so say so.
            let flag = if keep_stalls {
                "--keep-stalls"
            } else {
                "--set-stalls-aside"
            };
            anyhow::bail!(
                "{flag} applies to a tail metric (--metric p90, p95, p99 or mean); p50 is read from the rounds' medians, with every round"
            );
        }
        let opts = handoff_compare::Options {
            threshold,
            metric: metric.into(),
            keep_stalls,
            ..Default::default()
        };
        if gate_only {
            let out = out.expect("clap requires --out with --gate-only");
            return gate(&out, &model, &opts, markdown, json, false);
        }
        let text = std::fs::read_to_string(&suite)
            .with_context(|| format!("cannot read {}", suite.display()))?;
        // Paths on the command line are the user's, relative to here; the
        // suite resolves its own from its directory.
        let here = |p: Option<PathBuf>| p.map(std::path::absolute).transpose();
        let (base, head, base_ort, head_ort) =
            (here(base)?, here(head)?, here(base_ort)?, here(head_ort)?);
        let sides = (
            handoff_suite::ab::Side {
                file: base.as_deref(),
                ort_library: base_ort.as_deref(),
            },
            handoff_suite::ab::Side {
                file: head.as_deref(),
                ort_library: head_ort.as_deref(),
            },
        );
        let ab = handoff_suite::ab::ab_suite(&text, &model, sides.0, sides.1)
            .with_context(|| format!("{}", suite.display()))?;
        // Relative paths in the suite still resolve from its directory.
        let plan = Plan::from_str(
            &suite,
            &ab,
            &plan_options(registry, handoff_suite::Preparation::Build),
        )
        .map_err(|e| match e {
            SuiteError::Invalid(problems) => SuiteError::Invalid(handoff_suite::ab::relocate(
                &text, &model, problems, sides.0, sides.1,
            )),
            other => other,
        })?;
        if let Some(why) = handoff_suite::ab::unpaired(&plan, &model) {
            anyhow::bail!("{}: {why}", suite.display());
        }
        let out = out.unwrap_or_else(|| {
            PathBuf::from("reports").join(format!("ab-{model}-{}", timestamp()))
        });
        let (code, out) = run_plan(
            &plan,
            registry,
            &suite,
            RunArgs {
                filter,
                out: Some(out),
                quiet,
                repeat: 1,
                shard: None,
                resume: None,
                sequential: false,
            },
        )?;
        if code != ExitCode::SUCCESS {
            return Ok(code);
        }
        gate(&out, &model, &opts, markdown, json, true)
    }
}

/// Gates model `model`'s `.base` against `.head` cases of the `handoff ab`
/// run in `out`: Markdown to stdout, `markdown` and (`save`) `out/ab.md`;
/// exit 1 on a regression.
fn gate(
    out: &Path,
    model: &str,
    opts: &handoff_compare::Options,
    markdown: Option<PathBuf>,
    json: Option<PathBuf>,
    save: bool,
) -> Result<ExitCode> {
    let run = handoff_compare::Run::load(out)?;
    let c = handoff_compare::compare_ab(&run, model, opts);
    // compare_ab's own matching decides which cases belong to the model.
    if c.rows.is_empty() {
        anyhow::bail!(
            "{} holds no `handoff ab` cases of model {model} (none named {model}.base or {model}.head)",
            out.display()
        );
    }
    let md = handoff_compare::markdown(&c);
    out!("{md}")?;
    if save {
        std::fs::write(out.join("ab.md"), &md)?;
    }
    if let Some(p) = markdown {
        std::fs::write(p, &md)?;
    }
    if let Some(p) = json {
        std::fs::write(p, serde_json::to_vec_pretty(&c)?)?;
    }
    Ok(ExitCode::from(u8::from(c.regressions() > 0)))
}

/// Save a run as a named baseline (in .handoff/baselines/, or
/// $HANDOFF_BASELINES) for `handoff compare @NAME HEAD`.
#[derive(clap::Args)]
pub struct BaselineCmd {
    #[command(subcommand)]
    pub action: BaselineAction,
}

impl BaselineCmd {
    pub fn run(self) -> Result<ExitCode> {
        let Self { action } = self;
        match action {
            BaselineAction::Save { name, run } => {
                let dir = baselines_dir().join(&name);
                copy_run(&run, &dir)?;
                outln!("saved baseline {name} in {}", dir.display())?;
            }
            BaselineAction::List => {
                if let Ok(entries) = std::fs::read_dir(baselines_dir()) {
                    for e in entries.flatten() {
                        outln!("{}", e.file_name().to_string_lossy())?;
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Subcommand)]
pub enum BaselineAction {
    /// Copy RUN (a run directory or results.jsonl) to baseline NAME.
    Save { name: String, run: PathBuf },
    /// List saved baselines.
    List,
}

fn parse_case_threshold(s: &str) -> Result<(String, f64), String> {
    let (pat, t) = s.rsplit_once('=').ok_or("expected TEXT=FRACTION")?;
    Ok((
        pat.to_owned(),
        t.parse().map_err(|_| format!("`{t}` is not a number"))?,
    ))
}

fn baselines_dir() -> PathBuf {
    std::env::var_os("HANDOFF_BASELINES")
        .map_or_else(|| PathBuf::from(".handoff/baselines"), PathBuf::from)
}

/// Copies results.jsonl (+ env.json) of a run into `dir`.
fn copy_run(run: &Path, dir: &Path) -> Result<()> {
    let results = if run.is_dir() {
        run.join("results.jsonl")
    } else {
        run.to_owned()
    };
    handoff_runner::read_results(&results)?;
    std::fs::create_dir_all(dir)?;
    std::fs::copy(&results, dir.join("results.jsonl"))
        .with_context(|| format!("copying {}", results.display()))?;
    if let Some(env) = results
        .parent()
        .map(|p| p.join("env.json"))
        .filter(|p| p.is_file())
    {
        std::fs::copy(env, dir.join("env.json"))?;
    }
    Ok(())
}
