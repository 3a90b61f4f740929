//! `handoff compare --rerun`: suspected regressions measured again with both
//! builds in ABBA order (base, head, head, base), so drift during the rerun
//! hits both sides alike; a regression stands only if the rerun finds it too.

use std::path::{Path, PathBuf};

use crate::{CompareError, Comparison, Options, Run, Verdict, compare};

#[derive(Debug, thiserror::Error)]
pub enum RerunError {
    #[error("cannot run {}: {error}", bin.display())]
    Start { bin: PathBuf, error: String },
    #[error("rerun with {} failed ({status})", bin.display())]
    Failed { bin: PathBuf, status: String },
    #[error("the {0} rerun left no results")]
    Empty(&'static str),
    #[error(transparent)]
    Compare(#[from] CompareError),
}

/// Reruns the regressed cases ABBA with both builds; a regression stands
/// only if the rerun comparison also finds it.
pub fn confirm(
    mut c: Comparison,
    suite: &Path,
    base_bin: &Path,
    head_bin: &Path,
    opts: &Options,
) -> Result<Comparison, RerunError> {
    let ids: Vec<String> = c
        .rows
        .iter()
        .filter(|r| r.verdict == Verdict::Regressed)
        .map(|r| r.id.clone())
        .collect();
    let work = std::env::temp_dir().join(format!("handoff-rerun-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for (k, (bin, side)) in [(base_bin, 0), (head_bin, 1), (head_bin, 1), (base_bin, 0)]
        .into_iter()
        .enumerate()
    {
        let out = work.join(format!("{k}"));
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("run")
            .arg(suite)
            .arg("--out")
            .arg(&out)
            .arg("--quiet");
        for id in &ids {
            cmd.arg("--filter").arg(id);
        }
        let status = cmd.status().map_err(|e| RerunError::Start {
            bin: bin.to_owned(),
            error: e.to_string(),
        })?;
        if !status.success() {
            return Err(RerunError::Failed {
                bin: bin.to_owned(),
                status: status.to_string(),
            });
        }
        runs[side].push(Run::load(&out)?);
    }
    let [a, b] = runs;
    let (a, b) = (
        Run::as_repeats(a).ok_or(RerunError::Empty("base"))?,
        Run::as_repeats(b).ok_or(RerunError::Empty("head"))?,
    );
    let again = compare(&a, &b, opts)?;
    for row in &mut c.rows {
        if row.verdict != Verdict::Regressed {
            continue;
        }
        let confirmed = again
            .rows
            .iter()
            .any(|r| r.id == row.id && r.verdict == Verdict::Regressed);
        let rr = again.rows.iter().find(|r| r.id == row.id);
        let detail = rr
            .and_then(|r| r.ratio)
            .map_or(String::new(), |x| format!(" ({:+.1}%)", (x - 1.0) * 100.0));
        if confirmed {
            row.note = Some(format!("confirmed by ABBA rerun{detail}"));
        } else {
            row.verdict = Verdict::Inconclusive;
            row.note = Some(format!("not confirmed by ABBA rerun{detail}"));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(c)
}
