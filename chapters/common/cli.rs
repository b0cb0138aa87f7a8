//! Flags every chapter binary shares. Chapters flatten these into their own `clap` parser
//! and set their own defaults with `mut_arg`.

use crate::common::backend::Backend;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// Which Burn backend runs the model (flex: the fastest on a CPU; ndarray: the reference
    /// the course checks the others against; wgpu: a GPU).
    #[arg(long, default_value = "flex", value_parser = parse_backend)]
    pub backend: Backend,
    /// A UTF-8 text file to train on (default: $GPT_DATA, else Tiny Shakespeare, downloaded
    /// into data/ on first use).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Seed for weights, batches and samples: the same seed gives the same run.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Folder for summary.json, losses.csv and pictures (default: runs/<chapter>/).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub fn parse_backend(s: &str) -> Result<Backend, String> {
    s.parse()
}

// ANCHOR: numbers
/// A float flag's value, refused when clap parses it unless it is a finite number inside
/// `range`: "NaN", "inf" and "-0.5" for a learning rate stop the program with one line
/// instead of training on something else.
fn number_in(
    s: &str,
    range: (std::ops::Bound<f64>, std::ops::Bound<f64>),
    what: &str,
) -> Result<f64, String> {
    use std::ops::RangeBounds;
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && range.contains(&x) => Ok(x),
        Ok(_) => Err(format!("must be {what}")),
        Err(_) => Err("not a number".into()),
    }
}

/// `> 0` (learning rates, GFLOP/s).
pub fn positive(s: &str) -> Result<f64, String> {
    use std::ops::Bound::*;
    number_in(s, (Excluded(0.0), Unbounded), "a finite number above 0")
}

/// `>= 0` (weight decay, clipping, temperature, the final learning rate).
pub fn non_negative(s: &str) -> Result<f64, String> {
    use std::ops::Bound::*;
    number_in(s, (Included(0.0), Unbounded), "a finite number, 0 or above")
}

/// In `[0, 1)` (dropout, Adam's betas).
pub fn below_one(s: &str) -> Result<f64, String> {
    use std::ops::Bound::*;
    number_in(s, (Included(0.0), Excluded(1.0)), "in [0, 1)")
}

/// In `(0, 1]` (top-p).
pub fn up_to_one(s: &str) -> Result<f64, String> {
    use std::ops::Bound::*;
    number_in(s, (Excluded(0.0), Included(1.0)), "in (0, 1]")
}
// ANCHOR_END: numbers

/// How to sample from a trained model (chapter 4's `sample`, and later chapters).
#[derive(Args, Clone, Debug)]
pub struct SampleArgs {
    /// Softmax temperature; 0 always picks the most likely character.
    #[arg(long, default_value_t = 0.8, value_parser = non_negative)]
    pub temperature: f64,
    /// Sample only among the k most likely characters (k >= 1).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: only the most likely characters whose probabilities add up to p,
    /// in (0, 1].
    #[arg(long, value_parser = up_to_one)]
    pub top_p: Option<f64>,
    /// How many samples to draw.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Characters to generate per sample.
    #[arg(long, default_value_t = 500)]
    pub max_new_tokens: usize,
}

impl SampleArgs {
    /// The options, checked: out-of-range values are errors, not silent no-ops.
    pub fn options(&self) -> anyhow::Result<crate::common::sample::SampleOptions> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!(
                "--temperature must be 0 or positive, got {}",
                self.temperature
            );
        }
        if self.top_k == Some(0) {
            anyhow::bail!("--top-k must be at least 1 (leave it out to sample from all)");
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            anyhow::bail!("--top-p must be in (0, 1], got {p}");
        }
        if self.num_samples == 0 || self.max_new_tokens == 0 {
            anyhow::bail!("--num-samples and --max-new-tokens must be at least 1");
        }
        Ok(crate::common::sample::SampleOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        })
    }
}

/// The training flags of chapters 1 to 3. The defaults are the lecture's small setup; a
/// chapter changes them with clap's `mut_arg`.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    /// Optimizer steps.
    #[arg(long, default_value_t = 5000)]
    pub steps: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Context length: characters the model sees at once.
    #[arg(long, default_value_t = 8)]
    pub block_size: usize,
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3, value_parser = positive)]
    pub lr: f64,
    /// Estimate train and val loss every this many steps.
    #[arg(long, default_value_t = 500)]
    pub eval_interval: usize,
    /// Batches per loss estimate.
    #[arg(long, default_value_t = 200)]
    pub eval_iters: usize,
}

impl CommonArgs {
    pub fn out_dir(&self, chapter: &str) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(chapter))
    }
}

impl TrainArgs {
    /// The loop's settings (no clipping: chapter 4 introduces it).
    pub fn settings(&self, seed: u64) -> crate::common::train::TrainSettings {
        crate::common::train::TrainSettings {
            steps: self.steps,
            batch_size: self.batch_size,
            block_size: self.block_size,
            eval_interval: self.eval_interval,
            eval_iters: self.eval_iters,
            seed,
            grad_clip: None,
            stop_after: None,
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("--batch-size", self.batch_size),
            ("--block-size", self.block_size),
            ("--eval-iters", self.eval_iters),
            ("--eval-interval", self.eval_interval),
        ] {
            if v == 0 {
                anyhow::bail!("{name} must be at least 1");
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            anyhow::bail!("--lr must be a positive number, got {}", self.lr);
        }
        Ok(())
    }
}
