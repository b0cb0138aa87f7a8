//! Instruction fine-tuning, as LLMs-from-scratch's chapter 7 does it: records of (instruction,
//! input, output) in the Alpaca prompt format, batches padded with the end-of-text token, the
//! padding (and optionally the prompt) left out of the loss.

use super::{ids_1d, lm_loss_at};
use crate::ch03_gpt::Gpt;
use crate::ch06_generate::{KvCache, config_of, forward_cached};
use crate::common::data::{Remote, download_remote};
use crate::common::dataset::{rng_for, stream};
use crate::common::tokenizer::Vocab;
use crate::common::train::{LanguageModel, clip_grad_norm, model_device};
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

// ANCHOR: record
/// One record of `instruction-data.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub instruction: String,
    /// Extra input the instruction refers to; often empty.
    #[serde(default)]
    pub input: String,
    pub output: String,
}

/// The Alpaca prompt: a preamble, the instruction, the input when there is one, and the
/// heading the model answers under.
pub fn prompt(r: &Record) -> String {
    let mut p = format!(
        "Below is an instruction that describes a task. Write a response that appropriately \
         completes the request.\n\n### Instruction:\n{}",
        r.instruction
    );
    if !r.input.is_empty() {
        p += &format!("\n\n### Input:\n{}", r.input);
    }
    p + "\n\n### Response:\n"
}
// ANCHOR_END: record

/// LLMs-from-scratch's 1,100 records (Apache-2.0), pinned at one commit.
pub const INSTRUCTION_URL: &str = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/28c65cd/ch07/01_main-chapter-code/instruction-data.json";
pub const INSTRUCTION_SHA256: &str =
    "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944";

/// `file`, else `$GPT_INSTRUCTIONS`, else the download in `data/` (fetched on first use).
pub fn instruction_file(file: Option<&Path>) -> Result<PathBuf> {
    if let Some(file) = file {
        return Ok(file.to_path_buf());
    }
    if let Some(env) = std::env::var_os("GPT_INSTRUCTIONS").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(env));
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/instruction-data.json");
    if !path.exists() {
        let remote = Remote {
            url: INSTRUCTION_URL,
            sha256: INSTRUCTION_SHA256,
            size: None,
            offline_hint: "No network? Pass --instructions FILE (or set GPT_INSTRUCTIONS) to a \
                           local copy of instruction-data.json.",
        };
        download_remote(&remote, &path)?;
    }
    Ok(path)
}

// ANCHOR: load_records
/// Reads a JSON list of records; a malformed file or a record without `instruction` or
/// `output` is an error naming the line.
pub fn load_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the instruction file {}", path.display()))?;
    let records: Vec<Record> = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a list of {{\"instruction\", \"input\", \"output\"}} records: {e}",
            path.display()
        )
    })?;
    if records.len() < 20 {
        bail!(
            "{} holds {} records; the 85/10/5 split needs at least 20",
            path.display(),
            records.len()
        );
    }
    Ok(records)
}

/// LLMs-from-scratch's split, in file order: the first 85% train, the next 10% test, the last
/// 5% validate.
pub fn split(records: &[Record]) -> (&[Record], &[Record], &[Record]) {
    let train = records.len() * 85 / 100;
    let test = records.len() / 10;
    let (train_part, rest) = records.split_at(train);
    let (test_part, val_part) = rest.split_at(test);
    (train_part, test_part, val_part)
}
// ANCHOR_END: load_records

/// A record as token ids: the prompt's and the response's, which follow it.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokens {
    pub ids: Vec<usize>,
    pub prompt_len: usize,
}

/// Encodes prompt and response; a prompt that leaves no room in the context for a response is
/// an error, a response too long for it is cut.
pub fn encode<T: Vocab>(tok: &T, r: &Record, block_size: usize) -> Result<Tokens> {
    let p = tok.encode(&prompt(r))?;
    if p.len() >= block_size {
        bail!(
            "the prompt of the instruction {:?} is {} tokens, but the model reads at most {block_size}",
            r.instruction.chars().take(40).collect::<String>(),
            p.len()
        );
    }
    let mut ids = p.clone();
    ids.extend(tok.encode(&r.output)?);
    ids.truncate(block_size);
    Ok(Tokens {
        prompt_len: p.len(),
        ids,
    })
}

// ANCHOR: collate
/// A padded batch: inputs `[b, t]`, and the positions the loss counts with their targets.
pub struct LmBatch {
    pub inputs: Tensor<2, Int>,
    pub rows: Tensor<1, Int>,
    pub targets: Tensor<1, Int>,
    /// How many targets count.
    pub count: usize,
}

/// LLMs-from-scratch's collate: each sequence gets the end-of-text token `eot`, and is padded
/// with it to the longest one's length + 1; inputs are all but the last token, targets all but
/// the first. A target counts if it is a response token or the first end-of-text (the model
/// must learn to stop), not the padding after it; with `mask_prompt`, not the prompt either.
pub fn collate(examples: &[&Tokens], eot: usize, mask_prompt: bool, device: &Device) -> LmBatch {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let (mut inputs, mut rows, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for (i, e) in examples.iter().enumerate() {
        let mut padded = e.ids.clone();
        padded.resize(t + 1, eot); // [t + 1]: at least one end-of-text
        inputs.extend(padded[..t].iter().map(|&id| id as i64));
        for j in 0..t {
            // Target j is padded[j + 1]: a token of the record, or its first end-of-text.
            let counts = j < e.ids.len() && (!mask_prompt || j + 1 >= e.prompt_len);
            if counts {
                rows.push(i * t + j);
                targets.push(padded[j + 1]);
            }
        }
    }
    LmBatch {
        inputs: Tensor::from_data(TensorData::new(inputs, [examples.len(), t]), device),
        count: rows.len(),
        rows: ids_1d(&rows, device),
        targets: ids_1d(&targets, device),
    }
}
// ANCHOR_END: collate

/// The masked next-token loss of a batch (the mean over the targets that count).
pub fn batch_loss(model: &Gpt, batch: &LmBatch) -> Tensor<1> {
    lm_loss_at(
        model,
        batch.inputs.clone(),
        batch.rows.clone(),
        batch.targets.clone(),
    )
}

/// The knobs of instruction tuning.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct InstructSettings {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub mask_prompt: bool,
    pub seed: u64,
    pub eval_interval: usize,
}

/// Losses along the way.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InstructReport {
    pub train: Vec<(usize, f64)>,
    pub val: Vec<(usize, f64)>,
    pub ms_per_step: f64,
    pub tokens_per_second: f64,
}

/// The mean loss over `data` (inference copy, batches in order).
pub fn mean_loss(model: &Gpt, data: &[Tokens], eot: usize, s: &InstructSettings) -> f64 {
    let model = model.valid();
    let device = model_device(&model);
    let (mut total, mut count) = (0.0, 0);
    for chunk in data.chunks(s.batch_size) {
        let refs: Vec<&Tokens> = chunk.iter().collect();
        let b = collate(&refs, eot, s.mask_prompt, &device);
        total += batch_loss(&model, &b).into_scalar::<f32>() as f64 * b.count as f64;
        count += b.count;
    }
    total / count.max(1) as f64
}

// ANCHOR: train_step
/// One step on a batch: the masked loss, its gradients clipped to norm 1, AdamW's update.
/// Returns the model and the loss before the update.
pub fn train_step(
    model: Gpt,
    optim: &mut ModuleOptimizer,
    batch: &LmBatch,
    lr: f64,
) -> Result<(Gpt, f64)> {
    let loss = batch_loss(&model, batch);
    let value = loss.clone().into_scalar::<f32>() as f64;
    if !value.is_finite() {
        bail!("the instruction-tuning loss became {value}");
    }
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let (grads, _) = clip_grad_norm(grads, &model, Some(1.0));
    Ok((optim.step(lr, model, grads), value))
}
// ANCHOR_END: train_step

// ANCHOR: instruct
/// AdamW on the training records, epoch by epoch in a shuffled order drawn from (seed, epoch);
/// the validation loss every `eval_interval` steps and at the end.
pub fn instruct(
    mut model: Gpt,
    train: &[Tokens],
    val: &[Tokens],
    eot: usize,
    s: &InstructSettings,
    mut on_eval: impl FnMut(usize, Option<f64>, f64),
) -> Result<(Gpt, InstructReport)> {
    if train.is_empty() || s.batch_size == 0 {
        bail!("instruction tuning needs records and a batch of at least one");
    }
    let device = model_device(&model);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(s.weight_decay as f32)
        .init();
    let mut report = InstructReport::default();
    let (mut order, mut next, mut epoch) = (Vec::new(), 0, 0);
    let (mut train_ms, mut tokens) = (0.0, 0);
    for step in 0..=s.steps {
        if step % s.eval_interval.max(1) == 0 || step == s.steps {
            let v = mean_loss(&model, val, eot, s);
            // The mean training loss of the steps since the last evaluation (none at step 0).
            let recent: Vec<f64> = (report.train.iter().rev().take(s.eval_interval.max(1)))
                .map(|&(_, l)| l)
                .collect();
            let t = (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64);
            report.val.push((step, v));
            on_eval(step, t, v);
        }
        if step == s.steps {
            break;
        }
        if next + s.batch_size > order.len() {
            order = (0..train.len()).collect();
            order.shuffle(&mut rng_for(s.seed, stream::TRAIN, epoch));
            (next, epoch) = (0, epoch + 1);
        }
        let picked: Vec<&Tokens> = (order[next..(next + s.batch_size).min(order.len())].iter())
            .map(|&i| &train[i])
            .collect();
        next += s.batch_size;
        if model.has_dropout() {
            device.seed(rand::RngExt::random(&mut rng_for(
                s.seed,
                stream::DROPOUT,
                step,
            )));
        }
        let tick = Instant::now();
        let batch = collate(&picked, eot, s.mask_prompt, &device);
        let value;
        (model, value) = train_step(model, &mut optim, &batch, s.lr)
            .with_context(|| format!("at step {step} (try a lower --lr)"))?;
        train_ms += tick.elapsed().as_secs_f64() * 1e3;
        tokens += batch.inputs.dims().iter().product::<usize>();
        report.train.push((step, value));
    }
    report.ms_per_step = train_ms / s.steps.max(1) as f64;
    report.tokens_per_second = tokens as f64 / (train_ms / 1e3).max(1e-9);
    Ok((model, report))
}
// ANCHOR_END: instruct

// ANCHOR: respond
/// The model's answer to a prompt: greedy, token by token with chapter 6's cache, until the
/// end-of-text token, `max_new` tokens, or the end of the context.
pub fn respond(model: &Gpt, prompt: &[usize], eot: usize, max_new: usize) -> Vec<usize> {
    let model = model.valid();
    let device = model_device(&model);
    let mut cache = KvCache::new(&config_of(&model), 1, false, &device);
    let (mut out, mut feed) = (Vec::new(), prompt.to_vec());
    while out.len() < max_new && prompt.len() + out.len() < model.block_size {
        let ids: Vec<i64> = feed.iter().map(|&t| t as i64).collect();
        let idx = Tensor::from_data(TensorData::new(ids, [1, feed.len()]), &device);
        let logits = forward_cached(&model, idx, &mut cache); // [1, t, vocab]
        let [_, t, v] = logits.dims();
        let last = logits.slice(s![.., t - 1..t, ..]).reshape([v]);
        let token = last.argmax(0).into_scalar::<i64>() as usize;
        if token == eot {
            break;
        }
        out.push(token);
        feed = vec![token];
    }
    out
}
// ANCHOR_END: respond
