//! Snapshots of the terminal table and the Markdown summary from a fixed
//! set of results (no timing involved, so they are stable).

use handoff_results::ResultRecord;

fn fixture() -> Vec<ResultRecord> {
    include_str!("fixtures/results.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn terminal_table() {
    insta::assert_snapshot!(handoff_report::terminal_table(&fixture()));
}

#[test]
fn summary_markdown() {
    insta::assert_snapshot!(handoff_report::summary_markdown(
        "quick<script>",
        &fixture(),
        false,
        &handoff_report::RunContext::default()
    ));
}

#[test]
fn summary_of_an_interrupted_run() {
    let md = handoff_report::summary_markdown("q", &fixture()[..2], true, &Default::default());
    assert!(md.contains("cut off"));
    let empty = handoff_report::summary_markdown("q", &[], false, &Default::default());
    assert!(empty.contains("No results yet"));
}

#[test]
fn html_report_is_self_contained_and_escapes_user_strings() {
    let mut records = fixture();
    records[0].case.model = "<script>alert(1)</script>".into();
    let env = serde_json::json!({"cpu_model": "AMD <EPYC>", "logical_cores": 2});
    let html = handoff_report::html::report_html(
        "quick<script>",
        &records,
        Some(&env),
        false,
        &Default::default(),
        &Default::default(),
    );
    assert!(
        !html.contains("<script>alert"),
        "user strings must be escaped"
    );
    assert!(html.contains("&lt;script&gt;alert(1)&lt;"), "{html}");
    assert!(html.contains("AMD &lt;EPYC&gt;"));
    // No external resources: nothing is fetched when the file is opened.
    for needle in ["https://", "src=", "<link"] {
        assert!(!html.contains(needle), "{needle}");
    }
    // The only http:// URLs are SVG namespace names, which are not fetched.
    assert_eq!(
        html.matches("http://").count(),
        html.matches("http://www.w3.org/2000/svg").count(),
        "an http:// URL that is not the SVG namespace"
    );
    assert!(html.contains("Recommendation") && html.contains("<svg"));
    assert!(html.contains("unsupported") && html.contains("op LayerNormalization"));
    assert_eq!(
        html.matches("<script>").count(),
        1,
        "only handoff's own sorting script"
    );
}

#[test]
fn markdown_and_html_draw_the_same_conclusions_from_one_summary() {
    let mut records = fixture();
    let model = records[0].case.model.clone();
    for r in records.iter_mut().filter(|r| r.case.model == model) {
        r.case.model_source = format!("random:x ({})", handoff_backend::RANDOM_WEIGHTS_NOTE);
    }
    let summaries = handoff_report::model_summaries(&records);
    let first = &summaries[0];
    assert!(first.random_source.is_some());
    let md = handoff_report::summary_markdown("q", &records, false, &Default::default());
    let html = handoff_report::html::report_html(
        "q",
        &records,
        None,
        false,
        &Default::default(),
        &Default::default(),
    );
    // A random stand-in says so in both.
    assert!(md.contains("seeded random weights"), "{md}");
    assert!(html.contains("Seeded random weights"));
    // Both name the same lowest-p99 case, with the same figure.
    let best = first
        .lowest_p99
        .as_ref()
        .expect("a recommendable batch-1 case");
    let p99 = handoff_report::fmt_ms(handoff_report::p99(best.case));
    assert!(md.contains(&format!("p99 {p99} ms")), "{md}");
    assert!(html.contains(&format!("p99 {p99} ms at batch 1")), "{html}");
}

#[test]
fn plots_are_non_blank_pngs_of_the_promised_size() {
    let records = fixture();
    let dir = std::env::temp_dir().join(format!("handoff-plots-{}", std::process::id()));
    let rows: Vec<&handoff_results::ResultRecord> =
        records.iter().filter(|r| r.case.model == "mlp").collect();
    let files = handoff_report::plots::model_plots("mlp", &rows, &dir).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "mlp-latency.png",
            "mlp-throughput.png",
            "mlp-scaling.png",
            "mlp-frontier.png",
            "mlp-cold-start.png",
            "mlp-heatmap.png"
        ]
    );
    for f in &files {
        let img = image::open(f).unwrap().to_rgb8();
        assert_eq!(
            img.dimensions(),
            handoff_report::plots::SIZE,
            "{}",
            f.display()
        );
        // Non-blank: a real share of pixels is not the white background.
        let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(
            inked > 20_000,
            "{}: only {inked} non-white pixels",
            f.display()
        );
        let mean = img.pixels().map(|p| f64::from(p.0[0])).sum::<f64>()
            / f64::from(img.width() * img.height());
        let var = img
            .pixels()
            .map(|p| (f64::from(p.0[0]) - mean).powi(2))
            .sum::<f64>()
            / f64::from(img.width() * img.height());
        assert!(var > 100.0, "{}: pixel variance {var}", f.display());
    }
    let html = handoff_report::html::report_html(
        "q",
        &records,
        None,
        false,
        &[(
            "mlp".to_owned(),
            files.iter().map(|f| std::fs::read(f).unwrap()).collect(),
        )]
        .into(),
        &Default::default(),
    );
    assert_eq!(html.matches("src='data:image/png;base64,").count(), 6);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn base64_matches_the_standard_alphabet() {
    assert_eq!(handoff_report::html::base64(b"Man"), "TWFu");
    assert_eq!(handoff_report::html::base64(b"Ma"), "TWE=");
    assert_eq!(handoff_report::html::base64(b"M"), "TQ==");
}

/// Rust ort and the Python baseline measured in the same 12 rounds; the
/// Python side's per-round medians are `rust x factor x wobble`.
fn interleaved_pair(factor: f64, inner_factor: f64) -> Vec<ResultRecord> {
    let mut rust = fixture()
        .into_iter()
        .find(|r| r.case.backend == "ort" && r.status == handoff_results::Status::Ok)
        .unwrap();
    // A machine drifting by +-20% from round to round, common to both.
    let drift: Vec<f64> = (0..12)
        .map(|i| 1.0 + 0.2 * (f64::from(i) / 2.0).sin())
        .collect();
    // Each side's own noise, +-0.8%.
    let wobble = |i: usize, k: usize| 1.0 + 0.004 * ((i * k % 5) as f64 - 2.0);
    let rounds = |f: f64, k: usize| -> Vec<Option<f64>> {
        drift
            .iter()
            .enumerate()
            .map(|(i, d)| Some(10.0 * d * f * wobble(i, k)))
            .collect()
    };
    rust.rounds = Some(handoff_results::RoundsInfo {
        group: "g".into(),
        block_medians_ms: rounds(1.0, 7),
        ..Default::default()
    });
    rust.latency_ms.as_mut().unwrap().p50 = 10.0;
    let mut py = rust.clone();
    py.case.backend = "python-onnxruntime".into();
    py.case.id = py.case.id.replace("/ort/", "/python-onnxruntime/");
    py.inner_latency_ms = py.latency_ms.clone();
    py.inner_latency_ms.as_mut().unwrap().p50 = 10.0 * inner_factor;
    py.rounds = Some(handoff_results::RoundsInfo {
        group: "g".into(),
        block_medians_ms: rounds(factor, 3),
        inner_block_medians_ms: rounds(inner_factor, 3),
        ..Default::default()
    });
    vec![rust, py]
}

#[test]
fn hand_off_gain_prints_a_ratio_only_where_its_ci_excludes_one() {
    let same = handoff_report::paired::handoff_gain_table(&interleaved_pair(1.03, 1.0)).unwrap();
    let slower = handoff_report::paired::handoff_gain_table(&interleaved_pair(1.2, 1.1)).unwrap();
    let mut md = String::new();
    same.markdown(&mut md);
    slower.markdown(&mut md);
    insta::assert_snapshot!(md);
    assert!(same.rows[0][6].starts_with("no measurable difference"));
    assert_eq!(same.rows[0][7], "none measurable");
    assert!(
        slower.rows[0][6].starts_with("1.100x ["),
        "{:?}",
        slower.rows[0]
    );
    let comparisons =
        handoff_report::paired::comparisons_table(&interleaved_pair(1.2, 1.1)).unwrap();
    // Round trip and Python's own clock, both against Rust ort.
    assert_eq!(comparisons.rows.len(), 2, "{:?}", comparisons.rows);
    // Drift of +-20% cancels in the pairs: the intervals stay within 1%.
    let summary = handoff_report::summary_markdown(
        "q",
        &interleaved_pair(1.2, 1.1),
        false,
        &Default::default(),
    );
    assert!(
        summary.contains("Measured in interleaved rounds"),
        "{summary}"
    );
}

#[test]
fn the_variants_table_says_what_stays_fp32() {
    let base = fixture()[0].clone();
    let mut variant = base.clone();
    variant.case.model = "mlp@int8-dynamic".into();
    variant.case.id = "mlp@int8-dynamic/ort/cpu/t1/b1".into();
    variant.accuracy = Some(handoff_results::Accuracy {
        variant: "int8-dynamic".into(),
        compared: "output `y`: variant on ort vs fp32 on ort, 1 thread".into(),
        min_cosine: 0.9954,
        max_abs: 0.1,
        threshold_min_cosine: 0.995,
        label_agreement: None,
        passed: true,
        size_bytes: 24_700_000,
        fp32_size_bytes: 90_300_000,
        cpu_class: Some("x86-avx512-vnni".into()),
        built: None,
        kept_fp32: Some("1 of 36 MatMuls kept fp32 for accuracy (measured)".into()),
    });
    let md = handoff_report::summary_markdown("q", &[base, variant], false, &Default::default());
    let row = md
        .lines()
        .find(|l| l.starts_with("| mlp | int8-dynamic"))
        .unwrap_or_else(|| panic!("no variants row:\n{md}"));
    assert!(
        row.contains("pass (>= 0.995; 1 of 36 MatMuls kept fp32 for accuracy (measured))"),
        "{row}"
    );
}

/// A variant's gate is stated once above its section's table when every
/// row shares it and it passed; a failed gate stays on every row.
#[test]
fn a_shared_passed_gate_is_said_once_and_a_failed_one_on_every_row() {
    let variant_rows = |passed: bool| -> Vec<ResultRecord> {
        fixture()
            .into_iter()
            .filter(|r| r.case.model == "mlp" && r.case.backend == "ort")
            .map(|mut r| {
                r.case.model = "mlp@int8-dynamic".into();
                r.case.id = r.case.id.replacen("mlp", "mlp@int8-dynamic", 1);
                r.accuracy = Some(handoff_results::Accuracy {
                    variant: "int8-dynamic".into(),
                    compared: "output `y`: variant on ort vs fp32 on ort, 1 thread".into(),
                    min_cosine: if passed { 0.9974 } else { 0.9871 },
                    max_abs: 0.1,
                    threshold_min_cosine: 0.995,
                    label_agreement: None,
                    passed,
                    size_bytes: 23_000_000,
                    fp32_size_bytes: 90_300_000,
                    cpu_class: Some("x86-avx2".into()),
                    built: None,
                    kept_fp32: None,
                });
                r
            })
            .collect()
    };
    let section = |md: &str| -> String {
        let start = md
            .find("## mlp@int8-dynamic")
            .expect("the variant's section");
        md[start..].to_owned()
    };
    let rows = |md: &str, needle: &str| {
        md.lines()
            .filter(|l| l.starts_with("| ort |") && l.contains(needle))
            .count()
    };

    let ok = section(&handoff_report::summary_markdown(
        "q",
        &variant_rows(true),
        false,
        &Default::default(),
    ));
    assert_eq!(
        ok.matches("int8-dynamic: cos 0.9974 vs fp32, 23.0 MB")
            .count(),
        1,
        "{ok}"
    );
    assert!(
        ok.contains("Accuracy gate of every row: int8-dynamic: cos 0.9974"),
        "{ok}"
    );
    assert_eq!(rows(&ok, "cos 0.9974"), 0, "{ok}");

    let failed = section(&handoff_report::summary_markdown(
        "q",
        &variant_rows(false),
        false,
        &Default::default(),
    ));
    assert!(!failed.contains("Accuracy gate of every row"), "{failed}");
    assert_eq!(
        rows(&failed, "ACCURACY-FAIL int8-dynamic: cos 0.9871"),
        4,
        "{failed}"
    );
}

/// A lowered copy (made for a backend that lacks an op of the model) is
/// that backend's form of the model: its rows join the model's section,
/// marked, rather than a section of its own whose only backend "wins".
#[test]
fn a_lowered_copy_is_shown_in_its_models_section() {
    let mut records = fixture();
    for r in records
        .iter_mut()
        .filter(|r| r.case.model == "mlp" && r.case.backend == "candle-onnx" && r.case.batch == 1)
    {
        r.case.model = "mlp+lowered".into();
    }
    let summaries = handoff_report::model_summaries(&records);
    assert!(summaries.iter().all(|m| m.id != "mlp+lowered"));
    let mlp = summaries.iter().find(|m| m.id == "mlp").unwrap();
    assert_eq!(mlp.lowered, Some("mlp+lowered"));
    assert_eq!(
        mlp.rows
            .iter()
            .filter(|r| r.case.model == "mlp+lowered")
            .count(),
        2
    );
    let md = handoff_report::summary_markdown("q", &records, false, &Default::default());
    assert!(!md.contains("## mlp+lowered"), "{md}");
    assert!(
        md.contains("Rows marked *lowered copy* ran `mlp+lowered`"),
        "{md}"
    );
    assert!(
        md.contains("| candle-onnx (interp., lowered copy) | 1 | 1 |"),
        "{md}"
    );
    // Its thread scaling too.
    assert!(
        md.lines()
            .any(|l| l.starts_with("| candle-onnx (interp., lowered copy) |")
                && l.contains("1 -> 2")),
        "{md}"
    );
    let html = handoff_report::html::report_html(
        "q",
        &records,
        None,
        false,
        &Default::default(),
        &Default::default(),
    );
    assert!(html.contains("Rows marked lowered copy ran mlp+lowered:"));
    assert!(html.contains("candle-onnx (interp., lowered copy)"));
}
