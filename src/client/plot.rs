//! `analyze --plot out.svg`: the field's distribution (a histogram of numbers, or a bar per
//! category) and, when the answers carry their completion time (`created`), lines finished
//! per time step over the run. Drawn with plotters' SVG backend (text as SVG `<text>`, no font
//! files needed).

use plotters::prelude::*;
use std::path::Path;

/// What to draw.
pub struct PlotData<'a> {
    /// The field's name.
    pub field: Option<&'a str>,
    /// Histogram bins: (low edge, high edge, count).
    pub bins: Vec<(f64, f64, usize)>,
    /// Categories and their counts.
    pub categories: Vec<(String, usize)>,
    /// Completion times (unix seconds) of the lines that succeeded.
    pub finished_at: Vec<i64>,
}

/// Lines finished per step over the run: (seconds since the first, lines in that step), and
/// the step's length in seconds (about 40 steps; at least 1 s).
pub fn throughput(times: &[i64]) -> Option<(Vec<(f64, f64)>, i64)> {
    let (&first, &last) = (times.iter().min()?, times.iter().max()?);
    let span = last - first;
    if span < 2 {
        return None;
    }
    let step = (span / 40).max(1);
    let mut counts = vec![0usize; (span / step + 1) as usize];
    for t in times {
        counts[((t - first) / step) as usize] += 1;
    }
    Some((
        counts
            .iter()
            .enumerate()
            .map(|(i, &c)| ((i as i64 * step) as f64, c as f64))
            .collect(),
        step,
    ))
}

fn err(e: impl std::fmt::Display) -> String {
    format!("cannot draw the plot: {e}")
}

/// Draws the SVG; says what it drew.
pub fn draw(path: &Path, d: &PlotData) -> Result<String, String> {
    let rate = throughput(&d.finished_at);
    let root =
        SVGBackend::new(path, (960, if rate.is_some() { 760 } else { 400 })).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = if rate.is_some() {
        let (a, b) = root.split_vertically(380);
        (a, Some(b))
    } else {
        (root.clone(), None)
    };
    let mut drew = Vec::new();
    let field = d.field.unwrap_or("answer");
    if !d.bins.is_empty() {
        let lo = d.bins.first().map(|b| b.0).unwrap_or(0.0);
        let mut hi = d.bins.last().map(|b| b.1).unwrap_or(1.0);
        if hi <= lo {
            hi = lo + 1.0;
        }
        let top_count = d.bins.iter().map(|b| b.2).max().unwrap_or(1).max(1);
        let mut chart = ChartBuilder::on(&top)
            .caption(format!("'{field}': distribution"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(lo..hi, 0usize..top_count + top_count / 10 + 1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(field)
            .y_desc("answers")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(d.bins.iter().map(|&(a, b, c)| {
                let b = if b > a { b } else { a + (hi - lo) / 10.0 };
                Rectangle::new([(a, 0), (b, c)], BLUE.mix(0.6).filled())
            }))
            .map_err(err)?;
        drew.push("histogram");
    } else if !d.categories.is_empty() {
        let n = d.categories.len();
        let top_count = d.categories.iter().map(|c| c.1).max().unwrap_or(1).max(1);
        let names: Vec<String> = d.categories.iter().map(|c| c.0.clone()).collect();
        let mut chart = ChartBuilder::on(&top)
            .caption(format!("'{field}': counts"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(
                (0..n.saturating_sub(1)).into_segmented(),
                0usize..top_count + top_count / 10 + 1,
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc("answers")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(BLUE.mix(0.6).filled())
                    .margin(20)
                    .data(d.categories.iter().enumerate().map(|(i, (_, c))| (i, *c))),
            )
            .map_err(err)?;
        drew.push("category counts");
    }
    if let (Some((points, step)), Some(area)) = (rate, bottom) {
        let x_max = points.last().map(|p| p.0).unwrap_or(1.0).max(1.0) + step as f64;
        let y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("lines finished per {step} s"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the first answer")
            .y_desc("lines")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(points, RED.stroke_width(2)))
            .map_err(err)?;
        drew.push("throughput over time");
    }
    root.present().map_err(err)?;
    if drew.is_empty() {
        return Ok("nothing to plot (no --field values and no completion times)".into());
    }
    Ok(drew.join(" and "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_counts_lines_per_step() {
        assert_eq!(throughput(&[5, 6]), None, "under 2 s: no curve");
        let (points, step) = throughput(&[100, 100, 101, 102, 102, 102]).expect("curve");
        assert_eq!(step, 1);
        assert_eq!(points, vec![(0.0, 2.0), (1.0, 1.0), (2.0, 3.0)]);
        let times: Vec<i64> = (0..400).collect();
        let (points, step) = throughput(&times).expect("curve");
        assert_eq!(step, 9);
        assert_eq!(points.iter().map(|p| p.1).sum::<f64>(), 400.0);
    }
}
