//! Chapter 1: the bigram language model. Each character predicts the next one from a
//! lookup table alone: row `i` of a `vocab x vocab` table holds the logits of the character
//! that follows character `i`.

use crate::common::train::LanguageModel;
use burn::nn::{Embedding, EmbeddingConfig, Initializer};
use burn::prelude::*;

// ANCHOR: model
#[derive(Config, Debug)]
pub struct BigramConfig {
    pub vocab_size: usize,
    /// Standard deviation of the initial table. 1.0 is PyTorch's `nn.Embedding` default
    /// (and the lecture's); a small value makes every first prediction nearly uniform.
    #[config(default = 1.0)]
    pub init_std: f64,
}

#[derive(Module, Debug)]
pub struct Bigram {
    /// `[vocab, vocab]`: row = current character, columns = logits of the next one.
    pub token_embedding_table: Embedding,
}

impl BigramConfig {
    pub fn init(&self, device: &Device) -> Bigram {
        let initializer = Initializer::Normal {
            mean: 0.0,
            std: self.init_std,
        };
        Bigram {
            token_embedding_table: EmbeddingConfig::new(self.vocab_size, self.vocab_size)
                .with_initializer(initializer)
                .init(device),
        }
    }
}

impl LanguageModel for Bigram {
    fn forward(&self, idx: Tensor<2, Int>) -> Tensor<3> {
        self.token_embedding_table.forward(idx) // [batch, time, vocab]
    }

    /// A bigram reads only the current character.
    fn block_size(&self) -> usize {
        1
    }
}
// ANCHOR_END: model

// ANCHOR: counted
/// The bigram table without gradient descent: count how often each character follows each
/// other one, and turn each row of counts into probabilities. With `alpha = 0` this is the
/// maximum-likelihood table, the exact minimum of the training loss over all bigram tables;
/// `alpha > 0` adds that many imaginary sightings of every pair ("add-one" smoothing at 1), so
/// that a pair never seen in training does not get probability zero on new text.
pub fn counted_bigram(tokens: &[usize], vocab_size: usize, alpha: f64) -> Vec<f64> {
    let v = vocab_size;
    let mut counts = vec![alpha; v * v]; // [current * v + next]
    for w in tokens.windows(2) {
        counts[w[0] * v + w[1]] += 1.0;
    }
    for row in counts.chunks_mut(v) {
        let total: f64 = row.iter().sum();
        row.iter_mut()
            .for_each(|c| *c /= total.max(f64::MIN_POSITIVE));
    }
    counts // each row is p(next | current)
}

/// Mean negative log-likelihood of every consecutive pair of `tokens` under a table of
/// probabilities: the loss, computed exactly rather than estimated from batches.
pub fn bigram_nll(probs: &[f64], tokens: &[usize], vocab_size: usize) -> f64 {
    let total: f64 = tokens
        .windows(2)
        .map(|w| -probs[w[0] * vocab_size + w[1]].ln())
        .sum();
    total / (tokens.len() - 1) as f64
}
// ANCHOR_END: counted
