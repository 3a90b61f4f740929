//! What a report concludes, computed once from the result lines: per model,
//! the recommendation (lowest p99 at batch 1, highest throughput), the
//! runner-up and the Python baseline beside it with their paired ratios,
//! and what was left out of it. The terminal table, summary.md and
//! report.html only render this.

use handoff_results::ResultRecord;
use handoff_stats::rounds::PairedRatio;

use crate::paired;

/// One model's section of a report.
#[derive(Debug)]
pub struct ModelSummary<'a> {
    pub id: &'a str,
    /// Its one-query-at-a-time cases, in result order.
    pub rows: Vec<&'a ResultRecord>,
    /// The source of a seeded random-weights stand-in: every view of its
    /// numbers says so.
    pub random_source: Option<&'a str>,
    /// Passing batch-1 cases the recommendation does not rest on (measured
    /// while the CPU was busy, or without an output check).
    pub passed_over: usize,
    /// The recommendable batch-1 case with the lowest p99.
    pub lowest_p99: Option<Pick<'a>>,
    /// The recommendable case with the highest items/s.
    pub highest_throughput: Option<Pick<'a>>,
}

/// A recommended case and what it was measured against in the same rounds.
#[derive(Debug)]
pub struct Pick<'a> {
    pub case: &'a ResultRecord,
    /// The best other backend's recommendable batch-1 case (lowest p99),
    /// with its p50 over this one's; only for the latency pick, and only
    /// when the two were measured together.
    pub runner_up: Option<(&'a ResultRecord, PairedRatio)>,
    /// The Python onnxruntime baseline at the same threads, batch and dims,
    /// with its p50 over this one's when measured together.
    pub python: Option<(&'a ResultRecord, Option<PairedRatio>)>,
}

/// p99 in ms; a case without latency sorts last.
pub fn p99(r: &ResultRecord) -> f64 {
    r.latency_ms.as_ref().map_or(f64::INFINITY, |l| l.p99)
}

/// The summaries of every model in `records` (one-query-at-a-time rows
/// only; see [`crate::split_scenarios`]), in order of first appearance.
pub fn model_summaries(records: &[ResultRecord]) -> Vec<ModelSummary<'_>> {
    crate::models(records)
        .into_iter()
        .map(|m| model_summary(m, records))
        .collect()
}

fn model_summary<'a>(id: &'a str, records: &'a [ResultRecord]) -> ModelSummary<'a> {
    let rows: Vec<&ResultRecord> = records.iter().filter(|r| r.case.model == id).collect();
    let random_source = rows
        .iter()
        .find(|r| r.case.random_weights())
        .map(|r| r.case.model_source.as_str());
    let passed_over = rows
        .iter()
        .filter(|r| r.passes() && r.case.batch == 1 && !r.recommendable())
        .count();
    let batch1 = || {
        rows.iter()
            .copied()
            .filter(|r| r.recommendable() && r.case.batch == 1)
    };
    let python = |r: &ResultRecord| {
        if r.case.backend == "python-onnxruntime" {
            return None;
        }
        rows.iter()
            .copied()
            .find(|p| {
                p.case.backend == "python-onnxruntime"
                    && p.passes()
                    && (p.case.threads, p.case.batch, &p.case.dims)
                        == (r.case.threads, r.case.batch, &r.case.dims)
            })
            .map(|p| (p, paired::paired(r, p, false)))
    };
    let lowest_p99 = batch1()
        .min_by(|a, b| p99(a).total_cmp(&p99(b)))
        .map(|best| Pick {
            case: best,
            runner_up: batch1()
                .filter(|r| r.case.backend != best.case.backend)
                .filter_map(|r| paired::paired(best, r, false).map(|x| (r, x)))
                .min_by(|a, b| p99(a.0).total_cmp(&p99(b.0))),
            python: python(best),
        });
    let highest_throughput = rows
        .iter()
        .copied()
        .filter(|r| r.recommendable())
        .max_by(|a, b| {
            a.throughput_items_s
                .unwrap_or(0.0)
                .total_cmp(&b.throughput_items_s.unwrap_or(0.0))
        })
        .map(|best| Pick {
            case: best,
            runner_up: None,
            python: python(best),
        });
    ModelSummary {
        id,
        rows,
        random_source,
        passed_over,
        lowest_p99,
        highest_throughput,
    }
}

/// Latency in ms to about four significant digits: the one format every
/// view uses.
pub fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

/// Items or queries per second.
pub fn fmt_rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
