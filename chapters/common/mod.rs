//! The spine every chapter stands on: backend choice, data, tokenizer, batches, the
//! training loop, sampling, flags, and what a run writes to disk.

pub mod backend;
pub mod cli;
pub mod data;
pub mod dataset;
pub mod diagram;
pub mod heatmap;
pub mod report;
pub mod sample;
pub mod tokenizer;
pub mod train;

use crate::common::backend::Backend;
use crate::common::cli::CommonArgs;
use crate::common::data::{Corpus, load_corpus};
use crate::common::dataset::Dataset;
use anyhow::{Context, Result};
use burn::prelude::*;
use std::path::PathBuf;

/// What every chapter binary starts from: its output folder (checked writable before any
/// training), the device seeded with `--seed`, and the corpus, encoded and split.
pub struct Run {
    pub backend: Backend,
    pub seed: u64,
    pub out: PathBuf,
    pub device: Device,
    pub corpus: Corpus,
    pub data: Dataset,
}

impl CommonArgs {
    /// Prints the chapter's title line and sets up its run. `block_size`, when known, is
    /// checked against the text's length.
    pub fn start(&self, chapter: &str, title: &str, block_size: Option<usize>) -> Result<Run> {
        let out = self.out_dir(chapter);
        check_writable(&out)?;
        let device = self.backend.open()?;
        // The one place a binary seeds Burn's (process-wide) generator: every weight and
        // random tensor after this follows from `--seed`.
        device.seed(self.seed);
        println!("{title} (backend: {})", self.backend);
        let corpus = load_corpus(self.data.as_deref())?;
        let data = Dataset::new(&corpus.text)?;
        if let Some(block_size) = block_size {
            data.check_block_size(block_size)?;
        }
        Ok(Run {
            backend: self.backend,
            seed: self.seed,
            out,
            device,
            corpus,
            data,
        })
    }
}

/// Creates `dir` and checks that a file can be written into it.
pub fn check_writable(dir: &std::path::Path) -> Result<()> {
    let probe = dir.join(".write-test");
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&probe, b""))
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| format!("cannot write into the output folder {}", dir.display()))
}

/// Runs a binary's body and turns an error into one readable message and exit code 1
/// (anyhow's `Debug` output, which `fn main() -> Result` would print, adds a stack backtrace
/// whenever `RUST_BACKTRACE` is set).
///
/// The body runs on one of rayon's worker threads ([`on_a_worker`]), with the allocator told
/// to keep the memory it frees ([`crate::keep_freed_memory`]).
pub fn exit_on_error(body: impl FnOnce() -> anyhow::Result<()> + Send) -> std::process::ExitCode {
    crate::keep_freed_memory();
    match on_a_worker(body) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ANCHOR: on_a_worker
/// Runs `body` on one of rayon's worker threads and waits for it. Chapter 5's kernels split
/// their work with rayon; called from `main`'s own thread, each call hands its work to the
/// pool and puts the caller to sleep until the last piece is done, and two threads then
/// wake up for every kernel (hundreds per training step). Called from a worker, the kernel
/// does its share itself while the other worker takes the rest: a `baby` step ran 7-12%
/// faster this way, measured in turns (chapter 5). The workers get a main thread's 8 MB stack.
pub fn on_a_worker<R: Send>(body: impl FnOnce() -> R + Send) -> R {
    // Fails only if the pool was already started, which leaves it as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(8 << 20)
        .build_global();
    rayon::scope(|_| body())
}
// ANCHOR_END: on_a_worker

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

// ANCHOR: max_diff
/// `|a - b|`, or infinity where either is NaN or infinite: a comparison must fail on a NaN,
/// and `f32::max`, which folds differences into the largest, silently drops one.
pub fn abs_diff(a: f64, b: f64) -> f64 {
    match a.is_finite() && b.is_finite() {
        true => (a - b).abs(),
        false => f64::INFINITY,
    }
}

/// The largest of some differences, a NaN among them counted as infinite.
pub fn worst(diffs: impl IntoIterator<Item = f64>) -> f64 {
    diffs.into_iter().fold(
        0.0,
        |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
    )
}

/// The largest `|a_i - b_i|` of two equally long slices (NaN or infinity: infinite).
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    worst(a.iter().zip(b).map(|(&x, &y)| abs_diff(x as f64, y as f64))) as f32
}

/// The largest `|a_i - b_i| / max(1, |b_i|)`: absolute for small values, relative for large.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    let rel = |(&x, &y): (&f32, &f32)| abs_diff(x as f64, y as f64) / (y as f64).abs().max(1.0);
    worst(a.iter().zip(b).map(rel)) as f32
}

/// Largest absolute difference between two tensors of the same shape (on any devices);
/// infinite where either holds a NaN or an infinity.
pub fn max_abs_diff<const D: usize>(a: &Tensor<D>, b: &Tensor<D>) -> f32 {
    let a = a.to_data().try_to_vec::<f32>().expect("f32 tensor");
    let b = b.to_data().try_to_vec::<f32>().expect("f32 tensor");
    assert_eq!(a.len(), b.len(), "tensors of different sizes");
    max_diff(&a, &b)
}
// ANCHOR_END: max_diff
