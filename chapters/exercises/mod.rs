//! Solutions to the exercises at the end of each chapter. They are compiled with the course
//! and checked by `tests/exercises.rs`, so a solution that stops working fails the build.

use crate::ch01_bigram::{bigram_nll, counted_bigram};
use crate::ch02_attention::{MultiHeadAttention, causal_attention};
use crate::common::dataset::Dataset;
use crate::common::dataset::ids_tensor;
use crate::common::train::{LanguageModel, cross_entropy, model_device};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use rand::RngExt;
use rand::rngs::StdRng;

// ANCHOR: ch01_smoothing
/// Chapter 1, exercise 2: how much smoothing suits the counted table? The validation loss of
/// `counted_bigram` for each `alpha`, as (alpha, loss) pairs.
pub fn smoothing_sweep(data: &Dataset, alphas: &[f64]) -> Vec<(f64, f64)> {
    let v = data.tokenizer.vocab_size();
    alphas
        .iter()
        .map(|&alpha| {
            (
                alpha,
                bigram_nll(&counted_bigram(&data.train, v, alpha), &data.val, v),
            )
        })
        .collect()
}
// ANCHOR_END: ch01_smoothing

// ANCHOR: ch01_temperature
/// Chapter 1, exercise 3: the entropy (in nats) of the distribution that temperature `t`
/// makes of `logits`. Higher temperature, flatter distribution, higher entropy.
pub fn entropy_at_temperature(logits: &[f32], t: f64) -> f64 {
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / t).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scaled.iter().map(|l| (l - max).exp()).collect();
    let z: f64 = exps.iter().sum();
    exps.iter()
        .map(|e| e / z)
        .filter(|&p| p > 0.0)
        .map(|p| -p * p.ln())
        .sum()
}
// ANCHOR_END: ch01_temperature

// ANCHOR: ch02_loop
/// Chapter 2, exercise 1: multi-head attention as a loop over heads. Head `h` uses columns
/// `h*hs..(h+1)*hs` of the queries, keys and values; the outputs are concatenated and
/// projected. It must equal the batched `MultiHeadAttention::forward`.
pub fn multi_head_as_loop(mha: &MultiHeadAttention, x: Tensor<3>) -> Tensor<3> {
    let [b, t, c] = x.dims();
    let hs = c / mha.n_head;
    let qkv = mha.c_attn.forward(x); // [b, t, 3c]
    let cols = |from: usize| qkv.clone().slice(s![0..b, 0..t, from..from + hs]); // [b, t, hs]
    let heads: Vec<Tensor<3>> = (0..mha.n_head)
        .map(|h| causal_attention(cols(h * hs), cols(c + h * hs), cols(2 * c + h * hs)).0)
        .collect();
    mha.c_proj.forward(Tensor::cat(heads, 2)) // [b, t, c]
}
// ANCHOR_END: ch02_loop

// ANCHOR: ch02_unmasked
/// Chapter 2, exercise 2: attention without the causal mask. Every position now sees the
/// future, including the very character it is supposed to predict.
pub fn unmasked_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
    let hs = q.dims()[2];
    let wei = softmax(q.matmul(k.swap_dims(1, 2)) / (hs as f64).sqrt(), 2); // [b, t, t]
    wei.matmul(v)
}
// ANCHOR_END: ch02_unmasked

// ANCHOR: ch02_peaky
/// Chapter 2, exercise 3: the average largest weight per row of softmax(q k^T * scale):
/// near 1/t for soft attention, near 1 when softmax has turned one-hot.
pub fn mean_row_max(q: Tensor<3>, k: Tensor<3>, scale: f64) -> f32 {
    let wei = softmax(q.matmul(k.swap_dims(1, 2)) * scale, 2); // [b, t, t]
    wei.max_dim(2).mean().into_scalar::<f32>()
}
// ANCHOR_END: ch02_peaky

// ANCHOR: ch03_rms_norm
/// Chapter 3, exercise 2: RMSNorm (used by LLaMA and most models since): LayerNorm without
/// the mean subtraction and without the shift, `x / sqrt(mean(x^2) + eps) * gamma`.
pub fn rms_norm(x: Tensor<3>, gamma: Tensor<1>, eps: f64) -> Tensor<3> {
    let rms = (x.clone().square().mean_dim(2) + eps).sqrt(); // [b, t, 1]
    x / rms * gamma.unsqueeze::<3>()
}
// ANCHOR_END: ch03_rms_norm

// ANCHOR: ch04_top_p
/// Chapter 4, exercise 1: nucleus (top-p) sampling. Keep the most likely tokens until their
/// probabilities add up to `p`, renormalise, and sample among those.
pub fn pick_top_p(logits: &[f32], p: f64, rng: &mut StdRng) -> usize {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let probs: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut nucleus = Vec::new();
    let mut mass = 0.0;
    for &i in &order {
        nucleus.push(i);
        mass += probs[i] / total;
        if mass >= p {
            break;
        }
    }
    let kept: f64 = nucleus.iter().map(|&i| probs[i]).sum();
    let mut u = rng.random::<f64>() * kept;
    for &i in &nucleus {
        if u < probs[i] {
            return i;
        }
        u -= probs[i];
    }
    *nucleus.last().expect("a non-empty nucleus")
}
// ANCHOR_END: ch04_top_p

// ANCHOR: ch04_full_val
/// Chapter 4, exercise 2: the loss over the whole validation split, in consecutive
/// non-overlapping blocks (instead of `eval_iters` random batches).
pub fn full_val_loss<M: LanguageModel>(
    model: &M,
    data: &Dataset,
    block_size: usize,
    batch_size: usize,
) -> f64 {
    let model = model.valid();
    let device = model_device(&model);
    let starts: Vec<usize> = (0..data.val.len() - block_size)
        .step_by(block_size)
        .collect();
    let (mut total, mut count) = (0.0, 0usize);
    for chunk in starts.chunks(batch_size) {
        let ids = |off: usize| -> Vec<i64> {
            chunk
                .iter()
                .flat_map(|&s| {
                    data.val[s + off..s + off + block_size]
                        .iter()
                        .map(|&t| t as i64)
                })
                .collect()
        };
        let shape = [chunk.len(), block_size];
        let loss = cross_entropy(
            model.forward(ids_tensor(ids(0), shape, &device)),
            ids_tensor(ids(1), shape, &device),
        );
        total += loss.into_scalar::<f32>() as f64 * chunk.len() as f64;
        count += chunk.len();
    }
    total / count as f64
}
// ANCHOR_END: ch04_full_val

// ANCHOR: ch04_linear_decay
/// Chapter 4, exercise 3: warmup, then a straight line from `lr` down to `min_lr`.
pub fn linear_decay_lr(cfg: &crate::ch04_pretrain::PretrainConfig, step: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let progress =
        ((step - cfg.warmup_steps) as f64 / (cfg.steps - cfg.warmup_steps).max(1) as f64).min(1.0);
    cfg.lr + progress * (cfg.min_lr - cfg.lr)
}
// ANCHOR_END: ch04_linear_decay
