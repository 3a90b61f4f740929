//! `handoff report` and `handoff merge`: saved results rendered or joined.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::out::{errln, out, outln};
use anyhow::Result;

/// Print the table and Markdown summary of a results file.
/// Render summary.md, plots and report.html from saved results.
///
/// Several results files from different machines (different environment
/// fingerprints) become one report with a machine dimension: each model
/// is shown per machine (`minilm-l6 [AMD EPYC ...]`), never mixed.
///
/// Example: handoff report runs/cpu-box runs/gpu-box --out reports/both
#[derive(clap::Args)]
pub struct ReportCmd {
    /// results.jsonl files, or the run directories holding them.
    #[arg(required = true)]
    pub results: Vec<PathBuf>,
    /// Write the report here (default: next to the first results).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl ReportCmd {
    pub fn run(self) -> Result<ExitCode> {
        let Self { results, out } = self;
        let paths: Vec<PathBuf> = results
            .into_iter()
            .map(|p| {
                if p.is_dir() {
                    p.join("results.jsonl")
                } else {
                    p
                }
            })
            .collect();
        let first = paths[0].parent().unwrap_or(Path::new(".")).to_owned();
        let mut read = handoff_results::read_results(&paths[0])?;
        if paths.len() > 1 {
            read = handoff_results::merge_machines(&paths)?;
        }
        let mut suites: Vec<String> = Vec::new();
        for r in &read.records {
            if !suites.contains(&r.suite) {
                suites.push(r.suite.clone());
            }
        }
        let suite = if suites.is_empty() {
            "(empty)".to_owned()
        } else {
            suites.join(" + ")
        };
        out!("{}", handoff_report::terminal_table(&read.records))?;
        let out = out.unwrap_or_else(|| first.clone());
        write_report(&out, &first, &suite, &read)?;
        errln!(
            "wrote {} and {}",
            out.join("summary.md").display(),
            out.join("report.html").display()
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// Join the results of shards (each keeps its own environment).
#[derive(clap::Args)]
pub struct MergeCmd {
    /// Run directories or results.jsonl files.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output run directory.
    #[arg(long, short)]
    pub out: PathBuf,
}

impl MergeCmd {
    pub fn run(self) -> Result<ExitCode> {
        let Self { inputs, out } = self;
        std::fs::create_dir_all(out.join("envs"))?;
        let mut lines = String::new();
        for input in &inputs {
            let results = if input.is_dir() {
                input.join("results.jsonl")
            } else {
                input.clone()
            };
            let read = handoff_results::read_results(&results)?;
            for r in &read.records {
                lines.push_str(&serde_json::to_string(r)?);
                lines.push('\n');
            }
            // Each shard's fingerprint is kept under its hash.
            if let (Some(env), Some(first)) = (
                results
                    .parent()
                    .map(|p| p.join("env.json"))
                    .filter(|p| p.is_file()),
                read.records.first(),
            ) {
                std::fs::copy(env, out.join("envs").join(format!("{}.json", first.env)))?;
            }
        }
        std::fs::write(out.join("results.jsonl"), lines)?;
        outln!(
            "merged {} inputs into {}",
            inputs.len(),
            out.join("results.jsonl").display()
        )?;
        Ok(ExitCode::SUCCESS)
    }
}

/// summary.md, plots and report.html into `out`, with the environment of
/// the run in `run_dir`.
pub fn write_report(
    out: &Path,
    run_dir: &Path,
    suite: &str,
    read: &handoff_results::record::Results,
) -> Result<()> {
    let env: Option<serde_json::Value> = std::fs::read(run_dir.join("env.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let peak = handoff_report::roofline::MachinePeak::load(run_dir);
    let meta: Option<handoff_results::RunMeta> = std::fs::read(run_dir.join("run.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let ctx = handoff_report::RunContext {
        peak: peak.as_ref(),
        canary: meta.as_ref().map_or(&[], |m| &m.canary),
        measurement: meta.as_ref().map_or("", |m| &m.measurement),
        env: env.as_ref(),
        not_run: meta.as_ref().map_or(&[], |m| &m.not_run),
    };
    handoff_report::write_report(
        out,
        suite,
        &read.records,
        env.as_ref(),
        read.torn_last_line,
        &ctx,
    )?;
    Ok(())
}
