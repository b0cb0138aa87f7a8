//! Checkpoints: a folder holding the model weights, the optimizer state and a JSON file with
//! the step, the config, the vocabulary and the losses so far. A checkpoint is written to a
//! temporary folder and swapped in by renames, so a crash never leaves half of one.

use super::PretrainConfig;
use crate::ch03_gpt::Gpt;
use crate::common::report::{write_atomic, write_json};
use crate::common::tokenizer::Vocab;
use crate::common::train::{LossRecord, StepRecord};
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

const MODEL: &str = "model.bpk";
const OPTIMIZER: &str = "optimizer.bpk";
const META: &str = "meta.json";
/// Bumped whenever the layout of a checkpoint changes (3: the whole tokenizer, not only
/// a character vocabulary).
pub const FORMAT: u32 = 3;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta<T> {
    pub format: u32,
    /// Steps completed.
    pub step: usize,
    pub config: PretrainConfig,
    /// The tokenizer the model reads, saved whole (the binaries use chapter 8's `Tokenizer`:
    /// characters in id order, chapter 7's whole BPE file, or GPT-1's files).
    pub tokenizer: T,
    /// Val loss at this step, and the best seen so far.
    pub val_loss: f64,
    pub best_val_loss: f64,
    pub losses: Vec<LossRecord>,
    /// Every optimizer step so far (the per-step log).
    pub steps: Vec<StepRecord>,
    pub backend: String,
}

/// Saves into `dir` (replacing what was there).
pub fn save<T: Serialize>(
    dir: &Path,
    model: &Gpt,
    optim: Option<&ModuleOptimizer>,
    meta: &Meta<T>,
) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    let old = sibling(dir, "old");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let weights = model
        .clone()
        .into_record()
        .into_bytes()
        .context("cannot serialise the model")?;
    write_atomic(&tmp.join(MODEL), &weights)?;
    if let Some(optim) = optim {
        let state = optim
            .into_bytes()
            .context("cannot serialise the optimizer")?;
        write_atomic(&tmp.join(OPTIMIZER), &state)?;
    }
    write_json(&tmp.join(META), meta)?;
    // Swap: dir -> dir.old, tmp -> dir, drop dir.old. `load` falls back to dir.old if a crash
    // came between the two renames.
    let _ = fs::remove_dir_all(&old);
    if dir.exists() {
        fs::rename(dir, &old).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    fs::rename(&tmp, dir).with_context(|| format!("cannot write {}", dir.display()))?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!("{name}.{suffix}"))
}

/// Reads only the metadata of a checkpoint.
pub fn read_meta<T: DeserializeOwned>(dir: &Path) -> Result<(PathBuf, Meta<T>)> {
    let dir = if !dir.join(META).exists() && sibling(dir, "old").join(META).exists() {
        sibling(dir, "old")
    } else {
        dir.to_path_buf()
    };
    if !dir.join(META).exists() {
        bail!(
            "no checkpoint in {} (train first: `ch04_pretrain --out DIR` saves into DIR/ckpt/)",
            dir.display()
        );
    }
    let text = fs::read_to_string(dir.join(META))
        .with_context(|| format!("cannot read {}", dir.join(META).display()))?;
    let corrupt = || {
        format!(
            "the checkpoint file {} is corrupt",
            dir.join(META).display()
        )
    };
    // The format first: an older checkpoint lacks fields this build expects, and should be
    // told so rather than called corrupt.
    #[derive(serde::Deserialize)]
    struct Format {
        format: u32,
    }
    let format = serde_json::from_str::<Format>(&text)
        .with_context(corrupt)?
        .format;
    if format != FORMAT {
        bail!(
            "checkpoint format {format} in {} (this build reads {FORMAT}): train it again",
            dir.display()
        );
    }
    let meta: Meta<T> = serde_json::from_str(&text).with_context(corrupt)?;
    Ok((dir, meta))
}

/// Loads a checkpoint onto `device`: the model built from the saved config, its weights,
/// and, when an optimizer is passed in, its saved state.
pub fn load<T: Vocab + DeserializeOwned>(
    dir: &Path,
    device: &Device,
    optim: Option<ModuleOptimizer>,
) -> Result<(Gpt, Option<ModuleOptimizer>, Meta<T>)> {
    let (dir, meta) = read_meta::<T>(dir)?;
    if meta.tokenizer.vocab_size() != meta.config.model.vocab_size {
        bail!(
            "the checkpoint in {} is inconsistent: a tokenizer of {} for a {}-token model",
            dir.display(),
            meta.tokenizer.describe(),
            meta.config.model.vocab_size
        );
    }
    let path = dir.join(MODEL);
    let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes)).map_err(|e| {
        anyhow::anyhow!(
            "the checkpoint file {} is corrupt or truncated: {e:?}",
            path.display()
        )
    })?;
    let model = meta
        .config
        .model
        .init(device)
        .try_load_record(record)
        .map_err(|e| {
            anyhow::anyhow!(
                "the weights in {} do not fit the model in its meta.json: {e:?}",
                path.display()
            )
        })?;
    let optim = match optim {
        None => None,
        Some(optim) => {
            let path = dir.join(OPTIMIZER);
            let bytes =
                fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            Some(
                optim
                    .from_bytes(Bytes::from_bytes_vec(bytes))
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "the optimizer state {} is corrupt or truncated: {e:?}",
                            path.display()
                        )
                    })?,
            )
        }
    };
    Ok((model, optim, meta))
}

/// Refuses to resume a checkpoint made with another config or tokenizer, naming what differs.
/// Only the length of the run (`steps`, which must go beyond the checkpoint's step) and its
/// evaluations (`eval_interval`, `eval_iters`) may change: returns a note for each that did.
pub fn check_compatible<T: Vocab>(
    meta: &Meta<T>,
    config: &PretrainConfig,
    tokenizer: &T,
) -> Result<Vec<String>> {
    check_tokenizer(meta, tokenizer)?;
    // The checkpoint's config with this run's length and evaluations: the rest must match,
    // since the weights, the optimizer state and the batches were made with it.
    let saved = PretrainConfig {
        steps: config.steps,
        eval_interval: config.eval_interval,
        eval_iters: config.eval_iters,
        ..meta.config.clone()
    };
    if &saved != config {
        let a = serde_json::to_value(&saved)?;
        let b = serde_json::to_value(config)?;
        let mut diffs = Vec::new();
        diff_json("", &a, &b, &mut diffs);
        bail!(
            "the checkpoint was made with another config: {}",
            diffs.join(", ")
        );
    }
    if meta.step >= config.steps {
        bail!(
            "the checkpoint is at step {} and this run ends at step {}: pass a larger --steps \
             to train further",
            meta.step,
            config.steps
        );
    }
    let (old, new) = (&meta.config, config);
    let mut notes = Vec::new();
    if old.steps != new.steps {
        notes.push(format!(
            "steps {} -> {}: the cosine schedule now decays over {} steps",
            old.steps, new.steps, new.steps
        ));
    }
    if old.eval_interval != new.eval_interval {
        notes.push(format!(
            "eval interval {} -> {}: losses are estimated every {} steps from here on",
            old.eval_interval, new.eval_interval, new.eval_interval
        ));
    }
    if old.eval_iters != new.eval_iters {
        notes.push(format!(
            "eval iters {} -> {}: each loss estimate averages {} batches from here on",
            old.eval_iters, new.eval_iters, new.eval_iters
        ));
    }
    Ok(notes)
}

/// Checks only that the checkpoint reads the same tokens with the same ids.
pub fn check_tokenizer<T: Vocab>(meta: &Meta<T>, tokenizer: &T) -> Result<()> {
    match (&meta.tokenizer, tokenizer) {
        (a, b) if a.same_as(b) => Ok(()),
        (a, b) if a.is_characters() && b.is_characters() => bail!(
            "the checkpoint's vocabulary ({} characters) differs from this text's ({} characters): \
             it was trained on another corpus",
            a.vocab_size(),
            b.vocab_size()
        ),
        (a, b) => bail!(
            "the checkpoint was trained with another tokenizer ({}) than this run's ({}): \
             pass the --tokenizer it was trained with",
            a.describe(),
            b.describe()
        ),
    }
}

fn diff_json(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            for (k, va) in x {
                let vb = y.get(k).unwrap_or(&serde_json::Value::Null);
                diff_json(&format!("{prefix}{k}."), va, vb, out);
            }
        }
        _ if a != b => out.push(format!(
            "{} is {a} there, {b} here",
            prefix.trim_end_matches('.')
        )),
        _ => {}
    }
}
