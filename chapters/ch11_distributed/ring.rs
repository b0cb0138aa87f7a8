//! The ring all-reduce, written out: what MPI (and NCCL) do inside one `all_reduce_sum` call
//! for large buffers, run here on `p` buffers in memory, with the picture of its steps.

use anyhow::Result;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

// ANCHOR: ring
/// Sums `p` equal-length buffers element-wise, leaving the sum in every one, as `p` ranks on
/// a ring do: each buffer is cut into `p` chunks; rank `r` only ever sends to rank `r + 1`.
/// Returns the values each rank sent.
pub fn ring_all_reduce(bufs: &mut [Vec<f32>]) -> usize {
    let p = bufs.len();
    let n = bufs.first().map_or(0, Vec::len);
    assert!(
        bufs.iter().all(|b| b.len() == n),
        "buffers of different lengths"
    );
    let chunk = |c: usize| (c * n / p)..((c + 1) * n / p); // chunk c of every buffer
    let mut sent = 0;
    // Reduce-scatter: at step s, rank r passes chunk (r - s) mod p to rank r + 1, which adds
    // it to its own. After p - 1 steps rank r holds chunk (r + 1) mod p summed over all ranks.
    for s in 0..p.saturating_sub(1) {
        let messages: Vec<(usize, usize, Vec<f32>)> = (0..p)
            .map(|r| {
                let c = (r + p - s) % p;
                ((r + 1) % p, c, bufs[r][chunk(c)].to_vec())
            })
            .collect();
        for (to, c, values) in messages {
            sent += values.len();
            for (x, v) in bufs[to][chunk(c)].iter_mut().zip(values) {
                *x += v;
            }
        }
    }
    // All-gather: at step s, rank r passes the finished chunk (r + 1 - s) mod p to rank r + 1,
    // which keeps it. After p - 1 steps every rank holds every finished chunk.
    for s in 0..p.saturating_sub(1) {
        let messages: Vec<(usize, usize, Vec<f32>)> = (0..p)
            .map(|r| {
                let c = (r + 1 + p - s) % p;
                ((r + 1) % p, c, bufs[r][chunk(c)].to_vec())
            })
            .collect();
        for (to, c, values) in messages {
            sent += values.len();
            bufs[to][chunk(c)].copy_from_slice(&values);
        }
    }
    sent / p.max(1)
}
// ANCHOR_END: ring

/// Which ranks' contributions each (rank, chunk) holds after each step of the ring, as bit
/// sets: the same schedule as [`ring_all_reduce`], kept for the picture.
pub fn ring_states(p: usize) -> Vec<(String, Vec<Vec<u64>>)> {
    let mut state: Vec<Vec<u64>> = (0..p).map(|r| vec![1 << r; p]).collect();
    let mut states = vec![("start".to_string(), state.clone())];
    for s in 0..p - 1 {
        let before = state.clone();
        for r in 0..p {
            let c = (r + p - s) % p;
            state[(r + 1) % p][c] |= before[r][c];
        }
        states.push((format!("reduce-scatter {}", s + 1), state.clone()));
    }
    for s in 0..p - 1 {
        let before = state.clone();
        for r in 0..p {
            let c = (r + 1 + p - s) % p;
            state[(r + 1) % p][c] = before[r][c];
        }
        states.push((format!("all-gather {}", s + 1), state.clone()));
    }
    states
}

/// Draws [`ring_states`] for `p` ranks: one grid per step, a row per rank, a column per chunk,
/// each cell naming the ranks whose values it has summed (darker: more of them).
pub fn draw_ring(path: &Path, p: usize) -> Result<()> {
    let states = ring_states(p);
    let (cell_w, cell_h, gap) = (62i32, 26i32, 24i32);
    let grid_w = cell_w * p as i32;
    let per_row = 4usize;
    let rows = states.len().div_ceil(per_row) as i32;
    let (w, h) = (
        40 + per_row as i32 * (grid_w + gap),
        70 + rows * (cell_h * p as i32 + 60),
    );
    let path_str = path.to_string_lossy().to_string();
    let root = SVGBackend::new(&path_str, (w as u32, h as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "Ring all-reduce on {p} ranks: each rank sends 2(p-1) = {} chunks of 1/{p} of the buffer",
        2 * (p - 1)
    );
    root.draw(&Text::new(title, (20, 12), ("sans-serif", 17)))?;
    let centred = |size| {
        ("sans-serif", size)
            .into_text_style(&root)
            .pos(Pos::new(HPos::Center, VPos::Center))
    };
    for (i, (name, grid)) in states.iter().enumerate() {
        let x0 = 40 + (i % per_row) as i32 * (grid_w + gap);
        let y0 = 60 + (i / per_row) as i32 * (cell_h * p as i32 + 60);
        root.draw(&Text::new(name.clone(), (x0, y0), ("sans-serif", 14)))?;
        for (r, row) in grid.iter().enumerate() {
            let y = y0 + 12 + r as i32 * cell_h;
            if i % per_row == 0 {
                root.draw(&Text::new(
                    format!("rank {r}"),
                    (x0 - 38, y + 7),
                    ("sans-serif", 11),
                ))?;
            }
            for (c, &set) in row.iter().enumerate() {
                let x = x0 + c as i32 * cell_w;
                let k = set.count_ones() as f64 / p as f64; // share of the ranks summed
                let shade = (235.0 - 150.0 * k) as u8;
                let fill = RGBColor(shade, (shade as f64 * 1.05).min(255.0) as u8, 250);
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell_w - 2, y + cell_h - 2)],
                    fill.filled(),
                ))?;
                let label = (0..p)
                    .filter(|b| set & (1 << b) != 0)
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join("+");
                let text = if set.count_ones() as usize == p {
                    "Σ".to_string()
                } else {
                    label
                };
                root.draw(&Text::new(
                    text,
                    (x + cell_w / 2, y + cell_h / 2),
                    centred(12),
                ))?;
            }
        }
    }
    root.present()?;
    Ok(())
}
