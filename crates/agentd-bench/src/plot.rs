//! The PNG: tokens/s against concurrent sessions (throughput scenario) and p99 added latency against
//! concurrent streams (latency scenario), one line per server.
//!
//! Text is drawn with a TrueType font read at run time (plotters' pure-Rust `ab_glyph` backend, so no
//! system library is linked); DejaVu Sans is looked up where Debian and most distributions put it.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::combinators::BindKeyPoints;
use plotters::prelude::*;

use crate::report::{Cell, Results};
use crate::{Error, Result};

/// Where a sans-serif TrueType font is usually found.
const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers the font once per process; an error says which paths were tried.
pub(crate) fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let env_font = std::env::var("AGENTD_BENCH_FONT").ok();
            let candidates = env_font.iter().map(String::as_str).chain(FONT_PATHS);
            for path in candidates {
                if let Ok(bytes) = std::fs::read(path) {
                    // plotters keeps a `'static` reference to the font; it lives as long as the process.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                        .is_ok()
                    {
                        return Ok(());
                    }
                }
            }
            Err(format!(
                "no usable TrueType font (tried AGENTD_BENCH_FONT and {})",
                FONT_PATHS.join(", ")
            ))
        })
        .clone()
        .map_err(Error::new)
}

fn err<E: std::fmt::Display>(e: E) -> Error {
    Error::new(format!("plot: {e}"))
}

/// Colors per column, in table order.
const COLORS: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(31, 119, 180),
    RGBColor(148, 103, 189),
];

type Series = (String, Vec<(f64, f64)>);

fn series(
    results: &Results,
    pick: impl Fn(&crate::report::TargetReport) -> Vec<(f64, f64)>,
) -> Vec<Series> {
    results
        .targets
        .iter()
        .map(|t| (t.label.clone(), pick(t)))
        .collect()
}

fn bounds(all: &[Series], min_floor: f64) -> (f64, f64) {
    let ys = all
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .filter(|y| *y > 0.0);
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if lo > hi {
        return (min_floor, min_floor * 10.0);
    }
    ((lo / 2.0).max(min_floor), hi * 2.0)
}

/// Draws the two panels into `path`.
pub fn draw(results: &Results, path: &Path) -> Result<()> {
    ensure_font()?;
    let throughput = series(results, |t| {
        t.throughput
            .iter()
            .filter_map(|(n, c)| match c {
                Cell::Ok(v) if v.tokens_per_s > 0.0 => Some((*n as f64, v.tokens_per_s)),
                _ => None,
            })
            .collect()
    });
    let latency = series(results, |t| {
        t.latency
            .iter()
            .filter_map(|(n, c)| match c {
                Cell::Ok(v) if v.added.count > 0 => Some((*n as f64, v.added.p99_ms.max(0.01))),
                _ => None,
            })
            .collect()
    });

    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(700);
    let title_suffix = if results.quick { " (--quick)" } else { "" };

    let sizes = &results.sizes;
    panel(
        &left,
        &Panel {
            title: &format!(
                "Throughput, {}-token replies, no upstream delay{title_suffix}",
                sizes.throughput_tokens
            ),
            x_desc: "concurrent sessions",
            y_desc: "tokens delivered / s",
            x_ticks: &sizes.throughput_sessions,
            y_floor: 1.0,
            data: &throughput,
        },
    )?;
    let rate = 1000u64.checked_div(sizes.latency_delay_ms).unwrap_or(0);
    panel(
        &right,
        &Panel {
            title: &format!("p99 added latency, streams at {rate} tokens/s{title_suffix}"),
            x_desc: "concurrent streams",
            y_desc: "p99 added latency (ms)",
            x_ticks: &sizes.latency_sessions,
            y_floor: 0.01,
            data: &latency,
        },
    )?;
    root.present().map_err(err)?;
    Ok(())
}

/// Axis labels without clutter: 2.5, 40, 12k, 1.5M.
fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// One panel: log-log, x at the measured concurrency levels, one line per server.
struct Panel<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x_ticks: &'a [usize],
    /// Lowest y value the axis may start at.
    y_floor: f64,
    data: &'a [Series],
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    p: &Panel<'_>,
) -> Result<()> {
    let lo = p.x_ticks.iter().copied().min().unwrap_or(1) as f64;
    let hi = p.x_ticks.iter().copied().max().unwrap_or(10) as f64;
    let (y_lo, y_hi) = bounds(p.data, p.y_floor);
    let mut chart = ChartBuilder::on(area)
        .caption(p.title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(
            // Ticks at the measured concurrency levels only.
            ((lo / 1.5)..(hi * 1.5))
                .log_scale()
                .with_key_points(p.x_ticks.iter().map(|n| *n as f64).collect()),
            (y_lo..y_hi).log_scale(),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(p.x_desc)
        .y_desc(p.y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_labels(8)
        .y_label_formatter(&|v| short(*v))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, (label, pts)) in p.data.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}
