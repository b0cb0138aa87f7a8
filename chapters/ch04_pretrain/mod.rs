//! Chapter 4: pre-training the chapter 3 decoder on Tiny Shakespeare, with a learning-rate
//! schedule, weight decay on the right parameters, gradient clipping, checkpoints that
//! resume exactly, and sampling from a saved model.

pub mod bench;
pub mod checkpoint;

use crate::ch03_gpt::{GptConfig, Norm};
use crate::common::cli;
use crate::common::train::{TrainHooks, TrainSettings};
use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

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
        // No biases (as nanoGPT's Shakespeare config): a little faster, no worse. Pre-LN with
        // GPT-2's initialisation, as nanoGPT.
        model: GptConfig::new(vocab_size, block, n_layer, n_head, n_embd)
            .with_bias(false)
            .with_gpt2_init(true),
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
        // Between the two (about 2.7M parameters): the smallest model here that writes
        // passable Shakespeare (val 1.69-1.71; about 30 minutes on flex on 2 cores with chapter 5's
        // fused kernels).
        "medium" => {
            let mut c = base(6, 6, 192, 128, 32, 1500);
            c.model = c.model.with_dropout(0.1);
            c
        }
        // The lecture's final model (about 10.7M parameters): GPU-sized.
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
                .with_norm(Norm::Post)
                .with_gpt2_init(false);
            c.lr = 2.5e-4;
            c.min_lr = 0.0;
            c.warmup_steps = 2000;
            c.weight_decay = 0.01;
            c
        }
        _ => return None,
    })
}

pub const PRESETS: [&str; 5] = ["tiny", "baby", "medium", "lecture", "gpt1"];
// ANCHOR_END: presets

/// `preset`, with an unknown name an error that lists the known ones.
pub fn known_preset(name: &str, vocab_size: usize) -> Result<PretrainConfig> {
    preset(name, vocab_size).with_context(|| {
        format!(
            "unknown preset '{name}'; choose one of {}",
            PRESETS.join(", ")
        )
    })
}

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

/// The only hook a run needs when it keeps no checkpoints (chapter 7's comparison): the
/// schedule.
pub struct Schedule<'a>(pub &'a PretrainConfig);

impl<M> TrainHooks<M> for Schedule<'_> {
    fn learning_rate(&self, step: usize) -> f64 {
        learning_rate(self.0, step)
    }
}

// ANCHOR: optimizer
/// The parameters that get weight decay: the weight matrices of Linear layers (and of an
/// untied output head). Biases and LayerNorm gains are not shrunk towards zero, and neither
/// are the embeddings, tied or not: the rows of a rare character get few gradient updates,
/// and decay would pull them towards zero at every step whether the character was seen or
/// not (minGPT's choice; nanoGPT decays every 2-D tensor, the tied embedding included).
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

/// Ctrl-C during training. The first one only raises a flag: the training loop then saves
/// `ckpt/last` at the end of the current step and stops, and `--resume` continues exactly. A
/// second one kills the process as usual. Unix only; elsewhere Ctrl-C kills at once (and
/// `--ckpt-interval` bounds what is lost).
pub mod interrupt {
    use anyhow::Result;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Raised by the signal handler (or `request`), read by the training loop's hooks.
    static REQUESTED: AtomicBool = AtomicBool::new(false);

    /// Whether a stop was asked for since `catch`.
    pub fn requested() -> bool {
        REQUESTED.load(Ordering::SeqCst)
    }

    /// Asks for a stop as Ctrl-C does, without a signal.
    pub fn request() {
        REQUESTED.store(true, Ordering::SeqCst);
    }

    /// While the returned guard lives, Ctrl-C (SIGINT) only calls `request`; dropping it puts
    /// back what was there before. A process started with SIGINT ignored (a background job
    /// of a script) keeps ignoring it, as shells expect.
    pub fn catch() -> Result<Guard> {
        REQUESTED.store(false, Ordering::SeqCst);
        imp::install().map(Guard)
    }

    /// Catches Ctrl-C until dropped.
    pub struct Guard(imp::Previous);

    impl Drop for Guard {
        fn drop(&mut self) {
            imp::restore(&self.0);
        }
    }

    #[cfg(unix)]
    mod imp {
        use anyhow::{Result, bail};
        use std::sync::atomic::Ordering;

        /// SIGINT's action before `install` (`None`: it was ignored and was left so).
        pub struct Previous(Option<libc::sigaction>);

        extern "C" fn on_sigint(_: libc::c_int) {
            // Only what is async-signal-safe: a store to an atomic.
            super::REQUESTED.store(true, Ordering::SeqCst);
        }

        pub fn install() -> Result<Previous> {
            // SAFETY: `sigaction` reads and writes plain C structs that live on this stack;
            // an all-zero `sigaction` is a valid value (no handler, empty mask, no flags).
            unsafe {
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGINT, std::ptr::null(), &mut previous) != 0 {
                    let error = std::io::Error::last_os_error();
                    bail!("cannot read SIGINT's action: {error}");
                }
                if previous.sa_sigaction == libc::SIG_IGN {
                    return Ok(Previous(None));
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                // RESETHAND: the handler runs once, and SIGINT's default action (end the
                // process) is back for a second Ctrl-C. RESTART: a read or write that the
                // signal interrupts carries on rather than failing.
                action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
                if libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut()) != 0 {
                    let error = std::io::Error::last_os_error();
                    bail!("cannot catch Ctrl-C: {error}");
                }
                Ok(Previous(Some(previous)))
            }
        }

        pub fn restore(previous: &Previous) {
            if let Some(action) = &previous.0 {
                // SAFETY: puts back an action `sigaction` itself returned.
                unsafe {
                    libc::sigaction(libc::SIGINT, action, std::ptr::null_mut());
                }
            }
        }
    }

    #[cfg(not(unix))]
    mod imp {
        pub struct Previous;

        pub fn install() -> anyhow::Result<Previous> {
            Ok(Previous)
        }

        pub fn restore(_: &Previous) {}
    }
}

/// Counts (tensors, values) of the parameters in the decayed group and of the rest.
pub fn param_groups<M: Module>(model: &M) -> ((usize, usize), (usize, usize)) {
    let mut g = Groups {
        group: decayed_group(),
        path: vec![],
        decayed: (0, 0),
        kept: (0, 0),
    };
    model.visit(&mut g);
    (g.decayed, g.kept)
}

struct Groups {
    group: ParamGroup,
    path: Vec<String>,
    decayed: (usize, usize),
    kept: (usize, usize),
}

impl ModuleVisitor for Groups {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.shape().num_elements();
        let path = self.path.join("."); // e.g. "blocks.0.attn.c_attn.weight"
        let g = if self.group.matches(&param.id, Some(&path)) {
            &mut self.decayed
        } else {
            &mut self.kept
        };
        *g = (g.0 + 1, g.1 + n);
    }
}

// ANCHOR: overrides
/// Flags that change a preset's settings, each named after the field it sets (`--n-layer 6`
/// sets `model.n_layer`). A flag that is not given keeps the preset's value.
#[derive(clap::Args, Clone, Debug, Default, Serialize)]
pub struct Overrides {
    #[arg(long)]
    pub n_layer: Option<usize>,
    #[arg(long)]
    pub n_head: Option<usize>,
    #[arg(long)]
    pub n_embd: Option<usize>,
    /// Context length.
    #[arg(long)]
    pub block_size: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, value_parser = cli::below_one)]
    pub dropout: Option<f64>,
    /// LayerNorm placement: pre (GPT-2) or post (GPT-1).
    #[arg(long, value_enum)]
    pub norm: Option<Norm>,
    /// Biases in Linear and LayerNorm layers.
    #[arg(long)]
    pub bias: Option<bool>,
    /// Share the token embedding with the output head.
    #[arg(long)]
    pub tie_weights: Option<bool>,
    /// GPT-2's smaller initialisation of the residual projections.
    #[arg(long)]
    pub gpt2_init: Option<bool>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long, value_parser = cli::positive)]
    pub lr: Option<f64>,
    /// Final learning rate of the cosine decay.
    #[arg(long, value_parser = cli::non_negative)]
    pub min_lr: Option<f64>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long, value_parser = cli::non_negative)]
    pub weight_decay: Option<f64>,
    #[arg(long, value_parser = cli::below_one)]
    pub beta1: Option<f64>,
    #[arg(long, value_parser = cli::below_one)]
    pub beta2: Option<f64>,
    /// Global gradient-norm clip (0: off).
    #[arg(long, value_parser = cli::non_negative)]
    pub grad_clip: Option<f64>,
    #[arg(long)]
    pub eval_interval: Option<usize>,
    #[arg(long)]
    pub eval_iters: Option<usize>,
}

impl PretrainConfig {
    /// The preset `name` with every given override applied on top, checked.
    pub fn build(name: &str, vocab_size: usize, overrides: &Overrides, seed: u64) -> Result<Self> {
        let preset = known_preset(name, vocab_size)?;
        // Through JSON: each flag replaces the field of the same name, in the model's
        // settings or in the run's.
        let mut config = serde_json::to_value(&preset)?;
        let serde_json::Value::Object(flags) = serde_json::to_value(overrides)? else {
            unreachable!("a struct serialises to an object")
        };
        for (name, value) in flags.into_iter().filter(|(_, v)| !v.is_null()) {
            match config["model"].get_mut(&name) {
                Some(field) => *field = value,
                None => config[name.as_str()] = value,
            }
        }
        let built = Self {
            seed,
            ..serde_json::from_value(config)?
        };
        built.validate()?;
        Ok(built)
    }
}
// ANCHOR_END: overrides

impl PretrainConfig {
    /// Refuses settings that cannot train, naming the flag.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.batch_size == 0 || self.eval_interval == 0 || self.eval_iters == 0 {
            bail!("--batch-size, --eval-interval and --eval-iters must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr <= 1.0 && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            bail!(
                "need 0 < --lr <= 1 and 0 <= --min-lr <= --lr (got {} and {})",
                self.lr,
                self.min_lr
            );
        }
        if self.grad_clip < 0.0 || !self.grad_clip.is_finite() {
            bail!("--grad-clip must be 0 (off) or positive");
        }
        let betas = [self.beta1, self.beta2];
        if !betas.iter().all(|b| (0.0..1.0).contains(b)) {
            bail!("--beta1 and --beta2 must be in [0, 1), got {betas:?}");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!(
                "--weight-decay must be 0 or positive, got {}",
                self.weight_decay
            );
        }
        Ok(())
    }
}
