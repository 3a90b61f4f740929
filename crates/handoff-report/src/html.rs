//! A self-contained HTML report: no external CSS, JS or fonts, every user
//! string escaped (a minijinja template with HTML auto-escaping), charts as
//! inline SVG and PNG data URIs.

use std::fmt::Write;

use handoff_results::{ResultRecord, Status};

use crate::{fmt_ms, fmt_rate, p99};
use serde::Serialize;

/// Escapes text for HTML element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f4f4f4;cursor:pointer;position:sticky;top:0}td.l,th.l{text-align:left}
.ok{background:#e8f6e8}.mismatch,.failed,.timeout{background:#fde2e2}.unsupported{background:#fff3d6}.unavailable{background:#eee}
.rec{background:#eef5ff;border-left:4px solid #3b82f6;padding:.6em 1em;margin:1em 0}.note{color:#a15c00}
svg text{font-size:11px;font-family:sans-serif}";

const SCRIPT: &str = "document.querySelectorAll('table.sortable th').forEach(function(th,i){th.addEventListener('click',function(){
var t=th.closest('table'),b=t.tBodies[0],rows=Array.from(b.rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
rows.sort(function(x,y){var a=x.cells[i].dataset.v||x.cells[i].textContent,c=y.cells[i].dataset.v||y.cells[i].textContent;
var na=parseFloat(a),nc=parseFloat(c);var r=(!isNaN(na)&&!isNaN(nc))?na-nc:a.localeCompare(c);return asc?r:-r;});
rows.forEach(function(r){b.appendChild(r);});});});
window.addEventListener('load',function(){var im=document.images,n=0;for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)n++;}
document.body.setAttribute('data-images-loaded',n+'/'+im.length);});";

/// `backend t2 b8 seq=128`: a case in the chart and the recommendation.
fn label(r: &ResultRecord, section: &str) -> String {
    format!(
        "{} t{} b{} {}",
        crate::summary::row_label(r, section),
        r.case.threads,
        r.case.batch,
        crate::dim_items(r).join(",")
    )
}

/// A horizontal bar chart of p50 (with the p99 tick) for the ok cases.
fn chart(rows: &[&ResultRecord], section: &str) -> String {
    let ok: Vec<&&ResultRecord> = rows
        .iter()
        .filter(|r| r.status == Status::Ok && r.latency_ms.is_some())
        .collect();
    if ok.is_empty() {
        return String::new();
    }
    let max = ok
        .iter()
        .filter_map(|r| r.latency_ms.as_ref().map(|l| l.p99))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let (w, lw, bh) = (900.0, 330.0, 16.0);
    let h = ok.len() as f64 * (bh + 4.0) + 30.0;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' role='img' aria-label='median latency per configuration'>"
    );
    for (i, r) in ok.iter().enumerate() {
        let l = r.latency_ms.as_ref().expect("filtered");
        let y = i as f64 * (bh + 4.0) + 4.0;
        let scale = (w - lw - 60.0) / max;
        let _ = write!(
            s,
            "<text x='{}' y='{}' text-anchor='end'>{}</text><rect x='{lw}' y='{y}' width='{:.1}' height='{bh}' fill='#60a5fa'><title>p50 {:.4} ms, p99 {:.4} ms</title></rect>\
             <line x1='{:.1}' x2='{:.1}' y1='{y}' y2='{}' stroke='#b91c1c' stroke-width='2'/><text x='{:.1}' y='{}'>{:.3}</text>",
            lw - 6.0,
            y + 12.0,
            esc(&label(r, section)),
            l.p50 * scale,
            l.p50,
            l.p99,
            lw + l.p99 * scale,
            lw + l.p99 * scale,
            y + bh,
            lw + l.p50 * scale + 4.0,
            y + 12.0,
            l.p50
        );
    }
    let _ = write!(
        s,
        "<text x='{lw}' y='{}'>bar: p50 latency (ms); red tick: p99</text></svg>",
        h - 6.0
    );
    s
}

/// Standard base64, for inlining PNGs as data URIs.
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// The page itself: a minijinja template with HTML auto-escaping, so every
/// string from a suite or a results file (model ids, reasons, environment)
/// is escaped whatever the code around it does.
const TEMPLATE: &str = include_str!("../templates/report.html");

#[derive(Serialize)]
struct Rec {
    label: String,
    text: String,
}

#[derive(Serialize)]
struct Col {
    name: &'static str,
    left: bool,
}

#[derive(Serialize)]
struct Cell {
    text: String,
    /// The sort key (`data-v`), for numbers.
    raw: Option<String>,
    class: String,
}

#[derive(Serialize)]
struct ModelView {
    id: String,
    source: Option<String>,
    sha: Option<String>,
    /// A seeded random-weights stand-in.
    random: bool,
    /// Passing batch-1 cases the recommendation does not rest on.
    passed_over: usize,
    lowered_note: Option<String>,
    latency: Option<Rec>,
    throughput: Option<Rec>,
    /// Inline SVG built with [`esc`], marked safe.
    chart: minijinja::Value,
    images: Vec<String>,
    rows: Vec<Vec<Cell>>,
}

#[derive(Serialize)]
struct TableView {
    title: String,
    note: String,
    images: Vec<String>,
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

const COLUMNS: [&str; 24] = [
    "backend",
    "device",
    "threads",
    "batch",
    "dims",
    "status",
    "n",
    "p50 ms",
    "±CI %",
    "p90",
    "p99",
    "p99.9",
    "mean",
    "stddev",
    "CoV",
    "outliers",
    "items/s",
    "load ms",
    "first ms",
    "parity max abs",
    "stop",
    "busy",
    "reason",
    "provenance",
];

/// The whole report. `env` is the run's env.json, if any; `images` maps a
/// model id to PNG plots inlined under its heading (`""`: the variants
/// plot, `#roofline`: the roofline plot).
pub fn report_html(
    suite: &str,
    records: &[ResultRecord],
    env: Option<&serde_json::Value>,
    torn_last_line: bool,
    images: &std::collections::BTreeMap<String, Vec<Vec<u8>>>,
    ctx: &crate::RunContext<'_>,
) -> String {
    let peak = ctx.peak;
    let b64 = |key: &str| -> Vec<String> {
        images
            .get(key)
            .into_iter()
            .flatten()
            .map(|p| base64(p))
            .collect()
    };
    let (steady, loaded) = crate::split_scenarios(records);
    let models: Vec<ModelView> = crate::model_summaries(&steady)
        .iter()
        .map(|m| {
            let mut images = b64(m.id);
            images.extend(m.lowered.map(b64).unwrap_or_default());
            model_view(m, images)
        })
        .collect();
    let mut tables = Vec::new();
    let mut table = |title: &str, note: String, images: Vec<String>, t: Option<crate::Table>| {
        if let Some(t) = t {
            tables.push(TableView {
                title: title.to_owned(),
                note,
                images,
                header: t.header,
                rows: t.rows,
            });
        }
    };
    table(
        "How this run was measured",
        crate::paired::measurement_note(ctx, records).unwrap_or_default(),
        b64("#canary"),
        crate::paired::canary_table(ctx.canary),
    );
    table(
        "Models per backend",
        crate::COVERAGE_NOTE.into(),
        Vec::new(),
        crate::coverage_table(records),
    );
    table(
        "Hand-off gain: Rust ort vs Python onnxruntime",
        crate::paired::GAIN_NOTE.into(),
        Vec::new(),
        crate::paired::handoff_gain_table(&steady),
    );
    table(
        "Hand-off gain vs PyTorch",
        crate::paired::TORCH_GAIN_NOTE.into(),
        Vec::new(),
        crate::paired::torch_gain_table(&steady),
    );
    table(
        "Paired comparisons",
        crate::COMPARISONS_NOTE.into(),
        Vec::new(),
        crate::paired::comparisons_table(&steady),
    );
    table(
        "Roofline: achieved GFLOP/s vs the machine's matmul peak",
        crate::roofline::note(peak),
        b64("#roofline"),
        crate::roofline::roofline_table(&steady, peak),
    );
    table(
        "Cold start",
        crate::COLD_NOTE.into(),
        Vec::new(),
        crate::cold_table(&steady),
    );
    table(
        "Under load",
        crate::LOAD_NOTE.into(),
        Vec::new(),
        crate::load_table(&loaded),
    );
    table(
        "Hand-off gain: serving (handoff serve vs FastAPI)",
        std::iter::once(crate::SERVING_NOTE.to_owned())
            .chain(crate::serving_decisions(&loaded))
            .collect::<Vec<_>>()
            .join(" "),
        Vec::new(),
        crate::serving_gain(&loaded),
    );
    let env: Vec<(String, String)> = env
        .and_then(|e| e.as_object())
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), text)
                })
                .collect()
        })
        .unwrap_or_default();
    let columns: Vec<Col> = COLUMNS
        .iter()
        .map(|&name| Col {
            name,
            left: matches!(
                name,
                "backend" | "device" | "dims" | "status" | "stop" | "reason" | "provenance"
            ),
        })
        .collect();
    let mut jinja = minijinja::Environment::new();
    jinja.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    let rendered = jinja.template_from_str(TEMPLATE).and_then(|t| {
        t.render(minijinja::context! {
            suite,
            empty => records.is_empty(),
            torn => torn_last_line,
            style => minijinja::Value::from_safe_string(STYLE.into()),
            script => minijinja::Value::from_safe_string(SCRIPT.into()),
            variant_images => b64(""),
            models,
            columns,
            tables,
            env,
        })
    });
    match rendered {
        Ok(html) => html,
        // The template is compiled in and tested: this is a bug, shown as
        // a page rather than a panic that would lose the rest of the report.
        Err(e) => format!(
            "<!doctype html><html><body><p>report template error: {}</p></body></html>",
            esc(&format!("{e:#}"))
        ),
    }
}

fn model_view(m: &crate::ModelSummary<'_>, images: Vec<String>) -> ModelView {
    let python_p99 = |p: &crate::Pick<'_>| {
        p.python.as_ref().map_or(String::new(), |(py, x)| {
            format!(
                "; Python onnxruntime there: p99 {} ms{}",
                fmt_ms(p99(py)),
                x.as_ref().map_or(String::new(), |x| format!(
                    ", p50 Python / this: {}",
                    crate::paired::ratio_text(x)
                ))
            )
        })
    };
    let python_rate = |p: &crate::Pick<'_>| {
        p.python.as_ref().map_or(String::new(), |(py, x)| {
            py.throughput_items_s.map_or(String::new(), |pt| {
                format!(
                    "; Python onnxruntime there: {} items/s{}",
                    fmt_rate(pt),
                    x.as_ref().map_or(String::new(), |x| format!(
                        " (its p50 / this: {})",
                        crate::paired::ratio_text(x)
                    ))
                )
            })
        })
    };
    let latency = m.lowest_p99.as_ref().map(|p| Rec {
        label: label(p.case, m.id),
        text: format!("p99 {} ms at batch 1{}", fmt_ms(p99(p.case)), python_p99(p)),
    });
    let throughput = m.highest_throughput.as_ref().map(|p| Rec {
        label: label(p.case, m.id),
        text: format!(
            "{} items/s{}",
            fmt_rate(p.case.throughput_items_s.unwrap_or(0.0)),
            python_rate(p)
        ),
    });
    let first = m.rows.first();
    ModelView {
        id: m.id.to_owned(),
        source: first.map(|r| r.case.model_source.clone()),
        sha: first.map(|r| r.case.model_sha256[..16.min(r.case.model_sha256.len())].to_owned()),
        random: m.random_source.is_some(),
        passed_over: m.passed_over,
        lowered_note: m.lowered.map(|l| crate::lowered_note(l, false)),
        latency,
        throughput,
        chart: minijinja::Value::from_safe_string(chart(&m.rows, m.id)),
        images,
        rows: m.rows.iter().map(|r| table_row(r, m.id)).collect(),
    }
}

fn table_row(r: &ResultRecord, section: &str) -> Vec<Cell> {
    let text = |t: String, class: &str| Cell {
        text: t,
        raw: None,
        class: class.into(),
    };
    let l = r.latency_ms.as_ref();
    let dims = crate::dim_items(r);
    let backend = crate::summary::row_label(r, section);
    let mut cells = vec![
        text(backend, "l"),
        text(r.case.device.to_string(), "l"),
        text(r.case.threads.to_string(), ""),
        text(r.case.batch.to_string(), ""),
        text(dims.join(","), "l"),
        text(
            r.status.as_str().into(),
            &format!("l {}", r.status.as_str()),
        ),
    ];
    let ci = l.map(|l| 100.0 * (l.p50_ci95[1] - l.p50_ci95[0]) / 2.0 / l.p50);
    // Shown as every other view shows them; the raw value sorts.
    fn count(v: f64) -> String {
        format!("{v:.0}")
    }
    fn percent(v: f64) -> String {
        format!("{v:.2}")
    }
    fn ratio(v: f64) -> String {
        format!("{v:.3}")
    }
    fn abs(v: f64) -> String {
        format!("{v:.1e}")
    }
    type Shown = fn(f64) -> String;
    let numbers: [(Option<f64>, Shown); 14] = [
        (l.map(|l| l.n as f64), count),
        (l.map(|l| l.p50), fmt_ms),
        (ci, percent),
        (l.map(|l| l.p90), fmt_ms),
        (l.map(|l| l.p99), fmt_ms),
        (l.map(|l| l.p999), fmt_ms),
        (l.map(|l| l.mean), fmt_ms),
        (l.map(|l| l.stddev), fmt_ms),
        (l.map(|l| l.cov), ratio),
        (l.map(|l| l.outliers as f64), count),
        (r.throughput_items_s, fmt_rate),
        (r.load_ms, fmt_ms),
        (r.first_ms, fmt_ms),
        (r.parity.as_ref().map(|p| p.max_abs), abs),
    ];
    for (v, shown) in numbers {
        let (text, raw) = match v {
            Some(v) if v.is_finite() => (shown(v), v.to_string()),
            _ => ("-".into(), String::new()),
        };
        cells.push(Cell {
            text,
            raw: Some(raw),
            class: String::new(),
        });
    }
    let busy = r.machine.as_ref().map_or("-".into(), |m| {
        if m.busy {
            format!("yes ({:.1} cores)", m.other_cpu_cores)
        } else {
            "no".into()
        }
    });
    cells.push(text(r.stop.map_or("-".into(), |s| format!("{s:?}")), "l"));
    cells.push(text(busy, ""));
    cells.push(text(r.reason.clone().unwrap_or_default(), "l"));
    cells.push(text(provenance(r), "l"));
    cells
}

/// Where the row's model came from: its source, the file's hash, and for a
/// precision variant its accuracy gate (the sidecar next to the file holds
/// every step).
fn provenance(r: &ResultRecord) -> String {
    let sha = &r.case.model_sha256[..12.min(r.case.model_sha256.len())];
    let mut p = format!("{} sha256:{sha}", r.case.model_source);
    if let Some(a) = &r.accuracy {
        let _ = write!(
            p,
            "; {} cos {:.4} vs fp32 ({} {}{}{})",
            a.variant,
            a.min_cosine,
            if a.passed { "passes" } else { "FAILS" },
            a.threshold_min_cosine,
            a.regate_note()
                .map_or_else(String::new, |w| format!("; {w}")),
            a.kept_fp32
                .as_ref()
                .map_or_else(String::new, |k| format!("; {k}"))
        );
    }
    if let Some(v) = &r.case.backend_version {
        let _ = write!(p, "; {} {v}", r.case.backend);
    }
    p
}
