//! Heat maps with characters on the axes: attention weights per head, bigram tables.

use crate::common::report::Area;
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

/// Sizes in pixels, from the matrix size: small cells and labels for long sequences.
struct Layout {
    cell: u32,
    label: u32,
    margin: u32,
    panel: (u32, u32),
    grid: (usize, usize),
}

impl Layout {
    fn new((nr, nc): (usize, usize), panels: usize, cols: usize) -> Layout {
        let cell = if nr.max(nc) > 40 { 9 } else { 22 };
        let label = if cell > 12 { 14 } else { 8 };
        let margin = label * 2 + 8;
        let panel = (
            margin + nc as u32 * cell + 16,
            margin + 24 + nr as u32 * cell + 8,
        );
        let grid_cols = cols.max(1).min(panels.max(1));
        let grid = (grid_cols, panels.div_ceil(grid_cols));
        Layout {
            cell,
            label,
            margin,
            panel,
            grid,
        }
    }

    /// The whole picture: the panels, the title above them, the colour bar below.
    fn size(&self) -> (u32, u32) {
        let (w, h) = self.panel;
        (
            self.grid.0 as u32 * w + 20,
            self.grid.1 as u32 * h + 50 + 30,
        )
    }

    /// Top-left corner of panel `p`.
    fn origin(&self, p: usize) -> (i32, i32) {
        let (w, h) = self.panel;
        let (col, row) = (p % self.grid.0, p / self.grid.0);
        (10 + col as i32 * w as i32, 45 + row as i32 * h as i32)
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
    let layout = Layout::new((row_labels.len(), col_labels.len()), panels.len(), cols);
    let root = SVGBackend::new(path, layout.size()).into_drawing_area();
    root.fill(&WHITE)?;
    let font = ("sans-serif", 20).into_font();
    root.draw(&Text::new(title.to_string(), (10, 10), font))?;
    for (p, panel) in panels.iter().enumerate() {
        draw_panel(
            &root,
            &layout,
            layout.origin(p),
            panel,
            (row_labels, col_labels),
        )?;
    }
    draw_colour_bar(&root, layout.size().1 as i32 - 22)?;
    root.present()?;
    Ok(())
}

/// One heat map with its title and labels, its top-left corner at `(x0, y0)`.
fn draw_panel(
    root: &Area,
    layout: &Layout,
    (x0, y0): (i32, i32),
    panel: &Panel,
    (row_labels, col_labels): (&[String], &[String]),
) -> Result<()> {
    let (cell, label, margin) = (
        layout.cell as i32,
        layout.label as i32,
        layout.margin as i32,
    );
    let title_font = ("sans-serif", 15).into_font();
    root.draw(&Text::new(
        panel.title.clone(),
        (x0 + margin, y0),
        title_font,
    ))?;
    let (top, left) = (y0 + 24 + margin, x0 + margin);
    let mono = ("monospace", layout.label).into_font();
    for (j, l) in col_labels.iter().enumerate() {
        let x = left + j as i32 * cell + cell / 3;
        root.draw(&Text::new(l.clone(), (x, top - label - 4), mono.clone()))?;
    }
    for (i, l) in row_labels.iter().enumerate() {
        let y = top + i as i32 * cell + (cell - label) / 2;
        root.draw(&Text::new(
            l.clone(),
            (x0 + margin - label - 2, y),
            mono.clone(),
        ))?;
        for j in 0..col_labels.len() {
            let v = panel.values[i * col_labels.len() + j];
            let (cx, cy) = (left + j as i32 * cell, top + i as i32 * cell);
            let square = [(cx, cy), (cx + cell - 1, cy + cell - 1)];
            root.draw(&Rectangle::new(square, ramp(v).filled()))?;
        }
    }
    Ok(())
}

/// The colour ramp from 0 to 1, left to right, at height `y`.
fn draw_colour_bar(root: &Area, y: i32) -> Result<()> {
    let x = 10;
    for k in 0..100 {
        let step = [(x + 30 + k * 2, y), (x + 32 + k * 2, y + 10)];
        root.draw(&Rectangle::new(step, ramp(k as f32 / 99.0).filled()))?;
    }
    let font = ("sans-serif", 12).into_font();
    root.draw(&Text::new("0", (x + 18, y), font.clone()))?;
    root.draw(&Text::new("1", (x + 236, y), font))?;
    Ok(())
}
