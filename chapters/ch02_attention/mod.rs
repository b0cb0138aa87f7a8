//! Chapter 2: self-attention. Tokens look back at the tokens before them and take a
//! weighted average of what they find; the weights come from comparing queries with keys.

use crate::common::train::LanguageModel;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;

// ANCHOR: averaging
/// (a) For every position t, the mean of x[:, 0..=t] -- two explicit loops over the past.
pub fn average_loops(x: &Tensor<3>) -> Tensor<3> {
    let [b, t, c] = x.dims();
    let rows: Vec<Tensor<3>> = (0..t)
        .map(|i| x.clone().slice(s![0..b, 0..i + 1, 0..c]).mean_dim(1)) // [b, 1, c]
        .collect();
    Tensor::cat(rows, 1) // [b, t, c]
}

/// (b) The same as one matrix product: a lower-triangular matrix whose rows sum to 1.
pub fn average_matmul(x: &Tensor<3>) -> (Tensor<3>, Tensor<2>) {
    let [_, t, _] = x.dims();
    let wei = Tensor::<2>::ones([t, t], &x.device()).tril(0); // [t, t], ones on and below the diagonal
    let wei = wei.clone() / wei.sum_dim(1); // each row sums to 1
    (wei.clone().unsqueeze::<3>().matmul(x.clone()), wei) // [1, t, t] @ [b, t, c] -> [b, t, c]
}

/// (c) The same again with softmax: scores of 0 where a token may look, -inf where it may not.
/// Attention keeps exactly this shape, only the zeros become learned, data-dependent scores.
pub fn average_softmax(x: &Tensor<3>) -> (Tensor<3>, Tensor<2>) {
    let [_, t, _] = x.dims();
    let scores = Tensor::<2>::zeros([t, t], &x.device()); // [t, t]
    let future = Tensor::<2, Bool>::tril_mask([t, t], 0, &x.device()); // true above the diagonal
    let wei = softmax(scores.mask_fill(future, f32::NEG_INFINITY), 1);
    (wei.clone().unsqueeze::<3>().matmul(x.clone()), wei)
}
// ANCHOR_END: averaging

// ANCHOR: causal_attention
/// How much each query matches each key: `q k^T / sqrt(head_size)`. Without the scaling the
/// scores' variance grows with the head size and softmax turns one-hot.
pub fn scaled_scores<const D: usize>(q: Tensor<D>, k: Tensor<D>) -> Tensor<D> {
    let hs = q.dims()[D - 1];
    q.matmul(k.swap_dims(D - 2, D - 1)) / (hs as f64).sqrt() // [..., t, t]
}

/// The attention weights, for any leading dims (`[b, t, hs]` for one head, `[b, nh, t, hs]`
/// for many): scaled scores, -inf where a query would see a later key, softmax over the keys.
/// Each row of the result `[..., t, t]` is a probability distribution over the past.
pub fn causal_weights<const D: usize>(q: Tensor<D>, k: Tensor<D>) -> Tensor<D> {
    let scores = scaled_scores(q, k); // [..., t, t]
    let shape = scores.dims();
    let t = shape[D - 1];
    let future = Tensor::<2, Bool>::tril_mask([t, t], 0, &scores.device())
        .unsqueeze::<D>()
        .expand(shape); // true above the diagonal
    softmax(scores.mask_fill(future, f32::NEG_INFINITY), D - 1)
}

/// Scaled dot-product attention with a causal mask: the weighted average of the values.
/// Returns the output `[..., t, hs]` and the weights `[..., t, t]`.
pub fn causal_attention<const D: usize>(
    q: Tensor<D>,
    k: Tensor<D>,
    v: Tensor<D>,
) -> (Tensor<D>, Tensor<D>) {
    let wei = causal_weights(q, k);
    (wei.clone().matmul(v), wei)
}
// ANCHOR_END: causal_attention

// ANCHOR: head
/// One head of self-attention: every token emits a query ("what am I looking for"), a key
/// ("what do I contain") and a value ("what I pass on if chosen").
#[derive(Module, Debug)]
pub struct Head {
    pub key: Linear,
    pub query: Linear,
    pub value: Linear,
}

impl Head {
    pub fn new(n_embd: usize, head_size: usize, device: &Device) -> Self {
        let proj = || {
            LinearConfig::new(n_embd, head_size)
                .with_bias(false)
                .init(device)
        };
        Self {
            key: proj(),
            query: proj(),
            value: proj(),
        }
    }

    /// `x: [b, t, c]` -> (`[b, t, head_size]`, weights `[b, t, t]`).
    pub fn forward_with_weights(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let k = self.key.forward(x.clone()); // [b, t, hs]
        let q = self.query.forward(x.clone()); // [b, t, hs]
        let v = self.value.forward(x); // [b, t, hs]
        causal_attention(q, k, v)
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_weights(x).0
    }
}
// ANCHOR_END: head

// ANCHOR: forward_rows
/// `Linear` on `x: [b, t, c_in]` as ONE matrix product over `b * t` rows,
/// `[b*t, c_in] @ [c_in, c_out]`, rather than the `b` products of `t` rows that Burn's
/// `Linear::forward` runs on a 3-D input: the same numbers, but one big product keeps the CPU's
/// matrix kernels busier (forward and backward).
pub trait LinearRows {
    fn forward_rows(&self, x: Tensor<3>) -> Tensor<3>;
}

impl LinearRows for Linear {
    fn forward_rows(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, c] = x.dims();
        let y = self.forward(x.reshape([b * t, c])); // [b*t, c_out]
        let c_out = y.dims()[1];
        y.reshape([b, t, c_out])
    }
}
// ANCHOR_END: forward_rows

// ANCHOR: heads
/// `[b, t, 3c]` -> queries, keys and values of every head, each `[b, nh, t, hs]`.
pub fn split_heads(qkv: Tensor<3>, n_head: usize) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let [b, t, c3] = qkv.dims();
    let c = c3 / 3;
    let part = |i: usize| {
        qkv.clone()
            .slice(s![.., .., i * c..(i + 1) * c]) // [b, t, c]
            .reshape([b, t, n_head, c / n_head])
            .swap_dims(1, 2) // [b, nh, t, hs]
    };
    (part(0), part(1), part(2))
}

/// `[b, nh, t, hs]` -> `[b, t, c]`: the heads' outputs side by side again.
pub fn merge_heads(y: Tensor<4>) -> Tensor<3> {
    let [b, nh, t, hs] = y.dims();
    y.swap_dims(1, 2).reshape([b, t, nh * hs])
}
// ANCHOR_END: heads

// ANCHOR: mha
/// Several heads side by side. Rather than `n_head` separate `Head`s, one Linear makes the
/// queries, keys and values of all heads at once and a reshape splits them apart: the same
/// arithmetic, in a few big matrix products instead of 3 x `n_head` small ones.
#[derive(Module, Debug)]
pub struct MultiHeadAttention {
    /// `[c] -> [3c]`: queries, keys and values of every head.
    pub c_attn: Linear,
    /// `[c] -> [c]`: mixes what the heads found.
    pub c_proj: Linear,
    pub n_head: usize,
}

impl MultiHeadAttention {
    pub fn new(n_embd: usize, n_head: usize, device: &Device) -> Self {
        Self {
            c_attn: LinearConfig::new(n_embd, 3 * n_embd).init(device),
            c_proj: LinearConfig::new(n_embd, n_embd).init(device),
            n_head,
        }
    }

    /// `x: [b, t, c]` -> (`[b, t, c]`, attention weights `[b, n_head, t, t]`).
    pub fn forward_with_weights(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let (q, k, v) = split_heads(self.c_attn.forward_rows(x), self.n_head); // [b, nh, t, hs]
        let (y, wei) = causal_attention(q, k, v); // [b, nh, t, hs], [b, nh, t, t]
        (self.c_proj.forward_rows(merge_heads(y)), wei)
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_weights(x).0
    }
}
// ANCHOR_END: mha

// ANCHOR: model
/// Token embedding + learned position embedding -> self-attention -> logits. With one head
/// the attention is the `Head` of section 2.2 (model A); with several, `MultiHeadAttention`
/// (model B).
#[derive(Config, Debug)]
pub struct AttentionLmConfig {
    pub vocab_size: usize,
    pub block_size: usize,
    pub n_embd: usize,
    pub n_head: usize,
}

#[derive(Module, Debug)]
pub enum SelfAttention {
    One(Head),
    Multi(MultiHeadAttention),
}

#[derive(Module, Debug)]
pub struct AttentionLm {
    pub wte: Embedding, // [vocab, c]: what each character is
    pub wpe: Embedding, // [block, c]: where it is
    pub sa: SelfAttention,
    pub lm_head: Linear, // [c] -> [vocab]
    pub block_size: usize,
}

impl AttentionLmConfig {
    /// Refuses sizes the model cannot have.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            anyhow::bail!(
                "--n-embd ({}) must be a multiple of --n-head ({})",
                self.n_embd,
                self.n_head
            );
        }
        Ok(())
    }

    pub fn init(&self, device: &Device) -> AttentionLm {
        let (c, nh) = (self.n_embd, self.n_head);
        AttentionLm {
            wte: EmbeddingConfig::new(self.vocab_size, c).init(device),
            wpe: EmbeddingConfig::new(self.block_size, c).init(device),
            sa: match nh {
                1 => SelfAttention::One(Head::new(c, c, device)),
                _ => SelfAttention::Multi(MultiHeadAttention::new(c, nh, device)),
            },
            lm_head: LinearConfig::new(c, self.vocab_size).init(device),
            block_size: self.block_size,
        }
    }
}

/// Position ids `[1, t]`, broadcast over the batch when added.
pub fn positions(t: usize, block_size: usize, device: &Device) -> Tensor<2, Int> {
    assert!(
        t <= block_size,
        "sequence of {t} tokens is longer than the block size {block_size}"
    );
    Tensor::<1, Int>::arange(0..t as i64, device).unsqueeze::<2>()
}

impl AttentionLm {
    /// Logits and the attention weights `[b, n_head, t, t]`.
    pub fn forward_with_weights(&self, idx: Tensor<2, Int>) -> (Tensor<3>, Tensor<4>) {
        let [_, t] = idx.dims();
        let pos = positions(t, self.block_size, &idx.device());
        let x = self.wte.forward(idx) + self.wpe.forward(pos); // [b, t, c] + [1, t, c]
        let (x, wei) = match &self.sa {
            SelfAttention::One(head) => {
                let (y, wei) = head.forward_with_weights(x); // [b, t, c], [b, t, t]
                (y, wei.unsqueeze_dim(1)) // one head: [b, 1, t, t]
            }
            SelfAttention::Multi(mha) => mha.forward_with_weights(x),
        };
        (self.lm_head.forward_rows(x), wei) // [b, t, vocab]
    }
}

impl LanguageModel for AttentionLm {
    fn forward(&self, idx: Tensor<2, Int>) -> Tensor<3> {
        self.forward_with_weights(idx).0
    }

    fn block_size(&self) -> usize {
        self.block_size
    }
}
// ANCHOR_END: model
