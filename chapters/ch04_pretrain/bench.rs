//! `ch04_pretrain --bench N`: time real training steps and write `bench.json`.

use super::{PretrainConfig, learning_rate, optimizer, train_settings};
use crate::ch03_gpt::Gpt;
use crate::ch03_gpt::Kernels;
use crate::common::backend::Backend;
use crate::common::dataset::Dataset;
use crate::common::report::Machine;
use crate::common::train::train_step;
use serde::Serialize;
use std::time::Instant;

// ANCHOR: time_steps
/// Step times of a benchmark, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct StepTimes {
    /// The very first step: on GPU backends it compiles and autotunes every kernel.
    pub first_step_ms: f64,
    /// Median over the timed steps (after `warmup` untimed ones).
    pub median_ms_per_step: f64,
    pub tokens_per_s: f64,
    pub gflops: f64,
    pub timed_steps: usize,
    pub warmup_steps: usize,
}

/// Runs `warmup + n` real training steps of `model` (on an autodiff device) and times each;
/// reading the loss back every step makes each time include all of the step's device work.
pub fn time_steps<T>(
    cfg: &PretrainConfig,
    mut model: Gpt,
    data: &Dataset<T>,
    warmup: usize,
    n: usize,
) -> anyhow::Result<StepTimes> {
    let mut optim = optimizer(cfg);
    let run = train_settings(cfg, None);
    let mut times = Vec::with_capacity(warmup + n);
    for step in 0..warmup + n {
        let tick = Instant::now();
        let lr = learning_rate(cfg, step);
        let (next, loss, _) = train_step(model, &mut optim, data, &run, step, lr);
        model = next;
        times.push(tick.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            loss.is_finite(),
            "the loss became {loss} during the benchmark"
        );
    }
    let mut timed = times[warmup.min(times.len())..].to_vec();
    timed.sort_by(|a, b| a.total_cmp(b));
    let median = timed.get(timed.len() / 2).copied().unwrap_or(f64::NAN);
    let tokens_per_s = (cfg.batch_size * cfg.model.block_size) as f64 / (median / 1e3);
    Ok(StepTimes {
        first_step_ms: times.first().copied().unwrap_or(f64::NAN),
        median_ms_per_step: median,
        tokens_per_s,
        gflops: cfg.model.flops_per_token() * tokens_per_s / 1e9,
        timed_steps: n,
        warmup_steps: warmup,
    })
}
// ANCHOR_END: time_steps

/// What `bench.json` holds.
#[derive(Serialize)]
pub struct Bench<'a> {
    pub preset: &'a str,
    pub backend: String,
    /// `burn` or `fused` (chapter 5's kernels, where the backend runs them).
    pub kernels: &'static str,
    /// 0: fresh weights; otherwise the step of the checkpoint whose weights were timed.
    pub trained_steps: usize,
    #[serde(flatten)]
    pub times: StepTimes,
    pub flops_per_token: f64,
    pub tokens_per_step: usize,
    pub parameters: usize,
    pub config: &'a PretrainConfig,
    pub machine: Machine,
}

impl<'a> Bench<'a> {
    pub fn new(
        cfg: &'a PretrainConfig,
        backend: Backend,
        kernels: Kernels,
        trained_steps: usize,
        parameters: usize,
        times: StepTimes,
    ) -> Self {
        Bench {
            preset: &cfg.preset,
            backend: backend.to_string(),
            kernels: match kernels.fused_on(&backend.device()) {
                true => "fused",
                false => "burn",
            },
            trained_steps,
            times,
            flops_per_token: cfg.model.flops_per_token(),
            tokens_per_step: cfg.batch_size * cfg.model.block_size,
            parameters,
            config: cfg,
            machine: Machine::detect(!backend.is_cpu()),
        }
    }
}
