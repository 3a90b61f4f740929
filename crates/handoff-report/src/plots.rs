//! PNG plots (1200x800) drawn with plotters' bitmap backend and a font
//! embedded in the binary (DejaVu Sans), so they render on a machine with no
//! fonts installed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use handoff_runner::{ResultRecord, Status};
use plotters::prelude::*;

pub const SIZE: (u32, u32) = (1200, 800);
const FONT: &str = "handoff-sans";

#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {detail}")]
pub struct PlotError {
    pub path: PathBuf,
    pub detail: String,
}

fn font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(37, 99, 235),
    RGBColor(220, 38, 38),
    RGBColor(22, 163, 74),
    RGBColor(217, 119, 6),
    RGBColor(124, 58, 237),
    RGBColor(8, 145, 178),
    RGBColor(190, 24, 93),
    RGBColor(82, 82, 91),
];

fn ok<'a>(rows: &[&'a ResultRecord]) -> Vec<&'a ResultRecord> {
    rows.iter()
        .copied()
        .filter(|r| r.status == Status::Ok && r.latency_ms.is_some())
        .collect()
}

fn label(r: &ResultRecord) -> String {
    format!("{} t{} b{}", r.case.backend, r.case.threads, r.case.batch)
}

/// Draws the plots for one model into `dir`; returns the files written.
pub fn model_plots(
    model: &str,
    rows: &[&ResultRecord],
    dir: &Path,
) -> Result<Vec<PathBuf>, PlotError> {
    font();
    std::fs::create_dir_all(dir).map_err(|e| PlotError {
        path: dir.to_owned(),
        detail: e.to_string(),
    })?;
    let safe: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let rows = ok(rows);
    let mut out = Vec::new();
    if rows.is_empty() {
        return Ok(out);
    }
    let p = dir.join(format!("{safe}-latency.png"));
    latency(model, &rows, &p)?;
    out.push(p);
    let p = dir.join(format!("{safe}-throughput.png"));
    throughput(model, &rows, &p)?;
    out.push(p);
    if rows.iter().any(|r| r.case.threads > 1) {
        let p = dir.join(format!("{safe}-scaling.png"));
        scaling(model, &rows, &p)?;
        out.push(p);
    }
    Ok(out)
}

fn err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |detail| PlotError {
        path: path.to_owned(),
        detail,
    }
}

/// p50 bars with the p99 drawn as a red tick, one row per configuration.
fn latency(model: &str, rows: &[&ResultRecord], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let max = rows
        .iter()
        .map(|r| r.latency_ms.as_ref().map_or(0.0, |l| l.p99))
        .fold(0.0f64, f64::max)
        * 1.1;
    let n = rows.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{model}: latency per configuration (p50 bar, p99 tick)"),
            (FONT, 26),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..max.max(1e-6), (0..n).into_segmented())
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("latency (ms)")
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows.get(*i).map(|r| label(r)).unwrap_or_default(),
            _ => String::new(),
        })
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 18))
        .disable_y_mesh()
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (i, r) in rows.iter().enumerate() {
        let l = r.latency_ms.as_ref().expect("ok rows have latency");
        let colour = PALETTE[backend_index(rows, &r.case.backend) % PALETTE.len()];
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (l.p50, SegmentValue::Exact(i + 1)),
                ],
                colour.mix(0.8).filled(),
            )))
            .map_err(|x| e(x.to_string()))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![
                    (l.p99, SegmentValue::Exact(i)),
                    (l.p99, SegmentValue::Exact(i + 1)),
                ],
                RED.stroke_width(3),
            )))
            .map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))
}

fn backend_index(rows: &[&ResultRecord], backend: &str) -> usize {
    let mut seen: Vec<&str> = Vec::new();
    for r in rows {
        if !seen.contains(&r.case.backend.as_str()) {
            seen.push(&r.case.backend);
        }
    }
    seen.iter().position(|b| *b == backend).unwrap_or(0)
}

/// Series keyed by (backend, threads), x = batch or threads.
fn series<'a>(rows: &[&'a ResultRecord]) -> Vec<(String, Vec<&'a ResultRecord>)> {
    let mut out: Vec<(String, Vec<&ResultRecord>)> = Vec::new();
    for r in rows {
        let key = format!("{} t{}", r.case.backend, r.case.threads);
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => out.push((key, vec![r])),
        }
    }
    out
}

fn throughput(model: &str, rows: &[&ResultRecord], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let max_b = rows.iter().map(|r| r.case.batch).max().unwrap_or(1) as f64;
    let max_t = rows
        .iter()
        .filter_map(|r| r.throughput_items_s)
        .fold(0.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{model}: throughput vs batch"), (FONT, 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..max_b * 1.05 + 0.5, 0.0..max_t.max(1e-6))
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("batch size")
        .y_desc("throughput (items/s)")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 18))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (k, (name, mut pts)) in series(rows).into_iter().enumerate() {
        pts.sort_by_key(|r| r.case.batch);
        let colour = PALETTE[k % PALETTE.len()];
        let xy: Vec<(f64, f64)> = pts
            .iter()
            .map(|r| (f64::from(r.case.batch), r.throughput_items_s.unwrap_or(0.0)))
            .collect();
        line_with_markers(&mut chart, xy, name, colour).map_err(&e)?;
    }
    legend(&mut chart).map_err(&e)?;
    root.present().map_err(|x| e(x.to_string()))
}

type Chart<'a, 'b, Y> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>;

fn line_with_markers<'a, 'b: 'a, Y: Ranged<ValueType = f64>>(
    chart: &mut Chart<'a, 'b, Y>,
    xy: Vec<(f64, f64)>,
    name: String,
    colour: RGBColor,
) -> Result<(), String> {
    chart
        .draw_series(LineSeries::new(xy.clone(), colour.stroke_width(3)))
        .map_err(|x| x.to_string())?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3)));
    chart
        .draw_series(xy.iter().map(|p| Circle::new(*p, 5, colour.filled())))
        .map_err(|x| x.to_string())?;
    Ok(())
}

fn legend<'a, 'b: 'a, Y: Ranged<ValueType = f64>>(
    chart: &mut Chart<'a, 'b, Y>,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|x| x.to_string())
}

/// Speed-up of the median vs the fewest threads, per backend and batch,
/// with the ideal (linear) line.
fn scaling(model: &str, rows: &[&ResultRecord], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let max_threads = rows.iter().map(|r| r.case.threads).max().unwrap_or(1) as f64;
    let mut groups: Vec<(String, Vec<&ResultRecord>)> = Vec::new();
    for r in rows {
        let dims: Vec<String> = r
            .case
            .dims
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let key = format!("{} b{} {}", r.case.backend, r.case.batch, dims.join(","));
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{model}: thread scaling (p50 speed-up; dashed: ideal)"),
            (FONT, 26),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5..max_threads + 0.5, 0.0..max_threads * 1.15)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("threads")
        .y_desc("speed-up")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 18))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(1.0, 1.0), (max_threads, max_threads)],
            8,
            6,
            BLACK.stroke_width(2),
        ))
        .map_err(|x| e(x.to_string()))?;
    for (k, (name, mut pts)) in groups.into_iter().enumerate() {
        pts.sort_by_key(|r| r.case.threads);
        let Some(base) = pts
            .first()
            .and_then(|r| r.latency_ms.as_ref())
            .map(|l| (l.p50, pts[0].case.threads))
        else {
            continue;
        };
        let colour = PALETTE[k % PALETTE.len()];
        let xy: Vec<(f64, f64)> = pts
            .iter()
            .filter_map(|r| {
                r.latency_ms.as_ref().map(|l| {
                    (
                        f64::from(r.case.threads),
                        base.0 / l.p50 * f64::from(base.1),
                    )
                })
            })
            .collect();
        line_with_markers(&mut chart, xy, name, colour).map_err(&e)?;
    }
    legend(&mut chart).map_err(&e)?;
    root.present().map_err(|x| e(x.to_string()))
}
