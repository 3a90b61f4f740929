//! A self-contained HTML report: no external CSS, JS or fonts, every user
//! string escaped, charts as inline SVG.

use std::fmt::Write;

use handoff_runner::{ResultRecord, Status};

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

fn num(v: Option<f64>, digits: usize) -> (String, String) {
    match v {
        Some(v) if v.is_finite() => (format!("{v:.digits$}"), format!("{v}")),
        _ => ("-".into(), String::new()),
    }
}

fn label(r: &ResultRecord) -> String {
    let dims: Vec<String> = r
        .case
        .dims
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let interp = if matches!(
        r.case.execution,
        Some(handoff_backend::ExecutionKind::Interpreter)
    ) {
        " (interpreter)"
    } else {
        ""
    };
    format!(
        "{}{interp} t{} b{} {}",
        r.case.backend,
        r.case.threads,
        r.case.batch,
        dims.join(",")
    )
}

/// A horizontal bar chart of p50 (with the p99 tick) for the ok cases.
fn chart(rows: &[&ResultRecord]) -> String {
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
            esc(&label(r)),
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

/// The whole report. `env` is the run's env.json, if any; `images` maps a
/// model id to PNG plots inlined under its heading.
pub fn report_html(
    suite: &str,
    records: &[ResultRecord],
    env: Option<&serde_json::Value>,
    torn_last_line: bool,
    images: &std::collections::BTreeMap<String, Vec<Vec<u8>>>,
    peak: Option<&crate::roofline::MachinePeak>,
) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>handoff: {}</title><style>{STYLE}</style></head><body><h1>handoff results: {}</h1>",
        esc(suite),
        esc(suite)
    );
    if records.is_empty() {
        o.push_str("<p class='note'>No results yet: the run may have been interrupted before its first case finished.</p>");
    }
    if torn_last_line {
        o.push_str("<p class='note'>The last line of the results file was cut off (interrupted run) and is not shown.</p>");
    }
    // Report-wide images (the precision-variant trade-off) under "".
    for png in images.get("").into_iter().flatten() {
        let _ = write!(
            o,
            "<h2>Precision variants</h2><p><img alt='precision variants: accuracy vs speed' width='900' src='data:image/png;base64,{}'></p>",
            base64(png)
        );
    }
    let (steady, loaded) = crate::split_scenarios(records);
    let records = &steady[..];
    let models = crate::models(records);
    for m in models {
        let rows: Vec<&ResultRecord> = records.iter().filter(|r| r.case.model == m).collect();
        let _ = write!(o, "<h2>{}</h2>", esc(m));
        if let Some(src) = rows.first() {
            let _ = write!(
                o,
                "<p>source <code>{}</code>, sha256 <code>{}</code></p>",
                esc(&src.case.model_source),
                esc(&src.case.model_sha256[..16.min(src.case.model_sha256.len())])
            );
        }
        let ok = || rows.iter().filter(|r| r.passes());
        let lat = ok()
            .filter(|r| r.case.batch == 1)
            .min_by(|a, b| p99(a).total_cmp(&p99(b)));
        let thr = ok().max_by(|a, b| {
            a.throughput_items_s
                .unwrap_or(0.0)
                .total_cmp(&b.throughput_items_s.unwrap_or(0.0))
        });
        o.push_str("<div class='rec'><b>Recommendation</b> (fastest configuration that passed the parity and accuracy checks):<ul>");
        // The Python baseline at the recommended configuration, when the
        // suite ran one: the hand-off gain in one number.
        let python = |r: &ResultRecord| {
            rows.iter().find(|p| {
                p.case.backend == "python-onnxruntime"
                    && p.passes()
                    && (p.case.threads, p.case.batch, &p.case.dims)
                        == (r.case.threads, r.case.batch, &r.case.dims)
            })
        };
        match lat {
            Some(r) => {
                let vs = python(r)
                    .filter(|_| r.case.backend != "python-onnxruntime")
                    .map_or(String::new(), |p| {
                        format!(
                            "; Python onnxruntime there: p99 {:.3} ms ({:.2}x)",
                            p99(p),
                            p99(p) / p99(r)
                        )
                    });
                let _ = write!(
                    o,
                    "<li>latency: <b>{}</b> — p99 {:.3} ms at batch 1{}</li>",
                    esc(&label(r)),
                    p99(r),
                    vs
                );
            }
            None => o.push_str("<li>latency: no passing batch-1 case</li>"),
        }
        if let Some(r) = thr {
            let t = r.throughput_items_s.unwrap_or(0.0);
            let vs = python(r)
                .filter(|_| r.case.backend != "python-onnxruntime")
                .and_then(|p| p.throughput_items_s)
                .map_or(String::new(), |pt| {
                    format!(
                        "; Python onnxruntime there: {pt:.1} items/s ({:.2}x)",
                        t / pt
                    )
                });
            let _ = write!(
                o,
                "<li>throughput: <b>{}</b> — {t:.1} items/s{}</li>",
                esc(&label(r)),
                vs
            );
        }
        o.push_str("</ul></div>");
        o.push_str(&chart(&rows));
        for png in images.get(m).into_iter().flatten() {
            let _ = write!(
                o,
                "<p><img alt='plot for {}' width='900' src='data:image/png;base64,{}'></p>",
                esc(m),
                base64(png)
            );
        }
        o.push_str("<table class='sortable'><thead><tr>");
        for h in [
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
        ] {
            let class = if matches!(
                h,
                "backend" | "device" | "dims" | "status" | "stop" | "reason" | "provenance"
            ) {
                " class='l'"
            } else {
                ""
            };
            let _ = write!(o, "<th{class}>{h}</th>");
        }
        o.push_str("</tr></thead><tbody>");
        for r in &rows {
            let l = r.latency_ms.as_ref();
            let dims: Vec<String> = r
                .case
                .dims
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let backend = format!(
                "{}{}",
                r.case.backend,
                if matches!(
                    r.case.execution,
                    Some(handoff_backend::ExecutionKind::Interpreter)
                ) {
                    " (interpreter)"
                } else {
                    ""
                }
            );
            let _ = write!(
                o,
                "<tr><td class='l'>{}</td><td class='l'>{}</td><td>{}</td><td>{}</td><td class='l'>{}</td><td class='l {}'>{}</td>",
                esc(&backend),
                r.case.device,
                r.case.threads,
                r.case.batch,
                esc(&dims.join(",")),
                r.status.as_str(),
                r.status.as_str()
            );
            let ci = l.map(|l| 100.0 * (l.p50_ci95[1] - l.p50_ci95[0]) / 2.0 / l.p50);
            let cells = [
                (l.map(|l| l.n as f64), 0),
                (l.map(|l| l.p50), 4),
                (ci, 2),
                (l.map(|l| l.p90), 4),
                (l.map(|l| l.p99), 4),
                (l.map(|l| l.p999), 4),
                (l.map(|l| l.mean), 4),
                (l.map(|l| l.stddev), 4),
                (l.map(|l| l.cov), 3),
                (l.map(|l| l.outliers as f64), 0),
                (r.throughput_items_s, 1),
                (r.load_ms, 1),
                (r.first_ms, 2),
                (r.parity.as_ref().map(|p| p.max_abs), 9),
            ];
            for (v, d) in cells {
                let (text, raw) = num(v, d);
                let text = if d == 9 {
                    v.map_or("-".into(), |x| format!("{x:.1e}"))
                } else {
                    text
                };
                let _ = write!(o, "<td data-v='{}'>{}</td>", esc(&raw), esc(&text));
            }
            let busy = r.machine.as_ref().map_or("-".into(), |m| {
                if m.busy {
                    format!("yes ({:.1} cores)", m.other_cpu_cores)
                } else {
                    "no".into()
                }
            });
            let _ = write!(
                o,
                "<td class='l'>{}</td><td>{}</td><td class='l'>{}</td><td class='l'>{}</td></tr>",
                r.stop.map_or("-".into(), |s| format!("{s:?}")),
                esc(&busy),
                esc(r.reason.as_deref().unwrap_or("")),
                esc(&provenance(r))
            );
        }
        o.push_str("</tbody></table>");
    }
    if let Some(t) = crate::roofline::roofline_table(records, peak) {
        let _ = write!(
            o,
            "<h2>Roofline: achieved GFLOP/s vs the machine's matmul peak</h2><p>{}</p>",
            esc(&crate::roofline::note(peak))
        );
        for png in images.get("#roofline").into_iter().flatten() {
            let _ = write!(
                o,
                "<p><img alt='roofline: achieved GFLOP/s vs matmul peak' width='900' src='data:image/png;base64,{}'></p>",
                base64(png)
            );
        }
        table_html(&mut o, &t);
    }
    if let Some(t) = crate::cold_table(records) {
        let _ = write!(o, "<h2>Cold start</h2><p>{}</p>", esc(crate::COLD_NOTE));
        table_html(&mut o, &t);
    }
    if let Some(t) = crate::load_table(&loaded) {
        let _ = write!(o, "<h2>Under load</h2><p>{}</p>", esc(crate::LOAD_NOTE));
        table_html(&mut o, &t);
    }
    if let Some(t) = crate::serving_gain(&loaded) {
        let _ = write!(
            o,
            "<h2>Hand-off gain: serving (handoff serve vs FastAPI)</h2><p>{}</p>",
            esc(crate::SERVING_NOTE)
        );
        table_html(&mut o, &t);
    }
    if let Some(env) = env.and_then(|e| e.as_object()) {
        o.push_str("<h2>Environment</h2><table><tbody>");
        for (k, v) in env {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = write!(
                o,
                "<tr><td class='l'>{}</td><td class='l'>{}</td></tr>",
                esc(k),
                esc(&text)
            );
        }
        o.push_str("</tbody></table>");
    }
    let _ = writeln!(o, "<script>{SCRIPT}</script></body></html>");
    o
}

fn p99(r: &ResultRecord) -> f64 {
    r.latency_ms.as_ref().map_or(f64::INFINITY, |l| l.p99)
}

fn table_html(o: &mut String, t: &crate::Table) {
    o.push_str("<table class='sortable'><thead><tr>");
    for h in &t.header {
        let _ = write!(o, "<th class='l'>{}</th>", esc(h));
    }
    o.push_str("</tr></thead><tbody>");
    for r in &t.rows {
        o.push_str("<tr>");
        for c in r {
            let _ = write!(o, "<td class='l'>{}</td>", esc(c));
        }
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table>");
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
            "; {} cos {:.4} vs fp32 ({} {})",
            a.variant,
            a.min_cosine,
            if a.passed { "passes" } else { "FAILS" },
            a.threshold_min_cosine
        );
    }
    if let Some(v) = &r.case.backend_version {
        let _ = write!(p, "; {} {v}", r.case.backend);
    }
    p
}
