//! The PNG chart: commit → append latency under steady load, and backlog and
//! oldest-pending age at the writers' max rate, both peers on one set of axes.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::analysis::Sample;
use crate::report::Results;

const RELAY: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const DBZ: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const FLOOR: RGBColor = RGBColor(0x7f, 0x7f, 0x7f);

/// Registers the embedded DejaVu Sans as plotters' "sans-serif" (plotters'
/// ab_glyph backend has no system font lookup).
fn register_font() -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the embedded font is invalid"))
}

type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let x_max = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    let map_err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the chart: {e}");
    if log_y {
        let mut chart = builder
            .build_cartesian_2d(0f64..x_max, (1f64..y_max * 1.5).log_scale())
            .map_err(map_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the phase started")
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .light_line_style(TRANSPARENT)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(map_err)?;
        for (name, color, pts) in series {
            let c = *color;
            chart
                .draw_series(LineSeries::new(
                    pts.iter()
                        .filter(|p| p.1.is_finite())
                        .map(|&(x, y)| (x, y.max(1.0))),
                    c.stroke_width(2),
                ))
                .map_err(map_err)?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(map_err)?;
    } else {
        let mut chart = builder
            .build_cartesian_2d(0f64..x_max, 0f64..y_max * 1.1)
            .map_err(map_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the phase started")
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .light_line_style(TRANSPARENT)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(map_err)?;
        for (name, color, pts) in series {
            let c = *color;
            chart
                .draw_series(LineSeries::new(
                    pts.iter().filter(|p| p.1.is_finite()).copied(),
                    c.stroke_width(2),
                ))
                .map_err(map_err)?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(map_err)?;
    }
    Ok(())
}

fn pts(t: &[Sample], f: fn(&Sample) -> f64) -> Vec<(f64, f64)> {
    t.iter().map(|s| (s.t_s, f(s))).collect()
}

pub fn draw(r: &Results, path: &Path) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1200, 1200)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((3, 1));
    let mut peers = vec![("outbox-relay", RELAY, &r.relay)];
    if let Some(d) = &r.debezium {
        peers.push(("Debezium", DBZ, d));
    }
    if let Some(f) = &r.floor {
        // Steady only: the floor's send → append, on the same axes.
        peers.push(("floor (bare producer)", FLOOR, f));
    }
    let steady_rate = r
        .relay
        .steady
        .as_ref()
        .and_then(|s| s.target_rate)
        .unwrap_or(0.0);
    let series = |f: fn(&Sample) -> f64, steady: bool| -> Vec<Series> {
        peers
            .iter()
            .filter_map(|(n, c, p)| {
                let load = if steady {
                    p.steady.as_ref()
                } else {
                    p.max.as_ref()
                };
                load.map(|l| (*n, *c, pts(&l.timeline, f)))
            })
            .collect()
    };
    panel(
        &panels[0],
        &format!("Steady {steady_rate:.0} events/s: p99 commit → Kafka append per 250 ms"),
        "ms (log)",
        &series(|s| s.p99_ms, true),
        true,
    )?;
    panel(
        &panels[1],
        "Writers at max rate: events committed, not yet in Kafka",
        "events",
        &series(|s| s.backlog as f64, false),
        false,
    )?;
    panel(
        &panels[2],
        "Writers at max rate: age of the oldest pending event",
        "ms (log)",
        &series(|s| s.oldest_pending_ms, false),
        true,
    )?;
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}
