//! Train/validation split and random batches of (input, target) blocks.

use crate::common::tokenizer::{CharTokenizer, Vocab};
use anyhow::{Result, bail};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// The encoded corpus, split 90/10 into a training and a validation part. Chapters 1 to 6
/// read characters; chapter 4's trainer can also read chapter 7's tokens (any [`Vocab`]).
pub struct Dataset<T = CharTokenizer> {
    pub tokenizer: T,
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    /// How many characters of text each split's tokens stand for.
    pub train_chars: usize,
    pub val_chars: usize,
}

impl Dataset {
    // ANCHOR: split
    /// Encodes `text` and splits it: the first 90% trains, the last 10% validates.
    pub fn new(text: &str) -> Result<Self> {
        let tokenizer = CharTokenizer::from_text(text);
        let data = tokenizer.encode(text)?;
        let n = data.len() * 9 / 10;
        Ok(Self {
            tokenizer,
            val: data[n..].to_vec(),
            train: data[..n].to_vec(),
            train_chars: n,
            val_chars: data.len() - n,
        })
    }
    // ANCHOR_END: split
}

impl<T: Vocab> Dataset<T> {
    // ANCHOR: tokenized
    /// Splits `text` at 90% of its characters, then encodes each part: the same training
    /// and validation text as `Dataset::new`, whatever the tokenizer, so that losses can be
    /// compared per character.
    pub fn tokenized(text: &str, tokenizer: T) -> Result<Self> {
        let (train, val) = split_text(text);
        Ok(Self {
            train: tokenizer.encode(train)?,
            val: tokenizer.encode(val)?,
            tokenizer,
            train_chars: train.chars().count(),
            val_chars: val.chars().count(),
        })
    }
    // ANCHOR_END: tokenized
}

/// The first 90% of `text`'s characters (to train on) and the rest (to validate on):
/// chapter 1's split, made on the text instead of on token ids.
pub fn split_text(text: &str) -> (&str, &str) {
    let n = text.chars().count() * 9 / 10;
    let at = text.char_indices().nth(n).map_or(text.len(), |(i, _)| i);
    text.split_at(at)
}

impl<T> Dataset<T> {
    // ANCHOR: bits_per_char
    /// A loss in nats per token of `split`, as bits per character of its text: the
    /// measure that does not depend on how the text was cut into tokens.
    pub fn bits_per_char(&self, split: Split, loss: f64) -> f64 {
        let (tokens, chars) = match split {
            Split::Train => (self.train.len(), self.train_chars),
            Split::Val => (self.val.len(), self.val_chars),
        };
        loss * tokens as f64 / chars.max(1) as f64 / std::f64::consts::LN_2
    }
    // ANCHOR_END: bits_per_char

    pub fn split(&self, split: Split) -> &[usize] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Both splits must hold at least one block plus its shifted target.
    pub fn check_block_size(&self, block_size: usize) -> Result<()> {
        if block_size == 0 {
            bail!("block size must be at least 1");
        }
        let shortest = self.train.len().min(self.val.len());
        if shortest < block_size + 1 {
            bail!(
                "the text is too short for block size {block_size}: the validation split has {} \
                 tokens and the training split {}, each needs at least {} \
                 (use a longer text or a smaller --block-size)",
                self.val.len(),
                self.train.len(),
                block_size + 1
            );
        }
        Ok(())
    }

    // ANCHOR: sample_ids
    /// Token ids of a random batch: `x[b]` is a block of the split, `y[b]` the same block
    /// shifted one character to the left, `y[b][t] = x[b][t + 1]` (the next character at every
    /// position).
    pub fn sample_ids(
        &self,
        split: Split,
        batch_size: usize,
        block_size: usize,
        rng: &mut StdRng,
    ) -> (Vec<i64>, Vec<i64>) {
        let data = self.split(split);
        let mut x = Vec::with_capacity(batch_size * block_size);
        let mut y = Vec::with_capacity(batch_size * block_size);
        for _ in 0..batch_size {
            let i = rng.random_range(0..data.len() - block_size);
            x.extend(data[i..i + block_size].iter().map(|&t| t as i64));
            y.extend(data[i + 1..i + block_size + 1].iter().map(|&t| t as i64));
        }
        (x, y)
    }
    // ANCHOR_END: sample_ids

    /// A random batch as tensors on `device`: `x, y: [batch, block]`.
    pub fn batch(
        &self,
        split: Split,
        batch_size: usize,
        block_size: usize,
        rng: &mut StdRng,
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let (x, y) = self.sample_ids(split, batch_size, block_size, rng);
        let shape = [batch_size, block_size];
        (ids_tensor(x, shape, device), ids_tensor(y, shape, device))
    }
}

/// Token ids to an integer tensor of the given shape.
pub fn ids_tensor(ids: Vec<i64>, shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids, shape), device)
}

/// A reproducible random stream for one purpose at one step. Deriving every batch from
/// (seed, purpose, step) rather than from one long-lived generator means a run resumed at
/// step k draws exactly the batches the uninterrupted run drew.
pub fn rng_for(seed: u64, purpose: u64, step: usize) -> StdRng {
    // SplitMix-style mixing so that neighbouring steps get unrelated streams.
    let mut z = seed
        ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// The purposes `rng_for` separates.
pub mod stream {
    pub const TRAIN: u64 = 1;
    /// Loss estimates on the training split and on the validation split.
    pub const EVAL_TRAIN: u64 = 2;
    pub const EVAL_VAL: u64 = 5;
    pub const SAMPLE: u64 = 3;
    pub const DEMO: u64 = 4;
    /// The seed of Burn's generator for one training step's dropout masks.
    pub const DROPOUT: u64 = 6;
}
