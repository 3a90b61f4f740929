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
    /// Its lowered copy (`id+lowered`), when one ran: the model as the
    /// backends that lack one of its ops run it, so its rows belong here.
    pub lowered: Option<&'a str>,
    /// Its one-query-at-a-time cases, in result order; the lowered copy's
    /// after the model's own.
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
/// A lowered copy of a model in the run gets no section of its own.
pub fn model_summaries(records: &[ResultRecord]) -> Vec<ModelSummary<'_>> {
    let ids = crate::models(records);
    ids.iter()
        .filter(|id| lowered_from(id, &ids).is_none())
        .map(|&m| {
            let lowered = ids
                .iter()
                .copied()
                .find(|l| lowered_from(l, &ids) == Some(m));
            model_summary(m, lowered, records)
        })
        .collect()
}

/// The model `id` is the lowered copy of, where that model is in `ids`.
fn lowered_from<'a>(id: &'a str, ids: &[&str]) -> Option<&'a str> {
    handoff_backend::ids::lowered_from(id).filter(|m| ids.contains(m))
}

/// A row's backend as its model's section names it: the lowered copy's
/// rows say so.
pub fn row_label(r: &ResultRecord, section: &str) -> String {
    let label = crate::backend_label(r);
    if r.case.model == section {
        label
    } else if let Some(inner) = label.strip_suffix(')') {
        format!("{inner}, lowered copy)")
    } else {
        format!("{label} (lowered copy)")
    }
}

fn model_summary<'a>(
    id: &'a str,
    lowered: Option<&'a str>,
    records: &'a [ResultRecord],
) -> ModelSummary<'a> {
    let rows: Vec<&ResultRecord> = records
        .iter()
        .filter(|r| r.case.model == id)
        .chain(
            records
                .iter()
                .filter(|r| Some(r.case.model.as_str()) == lowered),
        )
        .collect();
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
        lowered,
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

/// How many of a run's models one backend ran.
#[derive(Debug, PartialEq)]
pub struct Coverage<'a> {
    pub backend: &'a str,
    pub ran: usize,
    pub of: usize,
    /// The models it did not run, each with the reason of its first case
    /// (`unsupported: ...`, `failed: ...`).
    pub not: Vec<(String, String)>,
}

/// Per backend, how many of the run's models (precision variants and
/// lowered copies counted with the model they come from) have at least one
/// `ok` case on it; `None` for a run of one model. A backend that never
/// ran a model at all (unavailable) is listed too, with its reason.
pub fn coverage(records: &[ResultRecord]) -> Option<Vec<Coverage<'_>>> {
    fn base(r: &ResultRecord) -> &str {
        crate::paired::base_model(&r.case.model)
    }
    let mut models: Vec<&str> = Vec::new();
    let mut backends: Vec<&str> = Vec::new();
    for r in records {
        let m = base(r);
        if !models.contains(&m) {
            models.push(m);
        }
        if !backends.contains(&r.case.backend.as_str()) {
            backends.push(&r.case.backend);
        }
    }
    if models.len() < 2 {
        return None;
    }
    let out = backends
        .into_iter()
        .map(|backend| {
            let mut ran = 0;
            let mut not = Vec::new();
            for m in &models {
                let cases: Vec<&ResultRecord> = records
                    .iter()
                    .filter(|r| r.case.backend == backend && base(r) == *m)
                    .collect();
                if cases
                    .iter()
                    .any(|r| r.status == handoff_results::Status::Ok)
                {
                    ran += 1;
                } else if let Some(first) = cases.first() {
                    not.push((
                        (*m).to_owned(),
                        format!(
                            "{}: {}",
                            first.status.as_str(),
                            first.reason.as_deref().unwrap_or("no reason recorded")
                        ),
                    ));
                } else {
                    not.push(((*m).to_owned(), "not in the suite for this backend".into()));
                }
            }
            Coverage {
                backend,
                ran,
                of: models.len(),
                not,
            }
        })
        .collect();
    Some(out)
}

#[cfg(test)]
mod tests {
    use handoff_results::{ResultRecord, Status};

    fn case(model: &str, backend: &str, status: Status, reason: Option<&str>) -> ResultRecord {
        let line = include_str!("../tests/fixtures/results.jsonl")
            .lines()
            .next()
            .unwrap();
        let mut r: ResultRecord = serde_json::from_str(line).unwrap();
        r.case.model = model.into();
        r.case.backend = backend.into();
        r.status = status;
        r.reason = reason.map(Into::into);
        r
    }

    #[test]
    fn coverage_counts_a_model_where_any_of_its_cases_passed_and_names_why_not() {
        let records = vec![
            case("cnn", "ort", Status::Ok, None),
            case("cnn", "candle-onnx", Status::Failed, Some("Shape mismatch")),
            case("bert", "ort", Status::Ok, None),
            case(
                "bert",
                "candle-onnx",
                Status::Unsupported,
                Some("op LayerNormalization"),
            ),
            case("bert+lowered", "candle-onnx", Status::Ok, None),
            case(
                "bert@int8-dynamic",
                "ort",
                Status::Mismatch,
                Some("max_abs 0.3"),
            ),
            case("rnn", "ort", Status::Mismatch, Some("max_abs 2")),
        ];
        let cov = super::coverage(&records).unwrap();
        assert_eq!(cov.len(), 2);
        assert_eq!((cov[0].backend, cov[0].ran, cov[0].of), ("ort", 2, 3));
        assert_eq!(
            cov[0].not,
            vec![("rnn".into(), "mismatch: max_abs 2".into())]
        );
        assert_eq!((cov[1].backend, cov[1].ran), ("candle-onnx", 1));
        assert_eq!(
            cov[1].not,
            vec![
                ("cnn".into(), "failed: Shape mismatch".into()),
                ("rnn".into(), "not in the suite for this backend".into()),
            ]
        );
        assert_eq!(super::coverage(&records[..2]), None, "one model: no line");
    }
}
