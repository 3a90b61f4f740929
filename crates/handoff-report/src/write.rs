//! Writing a report directory: `summary.md`, `plots/*.png`, `report.html`.

use std::path::{Path, PathBuf};

use handoff_results::ResultRecord;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plot(#[from] crate::plots::PlotError),
}

/// Renders everything into `out` (created if needed); `env` is the run's
/// env.json and `peak` its roofline.json, when there are. Returns the files written.
pub fn write_report(
    out: &Path,
    suite: &str,
    records: &[ResultRecord],
    env: Option<&serde_json::Value>,
    torn_last_line: bool,
    ctx: &crate::RunContext<'_>,
) -> Result<Vec<PathBuf>, WriteError> {
    let peak = ctx.peak;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| WriteError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut written = Vec::new();
    let md = out.join("summary.md");
    std::fs::write(
        &md,
        crate::summary_markdown(suite, records, torn_last_line, ctx),
    )
    .map_err(io(&md))?;
    written.push(md);
    let mut images = std::collections::BTreeMap::new();
    // Plots show one query at a time; load scenarios have their own tables.
    let (steady, _) = crate::split_scenarios(records);
    let records_all = records;
    let records = &steady[..];
    for m in crate::models(records) {
        let rows: Vec<&ResultRecord> = records.iter().filter(|r| r.case.model == m).collect();
        let files = crate::plots::model_plots(m, &rows, &out.join("plots"))?;
        let mut pngs = Vec::with_capacity(files.len());
        for f in &files {
            pngs.push(std::fs::read(f).map_err(io(f))?);
        }
        written.extend(files);
        images.insert(m.to_owned(), pngs);
    }
    // The variants' trade-off, once for the whole report.
    if let Some(p) = crate::plots::variants_plot(records, &out.join("plots"))? {
        let png = std::fs::read(&p).map_err(io(&p))?;
        images.insert(String::new(), vec![png]);
        written.push(p);
    }
    if let Some(p) = crate::plots::roofline_plot(records, peak, &out.join("plots"))? {
        let png = std::fs::read(&p).map_err(io(&p))?;
        images.insert("#roofline".into(), vec![png]);
        written.push(p);
    }
    if let Some(p) = crate::plots::canary_plot(ctx.canary, &out.join("plots"))? {
        let png = std::fs::read(&p).map_err(io(&p))?;
        images.insert("#canary".into(), vec![png]);
        written.push(p);
    }
    let html = out.join("report.html");
    std::fs::write(
        &html,
        crate::html::report_html(suite, records_all, env, torn_last_line, &images, ctx),
    )
    .map_err(io(&html))?;
    written.push(html);
    Ok(written)
}
