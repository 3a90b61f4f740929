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
