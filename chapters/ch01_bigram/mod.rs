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
}
// ANCHOR_END: model
