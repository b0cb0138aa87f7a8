//! GPT-1's fine-tuning (Radford et al., 2018, section 3.2): a linear head on the final state of
//! the last token, inputs wrapped in new start and extract tokens (section 3.3), and language
//! modelling kept on as an auxiliary loss, `L3 = L2 + lambda * L1` with lambda = 0.5.

use super::task::Example;
use super::{add_tokens, ids_1d, lm_loss_at};
use crate::ch03_gpt::{Gpt, GptConfig};
use crate::common::dataset::{rng_for, stream};
use crate::common::tokenizer::Vocab;
use crate::common::train::{LanguageModel, clip_grad_norm, cross_entropy, model_device};
use anyhow::{Result, bail};
use burn::module::{Module, ParamGroup};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use rand::RngExt;
use serde::Serialize;
use std::time::{Duration, Instant};

// ANCHOR: recipe
/// What the fine-tuning adds to the pre-trained model; each piece can be switched off.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Recipe {
    /// GPT-1's input transformation: the text between a new start token and a new extract
    /// token, and the head reads the extract token's state. Off: the bare text, read at its
    /// last token.
    pub transform: bool,
    /// The weight lambda of the auxiliary language-modelling loss (GPT-1: 0.5; 0: off).
    pub aux_weight: f64,
}

impl Recipe {
    pub const GPT1: Recipe = Recipe {
        transform: true,
        aux_weight: 0.5,
    };
}
// ANCHOR_END: recipe

// ANCHOR: classifier
/// A decoder with a task head: `W_y` of GPT-1's equation 3, from the last token's final state
/// to one score per class.
#[derive(Module, Debug)]
pub struct Classifier {
    pub gpt: Gpt,
    pub head: Linear, // [c] -> [classes]
    /// The vocabulary before the start and extract tokens were added (their ids follow it).
    pub base_vocab: usize,
    pub transform: bool,
}

impl Classifier {
    /// `gpt` with a fresh head for `classes` classes, and with `transform`, two new tokens.
    pub fn new(gpt: Gpt, classes: usize, transform: bool) -> Self {
        let device = model_device(&gpt);
        let [base_vocab, c] = gpt.wte.weight.dims();
        let gpt = if transform { add_tokens(gpt, 2) } else { gpt };
        let head = LinearConfig::new(c, classes)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            })
            .init(&device);
        Self {
            gpt,
            head,
            base_vocab,
            transform,
        }
    }

    /// The token that opens an input, and the one whose state the head reads.
    pub fn start_and_extract(&self) -> (usize, usize) {
        (self.base_vocab, self.base_vocab + 1)
    }

    /// `text` as the model reads it: cut to fit the context, between start and extract.
    pub fn encode<T: Vocab>(&self, tokenizer: &T, text: &str) -> Result<Vec<usize>> {
        let mut ids = tokenizer.encode(text)?;
        let room = self.gpt.block_size - 2 * usize::from(self.transform);
        ids.truncate(room);
        if ids.is_empty() {
            bail!("an empty passage cannot be classified");
        }
        if self.transform {
            let (start, extract) = self.start_and_extract();
            ids.insert(0, start);
            ids.push(extract);
        }
        Ok(ids)
    }
}
// ANCHOR_END: classifier

/// An encoded example.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub ids: Vec<usize>,
    pub label: usize,
}

/// Every example of a split, encoded for `model`.
pub fn encode_all<T: Vocab>(
    model: &Classifier,
    tokenizer: &T,
    examples: &[Example],
) -> Result<Vec<Encoded>> {
    (examples.iter())
        .map(|e| {
            Ok(Encoded {
                ids: model.encode(tokenizer, &e.text)?,
                label: e.label,
            })
        })
        .collect()
}

// ANCHOR: batch
/// Examples padded to one length, with where to read them.
pub struct Batch {
    pub idx: Tensor<2, Int>, // [b, t]
    /// Index (into the `b * t` positions) of each example's last token: where the head reads.
    pub last: Tensor<1, Int>, // [b]
    pub labels: Tensor<1, Int>, // [b]
    /// The positions whose next token is text, and that token: the auxiliary loss's terms.
    pub lm_rows: Tensor<1, Int>,
    pub lm_targets: Tensor<1, Int>,
}

impl Batch {
    /// Pads on the right; causal attention means a token never sees the padding after it.
    pub fn new(examples: &[&Encoded], transform: bool, device: &Device) -> Self {
        let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
        let (mut idx, mut last, mut rows, mut targets) = (vec![], vec![], vec![], vec![]);
        for (i, e) in examples.iter().enumerate() {
            idx.extend(e.ids.iter().map(|&id| id as i64));
            idx.extend(std::iter::repeat_n(0, t - e.ids.len()));
            last.push(i * t + e.ids.len() - 1);
            // Text tokens are ids[1..n-1] with the transformation, all of them without; each
            // is predicted from the position before it.
            let text = match transform {
                true => 1..e.ids.len() - 1,
                false => 1..e.ids.len(),
            };
            for j in text {
                rows.push(i * t + j - 1);
                targets.push(e.ids[j]);
            }
        }
        let labels: Vec<usize> = examples.iter().map(|e| e.label).collect();
        Batch {
            idx: Tensor::from_data(TensorData::new(idx, [examples.len(), t]), device),
            last: ids_1d(&last, device),
            labels: ids_1d(&labels, device),
            lm_rows: ids_1d(&rows, device),
            lm_targets: ids_1d(&targets, device),
        }
    }
}
// ANCHOR_END: batch

// ANCHOR: forward
impl Classifier {
    /// Class scores `[b, classes]`, and the auxiliary language-modelling loss when asked for.
    pub fn forward(&self, batch: &Batch, with_lm: bool) -> (Tensor<2>, Option<Tensor<1>>) {
        let h = self.gpt.hidden(batch.idx.clone()); // [b, t, c]
        let [b, t, c] = h.dims();
        let h = h.reshape([b * t, c]);
        // The last token's state, through the final LayerNorm where the model has one (pre-LN).
        let mut last = h.clone().select(0, batch.last.clone()).reshape([1, b, c]);
        if let Some(ln_f) = &self.gpt.ln_f {
            last = self.gpt.kernels.layer_norm(ln_f, last);
        }
        let scores = self.head.forward(last.reshape([b, c])); // [b, classes]
        let lm = with_lm.then(|| {
            let n = batch.lm_rows.dims()[0];
            let kept = h.select(0, batch.lm_rows.clone()).reshape([1, n, c]);
            let logits = self.gpt.logits(kept); // [1, n, vocab]
            (self.gpt.kernels).cross_entropy(logits, batch.lm_targets.clone().reshape([1, n]))
        });
        (scores, lm)
    }

    /// GPT-1's `L3 = L2 + lambda * L1`: the task's cross-entropy plus lambda times the
    /// language-modelling loss on the same inputs.
    pub fn loss(&self, batch: &Batch, aux_weight: f64) -> Tensor<1> {
        let (scores, lm) = self.forward(batch, aux_weight > 0.0);
        let [b, k] = scores.dims();
        let task = cross_entropy(
            scores.reshape([1, b, k]),
            batch.labels.clone().reshape([1, b]),
        );
        match lm {
            Some(lm) => task + lm * aux_weight,
            None => task,
        }
    }
}
// ANCHOR_END: forward

// ANCHOR: methods
/// Which weights fine-tuning changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The same model with random weights, all trained: what pre-training is measured against.
    Scratch,
    /// Every weight of the pre-trained model, and the head.
    Full,
    /// The last block, the final LayerNorm and the head; the rest frozen.
    LastBlock,
    /// Low-rank adapters on every block's four weight matrices, and the head.
    Lora,
}

/// LoRA's rank `r` and scale numerator `alpha` (the update is `alpha / r * A B`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
}

impl Method {
    pub const ALL: [Method; 4] = [
        Method::Scratch,
        Method::Full,
        Method::LastBlock,
        Method::Lora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Scratch => "from scratch",
            Method::Full => "full fine-tuning",
            Method::LastBlock => "last block + head",
            Method::Lora => "LoRA + head",
        }
    }

    /// The classifier this method trains, from the pre-trained `gpt` (of shape `config`).
    /// Draws random weights (the head, LoRA's `A`, new tokens) from Burn's generator.
    pub fn prepare(
        self,
        gpt: &Gpt,
        config: &GptConfig,
        classes: usize,
        recipe: Recipe,
        lora: LoraSettings,
    ) -> Classifier {
        let device = model_device(gpt);
        // Every weight read once, so none is still lazy: the clones below share a lazy
        // parameter's state, and freezing one would freeze the original with it.
        super::lora::count_params(gpt);
        let head = ParamGroup::from_predicate("head.");
        match self {
            Method::Scratch => {
                let fresh = config.init(&device).with_kernels(gpt.kernels);
                Classifier::new(fresh, classes, recipe.transform)
            }
            Method::Full => Classifier::new(gpt.clone(), classes, recipe.transform),
            Method::LastBlock => {
                let top = format!("gpt.blocks.{}.", config.n_layer - 1);
                Classifier::new(gpt.clone(), classes, recipe.transform)
                    .freeze()
                    .unfreeze_group(ParamGroup::from_any_predicates(vec![
                        top,
                        "gpt.ln_f.".into(),
                        "head.".into(),
                    ]))
            }
            Method::Lora => Classifier::new(gpt.clone(), classes, recipe.transform)
                .apply_lora(super::lora::lora_on_blocks(lora))
                .unfreeze_group(head),
        }
    }
}
// ANCHOR_END: methods

/// The knobs of one fine-tuning run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FineTuneSettings {
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate: reached after a linear warm-up over the first 10% of the steps,
    /// then decayed linearly to 0, as GPT-1's fine-tuning schedule.
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub recipe: Recipe,
    /// Measure the task loss on the held-out examples every this many steps (0: never).
    pub eval_every: usize,
}

impl FineTuneSettings {
    pub fn lr_at(&self, step: usize) -> f64 {
        let warmup = (self.steps / 10).max(1);
        match step < warmup {
            true => self.lr * (step + 1) as f64 / warmup as f64,
            false => self.lr * (self.steps - step) as f64 / (self.steps - warmup).max(1) as f64,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FineTuneReport {
    /// The training loss (task + lambda * LM) of each step's batch.
    pub losses: Vec<f64>,
    /// (steps done, the task loss on the held-out examples), every `eval_every` steps.
    pub test_losses: Vec<(usize, f64)>,
    /// Time per training step, the held-out evaluations left out.
    pub ms_per_step: f64,
}

// ANCHOR: fine_tune
/// Trains `model` (on an autodiff device) on `train` with AdamW; only the parameters that
/// require a gradient receive one, so frozen ones stay as they are. Batches are drawn at
/// random from (seed, step), so every method sees the same ones. `test` is only measured.
pub fn fine_tune(
    mut model: Classifier,
    train: &[Encoded],
    test: &[Encoded],
    s: &FineTuneSettings,
) -> Result<(Classifier, FineTuneReport)> {
    if train.is_empty() || s.steps == 0 || s.batch_size == 0 {
        bail!("fine-tuning needs examples, at least one step and a batch of at least one");
    }
    let device = model_device(&model);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(s.weight_decay as f32)
        .init();
    let mut report = FineTuneReport::default();
    let mut evaluating = Duration::ZERO;
    let mut evaluate = |model: &Classifier, done: usize, report: &mut FineTuneReport| {
        if s.eval_every > 0
            && !test.is_empty()
            && (done.is_multiple_of(s.eval_every) || done == s.steps)
        {
            let t = Instant::now();
            report.test_losses.push((done, task_loss(model, test)));
            evaluating += t.elapsed();
        }
    };
    let started = Instant::now();
    evaluate(&model, 0, &mut report);
    for step in 0..s.steps {
        let mut rng = rng_for(s.seed, stream::TRAIN, step);
        let picked: Vec<&Encoded> = (0..s.batch_size)
            .map(|_| &train[rng.random_range(0..train.len())])
            .collect();
        if model.gpt.has_dropout() {
            // As chapter 4's `train_step`: this step's masks follow from (seed, step) alone.
            device.seed(rng_for(s.seed, stream::DROPOUT, step).random());
        }
        let batch = Batch::new(&picked, model.transform, &device);
        let loss = model.loss(&batch, s.recipe.aux_weight);
        let value = loss.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            bail!("the fine-tuning loss became {value} at step {step} (try a lower --lr)");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let (grads, _) = clip_grad_norm(grads, &model, Some(1.0));
        model = optim.step(s.lr_at(step), model, grads);
        report.losses.push(value);
        evaluate(&model, step + 1, &mut report);
    }
    let training = started.elapsed() - evaluating;
    report.ms_per_step = training.as_secs_f64() * 1e3 / s.steps as f64;
    Ok((model, report))
}
// ANCHOR_END: fine_tune

/// The class scores of every example, `[n, classes]` as rows (inference: no dropout).
pub fn scores(model: &Classifier, examples: &[Encoded]) -> Vec<Vec<f32>> {
    let model = model.valid();
    let device = model_device(&model);
    let mut rows = Vec::new();
    for chunk in examples.chunks(32) {
        let picked: Vec<&Encoded> = chunk.iter().collect();
        let (s, _) = model.forward(&Batch::new(&picked, model.transform, &device), false);
        let k = s.dims()[1];
        let v = s
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 scores");
        rows.extend(v.chunks(k).map(<[f32]>::to_vec));
    }
    rows
}

/// The mean cross-entropy of the class scores against the labels (the task loss, no LM term).
pub fn task_loss(model: &Classifier, examples: &[Encoded]) -> f64 {
    let total: f64 = (scores(model, examples).iter().zip(examples))
        .map(|(row, e)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            max + sum.ln() - row[e.label] as f64
        })
        .sum();
    total / examples.len().max(1) as f64
}

/// The share of `examples` whose highest score is their label.
pub fn accuracy(model: &Classifier, examples: &[Encoded]) -> f64 {
    let right = (scores(model, examples).iter().zip(examples))
        .filter(|(row, e)| {
            let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]));
            best == Some(e.label)
        })
        .count();
    right as f64 / examples.len().max(1) as f64
}

// ANCHOR: zero_shot
/// GPT-1's zero-shot heuristic for CoLA (its section 5), with no training at all: a passage
/// scores the mean log-probability the pre-trained model gives its tokens.
pub fn lm_scores<T: Vocab>(gpt: &Gpt, tokenizer: &T, examples: &[Example]) -> Result<Vec<f64>> {
    let gpt = gpt.valid();
    let device = model_device(&gpt);
    (examples.iter())
        .map(|e| {
            let mut ids = tokenizer.encode(&e.text)?;
            ids.truncate(gpt.block_size + 1);
            if ids.len() < 2 {
                bail!("a passage of fewer than 2 tokens has no score");
            }
            let n = ids.len() - 1;
            let idx = ids_1d(&ids[..n], &device).reshape([1, n]); // [1, n]
            let rows = Tensor::<1, Int>::arange(0..n as i64, &device); // every position
            let loss = lm_loss_at(&gpt, idx, rows, ids_1d(&ids[1..], &device));
            Ok(-(loss.into_scalar::<f32>() as f64))
        })
        .collect()
}

/// Thresholding a score into labels 0 (below) and 1 (above): the threshold that is right most
/// often on the training examples, and how often it is right on the test examples.
pub fn threshold_accuracy(train: (&[f64], &[Example]), test: (&[f64], &[Example])) -> (f64, f64) {
    let right = |(scores, examples): (&[f64], &[Example]), at: f64| {
        let n = (scores.iter().zip(examples))
            .filter(|&(&s, e)| usize::from(s > at) == e.label)
            .count();
        n as f64 / examples.len().max(1) as f64
    };
    let mut candidates: Vec<f64> = train.0.iter().copied().filter(|s| s.is_finite()).collect();
    candidates.sort_by(f64::total_cmp);
    let best = (candidates.iter().copied())
        .max_by(|&a, &b| right(train, a).total_cmp(&right(train, b)))
        .unwrap_or(f64::NAN);
    (best, right(test, best))
}
// ANCHOR_END: zero_shot
