//! Chapter 9: fine-tuning, the second half of GPT-1's recipe. A pre-trained decoder gets a task
//! head (a linear layer on the last token's state), its input is transformed with tokens it has
//! never seen (start, extract), and language modelling continues beside the task as an
//! auxiliary loss. Then the same model is fine-tuned four ways (from scratch, fully, its last
//! block only, LoRA adapters), and GPT-2 is taught to follow instructions.

pub mod classify;
pub mod instruct;
pub mod lora;
pub mod task;

use crate::ch03_gpt::Gpt;
use burn::module::Param;
use burn::nn::Embedding;
use burn::prelude::*;
use burn::tensor::Distribution;

// ANCHOR: add_tokens
/// The same model with `n` new tokens at the end of its vocabulary (ids `vocab`, `vocab + 1`,
/// ...), their embeddings drawn as GPT-1 draws every weight, N(0, 0.02). GPT-1's fine-tuning
/// adds its start, delimiter and extract tokens this way; with a tied head, the model can
/// also predict them.
pub fn add_tokens(mut model: Gpt, n: usize) -> Gpt {
    let old = model.wte.weight.val(); // [vocab, c]
    let [_, c] = old.dims();
    let device = old.device();
    let new = Tensor::<2>::random([n, c], Distribution::Normal(0.0, 0.02), &device);
    // Through the host: the new table is a parameter of its own, not a function of the old one.
    let table = Tensor::cat(vec![old, new], 0).into_data(); // [vocab + n, c]
    model.wte = Embedding {
        weight: Param::from_tensor(Tensor::from_data(table, &device)),
    };
    model
}
// ANCHOR_END: add_tokens

// ANCHOR: loss_at
/// Mean next-token cross-entropy over some positions only: `rows` are indices into the
/// `b * t` positions of `idx: [b, t]`, `targets` the token each of them should predict. Only
/// the kept positions go through the output head, so masked ones cost nothing there; the mean
/// is over the kept ones, as PyTorch's `ignore_index` gives it.
pub fn lm_loss_at(
    model: &Gpt,
    idx: Tensor<2, Int>,
    rows: Tensor<1, Int>,
    targets: Tensor<1, Int>,
) -> Tensor<1> {
    let h = model.hidden(idx); // [b, t, c]
    let [b, t, c] = h.dims();
    let n = rows.dims()[0];
    let kept = h.reshape([b * t, c]).select(0, rows); // [n, c]
    let logits = model.logits(kept.reshape([1, n, c])); // [1, n, vocab]
    model.kernels.cross_entropy(logits, targets.reshape([1, n]))
}
// ANCHOR_END: loss_at

/// Integer ids as a 1-D tensor.
pub fn ids_1d(ids: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [ids.len()]), device)
}
