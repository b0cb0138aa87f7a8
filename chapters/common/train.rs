//! The training loop every chapter shares: sample a batch, forward, cross-entropy,
//! backward, optimizer step; every `eval_interval` steps, estimate train and val loss.

use crate::common::Run;
use crate::common::cli::TrainArgs;
use crate::common::dataset::{Dataset, Split, rng_for, stream};
use anyhow::{Result, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use rand::RngExt;
use serde::Serialize;
use std::ops::ControlFlow;
use std::time::Instant;

/// What every model of the course is: token ids in, next-token logits out.
pub trait LanguageModel: Module {
    /// `idx: [batch, time]` -> logits `[batch, time, vocab]`.
    fn forward(&self, idx: Tensor<2, Int>) -> Tensor<3>;
    /// The longest context the model can read (generation keeps only this many tokens).
    fn block_size(&self) -> usize;
    /// The training loss: mean cross-entropy of the next-token predictions (a model may
    /// compute it its own way, as chapter 5's fused kernels do).
    fn loss(&self, idx: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        cross_entropy(self.forward(idx), targets)
    }
    /// Whether training draws random dropout masks (from Burn's generator).
    fn has_dropout(&self) -> bool {
        false
    }
}

// ANCHOR: cross_entropy
/// Mean cross-entropy of `logits: [b, t, v]` against `targets: [b, t]`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, t, v] = logits.dims();
    CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits.reshape([b * t, v]), targets.reshape([b * t]))
}
// ANCHOR_END: cross_entropy

/// One evaluation: the mean loss over `eval_iters` random batches of each split.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct LossRecord {
    pub step: usize,
    pub train: f64,
    pub val: f64,
}

// ANCHOR: estimate_loss
/// How a loss estimate is taken: `iters` random batches of each split.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EvalSettings {
    pub batch_size: usize,
    pub block_size: usize,
    pub iters: usize,
    pub seed: u64,
}

/// Estimates the loss on both splits with the inference copy of `model` (no autodiff,
/// dropout off). Batches depend only on (seed, step), so every backend sees the same ones.
pub fn estimate_loss<M: LanguageModel, T>(
    model: &M,
    data: &Dataset<T>,
    eval: &EvalSettings,
    step: usize,
) -> LossRecord {
    let model = model.valid();
    let device = model_device(&model);
    let mean = |split: Split, purpose: u64| {
        let mut rng = rng_for(eval.seed, purpose, step);
        let mut total = 0.0;
        for _ in 0..eval.iters {
            let (x, y) = data.batch(split, eval.batch_size, eval.block_size, &mut rng, &device);
            total += model.loss(x, y).into_scalar::<f32>() as f64;
        }
        total / eval.iters as f64
    };
    let train = mean(Split::Train, stream::EVAL_TRAIN);
    let val = mean(Split::Val, stream::EVAL_VAL);
    LossRecord { step, train, val }
}
// ANCHOR_END: estimate_loss

/// The knobs of a training run.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSettings {
    pub steps: usize,
    pub batch_size: usize,
    pub block_size: usize,
    pub eval_interval: usize,
    pub eval_iters: usize,
    pub seed: u64,
    /// Rescale all gradients together when their global L2 norm exceeds this.
    pub grad_clip: Option<f64>,
    /// End early after this step (with an evaluation, so a checkpoint hook can save).
    pub stop_after: Option<usize>,
}

impl TrainSettings {
    /// The loss estimates of this run: same batch and block size, `eval_iters` batches.
    pub fn eval(&self) -> EvalSettings {
        EvalSettings {
            batch_size: self.batch_size,
            block_size: self.block_size,
            iters: self.eval_iters,
            seed: self.seed,
        }
    }
}

/// One optimizer step, as the per-step log (`steps.csv`) records it.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: usize,
    /// The loss of this step's training batch (noisy: one batch, not an estimate).
    pub loss: f64,
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall time of the step, in milliseconds.
    pub ms: f64,
}

/// What a run produced besides the trained model.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrainReport {
    pub losses: Vec<LossRecord>,
    pub steps: Vec<StepRecord>,
    /// Training time only (evaluations excluded), in seconds.
    pub train_seconds: f64,
    /// Wall time of the whole loop, evaluations included.
    pub wall_seconds: f64,
    pub tokens_per_second: f64,
}

/// Hooks a chapter can hang on the loop (chapter 4 writes checkpoints here).
pub trait TrainHooks<M> {
    /// Learning rate for `step` (0-based).
    fn learning_rate(&self, step: usize) -> f64;
    /// Called after each optimizer step.
    fn on_step(&mut self, _record: &StepRecord) {}
    /// Called after each evaluation, with the model and optimizer as they are at `record.step`.
    fn on_eval(
        &mut self,
        _record: &LossRecord,
        _model: &M,
        _optim: &ModuleOptimizer,
    ) -> Result<()> {
        Ok(())
    }
    /// Called between two optimizer steps (after any evaluation there), with the number of
    /// steps completed and the model and optimizer as they are then. `Break` ends the run at
    /// this point, with no further evaluation. Chapter 4 saves a checkpoint here every
    /// `--ckpt-interval` steps, and stops here after a Ctrl-C.
    fn between_steps(
        &mut self,
        _steps_done: usize,
        _model: &M,
        _optim: &ModuleOptimizer,
    ) -> Result<ControlFlow<()>> {
        Ok(ControlFlow::Continue(()))
    }
    /// Extra text for the progress bar (e.g. the learning rate or FLOPs utilisation).
    fn progress_extra(&self, _step: usize, _tokens_per_second: f64) -> String {
        String::new()
    }
}

/// A constant learning rate and no other hook: chapters 1 to 3.
pub struct ConstantLr(pub f64);

impl<M> TrainHooks<M> for ConstantLr {
    fn learning_rate(&self, _step: usize) -> f64 {
        self.0
    }
}

/// The device a model's parameters live on.
pub fn model_device<M: Module>(model: &M) -> Device {
    model
        .devices()
        .first()
        .cloned()
        .expect("a model with parameters")
}

// ANCHOR: train
/// Estimates the train and validation losses at `step` and prints them above the bar.
fn evaluate<M: LanguageModel, T>(
    model: &M,
    data: &Dataset<T>,
    settings: &TrainSettings,
    step: usize,
    bar: &ProgressBar,
) -> LossRecord {
    let record = estimate_loss(model, data, &settings.eval(), step);
    // `suspend` rather than `bar.println`: the latter prints nothing when the bar is hidden
    // (output piped to a file), and recorded runs need these lines.
    bar.suspend(|| {
        println!(
            "step {step:>5}: train loss {:.4}, val loss {:.4}",
            record.train, record.val
        )
    });
    record
}

/// Trains `model` (whose parameters live on an autodiff device) from `start_step` to
/// `settings.steps`. Losses are estimated at every multiple of `eval_interval` and after the
/// last step. A loss that is not finite stops the run with an error; a hook's `between_steps`
/// may end it early.
pub fn train<M: LanguageModel, T>(
    mut model: M,
    optim: &mut ModuleOptimizer,
    data: &Dataset<T>,
    settings: &TrainSettings,
    start_step: usize,
    hooks: &mut dyn TrainHooks<M>,
) -> Result<(M, TrainReport)> {
    data.check_block_size(settings.block_size)?;
    let bar = progress_bar(settings.steps, start_step);
    let mut report = TrainReport::default();
    let started = Instant::now();
    let end = settings
        .stop_after
        .map_or(settings.steps, |s| s.min(settings.steps));
    let is_eval_step = |step: usize| {
        step.is_multiple_of(settings.eval_interval.max(1)) || step == settings.steps || step == end
    };
    for step in start_step..=end {
        if is_eval_step(step) && (step > start_step || start_step == 0) {
            let record = evaluate(&model, data, settings, step, &bar);
            report.losses.push(record);
            hooks.on_eval(&record, &model, optim)?;
        }
        if step == end {
            break;
        }
        // After the evaluation, so that a checkpoint taken here holds it and a resumed run
        // (which does not evaluate at its first step) loses nothing.
        if hooks.between_steps(step, &model, optim)?.is_break() {
            break;
        }
        let lr = hooks.learning_rate(step);
        let tick = Instant::now();
        let (next, loss, grad_norm) = train_step(model, optim, data, settings, step, lr);
        model = next;
        if !loss.is_finite() {
            bar.abandon();
            bail!(
                "the training loss became {loss} at step {step}; stopping \
                 (try a lower learning rate; the last checkpoint, if any, is kept)"
            );
        }
        let ms = tick.elapsed().as_secs_f64() * 1e3;
        let record = StepRecord {
            step,
            loss: loss as f64,
            lr,
            grad_norm,
            ms,
        };
        report.steps.push(record);
        hooks.on_step(&record);
        report.train_seconds += ms / 1e3;
        let tps = report.tokens_per_second(settings);
        bar.set_message(format!(
            "loss {loss:.4} | {} tok/s{}",
            human(tps),
            hooks.progress_extra(step, tps)
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    report.wall_seconds = started.elapsed().as_secs_f64();
    report.tokens_per_second = report.tokens_per_second(settings);
    Ok((model, report))
}
// ANCHOR_END: train

impl TrainReport {
    /// Training tokens per second of the steps run so far (0 before the first).
    fn tokens_per_second(&self, settings: &TrainSettings) -> f64 {
        let tokens = self.steps.len() * settings.batch_size * settings.block_size;
        if tokens == 0 {
            0.0
        } else {
            tokens as f64 / self.train_seconds
        }
    }
}

fn progress_bar(steps: usize, start_step: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
            .expect("valid template"),
    );
    bar.set_position(start_step as u64);
    bar
}

// ANCHOR: fit
/// How chapters 1 to 3 train: AdamW at a constant learning rate, with the flags' settings,
/// then one line on how it went.
pub fn fit<M: LanguageModel>(
    name: &str,
    model: M,
    run: &Run,
    args: &TrainArgs,
) -> Result<(M, TrainReport)> {
    let mut optim = AdamWConfig::new().init();
    let settings = args.settings(run.seed);
    let mut lr = ConstantLr(args.lr);
    let (model, report) = train(model, &mut optim, &run.data, &settings, 0, &mut lr)?;
    let last = report.losses.last().expect("at least one evaluation");
    println!(
        "{name}: final train {:.4}, val {:.4} after {} steps; {:.1} s, {:.0} tokens/s",
        last.train, last.val, last.step, report.wall_seconds, report.tokens_per_second
    );
    Ok((model, report))
}
// ANCHOR_END: fit

// ANCHOR: train_step
/// One optimizer step on the training batch of `step`. Returns the new model, the batch
/// loss and the gradient norm before clipping.
pub fn train_step<M: LanguageModel, T>(
    model: M,
    optim: &mut ModuleOptimizer,
    data: &Dataset<T>,
    settings: &TrainSettings,
    step: usize,
    lr: f64,
) -> (M, f32, f64) {
    let mut rng = rng_for(settings.seed, stream::TRAIN, step);
    let (b, t) = (settings.batch_size, settings.block_size);
    let device = model_device(&model);
    if model.has_dropout() {
        // Dropout draws its masks from Burn's generator, whose state no checkpoint can hold.
        // Seeded from (seed, step) here, the masks of a step depend on nothing else, so a run
        // resumed at step k draws exactly the masks the uninterrupted run drew, as it does
        // the batches. (A model without dropout draws nothing, and the generator is left alone.)
        device.seed(rng_for(settings.seed, stream::DROPOUT, step).random());
    }
    let (x, y) = data.batch(Split::Train, b, t, &mut rng, &device);
    let loss = model.loss(x, y); // [1]
    let loss_value = loss.clone().into_scalar::<f32>();
    if !loss_value.is_finite() {
        return (model, loss_value, f64::NAN);
    }
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let (grads, norm) = clip_grad_norm(grads, &model, settings.grad_clip);
    (optim.step(lr, model, grads), loss_value, norm)
}
// ANCHOR_END: train_step

/// 12345.6 -> "12.3k".
pub fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

// ANCHOR: clip
/// Gradient clipping by global norm (as PyTorch's `clip_grad_norm_`): treat every gradient
/// of the model as one long vector; if its length exceeds `max_norm`, scale all of them down
/// by the same factor. Returns the gradients and their norm before clipping (measured even
/// when `max_norm` is `None`, for the training log).
pub fn clip_grad_norm<M: Module>(
    mut grads: GradientsParams,
    model: &M,
    max_norm: Option<f64>,
) -> (GradientsParams, f64) {
    let mut sum = SumOfSquares {
        grads: &grads,
        total: None,
    };
    model.visit(&mut sum);
    let norm = sum
        .total
        .map_or(0.0, |t| t.into_scalar::<f32>() as f64)
        .sqrt();
    if let Some(max_norm) = max_norm.filter(|&m| norm > m) {
        let mut scale = Scale {
            grads: &mut grads,
            factor: max_norm / (norm + 1e-6),
        };
        model.visit(&mut scale);
    }
    (grads, norm)
}

struct SumOfSquares<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SumOfSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum(); // [1]
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g * self.factor);
        }
    }
}
// ANCHOR_END: clip
