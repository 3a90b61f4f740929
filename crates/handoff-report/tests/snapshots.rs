//! Snapshots of the terminal table and the Markdown summary from a fixed
//! set of results (no timing involved, so they are stable).

use handoff_runner::ResultRecord;

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
        None
    ));
}

#[test]
fn summary_of_an_interrupted_run() {
    let md = handoff_report::summary_markdown("q", &fixture()[..2], true, None);
    assert!(md.contains("cut off"));
    let empty = handoff_report::summary_markdown("q", &[], false, None);
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
        None,
    );
    assert!(
        !html.contains("<script>alert"),
        "user strings must be escaped"
    );
    assert!(html.contains("&lt;script&gt;alert(1)&lt;"), "{html}");
    assert!(html.contains("AMD &lt;EPYC&gt;"));
    // No external resources: nothing is fetched when the file is opened.
    for needle in ["http://", "https://", "src=", "<link"] {
        assert!(
            !html.contains(needle)
                || needle == "http://"
                    && html
                        .matches("http://")
                        .all(|_| html.contains("xmlns='http://www.w3.org/2000/svg'")),
            "{needle}"
        );
    }
    assert!(html.contains("Recommendation") && html.contains("<svg"));
    assert!(html.contains("unsupported") && html.contains("op LayerNormalization"));
    assert_eq!(
        html.matches("<script>").count(),
        1,
        "only handoff's own sorting script"
    );
}

#[test]
fn plots_are_non_blank_pngs_of_the_promised_size() {
    let records = fixture();
    let dir = std::env::temp_dir().join(format!("handoff-plots-{}", std::process::id()));
    let rows: Vec<&handoff_runner::ResultRecord> =
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
        None,
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
