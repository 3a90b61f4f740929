//! PNG plots (1200x800) drawn with plotters' bitmap backend and a font
//! embedded in the binary (DejaVu Sans), so they render on a machine with no
//! fonts installed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use handoff_results::{ResultRecord, Status};
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
    let p = dir.join(format!("{safe}-frontier.png"));
    frontier(model, &rows, &p)?;
    out.push(p);
    if rows.iter().any(|r| r.load_ms.is_some()) {
        let p = dir.join(format!("{safe}-cold-start.png"));
        cold_start(model, &rows, &p)?;
        out.push(p);
    }
    let p = dir.join(format!("{safe}-heatmap.png"));
    heatmap(model, &rows, &p)?;
    out.push(p);
    Ok(out)
}

fn err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |detail| PlotError {
        path: path.to_owned(),
        detail,
    }
}

/// The axes of an x-y chart.
struct Axes<'s> {
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    x_desc: &'s str,
    y_desc: &'s str,
    /// Width of the y label area, px.
    y_area: u32,
}

/// An x-y chart with the report's fonts, margins and mesh, drawn.
fn xy_chart<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    (caption, size): (String, u32),
    axes: Axes<'_>,
) -> Result<Chart<'a, 'b, plotters::coord::types::RangedCoordf64>, String> {
    let mut chart = ChartBuilder::on(root)
        .caption(caption, (FONT, size))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(axes.y_area)
        .build_cartesian_2d(axes.x, axes.y)
        .map_err(|x| x.to_string())?;
    chart
        .configure_mesh()
        .x_desc(axes.x_desc)
        .y_desc(axes.y_desc)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 18))
        .draw()
        .map_err(|x| x.to_string())?;
    Ok(chart)
}

type BarChart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<
        plotters::coord::types::RangedCoordf64,
        plotters::coord::ranged1d::SegmentedCoord<plotters::coord::types::RangedCoordusize>,
    >,
>;

/// Horizontal bars, one labelled row each; x from 0 to `max`.
fn bar_rows<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: String,
    x_desc: &str,
    max: f64,
    labels: Vec<String>,
) -> Result<BarChart<'a, 'b>, String> {
    let n = labels.len();
    let mut chart = ChartBuilder::on(root)
        .caption(caption, (FONT, 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(260)
        .build_cartesian_2d(
            0.0..max.max(1e-6),
            (0..n.saturating_sub(1)).into_segmented(),
        )
        .map_err(|x| x.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 18))
        .disable_y_mesh()
        .draw()
        .map_err(|x| x.to_string())?;
    Ok(chart)
}

/// p50 bars with their 95% confidence interval as a black whisker and the
/// p99 as a red tick, one row per configuration.
fn latency(model: &str, rows: &[&ResultRecord], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let max = rows
        .iter()
        .map(|r| r.latency_ms.as_ref().map_or(0.0, |l| l.p99))
        .fold(0.0f64, f64::max)
        * 1.1;
    let mut chart = bar_rows(
        &root,
        format!("{model}: latency per configuration (p50 bar with 95% CI, p99 tick)"),
        "latency (ms)",
        max,
        rows.iter().map(|r| label(r)).collect(),
    )
    .map_err(&e)?;
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
        // The whisker: how well the median is known (often thinner than
        // the line on a quiet machine, which is the point).
        let [lo, hi] = l.p50_ci95;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![
                    (lo, SegmentValue::CenterOf(i)),
                    (hi, SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            )))
            .map_err(|x| e(x.to_string()))?;
        chart
            .draw_series(
                [lo, hi]
                    .into_iter()
                    .map(|x| Circle::new((x, SegmentValue::CenterOf(i)), 3, BLACK.filled())),
            )
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
    let mut chart = xy_chart(
        &root,
        (format!("{model}: throughput vs batch"), 26),
        Axes {
            x: 0.0..max_b * 1.05 + 0.5,
            y: 0.0..max_t.max(1e-6),
            x_desc: "batch size",
            y_desc: "throughput (items/s)",
            y_area: 90,
        },
    )
    .map_err(&e)?;
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
    legend_at(chart, SeriesLabelPosition::UpperLeft)
}

fn legend_at<'a, 'b: 'a, Y: Ranged<ValueType = f64>>(
    chart: &mut Chart<'a, 'b, Y>,
    position: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(position)
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
        let dims = crate::dim_items(r);
        let key = format!("{} b{} {}", r.case.backend, r.case.batch, dims.join(","));
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    let mut chart = xy_chart(
        &root,
        (
            format!("{model}: thread scaling (p50 speed-up; dashed: ideal)"),
            26,
        ),
        Axes {
            x: 0.5..max_threads + 0.5,
            y: 0.0..max_threads * 1.15,
            x_desc: "threads",
            y_desc: "speed-up",
            y_area: 70,
        },
    )
    .map_err(&e)?;
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

/// Latency against throughput, one line per (backend, threads) over batch
/// sizes; configurations no other one beats on both axes are ringed.
fn frontier(model: &str, rows: &[&ResultRecord], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let point = |r: &ResultRecord| {
        (
            r.latency_ms.as_ref().map_or(0.0, |l| l.p50),
            r.throughput_items_s.unwrap_or(0.0),
        )
    };
    let max_x = rows.iter().map(|r| point(r).0).fold(0.0f64, f64::max) * 1.1;
    let max_y = rows.iter().map(|r| point(r).1).fold(0.0f64, f64::max) * 1.15;
    let mut chart = xy_chart(
        &root,
        (
            format!("{model}: latency vs throughput (ringed: Pareto frontier)"),
            26,
        ),
        Axes {
            x: 0.0..max_x.max(1e-6),
            y: 0.0..max_y.max(1e-6),
            x_desc: "p50 latency per batch (ms)",
            y_desc: "throughput (items/s)",
            y_area: 90,
        },
    )
    .map_err(&e)?;
    for (k, (name, mut pts)) in series(rows).into_iter().enumerate() {
        pts.sort_by_key(|r| r.case.batch);
        let xy: Vec<(f64, f64)> = pts.iter().map(|r| point(r)).collect();
        line_with_markers(&mut chart, xy, name, PALETTE[k % PALETTE.len()]).map_err(&e)?;
    }
    let pareto: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| point(r))
        .filter(|&(x, y)| {
            !rows
                .iter()
                .map(|r| point(r))
                .any(|(ox, oy)| ox <= x && oy >= y && (ox < x || oy > y))
        })
        .collect();
    chart
        .draw_series(
            pareto
                .into_iter()
                .map(|p| Circle::new(p, 11, BLACK.stroke_width(2))),
        )
        .map_err(|x| e(x.to_string()))?;
    // High throughput at low latency is top left: keep the legend away.
    legend_at(&mut chart, SeriesLabelPosition::LowerRight).map_err(&e)?;
    root.present().map_err(|x| e(x.to_string()))
}

/// Load (model to runnable session) and first inference per backend, for
/// its smallest configuration: what a cold process pays before steady state.
fn cold_start(model: &str, rows: &[&ResultRecord], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut firsts: Vec<&ResultRecord> = Vec::new();
    for r in rows.iter().filter(|r| r.load_ms.is_some()) {
        match firsts.iter_mut().find(|f| f.case.backend == r.case.backend) {
            Some(f) if (r.case.batch, r.case.threads) < (f.case.batch, f.case.threads) => *f = r,
            Some(_) => {}
            None => firsts.push(r),
        }
    }
    let total = |r: &ResultRecord| r.load_ms.unwrap_or(0.0) + r.first_ms.unwrap_or(0.0);
    let max = firsts.iter().map(|r| total(r)).fold(0.0f64, f64::max) * 1.1;
    let mut chart = bar_rows(
        &root,
        format!("{model}: cold start (load, then first inference; blue = load)"),
        "time (ms)",
        max,
        firsts.iter().map(|r| label(r)).collect(),
    )
    .map_err(&e)?;
    for (i, r) in firsts.iter().enumerate() {
        let load = r.load_ms.unwrap_or(0.0);
        for (from, to, colour) in [(0.0, load, PALETTE[0]), (load, total(r), PALETTE[3])] {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (from, SegmentValue::Exact(i)),
                        (to, SegmentValue::Exact(i + 1)),
                    ],
                    colour.mix(0.85).filled(),
                )))
                .map_err(|x| e(x.to_string()))?;
        }
    }
    root.present().map_err(|x| e(x.to_string()))
}

/// Median latency per backend (rows) and (threads, batch) (columns),
/// coloured by how far each cell is from the fastest backend of its column.
fn heatmap(model: &str, rows: &[&ResultRecord], path: &Path) -> Result<(), PlotError> {
    let e = err(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut backends: Vec<&str> = Vec::new();
    let mut columns: Vec<(u32, u32)> = Vec::new();
    for r in rows {
        if !backends.contains(&r.case.backend.as_str()) {
            backends.push(&r.case.backend);
        }
        if !columns.contains(&(r.case.threads, r.case.batch)) {
            columns.push((r.case.threads, r.case.batch));
        }
    }
    columns.sort_unstable();
    let p50 = |b: &str, c: (u32, u32)| {
        rows.iter()
            .find(|r| r.case.backend == b && (r.case.threads, r.case.batch) == c)
            .and_then(|r| r.latency_ms.as_ref().map(|l| l.p50))
    };
    let (nx, ny) = (columns.len(), backends.len());
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{model}: p50 ms per backend and (threads, batch); \
                 darker = slower than the column's best"
            ),
            (FONT, 22),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(200)
        .build_cartesian_2d(
            (0..nx.saturating_sub(1)).into_segmented(),
            (0..ny.saturating_sub(1)).into_segmented(),
        )
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_labels(nx)
        .y_labels(ny)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => columns
                .get(*i)
                .map(|(t, b)| format!("t{t} b{b}"))
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => backends
                .get(*i)
                .map(|b| (*b).to_owned())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .label_style((FONT, 15))
        .disable_mesh()
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (ix, &c) in columns.iter().enumerate() {
        let best = backends
            .iter()
            .filter_map(|b| p50(b, c))
            .fold(f64::INFINITY, f64::min);
        for (iy, b) in backends.iter().enumerate() {
            let Some(v) = p50(b, c) else { continue };
            // 1x -> white-ish, 4x or more -> full colour.
            let t = ((v / best).log2() / 2.0).clamp(0.0, 1.0);
            let shade = RGBColor(
                (255.0 - t * (255.0 - 37.0)) as u8,
                (255.0 - t * (255.0 - 99.0)) as u8,
                (255.0 - t * (255.0 - 235.0)) as u8,
            );
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (SegmentValue::Exact(ix), SegmentValue::Exact(iy)),
                        (SegmentValue::Exact(ix + 1), SegmentValue::Exact(iy + 1)),
                    ],
                    shade.filled(),
                )))
                .map_err(|x| e(x.to_string()))?;
            let text_colour = if t > 0.5 { WHITE } else { BLACK };
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{} ms", crate::fmt_ms(v)),
                    (SegmentValue::CenterOf(ix), SegmentValue::CenterOf(iy)),
                    (FONT, 16).into_font().color(&text_colour),
                )))
                .map_err(|x| e(x.to_string()))?;
        }
    }
    root.present().map_err(|x| e(x.to_string()))
}

/// Accuracy (cosine to fp32) against speed (best items/s) for each base
/// model's precision variants, marker area by file size; the variants no
/// other one beats on both are ringed. `None` when no record is a variant.
pub fn variants_plot(records: &[ResultRecord], dir: &Path) -> Result<Option<PathBuf>, PlotError> {
    font();
    // (label, items/s, cosine, MB, passed)
    let mut points: Vec<(String, f64, f64, f64, bool)> = Vec::new();
    let best = |model: &str| crate::best_throughput(records, model);
    for (m, base, a) in crate::variant_models(records) {
        if !points.iter().any(|p| p.0 == format!("{base} fp32"))
            && let Some(t) = best(base)
        {
            points.push((
                format!("{base} fp32"),
                t,
                1.0,
                a.fp32_size_bytes as f64 / 1e6,
                true,
            ));
        }
        if let Some(t) = best(m) {
            points.push((
                format!("{base} {}", a.variant),
                t,
                a.min_cosine,
                a.size_bytes as f64 / 1e6,
                a.passed,
            ));
        }
    }
    if points.len() < 2 {
        return Ok(None);
    }
    std::fs::create_dir_all(dir).map_err(|e| PlotError {
        path: dir.to_owned(),
        detail: e.to_string(),
    })?;
    let path = dir.join("variants.png");
    let e = err(&path);
    let root = BitMapBackend::new(&path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    // Room right of the fastest point for its label (about a quarter of
    // the plot width at 15 px).
    let max_x = points.iter().map(|p| p.1).fold(0.0f64, f64::max) * 1.45;
    let min_y = points.iter().map(|p| p.2).fold(1.0f64, f64::min);
    let lo = (min_y - (1.0 - min_y) * 0.2).min(0.98);
    let mut chart = xy_chart(
        &root,
        (
            "precision variants: accuracy vs speed (area = file size; ringed: Pareto; red = fails the gate)"
                .into(),
            22,
        ),
        Axes {
            x: 0.0..max_x.max(1e-6),
            y: lo..1.002,
            x_desc: "best throughput (items/s)",
            y_desc: "min cosine vs fp32",
            y_area: 90,
        },
    )
    .map_err(&e)?;
    let max_mb = points.iter().map(|p| p.3).fold(1e-6f64, f64::max);
    for (label, x, y, mb, passed) in &points {
        let radius = (6.0 + 24.0 * (mb / max_mb).sqrt()) as i32;
        let colour = if *passed { PALETTE[0] } else { PALETTE[1] };
        let pareto = !points
            .iter()
            .any(|o| o.1 >= *x && o.2 >= *y && (o.1 > *x || o.2 > *y));
        chart
            .draw_series(std::iter::once(Circle::new(
                (*x, *y),
                radius,
                colour.mix(0.5).filled(),
            )))
            .map_err(|x| e(x.to_string()))?;
        if pareto {
            chart
                .draw_series(std::iter::once(Circle::new(
                    (*x, *y),
                    radius + 5,
                    BLACK.stroke_width(2),
                )))
                .map_err(|x| e(x.to_string()))?;
        }
        chart
            .draw_series(std::iter::once(Text::new(
                if *mb > 0.0 {
                    format!("  {label} ({mb:.0} MB)")
                } else {
                    format!("  {label} (quantised at load)")
                },
                (*x, *y),
                (FONT, 15).into_font(),
            )))
            .map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(Some(dir.join("variants.png")))
}

/// The drift canary over the run: its time per reading, so a reader sees
/// how much (and when) the machine's speed moved.
pub fn canary_plot(
    canary: &[handoff_results::CanaryPoint],
    dir: &Path,
) -> Result<Option<PathBuf>, PlotError> {
    let points: Vec<(f64, f64)> = canary
        .iter()
        .filter_map(|c| c.ms.map(|m| (c.t_s, m)))
        .collect();
    if points.len() < 2 {
        return Ok(None);
    }
    font();
    std::fs::create_dir_all(dir).map_err(|x| err(dir)(x.to_string()))?;
    let path = dir.join("canary.png");
    let e = err(&path);
    let root = BitMapBackend::new(&path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let t_max = points.iter().map(|p| p.0).fold(0.0f64, f64::max).max(1e-3);
    let y_max = points.iter().map(|p| p.1).fold(0.0f64, f64::max) * 1.15;
    let mut chart = xy_chart(
        &root,
        (
            "Drift canary: 128³ f32 matmul on CPU 0 between rounds".into(),
            22,
        ),
        Axes {
            x: 0.0..t_max * 1.02,
            y: 0.0..y_max,
            x_desc: "seconds since the run started",
            y_desc: "canary ms (higher: machine slower)",
            y_area: 70,
        },
    )
    .map_err(&e)?;
    chart
        .draw_series(
            points
                .iter()
                .map(|p| Circle::new(*p, 3, PALETTE[0].filled())),
        )
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(Some(dir.join("canary.png")))
}

/// Achieved GFLOP/s per configuration (bars, one colour per thread count)
/// under the machine's matmul peak at each thread count (dashed lines of the
/// same colour), labelled with the fraction of the peak. `None` when no
/// case has a FLOP count.
pub fn roofline_plot(
    records: &[ResultRecord],
    peak: Option<&crate::roofline::MachinePeak>,
    dir: &Path,
) -> Result<Option<PathBuf>, PlotError> {
    font();
    let rows: Vec<(&ResultRecord, f64)> = records
        .iter()
        .filter_map(|r| crate::roofline::achieved_gflops(r).map(|g| (r, g)))
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    std::fs::create_dir_all(dir).map_err(|x| err(dir)(x.to_string()))?;
    let path = dir.join("roofline.png");
    let e = err(&path);
    let root = BitMapBackend::new(&path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let peaks = peak.map(|p| p.gflops.clone()).unwrap_or_default();
    let max = rows
        .iter()
        .map(|(_, g)| *g)
        .chain(peaks.values().copied())
        .fold(0.0f64, f64::max)
        // Room on the right for the legend.
        * 1.45;
    let threads: Vec<u32> = {
        let mut t: Vec<u32> = rows.iter().map(|(r, _)| r.case.threads).collect();
        t.sort_unstable();
        t.dedup();
        t
    };
    let colour =
        |t: u32| PALETTE[threads.iter().position(|x| *x == t).unwrap_or(0) % PALETTE.len()];
    let mut chart = bar_rows(
        &root,
        "Roofline: achieved GFLOP/s per case vs matmul peak (dashed)".into(),
        "GFLOP/s (FLOPs per inference / median latency)",
        max,
        rows.iter()
            .map(|(r, _)| format!("{} {}", r.case.model, label(r)))
            .collect(),
    )
    .map_err(&e)?;
    let n = rows.len();
    for (i, (r, g)) in rows.iter().enumerate() {
        let c = colour(r.case.threads);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*g, SegmentValue::Exact(i + 1)),
                ],
                c.mix(0.8).filled(),
            )))
            .map_err(|x| e(x.to_string()))?;
        if let Some(p) = peaks.get(&r.case.threads) {
            chart
                .draw_series(std::iter::once(Text::new(
                    format!(" {:.0}%", 100.0 * g / p),
                    (*g, SegmentValue::CenterOf(i)),
                    (FONT, 14).into_font(),
                )))
                .map_err(|x| e(x.to_string()))?;
        }
    }
    for (t, p) in &peaks {
        if !threads.contains(t) {
            continue;
        }
        let c = colour(*t);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(*p, SegmentValue::Exact(0)), (*p, SegmentValue::Exact(n))],
                8,
                6,
                c.stroke_width(2),
            ))
            .map_err(|x| e(x.to_string()))?
            .label(format!("matmul peak, {t} thread(s): {p:.0} GFLOP/s"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    if !peaks.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 15))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    drop(chart);
    drop(root);
    Ok(Some(path.clone()))
}
