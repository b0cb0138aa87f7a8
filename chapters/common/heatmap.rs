//! Heat maps with characters on the axes: attention weights per head, bigram tables.

use anyhow::Result;
use plotters::prelude::*;
use std::path::Path;

/// One panel: a title and a `rows x cols` matrix in row-major order, values in [0, 1].
pub struct Panel {
    pub title: String,
    pub values: Vec<f32>,
}

/// A perceptually even colour ramp (a short viridis-like gradient) for v in [0, 1].
fn ramp(v: f32) -> RGBColor {
    const STOPS: [(f32, (u8, u8, u8)); 5] = [
        (0.00, (255, 255, 255)),
        (0.25, (199, 233, 180)),
        (0.50, (65, 182, 196)),
        (0.75, (34, 94, 168)),
        (1.00, (8, 29, 88)),
    ];
    let v = v.clamp(0.0, 1.0);
    for w in STOPS.windows(2) {
        let ((a, ca), (b, cb)) = (w[0], w[1]);
        if v <= b {
            let f = (v - a) / (b - a);
            let mix = |x: u8, y: u8| (x as f32 + f * (y as f32 - x as f32)).round() as u8;
            return RGBColor(mix(ca.0, cb.0), mix(ca.1, cb.1), mix(ca.2, cb.2));
        }
    }
    RGBColor(8, 29, 88)
}

/// How a character is shown on an axis (spaces and newlines made visible).
pub fn show_char(c: char) -> String {
    match c {
        ' ' => "␣".to_string(),
        '\n' => "⏎".to_string(),
        c => c.to_string(),
    }
}

/// Draws `panels` in a grid of `cols` columns, each a heat map whose rows are labelled by
/// `row_labels` (the query) and columns by `col_labels` (the key), into an SVG file.
pub fn heatmap_grid(
    path: &Path,
    title: &str,
    panels: &[Panel],
    row_labels: &[String],
    col_labels: &[String],
    cols: usize,
) -> Result<()> {
    let (nr, nc) = (row_labels.len(), col_labels.len());
    let cell = if nr.max(nc) > 40 { 9 } else { 22 };
    let label = if cell > 12 { 14 } else { 8 };
    let margin = label * 2 + 8;
    let panel_w = margin + nc as u32 * cell + 16;
    let panel_h = margin + 24 + nr as u32 * cell + 8;
    let grid_cols = cols.max(1).min(panels.len().max(1));
    let grid_rows = panels.len().div_ceil(grid_cols);
    let width = grid_cols as u32 * panel_w + 20;
    let height = grid_rows as u32 * panel_h + 50 + 30;
    let path_str = path.to_string_lossy().to_string();
    let root = SVGBackend::new(&path_str, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw(&Text::new(
        title.to_string(),
        (10, 10),
        ("sans-serif", 20).into_font(),
    ))?;
    let mono = ("monospace", label).into_font();
    for (p, panel) in panels.iter().enumerate() {
        let x0 = 10 + (p % grid_cols) as i32 * panel_w as i32;
        let y0 = 45 + (p / grid_cols) as i32 * panel_h as i32;
        root.draw(&Text::new(
            panel.title.clone(),
            (x0 + margin as i32, y0),
            ("sans-serif", 15).into_font(),
        ))?;
        let top = y0 + 24 + margin as i32;
        let left = x0 + margin as i32;
        for (j, l) in col_labels.iter().enumerate() {
            let x = left + j as i32 * cell as i32 + cell as i32 / 3;
            root.draw(&Text::new(
                l.clone(),
                (x, top - label as i32 - 4),
                mono.clone(),
            ))?;
        }
        for (i, l) in row_labels.iter().enumerate() {
            let y = top + i as i32 * cell as i32 + (cell as i32 - label as i32) / 2;
            root.draw(&Text::new(
                l.clone(),
                (x0 + margin as i32 - label as i32 - 2, y),
                mono.clone(),
            ))?;
            for j in 0..nc {
                let v = panel.values[i * nc + j];
                let (cx, cy) = (left + j as i32 * cell as i32, top + i as i32 * cell as i32);
                root.draw(&Rectangle::new(
                    [(cx, cy), (cx + cell as i32 - 1, cy + cell as i32 - 1)],
                    ramp(v).filled(),
                ))?;
            }
        }
    }
    // Colour bar.
    let (bx, by) = (10, height as i32 - 22);
    for k in 0..100 {
        root.draw(&Rectangle::new(
            [(bx + 30 + k * 2, by), (bx + 32 + k * 2, by + 10)],
            ramp(k as f32 / 99.0).filled(),
        ))?;
    }
    root.draw(&Text::new(
        "0",
        (bx + 18, by),
        ("sans-serif", 12).into_font(),
    ))?;
    root.draw(&Text::new(
        "1",
        (bx + 236, by),
        ("sans-serif", 12).into_font(),
    ))?;
    root.present()?;
    Ok(())
}
