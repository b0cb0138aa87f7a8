//! Chapter 2: self-attention. Tokens look back at the tokens before them and take a
//! weighted average of what they find; the weights come from comparing queries with keys.

use crate::common::train::LanguageModel;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig,
};
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

/// Scaled dot-product attention with a causal mask, for any leading dims
/// (`[b, t, hs]` for one head, `[b, nh, t, hs]` for many). Returns the output and the
/// attention weights `[..., t, t]` (each row a probability distribution over the past).
pub fn causal_attention<const D: usize>(
    q: Tensor<D>,
    k: Tensor<D>,
    v: Tensor<D>,
) -> (Tensor<D>, Tensor<D>) {
    let dims = q.dims();
    let t = dims[D - 2];
    let scores = scaled_scores(q, k); // [..., t, t]
    let mut shape = dims;
    shape[D - 1] = t;
    let future = Tensor::<2, Bool>::tril_mask([t, t], 0, &scores.device())
        .unsqueeze::<D>()
        .expand(shape); // true where a query would see a later key
    let wei = softmax(scores.mask_fill(future, f32::NEG_INFINITY), D - 1);
    (wei.clone().matmul(v), wei) // [..., t, hs], [..., t, t]
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

// ANCHOR: mha_config
#[derive(Config, Debug)]
pub struct MultiHeadAttentionConfig {
    pub n_embd: usize,
    pub n_head: usize,
    #[config(default = 0.0)]
    pub dropout: f64,
    #[config(default = true)]
    pub bias: bool,
    /// N(0, std) for the weights; `None` keeps Burn's default (PyTorch's Kaiming uniform).
    #[config(default = "None")]
    pub init_std: Option<f64>,
    /// A separate std for the output projection (GPT-2 scales it by 1/sqrt(2 * layers)).
    #[config(default = "None")]
    pub proj_init_std: Option<f64>,
}
// ANCHOR_END: mha_config

// ANCHOR: mha
/// Several heads side by side. Rather than `n_head` separate `Head`s, one Linear makes the
/// queries, keys and values of all heads at once and a reshape splits them apart: the same
/// arithmetic, in three big matrix products instead of 3 x `n_head` small ones.
#[derive(Module, Debug)]
pub struct MultiHeadAttention {
    /// `[c] -> [3c]`: queries, keys and values of every head.
    pub c_attn: Linear,
    /// `[c] -> [c]`: mixes what the heads found.
    pub c_proj: Linear,
    pub attn_dropout: Dropout,
    pub resid_dropout: Dropout,
    pub n_head: usize,
}

impl MultiHeadAttention {
    /// `x: [b, t, c]` -> (`[b, t, c]`, attention weights `[b, n_head, t, t]`).
    pub fn forward_with_weights(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let [b, t, c] = x.dims();
        let (nh, hs) = (self.n_head, c / self.n_head);
        let qkv = per_token(&self.c_attn, x); // [b, t, 3c]
        let heads = |i: usize| {
            qkv.clone()
                .slice(s![.., .., i * c..(i + 1) * c]) // [b, t, c]
                .reshape([b, t, nh, hs])
                .swap_dims(1, 2) // [b, nh, t, hs]
        };
        let (q, k, v) = (heads(0), heads(1), heads(2));
        let (y, wei) = causal_attention(q, k, v); // [b, nh, t, hs], [b, nh, t, t]
        let y = self.attn_dropout.forward(y);
        let y = y.swap_dims(1, 2).reshape([b, t, c]); // heads side by side again
        (self.resid_dropout.forward(per_token(&self.c_proj, y)), wei)
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with_weights(x).0
    }
}
// ANCHOR_END: mha

// ANCHOR: per_token
/// Applies `linear` to every token of `x: [b, t, c_in]` as ONE matrix product over `b * t`
/// rows, `[b*t, c_in] @ [c_in, c_out]`, rather than `b` products of `t` rows each: the same
/// numbers, but a bigger product keeps the CPU's matrix kernels busier (forward and backward).
pub fn per_token(linear: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, t, c] = x.dims();
    let y = linear.forward(x.reshape([b * t, c])); // [b*t, c_out]
    let c_out = y.dims()[1];
    y.reshape([b, t, c_out])
}
// ANCHOR_END: per_token

/// Weight initialiser: N(0, std) when given, Burn's (and PyTorch's) default otherwise.
pub fn linear_init(std: Option<f64>) -> Initializer {
    match std {
        Some(std) => Initializer::Normal { mean: 0.0, std },
        None => LinearConfig::new(1, 1).initializer,
    }
}

impl MultiHeadAttentionConfig {
    pub fn init(&self, device: &Device) -> MultiHeadAttention {
        assert!(
            self.n_head > 0 && self.n_embd.is_multiple_of(self.n_head),
            "n_embd ({}) must be a multiple of n_head ({})",
            self.n_embd,
            self.n_head
        );
        let linear = |i, o, std| {
            LinearConfig::new(i, o)
                .with_bias(self.bias)
                .with_initializer(linear_init(std))
                .init(device)
        };
        MultiHeadAttention {
            c_attn: linear(self.n_embd, 3 * self.n_embd, self.init_std),
            c_proj: linear(
                self.n_embd,
                self.n_embd,
                self.proj_init_std.or(self.init_std),
            ),
            attn_dropout: DropoutConfig::new(self.dropout).init(),
            resid_dropout: DropoutConfig::new(self.dropout).init(),
            n_head: self.n_head,
        }
    }
}

// ANCHOR: model
/// Token embedding + learned position embedding -> multi-head self-attention -> logits.
/// Model A of the chapter is this with one head of size 32, model B with four heads of 8.
#[derive(Config, Debug)]
pub struct AttentionLmConfig {
    pub vocab_size: usize,
    pub block_size: usize,
    pub n_embd: usize,
    pub n_head: usize,
}

#[derive(Module, Debug)]
pub struct AttentionLm {
    pub wte: Embedding, // [vocab, c]: what each character is
    pub wpe: Embedding, // [block, c]: where it is
    pub sa: MultiHeadAttention,
    pub lm_head: Linear, // [c] -> [vocab]
    pub block_size: usize,
}

impl AttentionLmConfig {
    pub fn init(&self, device: &Device) -> AttentionLm {
        AttentionLm {
            wte: EmbeddingConfig::new(self.vocab_size, self.n_embd).init(device),
            wpe: EmbeddingConfig::new(self.block_size, self.n_embd).init(device),
            sa: MultiHeadAttentionConfig::new(self.n_embd, self.n_head).init(device),
            lm_head: LinearConfig::new(self.n_embd, self.vocab_size).init(device),
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
        let (x, wei) = self.sa.forward_with_weights(x); // [b, t, c]
        (self.lm_head.forward(x), wei) // [b, t, vocab]
    }
}

impl LanguageModel for AttentionLm {
    fn forward(&self, idx: Tensor<2, Int>) -> Tensor<3> {
        self.forward_with_weights(idx).0
    }
}
// ANCHOR_END: model
