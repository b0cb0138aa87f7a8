//! The spine every chapter stands on: backend choice, data, tokenizer, batches, the
//! training loop, sampling, flags, and what a run writes to disk.

pub mod backend;
pub mod cli;
pub mod data;
pub mod dataset;
pub mod heatmap;
pub mod report;
pub mod sample;
pub mod tokenizer;
pub mod train;

use burn::prelude::*;

/// Runs a binary's body and turns an error into one readable message and exit code 1
/// (anyhow's `Debug` output, which `fn main() -> Result` would print, adds a stack backtrace
/// whenever `RUST_BACKTRACE` is set).
pub fn exit_on_error(body: impl FnOnce() -> anyhow::Result<()>) -> std::process::ExitCode {
    match body() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints a notebook-style section heading: `== 1.3 Batches ==`.
pub fn section(number: &str, title: &str) {
    println!("\n== {number} {title} ==");
}

/// A small 2-D tensor as aligned rows, for printing.
pub fn fmt_matrix(t: &Tensor<2>, decimals: usize) -> String {
    let [rows, cols] = t.dims();
    let v = t.to_data().try_to_vec::<f32>().expect("f32 tensor");
    let width = decimals + 4;
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = (0..cols)
                .map(|c| format!("{:>width$.decimals$}", v[r * cols + c]))
                .collect();
            format!("[{}]", cells.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A 2-D integer tensor as rows, for printing.
pub fn fmt_ids(t: &Tensor<2, Int>) -> String {
    let [rows, cols] = t.dims();
    let v = t
        .to_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .expect("int tensor");
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = (0..cols)
                .map(|c| format!("{:>3}", v[r * cols + c]))
                .collect();
            format!("[{}]", cells.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Largest absolute difference between two tensors of the same shape (on any devices).
pub fn max_abs_diff<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> f32 {
    let a = a.to_data().try_to_vec::<f32>().expect("f32 tensor");
    let b = b.to_data().try_to_vec::<f32>().expect("f32 tensor");
    assert_eq!(a.len(), b.len(), "tensors of different sizes");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
