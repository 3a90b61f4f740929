//! The HTML report in a real browser: headless Chromium (Debian package,
//! fetched by scripts/ensure-chromium.sh when missing) loads report.html
//! from the committed fixture, with no console errors, showing the
//! recommendation and every inlined plot; the PNGs are the expected size and
//! not blank.

use std::path::{Path, PathBuf};
use std::process::Command;

use handoff_results::ResultRecord;

fn fixture() -> Vec<ResultRecord> {
    include_str!("fixtures/results.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The headless Chromium that `scripts/ensure-chromium.sh` provisions
/// (README command 1 and `.ci/run` call it): the test itself installs
/// nothing, and fails, not skips, without one.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "headless Chromium is needed for this test and none is on PATH: run scripts/ensure-chromium.sh (README command 1 and .ci/run do)"
            )
        })
}

/// Loads `page` headless; returns (DOM after load, browser log).
fn load(chrome: &Path, page: &Path, screenshot: Option<&Path>) -> (String, String) {
    let mut cmd = Command::new(chrome);
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--window-size=1280,2400",
    ]);
    let profile = tempfile::tempdir().unwrap();
    cmd.arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(png) => cmd.arg(format!("--screenshot={}", png.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn console_errors(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .collect()
}

/// Standard deviation of the grey levels: 0 for a blank image.
fn pixel_spread(png: &[u8]) -> (u32, u32, f64) {
    let img = image::load_from_memory(png).unwrap().to_luma8();
    let n = f64::from(img.width() * img.height());
    let mean = img.pixels().map(|p| f64::from(p.0[0])).sum::<f64>() / n;
    let var = img
        .pixels()
        .map(|p| (f64::from(p.0[0]) - mean).powi(2))
        .sum::<f64>()
        / n;
    (img.width(), img.height(), var.sqrt())
}

#[test]
fn report_renders_in_headless_chromium() {
    let chrome = chromium();
    let dir = tempfile::tempdir().unwrap();
    let env = serde_json::json!({"cpu_model": "fixture", "logical_cores": 2});
    let files = handoff_report::write_report(
        dir.path(),
        "fixture",
        &fixture(),
        Some(&env),
        false,
        &handoff_report::RunContext::default(),
    )
    .unwrap();
    let pngs: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
        .collect();
    assert!(!pngs.is_empty());
    for png in &pngs {
        let (w, h, spread) = pixel_spread(&std::fs::read(png).unwrap());
        assert_eq!((w, h), handoff_report::plots::SIZE, "{}", png.display());
        assert!(
            spread > 10.0,
            "{} looks blank (grey-level spread {spread:.1})",
            png.display()
        );
    }

    let page = dir.path().join("report.html");
    let (dom, log) = load(&chrome, &page, None);
    assert!(
        console_errors(&log).is_empty(),
        "console errors: {:?}",
        console_errors(&log)
    );
    assert!(
        dom.contains("Recommendation"),
        "no recommendation in the rendered page"
    );
    let want = format!("data-images-loaded=\"{n}/{n}\"", n = pngs.len());
    assert!(
        dom.contains(&want),
        "not every plot decoded: expected {want}"
    );

    let shot = dir.path().join("shot.png");
    load(&chrome, &page, Some(&shot));
    let (w, h, spread) = pixel_spread(&std::fs::read(&shot).unwrap());
    assert!(
        w >= 1200 && h >= 2000 && spread > 10.0,
        "screenshot {w}x{h}, spread {spread:.1}"
    );

    // The checks can fail: a page with a script error and a broken image.
    let broken = dir.path().join("broken.html");
    let html = std::fs::read_to_string(&page).unwrap().replacen(
        "<body>",
        "<body><script>undefinedFunction()</script><img src='data:image/png;base64,AAAA'>",
        1,
    );
    std::fs::write(&broken, html).unwrap();
    let (dom, log) = load(&chrome, &broken, None);
    assert!(
        !console_errors(&log).is_empty(),
        "a script error went unnoticed: {log}"
    );
    assert!(!dom.contains(&want), "a broken image went unnoticed");
}
