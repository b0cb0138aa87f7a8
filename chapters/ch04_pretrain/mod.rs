//! Chapter 4: pre-training the chapter 3 decoder on Tiny Shakespeare, with a learning-rate
//! schedule, weight decay on the right parameters, gradient clipping, checkpoints that
//! resume exactly, and sampling from a saved model.

pub mod checkpoint;

use crate::ch03_gpt::{Gpt, GptConfig, Norm};
use crate::common::dataset::Dataset;
use crate::common::train::{TrainSettings, train_step};
use burn::module::{Module, ParamGroup};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use serde::{Deserialize, Serialize};
use std::time::Instant;

// ANCHOR: config
/// Everything that defines a pre-training run (saved with every checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub preset: String,
    pub model: GptConfig,
    pub batch_size: usize,
    pub steps: usize,
    /// Peak learning rate, reached after `warmup_steps`.
    pub lr: f64,
    /// Where the cosine decay ends.
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Clip the global gradient norm to this (0 turns clipping off).
    pub grad_clip: f64,
    pub eval_interval: usize,
    pub eval_iters: usize,
    pub seed: u64,
}
// ANCHOR_END: config

// ANCHOR: presets
/// The named starting points. Every field can still be overridden by a flag.
pub fn preset(name: &str, vocab_size: usize) -> Option<PretrainConfig> {
    let base = |n_layer, n_head, n_embd, block, batch, steps| PretrainConfig {
        preset: name.to_string(),
        // No biases (as nanoGPT's Shakespeare config): a little faster, no worse.
        model: GptConfig::new(vocab_size, block, n_layer, n_head, n_embd).with_bias(false),
        batch_size: batch,
        steps,
        lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 100,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        grad_clip: 1.0,
        eval_interval: 250,
        eval_iters: 20,
        seed: 1337,
    };
    Some(match name {
        // For tests and a first look: seconds on a CPU.
        "tiny" => PretrainConfig {
            warmup_steps: 50,
            eval_interval: 100,
            ..base(2, 2, 64, 32, 16, 500)
        },
        // The default: nanoGPT's "baby GPT" for CPUs, about 0.8M parameters.
        "baby" => base(4, 4, 128, 64, 12, 2000),
        // The lecture's final model (about 10.8M parameters): GPU-sized.
        "lecture" => {
            let mut c = base(6, 6, 384, 256, 64, 5000);
            c.model = c.model.with_dropout(0.2);
            c.lr = 3e-4;
            c.min_lr = 3e-5;
            c.eval_interval = 500;
            c.eval_iters = 200;
            c
        }
        // GPT-1's shape (with this corpus's characters as its vocabulary), for reading its
        // numbers; far too big to train on a CPU.
        "gpt1" => {
            let mut c = base(12, 12, 768, 512, 64, 100_000);
            c.model = c
                .model
                .with_dropout(0.1)
                .with_bias(true)
                .with_norm(Norm::Post);
            c.lr = 2.5e-4;
            c.min_lr = 0.0;
            c.warmup_steps = 2000;
            c.weight_decay = 0.01;
            c
        }
        _ => return None,
    })
}

pub const PRESETS: [&str; 4] = ["tiny", "baby", "lecture", "gpt1"];
// ANCHOR_END: presets

// ANCHOR: schedule
/// Linear warmup from lr/warmup to lr, then cosine decay to `min_lr` at the last step.
/// A pure function of the step, so a resumed run needs no scheduler state.
pub fn learning_rate(cfg: &PretrainConfig, step: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    if step >= cfg.steps {
        return cfg.min_lr;
    }
    let progress = (step - cfg.warmup_steps) as f64 / (cfg.steps - cfg.warmup_steps).max(1) as f64;
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()); // 1 -> 0
    cfg.min_lr + cosine * (cfg.lr - cfg.min_lr)
}
// ANCHOR_END: schedule

// ANCHOR: optimizer
/// The parameters that get weight decay: the weight matrices of Linear layers. Biases,
/// LayerNorm gains and the embeddings are not shrunk towards zero.
pub const DECAYED: &str =
    r"^(blocks\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)|lm_head)\.weight$";

/// AdamW with two parameter groups: no decay by default, `weight_decay` for `DECAYED`.
/// (Clipping is done by the training loop on the global norm, not per tensor.)
pub fn optimizer(cfg: &PretrainConfig) -> ModuleOptimizer {
    let adamw = |wd: f64| {
        AdamWConfig::new()
            .with_beta_1(cfg.beta1 as f32)
            .with_beta_2(cfg.beta2 as f32)
            .with_epsilon(1e-8)
            .with_weight_decay(wd as f32)
    };
    adamw(0.0)
        .init()
        .with_group(decayed_group(), adamw(cfg.weight_decay).build(), None)
}

pub fn decayed_group() -> ParamGroup {
    ParamGroup::from_regex(DECAYED).expect("a valid regex")
}
// ANCHOR_END: optimizer

/// Model FLOPs utilisation: the share of `peak_flops` that the model's own arithmetic
/// (6N + attention per token) would need at `tokens_per_second`.
pub fn mfu(cfg: &GptConfig, tokens_per_second: f64, peak_flops: f64) -> f64 {
    cfg.flops_per_token() * tokens_per_second / peak_flops
}

/// The training settings of a config (`stop_after` ends early, as if interrupted).
pub fn train_settings(c: &PretrainConfig, stop_after: Option<usize>) -> TrainSettings {
    TrainSettings {
        steps: c.steps,
        batch_size: c.batch_size,
        block_size: c.model.block_size,
        eval_interval: c.eval_interval,
        eval_iters: c.eval_iters,
        seed: c.seed,
        grad_clip: (c.grad_clip > 0.0).then_some(c.grad_clip),
        stop_after,
    }
}

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
pub fn time_steps(
    cfg: &PretrainConfig,
    mut model: Gpt,
    data: &Dataset,
    warmup: usize,
    n: usize,
) -> anyhow::Result<StepTimes> {
    let mut optim = optimizer(cfg);
    let run = train_settings(cfg, None);
    let device = model.devices()[0].clone();
    let mut times = Vec::with_capacity(warmup + n);
    for step in 0..warmup + n {
        let tick = Instant::now();
        let (next, loss) = train_step(
            model,
            &mut optim,
            data,
            &run,
            step,
            learning_rate(cfg, step),
            &device,
        );
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
