//! SVG charts of a report (plotters, SVG backend only, so no system fonts are needed):
//! latency per second (p50, p99, max) and the percentile spectrum on a log
//! `1/(1-q)` axis; and an HTML page with the charts and the report's tables.

use std::path::Path;

use plotters::chart::SeriesAnno;
use plotters::coord::CoordTranslate;
use plotters::prelude::*;

use crate::histogram::decode_histogram;
use crate::report::{steps_text, Report};
use crate::Error;

const WIDTH: u32 = 960;
const PANEL: u32 = 440;
/// Quantiles from 0 up to 1 - 10^-5 (the spectrum's right end is p99.999).
const SPECTRUM_POINTS: u32 = 100;

fn plot_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    format!("drawing the chart: {e}").into()
}

/// Both charts, stacked, as one SVG document.
pub fn svg(report: &Report) -> Result<String, Error> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, 2 * PANEL)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (top, bottom) = root.split_vertically(PANEL);
        over_time(report, &top)?;
        spectrum(report, &bottom)?;
        root.present().map_err(plot_error)?;
    }
    Ok(out)
}

fn over_time(
    report: &Report,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> Result<(), Error> {
    let points = &report.series;
    let x_max = points.iter().map(|p| p.offset_s).max().unwrap_or(0) as f64 + 1.0;
    let y_max = points.iter().map(|p| p.max_ms).fold(0.01f64, f64::max) * 1.5;
    let y_min = points
        .iter()
        .map(|p| p.p50_ms)
        .filter(|v| *v > 0.0)
        .fold(y_max, f64::min)
        .max(0.001)
        / 1.5;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{}: latency per second", report.kind),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds into the measured window")
        .y_desc("latency (ms)")
        .draw()
        .map_err(plot_error)?;
    type Value = fn(&crate::report::SecondPoint) -> f64;
    let lines: [(&str, RGBColor, Value); 3] = [
        ("p50", BLUE, |p| p.p50_ms),
        ("p99", RED, |p| p.p99_ms),
        ("max", RGBColor(120, 120, 120), |p| p.max_ms),
    ];
    for (name, color, value) in lines {
        let series = chart
            .draw_series(LineSeries::new(
                points
                    .iter()
                    .filter(|p| p.count > 0)
                    .map(|p| (p.offset_s as f64 + 0.5, value(p).max(y_min))),
                color.stroke_width(2),
            ))
            .map_err(plot_error)?;
        name_line(series, name, color);
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn spectrum(
    report: &Report,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> Result<(), Error> {
    let palette = [
        RGBColor(0, 0, 0),
        BLUE,
        RED,
        RGBColor(0, 140, 0),
        RGBColor(200, 120, 0),
    ];
    let mut curves = Vec::new();
    let mut names: Vec<&String> = report.operations.keys().collect();
    // "overall" first, in black.
    names.sort_by_key(|n| (*n != "overall", (*n).clone()));
    for name in names {
        let h = decode_histogram(&report.operations[name].histogram)?;
        if h.is_empty() {
            continue;
        }
        let curve: Vec<(f64, f64)> = (0..=SPECTRUM_POINTS)
            .map(|i| {
                // x = 1/(1-q) from 1 to 10^5, evenly spaced on a log axis.
                let x = 10f64.powf(5.0 * f64::from(i) / f64::from(SPECTRUM_POINTS));
                let q = 1.0 - 1.0 / x;
                (x, h.value_at_quantile(q) as f64 / 1000.0)
            })
            .collect();
        curves.push((name.clone(), curve));
    }
    let y_max = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|(_, y)| *y))
        .fold(0.01f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption("latency by percentile", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((1f64..1e5).log_scale(), 0f64..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| percentile_label(*x))
        .draw()
        .map_err(plot_error)?;
    for (i, (name, curve)) in curves.into_iter().enumerate() {
        let color = palette[i % palette.len()];
        let series = chart
            .draw_series(LineSeries::new(curve, color.stroke_width(2)))
            .map_err(plot_error)?;
        name_line(series, name, color);
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

/// Names a line just drawn in the legend, next to a short stroke of its colour.
fn name_line(
    series: &mut SeriesAnno<'_, SVGBackend<'_>>,
    name: impl Into<String>,
    color: RGBColor,
) {
    series
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
}

/// Draws a chart's legend (the names of its lines) at `position`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), Error> {
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(position)
        .draw()
        .map_err(plot_error)
}

/// `x = 1/(1-q)` as a percentile: 10 → "90%", 1000 → "99.9%".
fn percentile_label(x: f64) -> String {
    let percentile = (100.0 - 100.0 / x).max(0.0);
    let text = format!("{percentile:.4}");
    format!("{}%", text.trim_end_matches('0').trim_end_matches('.'))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An HTML page: the report's tables and the charts.
pub fn html(report: &Report) -> Result<String, Error> {
    let svg = svg(report)?;
    let mut tables = report.text();
    if !report.steps.is_empty() {
        tables.push('\n');
        tables.push_str(&steps_text(&report.steps));
    }
    let target = report
        .target
        .as_ref()
        .map(|t| format!("{}{}", t.endpoint, t.api_root))
        .unwrap_or_else(|| "PKCS#11 token".into());
    Ok(format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>xks-loadtest {kind}</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f6f6f6;padding:1em}}</style>\n\
         </head><body>\n<h1>xks-loadtest {kind}: {target}</h1>\n<p>started {started}, {tool} {version}</p>\n\
         <pre>{tables}</pre>\n{svg}\n</body></html>\n",
        kind = escape(&report.kind),
        target = escape(&target),
        started = escape(&report.started_at),
        tool = escape(&report.tool.name),
        version = escape(&report.tool.version),
        tables = escape(&tables),
    ))
}

/// Writes the chart: HTML when `path` ends in `.html`, SVG otherwise.
pub fn write(report: &Report, path: &Path) -> Result<(), Error> {
    let text = if path.extension().is_some_and(|e| e == "html" || e == "htm") {
        html(report)?
    } else {
        svg(report)?
    };
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(1e5), "99.999%");
    }
}
