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
        false
    ));
}

#[test]
fn summary_of_an_interrupted_run() {
    let md = handoff_report::summary_markdown("q", &fixture()[..2], true);
    assert!(md.contains("cut off"));
    let empty = handoff_report::summary_markdown("q", &[], false);
    assert!(empty.contains("No results yet"));
}

#[test]
fn html_report_is_self_contained_and_escapes_user_strings() {
    let mut records = fixture();
    records[0].case.model = "<script>alert(1)</script>".into();
    let env = serde_json::json!({"cpu_model": "AMD <EPYC>", "logical_cores": 2});
    let html = handoff_report::html::report_html("quick<script>", &records, Some(&env), false);
    assert!(
        !html.contains("<script>alert"),
        "user strings must be escaped"
    );
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
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
