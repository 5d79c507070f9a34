//! `loss.svg` in the run directory: training and validation loss against steps, redrawn at
//! each evaluation so a running job can be watched.

use plotters::prelude::*;
use std::path::Path;

/// What `loss.svg` shows: (step, value) series.
#[derive(Debug, Default)]
pub struct Curves {
    /// The training loss of each step.
    pub train: Vec<(usize, f64)>,
    /// The validation loss at each evaluation.
    pub valid: Vec<(usize, f64)>,
    /// A preference objective's reward margins (`rewards/margins`), drawn in a second panel
    /// below the loss: the loss of DPO and its relatives says little on its own (ln 2 at the
    /// start, whatever the data), the margin between chosen and rejected is what grows.
    pub margins: Vec<(usize, f64)>,
    /// The reward margins on the validation pairs, at each evaluation.
    pub val_margins: Vec<(usize, f64)>,
}

/// Draw `curves` into `path`.
pub fn loss_curve(path: &Path, curves: &Curves) -> Result<(), String> {
    if curves.train.is_empty() {
        return Ok(());
    }
    let with_margins = curves.margins.iter().chain(&curves.val_margins).any(|p| p.1.is_finite());
    let root =
        SVGBackend::new(path, (800, if with_margins { 800 } else { 480 })).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels =
        if with_margins { root.split_vertically(480) } else { (root.clone(), root.clone()) };
    let steps = curves.train.iter().chain(&curves.valid).chain(&curves.margins).map(|p| p.0);
    let max_step = steps.max().unwrap_or(1).max(1);
    panel(&panels.0, "loss", max_step, &curves.train, &curves.valid)?;
    if with_margins {
        panel(&panels.1, "reward margin", max_step, &curves.margins, &curves.val_margins)?;
    }
    root.present().map_err(|e| e.to_string())
}

/// One chart: the training series in blue, the validation series in red.
fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    name: &str,
    max_step: usize,
    train: &[(usize, f64)],
    valid: &[(usize, f64)],
) -> Result<(), String> {
    let finite = |p: &&(usize, f64)| p.1.is_finite();
    let values = || train.iter().chain(valid).filter(finite).map(|p| p.1);
    // Losses start at 0; margins may be negative.
    let lo = values().fold(0.0, f64::min) * 1.05;
    let hi = values().fold(0.0, f64::max).max(lo + 1e-3) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(name, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0usize..max_step, lo..hi)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("step").y_desc(name).draw().map_err(|e| e.to_string())?;
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
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::Curves;

    #[test]
    fn draws_both_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        let curves = Curves {
            train: vec![(1, 3.0), (2, 2.0), (3, 1.5)],
            valid: vec![(3, 1.8)],
            ..Curves::default()
        };
        super::loss_curve(&path, &curves).unwrap();
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.contains("<polyline") && svg.contains("validation"));
        assert!(!svg.contains("reward margin"), "SFT has no margins panel");
    }

    #[test]
    fn draws_margins_below_the_loss() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        let curves = Curves {
            train: vec![(1, 0.69), (2, 0.6), (3, 0.5)],
            margins: vec![(1, 0.0), (2, -0.1), (3, 0.4)],
            val_margins: vec![(3, f64::NAN)],
            ..Curves::default()
        };
        super::loss_curve(&path, &curves).unwrap();
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.contains("reward margin") && svg.contains("height=\"800\""), "{svg}");
        // The margin panel adds its own lines beside the loss panel's.
        let loss_only = dir.path().join("loss-only.svg");
        let curves = Curves { margins: vec![], val_margins: vec![], ..curves };
        super::loss_curve(&loss_only, &curves).unwrap();
        let plain = std::fs::read_to_string(loss_only).unwrap();
        assert!(svg.matches("<polyline").count() > plain.matches("<polyline").count());
        assert!(!plain.contains("reward margin"));
    }
}
