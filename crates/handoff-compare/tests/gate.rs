//! The gate on the changes users make: matched by logical identity, with
//! failures, missing cases and accuracy failures as regressions.

use handoff_compare::{Options, Run, StalledRounds, Verdict, compare};
use handoff_results::{ResultRecord, Status};

/// One `ok` ort case with 400 samples around `ms`.
fn case(ms: f64) -> ResultRecord {
    let line = include_str!("../../handoff-report/tests/fixtures/results.jsonl")
        .lines()
        .next()
        .unwrap();
    let mut r: ResultRecord = serde_json::from_str(line).unwrap();
    r.samples_ms = (0..400)
        .map(|i| ms * (1.0 + 0.01 * f64::from(i % 7) / 7.0))
        .collect();
    r.status = Status::Ok;
    r
}

fn run(records: Vec<ResultRecord>) -> Run {
    Run {
        path: "r.jsonl".into(),
        records,
        fingerprint: None,
    }
}

fn verdict(base: Vec<ResultRecord>, head: Vec<ResultRecord>, opts: &Options) -> (Verdict, String) {
    let c = compare(&run(base), &run(head), opts).unwrap();
    assert_eq!(c.rows.len(), 1, "{:?}", c.rows);
    (
        c.rows[0].verdict,
        c.rows[0].note.clone().unwrap_or_default(),
    )
}

#[test]
fn a_changed_model_file_is_compared_and_named() {
    let mut head = case(0.4);
    head.case.model_sha256 = "cd34".repeat(16);
    let (v, note) = verdict(vec![case(0.1)], vec![head], &Options::default());
    assert_eq!(v, Verdict::Regressed);
    assert!(
        note.contains("model file changed (sha b47297ab.. -> cd34cd34.."),
        "{note}"
    );
    // A faster model is an improvement.
    let (v, _) = verdict(vec![case(0.1)], vec![case(0.09)], &Options::default());
    assert_eq!(v, Verdict::Improved);
}

#[test]
fn a_runtime_upgrade_is_compared_and_named() {
    let mut head = case(0.1);
    head.case.backend_version = Some("1.32.0".into());
    let (v, note) = verdict(vec![case(0.1)], vec![head], &Options::default());
    assert_eq!(v, Verdict::Unchanged);
    assert!(note.contains("ort 1.31.1 -> 1.32.0"), "{note}");
}

#[test]
fn a_crash_a_hang_or_a_mismatch_in_head_is_a_regression() {
    for (status, reason) in [
        (Status::Failed, "worker crashed (SIGABRT (6))"),
        (Status::Timeout, "killed after 60s"),
        (Status::Mismatch, "outputs differ from ort"),
    ] {
        let mut head = case(0.1);
        head.status = status;
        head.reason = Some(reason.into());
        // Failed cells carry no runtime version.
        head.case.backend_version = None;
        head.samples_ms.clear();
        let (v, note) = verdict(vec![case(0.1)], vec![head.clone()], &Options::default());
        assert_eq!(v, Verdict::Regressed, "{status:?}");
        assert!(note.contains(reason), "{note}");
        // One bad repeat among good ones still fails the gate.
        let mut good = case(0.1);
        good.repeat = 1;
        let (v, _) = verdict(vec![case(0.1)], vec![good, head], &Options::default());
        assert_eq!(v, Verdict::Regressed, "{status:?} in one repeat");
    }
}

#[test]
fn newly_unavailable_is_a_regression_and_missing_needs_allow_missing() {
    let mut head = case(0.1);
    head.status = Status::Unavailable;
    head.samples_ms.clear();
    let (v, _) = verdict(vec![case(0.1)], vec![head], &Options::default());
    assert_eq!(v, Verdict::Regressed);
    // Head ran another model only.
    let mut other = case(0.1);
    other.case.model = "other".into();
    other.case.id = "other/ort/cpu/t1/b1".into();
    let missing = |opts: &Options| {
        let c = compare(&run(vec![case(0.1)]), &run(vec![other.clone()]), opts).unwrap();
        let row = c
            .rows
            .iter()
            .find(|r| r.id.starts_with("mlp/"))
            .unwrap()
            .clone();
        (row.verdict, row.note.unwrap_or_default())
    };
    let (v, note) = missing(&Options::default());
    assert_eq!(
        (v, note.contains("--allow-missing")),
        (Verdict::Regressed, true)
    );
    let allow = Options {
        allow_missing: true,
        ..Options::default()
    };
    assert_eq!(missing(&allow).0, Verdict::Missing);
}

#[test]
fn an_accuracy_gate_that_passed_in_base_and_fails_in_head_is_a_regression() {
    let accuracy = |passed: bool, cos: f64| handoff_results::Accuracy {
        variant: "int8-dynamic".into(),
        compared: "sentence embedding".into(),
        min_cosine: cos,
        max_abs: 0.1,
        threshold_min_cosine: 0.99,
        label_agreement: None,
        passed,
        size_bytes: 23_000_000,
        fp32_size_bytes: 90_000_000,
        cpu_class: None,
        built: None,
        kept_fp32: None,
    };
    let mut base = case(0.1);
    base.accuracy = Some(accuracy(true, 0.993));
    let mut head = case(0.1);
    head.accuracy = Some(accuracy(false, 0.9897));
    let (v, note) = verdict(vec![base], vec![head], &Options::default());
    assert_eq!(v, Verdict::Regressed);
    assert!(
        note.contains("accuracy gate failed in head: min cosine 0.9897"),
        "{note}"
    );
}

/// One side of an `ab` run: 20 rounds of 20 runs in one group, the
/// slowest 5% of runs at `tail` x the median `ms`.
fn ab_side(model: &str, ms: f64, tail: f64) -> ResultRecord {
    let mut r = case(ms);
    for (i, s) in r.samples_ms.iter_mut().enumerate() {
        if i % 20 == 0 {
            *s = ms * tail;
        }
    }
    r.case.id = r.case.id.replacen(&r.case.model, model, 1);
    r.case.model = model.into();
    r.rounds = Some(handoff_results::RoundsInfo {
        group: "g".into(),
        block_runs: vec![20; 20],
        block_medians_ms: vec![Some(ms); 20],
        ..Default::default()
    });
    r
}

/// `handoff ab --metric p99`: both files from one run's rounds, the tail
/// gated by a paired bootstrap over those rounds, and the Markdown says how
/// it was measured (one run, interleaved), not that the runs were made
/// apart.
#[test]
fn an_ab_run_gated_on_p99_says_it_was_interleaved() {
    let both = run(vec![
        ab_side("m.base", 1.0, 3.0),
        ab_side("m.head", 1.0, 4.0),
    ]);
    let opts = Options {
        metric: handoff_compare::Metric::P99,
        threshold: 0.02,
        ..Options::default()
    };
    let c = handoff_compare::compare_ab(&both, "m", &opts);
    assert_eq!(c.rows.len(), 1, "{:?}", c.rows);
    assert_eq!(c.rows[0].verdict, Verdict::Regressed, "{:?}", c.rows[0]);
    let md = handoff_compare::markdown(&c);
    assert!(md.contains("## handoff ab"), "{md}");
    assert!(md.contains("paired bootstrap over rounds"), "{md}");
    assert!(!md.contains("separate runs"), "{md}");
}

/// A worker process keeps a speed of its own for its life, which shifts
/// its side's whole distribution, tail included: a tail gate's interval
/// carries the between-process variance as p50's does, so a 3% change
/// that processes 2% apart in speed could make is not called a regression.
#[test]
fn a_tail_interval_carries_the_speed_spread_between_processes() {
    let gate = |process_var: Option<f64>| {
        let side = |model, ms| {
            let mut r = ab_side(model, ms, 1.0);
            let info = r.rounds.as_mut().unwrap();
            info.processes = 3;
            info.process_var = process_var;
            r
        };
        let opts = Options {
            metric: handoff_compare::Metric::P90,
            threshold: 0.02,
            ..Options::default()
        };
        let c = handoff_compare::compare_ab(
            &run(vec![side("m.base", 1.0), side("m.head", 1.03)]),
            "m",
            &opts,
        );
        c.rows[0].clone()
    };
    let alone = gate(None);
    assert_eq!(alone.verdict, Verdict::Regressed, "{alone:?}");
    // 2% between processes, averaged over three per side: about +-3.2%.
    let spread = gate(Some(0.02f64.powi(2)));
    assert_eq!(spread.verdict, Verdict::Inconclusive, "{spread:?}");
    let [lo, hi] = spread.ratio_ci95.unwrap();
    assert!(lo < 1.0 && hi > 1.06, "{spread:?}");
    assert!((spread.ratio.unwrap() - 1.03).abs() < 1e-9, "{spread:?}");
}

/// A stretch of consecutive slow runs (the host stalling the VM) sets the
/// p99 of whichever side met it; a tail gate of an interleaved run leaves
/// that round out on both sides and says how many it left out, unless told
/// to keep them.
#[test]
fn a_tail_gate_leaves_rounds_with_host_stalls_out_and_counts_them() {
    let mut base = ab_side("m.base", 1.0, 1.0);
    for s in &mut base.samples_ms[45..51] {
        *s = 1.6;
    }
    let gate = |keep_stalls| {
        let opts = Options {
            metric: handoff_compare::Metric::P99,
            threshold: 0.02,
            keep_stalls,
            ..Options::default()
        };
        let c = handoff_compare::compare_ab(
            &run(vec![base.clone(), ab_side("m.head", 1.1, 1.0)]),
            "m",
            &opts,
        );
        assert_eq!(c.rows.len(), 1, "{:?}", c.rows);
        c
    };
    let c = gate(false);
    let row = &c.rows[0];
    assert_eq!(row.verdict, Verdict::Regressed, "{row:?}");
    assert!((row.ratio.unwrap() - 1.1).abs() < 0.01, "{row:?}");
    let note = row.note.clone().unwrap_or_default();
    assert!(
        note.contains("1 of 20 rounds left out on both sides for host stalls (3+ consecutive runs over 1.3x the median): base met 1 stall (6 runs), head none"),
        "{note}"
    );
    let [b, h] = row.stalls.unwrap();
    assert_eq!((b.rounds, h.rounds), (1, 0), "{row:?}");
    assert_eq!(
        row.stalled_rounds,
        Some(StalledRounds {
            stalled: 1,
            rounds: 20,
            left_out: true
        })
    );
    assert!(
        handoff_compare::markdown(&c)
            .contains("Rounds with a host stall are left out on both sides")
    );
    // Kept, the stall is base's p99 and hides the 10%.
    let c = gate(true);
    let row = &c.rows[0];
    assert_ne!(row.verdict, Verdict::Regressed, "{row:?}");
    assert_eq!(row.stalls, None);
    assert!(!handoff_compare::markdown(&c).contains("host stall"));
    // Many more stretches on head's side may be the model's own: said.
    let mut head = ab_side("m.head", 1.0, 1.0);
    for at in [25, 105, 205] {
        for s in &mut head.samples_ms[at..at + 4] {
            *s = 1.6;
        }
    }
    let opts = Options {
        metric: handoff_compare::Metric::P99,
        threshold: 0.02,
        ..Options::default()
    };
    let c = handoff_compare::compare_ab(
        &run(vec![ab_side("m.base", 1.0, 1.0), head.clone()]),
        "m",
        &opts,
    );
    let note = c.rows[0].note.clone().unwrap_or_default();
    assert!(
        note.contains("3 of 20 rounds left out on both sides for host stalls (3+ consecutive runs over 1.3x the median): base met none, head 3 stalls (12 runs); head met 3 stalls against base's 0: if the model causes them, gate with `--keep-stalls`"),
        "{note}"
    );
    assert_eq!(c.rows[0].verdict, Verdict::Unchanged, "{:?}", c.rows[0]);
    // Stalls in more than a fifth of the rounds are no longer rare events
    // to leave out: every round is kept, and head's stalls set its p99.
    for at in [65, 145, 185] {
        for s in &mut head.samples_ms[at..at + 4] {
            *s = 1.6;
        }
    }
    let c = handoff_compare::compare_ab(&run(vec![ab_side("m.base", 1.0, 1.0), head]), "m", &opts);
    let row = &c.rows[0];
    let note = row.note.clone().unwrap_or_default();
    assert!(
        note.contains("every round kept: 6 of 20 held host stalls (3+ consecutive runs over 1.3x the median): base met none, head 6 stalls (24 runs); beyond 20% of the rounds, the calm rest would be a selection too narrow to judge from"),
        "{note}"
    );
    assert!(!note.contains("--keep-stalls"), "{note}");
    assert_eq!(row.verdict, Verdict::Regressed, "{row:?}");
    assert_eq!(
        row.stalled_rounds,
        Some(StalledRounds {
            stalled: 6,
            rounds: 20,
            left_out: false
        })
    );
}

/// p90 is read from the body of the distribution: a change in the slowest
/// 5% of runs alone leaves it unchanged (and regresses p99), a 10% slower
/// body regresses it.
#[test]
fn p90_gates_the_body_and_not_the_slowest_runs() {
    let gate = |head: ResultRecord, metric| {
        let opts = Options {
            metric,
            threshold: 0.02,
            ..Options::default()
        };
        let c =
            handoff_compare::compare_ab(&run(vec![ab_side("m.base", 1.0, 3.0), head]), "m", &opts);
        assert_eq!(c.rows.len(), 1, "{:?}", c.rows);
        c.rows[0].verdict
    };
    use handoff_compare::Metric::{P90, P95, P99};
    assert_eq!(gate(ab_side("m.head", 1.0, 4.0), P90), Verdict::Unchanged);
    assert_eq!(gate(ab_side("m.head", 1.0, 4.0), P99), Verdict::Regressed);
    assert_eq!(
        gate(ab_side("m.head", 1.1, 3.0 / 1.1), P90),
        Verdict::Regressed
    );
    assert_eq!(
        gate(ab_side("m.head", 1.1, 3.0 / 1.1), P95),
        Verdict::Regressed
    );
}

/// A tail quantile with more outliers above it than half its tail (runs
/// beyond 1.3x the median) is set by them, not by the model: the row says
/// so and carries each side's share; one in the body of the distribution
/// does not.
#[test]
fn a_tail_quantile_set_by_outliers_says_so() {
    let gate = |base: ResultRecord, head: ResultRecord, metric| {
        let opts = Options {
            metric,
            threshold: 0.02,
            ..Options::default()
        };
        let c = handoff_compare::compare_ab(&run(vec![base, head]), "m", &opts);
        assert_eq!(c.rows.len(), 1, "{:?}", c.rows);
        c.rows[0].clone()
    };
    use handoff_compare::Metric::{P50, P90, P99};
    // 5% of runs at 3x and 4x the median: p99 is among them.
    let row = gate(
        ab_side("m.base", 1.0, 3.0),
        ab_side("m.head", 1.0, 4.0),
        P99,
    );
    assert_eq!(row.outliers, Some([0.05, 0.05]));
    let note = row.note.unwrap_or_default();
    assert!(
        note.contains("p99 lies among outliers: 5.0% of base's and 5.0% of head's runs took over 1.3x their median"),
        "{note}"
    );
    // p90 has 10% of runs above it, half of them outliers at most: no note.
    let row = gate(
        ab_side("m.base", 1.0, 3.0),
        ab_side("m.head", 1.0, 4.0),
        P90,
    );
    assert_eq!(row.outliers, Some([0.05, 0.05]));
    assert!(!row.note.unwrap_or_default().contains("outliers"));
    // A slow 5% within 1.3x of the median is the body of the distribution.
    let row = gate(
        ab_side("m.base", 1.0, 1.2),
        ab_side("m.head", 1.0, 1.25),
        P99,
    );
    assert_eq!(row.outliers, Some([0.0, 0.0]));
    assert!(!row.note.unwrap_or_default().contains("outliers"));
    // The median gate does not look at the tail.
    let row = gate(
        ab_side("m.base", 1.0, 3.0),
        ab_side("m.head", 1.0, 4.0),
        P50,
    );
    assert_eq!(row.outliers, None);
}

/// A case timed while something else used the CPU (a parallel build) is
/// judged only beyond what that load can do to one side (2x), in a
/// comparison of two runs and in one `ab` run: the load does not hit both
/// sides alike, so a smaller "change" may be the load's.
#[test]
fn a_change_measured_on_a_busy_machine_is_judged_only_beyond_what_the_load_can_do() {
    let busy = |mut r: ResultRecord| {
        r.machine = Some(handoff_results::MachineLoad {
            loadavg_before: 2.3,
            loadavg_after: 2.3,
            other_cpu_cores: 0.93,
            busy: true,
        });
        r
    };
    let (v, note) = verdict(vec![case(1.0)], vec![busy(case(1.1))], &Options::default());
    assert_eq!(v, Verdict::Inconclusive);
    assert!(
        note.contains("busy: measured while other processes used up to 0.93 cores"),
        "{note}"
    );
    // Quiet, the same numbers are a regression; busy, a 3x change still is.
    let (v, _) = verdict(vec![case(1.0)], vec![case(1.1)], &Options::default());
    assert_eq!(v, Verdict::Regressed);
    let (v, _) = verdict(vec![case(1.0)], vec![busy(case(3.0))], &Options::default());
    assert_eq!(v, Verdict::Regressed);
    // A threshold above the change holds on a busy machine too.
    let tolerant = Options {
        threshold: 4.0,
        ..Options::default()
    };
    let (v, _) = verdict(vec![case(1.0)], vec![busy(case(3.0))], &tolerant);
    assert_eq!(v, Verdict::Unchanged);

    let side = |model: &str, ms: f64| {
        let mut r = case(ms);
        r.case.id = r.case.id.replacen(&r.case.model, model, 1);
        r.case.model = model.into();
        r.rounds = Some(handoff_results::RoundsInfo {
            group: "g".into(),
            block_runs: vec![20; 20],
            block_medians_ms: (0..20)
                .map(|i| Some(ms * (1.0 + 0.001 * f64::from(i % 3))))
                .collect(),
            ..Default::default()
        });
        r
    };
    let both = run(vec![side("m.base", 1.0), busy(side("m.head", 1.1))]);
    let c = handoff_compare::compare_ab(&both, "m", &Options::default());
    assert_eq!(c.rows[0].verdict, Verdict::Inconclusive, "{:?}", c.rows[0]);
    assert_eq!(c.regressions(), 0);
    assert!(c.rows[0].note.as_deref().unwrap_or("").starts_with("busy:"));
}

#[test]
fn runs_on_different_int8_cpu_classes_are_refused() {
    let fingerprint = |class: &str| {
        serde_json::from_value::<handoff_results::Fingerprint>(serde_json::json!({
            "cpu_model": "Intel Xeon", "logical_cores": 2, "cpu_flags": ["avx2", "avx512_vnni"],
            "cpu_class": class, "os": "Debian", "kernel": "6.1", "handoff_version": "0.1.0",
            "rustc": "1.95", "build_profile": "release", "git_commit": null,
            "backends": {}, "env_vars": {}}))
        .unwrap()
    };
    let with = |class: &str| Run {
        fingerprint: Some(fingerprint(class)),
        ..run(vec![case(0.1)])
    };
    // The same CPU under a cpuid mask runs other int8 kernels.
    let err = compare(
        &with("x86-avx512-vnni"),
        &with("x86-avx2"),
        &Options::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("int8 CPU class: base x86-avx512-vnni, head x86-avx2"),
        "{err}"
    );
    // A run recorded before the class was kept has none: not a difference.
    assert!(compare(&with(""), &with("x86-avx2"), &Options::default()).is_ok());
}
