//! `handoff`: where should we hand off from Python, and to what?
//!
//! The binary parses arguments and calls the libraries: one module per
//! subcommand under `cmd/`, the compiled-in backends in `backends`.
//!
//! Exit codes: 0 success, 1 regression found (compare), 2 bad input or
//! internal error.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use handoff_suite::SuiteError;
use out::errln;

mod backends;
mod cmd;
mod out;
mod roofline;

#[derive(Parser)]
#[command(
    name = "handoff",
    version,
    about = "Benchmark ONNX Runtime, tract and candle on the same models, with sound statistics.",
    long_about = "handoff runs one YAML suite (models x backends x devices x threads x batch x dims) \
across ONNX Runtime, tract and candle, checks every backend's outputs against a reference, measures \
the cases a report compares in interleaved rounds (ratios with 95% CIs), and writes results.jsonl as \
it goes.\n\n\
Start with:\n  handoff setup                      # fetch libonnxruntime from PyPI into .cache/\n  \
handoff run suites/quickstart.yaml # measure, then print a table\n  \
handoff run suites/quickstart.yaml --dry-run   # show the expanded cases only\n  \
handoff schema > suite.schema.json # JSON Schema for editors",
    after_help = "Exit codes: 0 success, 1 regression found, 2 bad input or internal error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(cmd::run::RunCmd),
    Compare(cmd::compare::CompareCmd),
    Ab(cmd::compare::AbCmd),
    Baseline(cmd::compare::BaselineCmd),
    Merge(cmd::report::MergeCmd),
    Init(cmd::init::InitCmd),
    Validate(cmd::run::ValidateCmd),
    Prepare(cmd::run::PrepareCmd),
    /// Print the suite format's JSON Schema.
    Schema,
    /// Probe each compiled-in backend: version, or why it is unavailable.
    ListBackends,
    Setup(cmd::setup::SetupCmd),
    Gil(cmd::setup::GilCmd),
    Serve(cmd::serve::ServeCmd),
    Convert(cmd::convert::ConvertCmd),
    Quantize(cmd::quantize::QuantizeCmd),
    Report(cmd::report::ReportCmd),
    #[command(name = "__worker", hide = true)]
    Worker,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(SuiteError::Invalid(problems)) = e.downcast_ref::<SuiteError>() {
                for p in problems {
                    errln!("error: {p}");
                }
            } else {
                errln!("error: {}", message(&e));
            }
            ExitCode::from(2)
        }
    }
}

/// The error and its causes, each said once: the libraries' errors
/// already include their cause in their message ("cannot read suite
/// x.yaml: No such file or directory"), which `{:#}` would repeat.
fn message(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if text.is_empty() {
            text = cause;
        } else if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

fn run(cli: Cli) -> Result<ExitCode> {
    // A misspelt target would otherwise build for this machine unnoticed.
    if let Ok(v) = std::env::var(handoff_convert::isa::TARGET_CPU_VAR)
        && !v.is_empty()
    {
        v.parse::<handoff_convert::isa::TargetCpu>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", handoff_convert::isa::TARGET_CPU_VAR))?;
    }
    let registry = std::sync::Arc::new(backends::registry());
    match cli.command {
        Command::Worker => Ok(ExitCode::from(
            handoff_runner::isolate::worker_main(&registry) as u8,
        )),
        Command::Schema => cmd::setup::schema(),
        Command::ListBackends => cmd::setup::list_backends(&registry),
        Command::Run(c) => c.run(&registry),
        Command::Validate(c) => c.run(&registry),
        Command::Prepare(c) => c.run(&registry),
        Command::Compare(c) => c.run(),
        Command::Ab(c) => c.run(&registry),
        Command::Baseline(c) => c.run(),
        Command::Merge(c) => c.run(),
        Command::Report(c) => c.run(),
        Command::Init(c) => c.run(&registry),
        Command::Setup(c) => c.run(),
        Command::Gil(c) => c.run(),
        Command::Serve(c) => c.run(&registry),
        Command::Convert(c) => c.run(&registry),
        Command::Quantize(c) => c.run(&registry),
    }
}
