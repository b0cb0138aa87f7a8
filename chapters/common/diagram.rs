//! Flow diagrams drawn from a run: one box per operation, labelled with the shape of what
//! it produces (read from the real tensors by the caller), side inputs on the left and
//! residual connections on the right.

use crate::common::report::Area;
use anyhow::Result;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// One operation of a diagram.
pub struct Node {
    /// What it computes (`"softmax over keys"`).
    pub op: String,
    /// The shape of its result (`"[b=4, t=8, t=8]"`), or empty.
    pub shape: String,
    /// A second input drawn on the left (`"V"` for `· V`).
    pub side: Option<String>,
    /// The index of an earlier node whose output this node adds (a residual connection).
    pub adds: Option<usize>,
}

impl Node {
    pub fn new(op: &str, shape: impl Into<String>) -> Self {
        Self {
            op: op.to_string(),
            shape: shape.into(),
            side: None,
            adds: None,
        }
    }

    pub fn with_side(mut self, side: &str) -> Self {
        self.side = Some(side.to_string());
        self
    }

    pub fn adding(mut self, from: usize) -> Self {
        self.adds = Some(from);
        self
    }
}

/// One column of the diagram, read top to bottom.
pub struct Column {
    pub title: String,
    pub nodes: Vec<Node>,
}

/// A shape with its names, e.g. `shape(&["b", "t", "c"], &[4, 8, 32])` is `[b=4, t=8, c=32]`.
pub fn shape(names: &[&str], dims: &[usize]) -> String {
    assert_eq!(names.len(), dims.len(), "one name per dimension");
    let parts: Vec<String> = names
        .iter()
        .zip(dims)
        .map(|(n, d)| format!("{n}={d}"))
        .collect();
    format!("[{}]", parts.join(", "))
}

const BOX_W: i32 = 250;
const BOX_H: i32 = 44;
const GAP: i32 = 26;
const SIDE_W: i32 = 90;
const COL_W: i32 = SIDE_W + 30 + BOX_W + 70;

/// Draws the columns side by side into an SVG file.
pub fn flow(path: &Path, title: &str, columns: &[Column]) -> Result<()> {
    let rows = columns.iter().map(|c| c.nodes.len()).max().unwrap_or(0) as i32;
    let width = 20 + columns.len() as i32 * COL_W;
    let height = 90 + rows * (BOX_H + GAP) + 10;
    let path_str = path.to_string_lossy().to_string();
    let root = SVGBackend::new(&path_str, (width as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw(&Text::new(
        title.to_string(),
        (10, 12),
        ("sans-serif", 18).into_font(),
    ))?;
    for (i, col) in columns.iter().enumerate() {
        let left = 10 + i as i32 * COL_W + SIDE_W + 30;
        let style = centred("sans-serif", 15);
        root.draw(&Text::new(col.title.clone(), (left + BOX_W / 2, 52), style))?;
        draw_column(&root, col, left, 75)?;
    }
    root.present()?;
    Ok(())
}

fn draw_column(root: &Area, col: &Column, left: i32, top: i32) -> Result<()> {
    let y_of = |i: usize| top + i as i32 * (BOX_H + GAP);
    let ink = RGBColor(40, 40, 40);
    for (i, node) in col.nodes.iter().enumerate() {
        let y = y_of(i);
        let fill = if node.adds.is_some() {
            RGBColor(255, 243, 205)
        } else {
            RGBColor(222, 235, 247)
        };
        root.draw(&Rectangle::new(
            [(left, y), (left + BOX_W, y + BOX_H)],
            fill.filled(),
        ))?;
        root.draw(&Rectangle::new(
            [(left, y), (left + BOX_W, y + BOX_H)],
            ink.stroke_width(1),
        ))?;
        let (cx, has_shape) = (left + BOX_W / 2, !node.shape.is_empty());
        let op_y = if has_shape { y + 14 } else { y + BOX_H / 2 };
        let font = centred("sans-serif", 14);
        root.draw(&Text::new(node.op.clone(), (cx, op_y), font))?;
        if has_shape {
            let mono = centred("monospace", 12).color(&BLUE);
            root.draw(&Text::new(node.shape.clone(), (cx, y + 32), mono))?;
        }
        if i > 0 {
            arrow(root, (cx, y_of(i - 1) + BOX_H), (cx, y), &ink)?;
        }
        if let Some(side) = &node.side {
            let (sx, sy) = (left - SIDE_W - 30, y + 8);
            root.draw(&Rectangle::new(
                [(sx, sy), (sx + SIDE_W, sy + BOX_H - 16)],
                ink.stroke_width(1),
            ))?;
            let font = centred("sans-serif", 13);
            root.draw(&Text::new(
                side.clone(),
                (sx + SIDE_W / 2, y + BOX_H / 2),
                font,
            ))?;
            arrow(
                root,
                (sx + SIDE_W, y + BOX_H / 2),
                (left, y + BOX_H / 2),
                &ink,
            )?;
        }
        if let Some(from) = node.adds {
            // Out of the earlier box's right side, down, and into this one's.
            let (x0, x1) = (left + BOX_W, left + BOX_W + 30 + 8 * (i % 2) as i32);
            let (y0, y1) = (y_of(from) + BOX_H - 10, y + BOX_H / 2);
            let path = vec![(x0, y0), (x1, y0), (x1, y1)];
            root.draw(&PathElement::new(path, ink.stroke_width(2)))?;
            arrow(root, (x1, y1), (x0, y1), &ink)?;
        }
    }
    Ok(())
}

fn centred(family: &'static str, size: u32) -> TextStyle<'static> {
    TextStyle::from((family, size).into_font()).pos(Pos::new(HPos::Center, VPos::Center))
}

/// A straight line with an arrow head at `to` (vertical or horizontal).
fn arrow(root: &Area, from: (i32, i32), to: (i32, i32), ink: &RGBColor) -> Result<()> {
    root.draw(&PathElement::new(vec![from, to], ink.stroke_width(2)))?;
    let (dx, dy) = ((to.0 - from.0).signum(), (to.1 - from.1).signum());
    let (px, py) = (-dy, dx); // perpendicular
    let back = (to.0 - 8 * dx, to.1 - 8 * dy);
    let head = vec![
        to,
        (back.0 + 5 * px, back.1 + 5 * py),
        (back.0 - 5 * px, back.1 - 5 * py),
    ];
    root.draw(&Polygon::new(head, ink.filled()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diagram_has_every_label_and_shape() {
        let dir = std::env::temp_dir().join(format!("diagram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flow.svg");
        let nodes = vec![
            Node::new("x", shape(&["b", "t"], &[2, 3])),
            Node::new("matmul", "[2, 3]").with_side("V"),
            Node::new("+", "").adding(0),
        ];
        let col = Column {
            title: "one".into(),
            nodes,
        };
        flow(&path, "test", &[col]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in ["[b=2, t=3]", "matmul", "V", "one", "test"] {
            assert!(svg.contains(text), "{text} missing");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
