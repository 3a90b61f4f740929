//! Paired comparisons within a group measured in rounds: every pair a
//! report puts side by side, as a ratio of medians with a 95% CI from the
//! per-round ratios (`comparisons.jsonl`, one line per pair).

use std::io::BufRead;
use std::path::Path;

use handoff_stats::rounds::{PairedRatio, Verdict, paired_ratio};
use serde::{Deserialize, Serialize};

use crate::record::{ResultRecord, Status};

/// How the ratio and its interval are computed, stated in every line.
pub const METHOD: &str = "Hodges-Lehmann with Wilcoxon signed-rank 95% CI on log ratios of per-round block medians, widened by the between-process variance";

/// What a pair compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairKind {
    /// A backend against the reference backend (the Python baseline against
    /// Rust ort, tract against ort), same model and threads.
    Backend,
    /// More threads against the fewest, same model and backend.
    Threads,
    /// Another model of the group against one it derives from or stands
    /// beside, same backend and threads: a precision variant or lowered
    /// copy against its own model (`m@int8-dynamic` against `m`); another
    /// entry (a second file or other settings with the same inputs)
    /// against the group's first, variant against the same variant.
    Model,
}

/// One line of `comparisons.jsonl`: `b / a` of a latency metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub group: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeat: u32,
    pub kind: PairKind,
    /// Case ids.
    pub a: String,
    pub b: String,
    /// `p50`, or `p50-inner`: `b` timed by its own clock (the Python
    /// baseline inside Python, without the pipe to handoff).
    pub metric: String,
    pub ratio: f64,
    pub ci95: [f64; 2],
    pub rounds: usize,
    pub verdict: Verdict,
    pub method: String,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Comparison {
    fn new(
        kind: PairKind,
        a: &ResultRecord,
        b: &ResultRecord,
        metric: &str,
        r: PairedRatio,
    ) -> Self {
        Self {
            group: a.rounds.as_ref().map_or(String::new(), |i| i.group.clone()),
            repeat: a.repeat,
            kind,
            a: a.case.id.clone(),
            b: b.case.id.clone(),
            metric: metric.to_owned(),
            ratio: r.ratio,
            ci95: r.ci95,
            rounds: r.rounds,
            verdict: r.verdict,
            method: METHOD.to_owned(),
        }
    }

    /// `+-x%` half-width of the interval relative to the ratio.
    pub fn half_width(&self) -> f64 {
        (self.ci95[1] - self.ci95[0]) / 2.0 / self.ratio
    }
}

/// A case's per-round block medians (`inner`: by the backend's own clock),
/// `NaN` for rounds it did not run; `None` without rounds.
pub fn medians(r: &ResultRecord, inner: bool) -> Option<Vec<f64>> {
    let info = r.rounds.as_ref()?;
    let v = if inner {
        &info.inner_block_medians_ms
    } else {
        &info.block_medians_ms
    };
    if v.is_empty() {
        return None;
    }
    Some(v.iter().map(|m| m.unwrap_or(f64::NAN)).collect())
}

/// A case's samples split into its rounds' blocks (empty for rounds it did
/// not run); `None` without rounds or when the counts do not add up.
pub fn round_samples(r: &ResultRecord) -> Option<Vec<&[f64]>> {
    let info = r.rounds.as_ref()?;
    if info.block_runs.iter().sum::<usize>() != r.samples_ms.len() {
        return None;
    }
    let mut at = 0;
    Some(
        info.block_runs
            .iter()
            .map(|&n| {
                let block = &r.samples_ms[at..at + n];
                at += n;
                block
            })
            .collect(),
    )
}

/// `b / a` from the rounds both ran (`inner`: `b` by its own clock), its
/// interval widened by both sides' between-process variance.
pub fn ratio_of(a: &ResultRecord, b: &ResultRecord, inner: bool) -> Option<PairedRatio> {
    let r = paired_ratio(&medians(a, false)?, &medians(b, inner)?)?;
    Some(r.widened(a.process_term().plus(b.process_term())))
}

fn pair(kind: PairKind, a: &ResultRecord, b: &ResultRecord, inner: bool) -> Option<Comparison> {
    let r = ratio_of(a, b, inner)?;
    Some(Comparison::new(
        kind,
        a,
        b,
        if inner { "p50-inner" } else { "p50" },
        r,
    ))
}

/// [`handoff_backend::ids::split`], where a suffix counts only if its entry
/// is among `models`: results written before ids were checked may hold an id
/// that merely contains `@`, and it stays whole.
fn entry_and_form<'a>(model: &'a str, models: &[&str]) -> (&'a str, &'a str) {
    match handoff_backend::ids::split(model) {
        (entry, form) if !form.is_empty() && models.contains(&entry) => (entry, form),
        _ => (model, ""),
    }
}

/// The pairs of one group's records (all from one repeat): each backend
/// against `reference`, more threads against the fewest, each variant
/// against its own model, and each other entry against the group's first,
/// form for form.
pub fn group_comparisons(records: &[ResultRecord], reference: &str) -> Vec<Comparison> {
    let ok: Vec<&ResultRecord> = records
        .iter()
        .filter(|r| r.status == Status::Ok && r.rounds.is_some())
        .collect();
    let models: Vec<&str> = records.iter().map(|r| r.case.model.as_str()).collect();
    let first_entry = records
        .iter()
        .min_by_key(|r| r.index)
        .map(|r| entry_and_form(&r.case.model, &models).0);
    let mut out = Vec::new();
    for b in &ok {
        let c = &b.case;
        let reference_on = |model: &str| {
            ok.iter().find(move |a| {
                a.case.backend == reference && a.case.model == model && a.case.threads == c.threads
            })
        };
        // A lowered copy is the backend's form of the model it was lowered
        // from: where the reference did not run the copy, it is compared
        // with the reference on that model (same inputs, same rounds).
        let lowered_from =
            handoff_backend::ids::lowered_from(&c.model).filter(|m| models.contains(m));
        if c.backend != reference
            && let Some(a) = reference_on(&c.model).or_else(|| lowered_from.and_then(reference_on))
        {
            out.extend(pair(PairKind::Backend, a, b, false));
            if b.rounds
                .as_ref()
                .is_some_and(|i| !i.inner_block_medians_ms.is_empty())
            {
                out.extend(pair(PairKind::Backend, a, b, true));
            }
        }
        let fewest = ok
            .iter()
            .filter(|a| a.case.backend == c.backend && a.case.model == c.model)
            .min_by_key(|a| a.case.threads);
        if let Some(a) = fewest
            && a.case.threads < c.threads
        {
            out.extend(pair(PairKind::Threads, a, b, false));
        }
        let (entry, form) = entry_and_form(&c.model, &models);
        let against = |model: &str| {
            ok.iter().find(move |a| {
                a.case.model == model && a.case.backend == c.backend && a.case.threads == c.threads
            })
        };
        if !form.is_empty()
            && let Some(a) = against(entry)
        {
            out.extend(pair(PairKind::Model, a, b, false));
        }
        if let Some(first) = first_entry
            && first != entry
            && let Some(a) = against(&format!("{first}{form}"))
        {
            out.extend(pair(PairKind::Model, a, b, false));
        }
    }
    out
}

/// Reads `comparisons.jsonl` (missing file: none; a torn last line of an
/// interrupted run is skipped).
pub fn read_comparisons(path: &Path) -> Vec<Comparison> {
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

/// The comparison of `b` against `a` on `metric`, if one was measured.
pub fn find<'c>(all: &'c [Comparison], a: &str, b: &str, metric: &str) -> Option<&'c Comparison> {
    all.iter()
        .find(|c| c.a == a && c.b == b && c.metric == metric)
}

/// "1.23x [1.20, 1.26]" style text, or "no measurable difference (+-2.1%)".
pub fn describe(c: &Comparison) -> String {
    match c.verdict {
        Verdict::NoMeasurableDifference => {
            format!("no measurable difference (±{:.1}%)", 100.0 * c.half_width())
        }
        v => format!(
            "{:.3}x [{:.3}, {:.3}] {}",
            c.ratio,
            c.ci95[0],
            c.ci95[1],
            v.as_str()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_is_split_from_its_entry_only_where_the_entry_is_there() {
        let models = ["m", "m@int8-dynamic", "m+lowered", "n@home"];
        assert_eq!(
            entry_and_form("m@int8-dynamic", &models),
            ("m", "@int8-dynamic")
        );
        assert_eq!(entry_and_form("m+lowered", &models), ("m", "+lowered"));
        assert_eq!(entry_and_form("m", &models), ("m", ""));
        assert_eq!(entry_and_form("n@home", &models), ("n@home", ""));
    }

    fn record(index: usize, model: &str, scale: f64) -> ResultRecord {
        record_on(index, model, "ort", scale)
    }

    fn record_on(index: usize, model: &str, backend: &str, scale: f64) -> ResultRecord {
        let medians: Vec<f64> = (0..8).map(|i| scale * (10.0 + f64::from(i % 3))).collect();
        serde_json::from_value(serde_json::json!({
            "schema": 1, "suite": "s", "index": index, "status": "ok", "env": "e",
            "case": {"id": format!("{model}/{backend}/cpu/t1/b8"), "model": model,
                "model_sha256": "", "model_source": "", "backend": backend,
                "backend_version": null, "execution": null, "device": "cpu",
                "threads": 1, "batch": 8, "dims": {}, "scenario": "single-stream"},
            "samples_ms": medians,
            "rounds": {"group": "g", "order_seed": 1, "block_runs": vec![1; 8],
                "block_medians_ms": medians},
        }))
        .unwrap()
    }

    /// Two entries of one model (ORT settings, say), each with an int8
    /// variant: each variant against its own fp32, and the second entry
    /// against the first form for form; not int8 of one against fp32 of
    /// the other.
    #[test]
    fn variants_pair_with_their_own_model_and_entries_form_for_form() {
        let records = [
            record(0, "keep", 1.0),
            record(1, "keep@int8", 0.5),
            record(2, "flush", 0.8),
            record(3, "flush@int8", 0.3),
        ];
        let pairs: Vec<(String, String)> = group_comparisons(&records, "ort")
            .into_iter()
            .filter(|c| c.kind == PairKind::Model)
            .map(|c| {
                (
                    c.a.split('/').next().unwrap().to_owned(),
                    c.b.split('/').next().unwrap().to_owned(),
                )
            })
            .collect();
        let want = [
            ("keep", "keep@int8"),
            ("keep", "flush"),
            ("flush", "flush@int8"),
            ("keep@int8", "flush@int8"),
        ];
        assert_eq!(
            pairs,
            want.map(|(a, b)| (a.to_owned(), b.to_owned())).to_vec()
        );
    }

    /// A backend that runs only the lowered copy (it lacks an op of the
    /// original) is compared with the reference on the original; a
    /// backend that runs the original is compared on it, as before.
    #[test]
    fn a_lowered_copy_is_its_backends_form_of_the_model() {
        let mut unsupported = record_on(1, "m", "candle-onnx", 1.0);
        unsupported.status = Status::Unsupported;
        let records = [
            record(0, "m", 1.0),
            unsupported,
            record_on(2, "m+lowered", "candle-onnx", 2.0),
            record_on(3, "m", "tract", 1.5),
        ];
        let pairs: Vec<(String, String)> = group_comparisons(&records, "ort")
            .into_iter()
            .filter(|c| c.kind == PairKind::Backend)
            .map(|c| (c.a, c.b))
            .collect();
        assert_eq!(
            pairs,
            [
                ("m/ort/cpu/t1/b8", "m+lowered/candle-onnx/cpu/t1/b8"),
                ("m/ort/cpu/t1/b8", "m/tract/cpu/t1/b8"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .to_vec()
        );
    }
}
