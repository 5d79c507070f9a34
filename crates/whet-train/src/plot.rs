//! `loss.svg` in the run directory: training and validation loss against steps, redrawn at
//! each evaluation so a running job can be watched.

use plotters::prelude::*;
use std::path::Path;

/// Draw `train` and `valid` (step, loss) series into `path`.
pub fn loss_curve(
    path: &Path,
    train: &[(usize, f64)],
    valid: &[(usize, f64)],
) -> Result<(), String> {
    if train.is_empty() {
        return Ok(());
    }
    let max_step = train.iter().chain(valid).map(|p| p.0).max().unwrap_or(1).max(1);
    let finite = |p: &&(usize, f64)| p.1.is_finite();
    let hi =
        train.iter().chain(valid).filter(finite).map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.05;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0usize..max_step, 0f64..hi)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(train.iter().filter(finite).copied(), &BLUE))
        .map_err(|e| e.to_string())?
        .label("train")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if !valid.is_empty() {
        chart
            .draw_series(LineSeries::new(valid.iter().filter(finite).copied(), &RED))
            .map_err(|e| e.to_string())?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_both_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        super::loss_curve(&path, &[(1, 3.0), (2, 2.0), (3, 1.5)], &[(3, 1.8)]).unwrap();
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.contains("<polyline") && svg.contains("validation"));
    }
}
