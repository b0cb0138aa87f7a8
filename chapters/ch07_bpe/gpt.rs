//! Chapter 7's experiment: chapter 4's GPT trained on characters and on BPE tokens, with the
//! same preset (the same layers, batch, block and steps), compared in bits per character.

use crate::ch04_pretrain::{Overrides, PretrainConfig, Schedule, optimizer, train_settings};
use crate::ch05_fast::FUSED;
use crate::common::dataset::{Dataset, Split, ids_tensor, rng_for, stream};
use crate::common::sample::{SampleOptions, generate};
use crate::common::tokenizer::Vocab;
use crate::common::train::{LanguageModel, train};
use anyhow::Result;
use burn::module::Module;
use burn::prelude::*;
use serde::Serialize;

/// What one tokenizer's model reached.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub name: String,
    pub vocab_size: usize,
    pub parameters: usize,
    /// Characters per token of the validation text.
    pub chars_per_token: f64,
    /// Training FLOPs of one step (the output layer grows with the vocabulary).
    pub gflop_per_step: f64,
    /// Characters of text in one step's batch, on average.
    pub chars_per_step: f64,
    /// The last loss estimate on the validation split, in nats per token...
    pub val_loss: f64,
    /// ...and the same in bits per character.
    pub val_bits_per_char: f64,
    /// Every token of the validation text, in bits per character (see `whole_split_bits`).
    pub whole_val_bits_per_char: f64,
    pub train_seconds: f64,
    /// (step, validation bits per character) at every evaluation.
    pub curve: Vec<(usize, f64)>,
    pub sample: String,
}

// ANCHOR: compete
/// The settings every contender shares: one text, one preset, one seed.
pub struct Race<'a> {
    pub text: &'a str,
    pub preset: &'a str,
    pub overrides: Overrides,
    pub seed: u64,
    pub device: Device,
    /// About how many characters to sample from each trained model.
    pub sample_chars: usize,
}

/// Trains the race's preset on its text cut into tokens by `tokenizer`, then measures the
/// model per character and samples from it.
pub fn compete<T: Vocab>(race: &Race, name: &str, tokenizer: T) -> Result<Outcome> {
    let data = Dataset::tokenized(race.text, tokenizer)?;
    let vocab = data.tokenizer.vocab_size();
    let cfg = PretrainConfig::build(race.preset, vocab, &race.overrides, race.seed)?;
    let model = cfg.model.init(&race.device.clone().autodiff());
    let model = model.with_kernels(FUSED);
    let parameters = model.num_params();
    let mut optim = optimizer(&cfg);
    let settings = train_settings(&cfg, None);
    let (model, report) = train(model, &mut optim, &data, &settings, 0, &mut Schedule(&cfg))?;
    let last = report
        .losses
        .last()
        .expect("the loop evaluates after its last step");
    let chars_per_token = data.val_chars as f64 / data.val.len() as f64;
    let tokens_per_step = (cfg.batch_size * cfg.model.block_size) as f64;
    Ok(Outcome {
        name: name.to_string(),
        vocab_size: vocab,
        parameters,
        chars_per_token,
        gflop_per_step: cfg.model.flops_per_token() * tokens_per_step / 1e9,
        chars_per_step: tokens_per_step * data.train_chars as f64 / data.train.len() as f64,
        val_loss: last.val,
        val_bits_per_char: data.bits_per_char(Split::Val, last.val),
        whole_val_bits_per_char: whole_split_bits(&model, &data, Split::Val, cfg.batch_size),
        train_seconds: report.train_seconds,
        curve: (report.losses.iter())
            .map(|r| (r.step, data.bits_per_char(Split::Val, r.val)))
            .collect(),
        sample: sample(
            &model,
            &data.tokenizer,
            race.sample_chars as f64 / chars_per_token,
            race.seed,
        ),
    })
}
// ANCHOR_END: compete

// ANCHOR: whole_split
/// The model's code length for a whole split, in bits per character: the split cut into
/// consecutive blocks, every token after a block's first predicted from the ones before it
/// in its block; the summed loss divided by the characters of the predicted tokens.
pub fn whole_split_bits<M: LanguageModel, T: Vocab>(
    model: &M,
    data: &Dataset<T>,
    split: Split,
    batch: usize,
) -> f64 {
    let model = model.valid();
    let ids = data.split(split);
    let t = model.block_size();
    let blocks = (ids.len() - 1) / t; // whole blocks with their shifted targets
    let device = crate::common::train::model_device(&model);
    let mut nats = 0.0;
    for first in (0..blocks).step_by(batch) {
        let b = batch.min(blocks - first);
        let window = |shift: usize| {
            let start = first * t + shift;
            let v: Vec<i64> = ids[start..start + b * t]
                .iter()
                .map(|&i| i as i64)
                .collect();
            ids_tensor(v, [b, t], &device)
        };
        let mean = model.loss(window(0), window(1)).into_scalar::<f32>() as f64;
        nats += mean * (b * t) as f64;
    }
    // Decoded in one piece: a character cut between two blocks still counts once.
    let chars = data
        .tokenizer
        .decode(&ids[1..blocks * t + 1])
        .chars()
        .count();
    nats / chars as f64 / std::f64::consts::LN_2
}
// ANCHOR_END: whole_split

/// About `chars` characters (whole tokens) generated after a newline, at temperature 0.8.
fn sample<M: LanguageModel, T: Vocab>(model: &M, tokenizer: &T, chars: f64, seed: u64) -> String {
    let n = chars.ceil() as usize;
    let opts = SampleOptions {
        temperature: 0.8,
        top_k: None,
        top_p: None,
    };
    let context = tokenizer
        .encode("\n")
        .expect("every tokenizer here encodes a newline");
    let mut rng = rng_for(seed, stream::SAMPLE, 7);
    tokenizer.decode(&generate(model, &context, n, opts, &mut rng, |_| {}))
}
