//! Chapter 3: a full GPT-1-style decoder. Attention from chapter 2, plus a feed-forward
//! network, residual connections, LayerNorm and dropout, stacked into blocks.

use crate::ch02_attention::{LinearRows, causal_weights, merge_heads, positions, split_heads};
use crate::common::train::{LanguageModel, cross_entropy};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Gelu, Initializer, LayerNorm,
    LayerNormConfig, Linear, LinearConfig,
};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

// ANCHOR: layer_norm
/// LayerNorm from its definition: normalise each token's vector to mean 0 and variance 1
/// (over the channels, not the batch), then scale by `gamma` and shift by `beta`.
pub fn layer_norm(x: Tensor<3>, gamma: Tensor<1>, beta: Option<Tensor<1>>, eps: f64) -> Tensor<3> {
    let mean = x.clone().mean_dim(2); // [b, t, 1]
    let centered = x - mean; // [b, t, c]
    let var = centered.clone().square().mean_dim(2); // [b, t, 1], the biased variance
    let normed = centered / (var + eps).sqrt();
    let y = normed * gamma.unsqueeze::<3>(); // [1, 1, c] broadcasts
    match beta {
        Some(beta) => y + beta.unsqueeze::<3>(),
        None => y,
    }
}
// ANCHOR_END: layer_norm

// ANCHOR: kernels
/// How the model computes the operations a training step spends its time in. Each has
/// Burn's own operations as its default, which is all this chapter uses ([`BurnOps`]);
/// chapter 5 implements the trait again with fused kernels and swaps them into the same
/// model with [`Gpt::with_kernels`]. The model says *what* it computes; this says *how*.
pub trait KernelOps: Send + Sync {
    /// A short name for reports: "burn", "fused".
    fn name(&self) -> &'static str;
    /// True when these kernels do anything but Burn's operations for tensors on `device`.
    fn runs_on(&self, _device: &Device) -> bool {
        false
    }
    /// A Linear layer over all `b * t` rows at once (chapter 2's `forward_rows`).
    fn linear(&self, layer: &Linear, x: Tensor<3>) -> Tensor<3> {
        layer.forward_rows(x)
    }
    /// `a @ b` for `a: [m, k]`, `b: [k, n]`.
    fn matmul(&self, a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
        a.matmul(b)
    }
    fn gelu(&self, gelu: &Gelu, x: Tensor<3>) -> Tensor<3> {
        gelu.forward(x)
    }
    fn layer_norm(&self, ln: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
        ln.forward(x)
    }
    fn dropout(&self, dropout: &Dropout, x: Tensor<3>) -> Tensor<3> {
        dropout.forward(x)
    }
    /// Causal self-attention of all heads, from `qkv: [b, t, 3c]` to `[b, t, c]`, with
    /// `dropout` on the weights.
    fn attention(&self, qkv: Tensor<3>, n_head: usize, dropout: &Dropout) -> Tensor<3> {
        composed_attention(qkv, n_head, dropout)
    }
    /// Mean cross-entropy of `logits: [b, t, v]` against `targets: [b, t]`.
    fn cross_entropy(&self, logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
        cross_entropy(logits, targets)
    }
}

/// Burn's operations, exactly as chapters 2 and 3 write them.
pub struct BurnOps;

impl KernelOps for BurnOps {
    fn name(&self) -> &'static str {
        "burn"
    }
}

/// The kernels a model runs: a pointer to one implementation of [`KernelOps`], cheap to
/// copy into every layer.
#[derive(Clone, Copy)]
pub struct Kernels(pub &'static dyn KernelOps);

impl Kernels {
    /// Burn's operations: every model starts with these.
    pub const BURN: Kernels = Kernels(&BurnOps);

    /// True when the kernels do anything but Burn's operations on `device`.
    pub fn fused_on(self, device: &Device) -> bool {
        self.0.runs_on(device)
    }

    pub fn name(self) -> &'static str {
        self.0.name()
    }
}

impl std::ops::Deref for Kernels {
    type Target = dyn KernelOps;
    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl Default for Kernels {
    fn default() -> Self {
        Kernels::BURN
    }
}

impl PartialEq for Kernels {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernels({})", self.name())
    }
}

/// Attention as Burn operations, as [`CausalSelfAttention`] composes it: heads apart,
/// weights, dropout, values, heads together.
pub fn composed_attention(qkv: Tensor<3>, n_head: usize, dropout: &Dropout) -> Tensor<3> {
    let (q, k, v) = split_heads(qkv, n_head); // [b, nh, t, hs]
    merge_heads(dropout.forward(causal_weights(q, k)).matmul(v)) // [b, t, c]
}
// ANCHOR_END: kernels

// ANCHOR: feed_forward
/// The per-token MLP: widen 4x, GELU, narrow back. Attention moves information between
/// tokens; this is where each token thinks about what it gathered.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub c_fc: Linear, // [c] -> [4c]
    pub gelu: Gelu,
    pub c_proj: Linear, // [4c] -> [c]
    pub dropout: Dropout,
    /// Chapter 5 swaps in its own kernels here; until then, Burn's.
    #[module(skip)]
    pub kernels: Kernels,
}

impl FeedForward {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        // Until chapter 5, k.linear(layer, x) is layer.forward_rows(x), k.gelu(gelu, x) is
        // gelu.forward(x) and k.dropout(dropout, x) is dropout.forward(x).
        let k = self.kernels;
        let h = k.gelu(&self.gelu, k.linear(&self.c_fc, x)); // [b, t, 4c]
        k.dropout(&self.dropout, k.linear(&self.c_proj, h)) // [b, t, c]
    }
}
// ANCHOR_END: feed_forward

// ANCHOR: attention
/// Chapter 2's multi-head attention with dropout where GPT-1, GPT-2 and nanoGPT put it: on
/// the attention weights (a query randomly ignores some of the keys it chose) and on the
/// output, before it joins the residual stream.
#[derive(Module, Debug)]
pub struct CausalSelfAttention {
    pub c_attn: Linear, // [c] -> [3c]
    pub c_proj: Linear, // [c] -> [c]
    pub attn_dropout: Dropout,
    pub resid_dropout: Dropout,
    pub n_head: usize,
    #[module(skip)]
    pub kernels: Kernels,
}

impl CausalSelfAttention {
    /// `x: [b, t, c]` -> (`[b, t, c]`, the weights that multiplied the values `[b, nh, t, t]`).
    pub fn forward_with_weights(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let (q, k, v) = split_heads(self.c_attn.forward_rows(x), self.n_head); // [b, nh, t, hs]
        let att = self.attn_dropout.forward(causal_weights(q, k)); // [b, nh, t, t]
        let y = merge_heads(att.clone().matmul(v)); // [b, t, c]
        (self.resid_dropout.forward(self.c_proj.forward_rows(y)), att)
    }

    /// `forward_with_weights` without the weights, through the kernels: with Burn's the
    /// same operations, in the same order; chapter 5 makes the middle one operation.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let k = self.kernels;
        let qkv = k.linear(&self.c_attn, x); // [b, t, 3c]
        let y = k.attention(qkv, self.n_head, &self.attn_dropout); // [b, t, c]
        k.dropout(&self.resid_dropout, k.linear(&self.c_proj, y))
    }
}
// ANCHOR_END: attention

// ANCHOR: norm
/// Where LayerNorm sits in a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// GPT-1 (2018): normalise after each residual sum, `x = LN(x + f(x))`.
    Post,
    /// GPT-2 (2019) onwards: normalise the branch input, `x = x + f(LN(x))`, plus a final LN.
    /// The residual path stays an identity from the loss to the embeddings, which trains
    /// deep stacks more stably.
    Pre,
}
// ANCHOR_END: norm

// ANCHOR: block
#[derive(Module, Debug)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: CausalSelfAttention,
    pub ln_2: LayerNorm,
    pub mlp: FeedForward,
    pub pre_norm: bool,
    #[module(skip)]
    pub kernels: Kernels,
}

impl Block {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_with(x, |attn, x| attn.forward(x))
    }

    /// The block with `attend` standing in for its attention (chapter 6 passes one that
    /// reads and writes a cache of keys and values).
    pub fn forward_with(
        &self,
        x: Tensor<3>,
        attend: impl FnOnce(&CausalSelfAttention, Tensor<3>) -> Tensor<3>,
    ) -> Tensor<3> {
        let ln = |ln, x| self.kernels.layer_norm(ln, x); // ln.forward(x) until chapter 5
        if self.pre_norm {
            let x = x.clone() + attend(&self.attn, ln(&self.ln_1, x)); // [b, t, c]
            x.clone() + self.mlp.forward(ln(&self.ln_2, x))
        } else {
            let x = ln(&self.ln_1, x.clone() + attend(&self.attn, x));
            ln(&self.ln_2, x.clone() + self.mlp.forward(x))
        }
    }
}
// ANCHOR_END: block

// ANCHOR: config
#[derive(Config, Debug, PartialEq)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Longest context (number of learned positions).
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Biases in Linear and LayerNorm layers (GPT-1 and GPT-2 have them; nanoGPT drops them).
    #[config(default = true)]
    pub bias: bool,
    #[config(default = "Norm::Pre")]
    pub norm: Norm,
    /// Share the token embedding with the output head (GPT-1 does).
    #[config(default = true)]
    pub tie_weights: bool,
    /// GPT-2's initialisation: the layers that write into the residual stream start
    /// 1/sqrt(2 * n_layer) smaller than the others. Off: every weight N(0, 0.02), as GPT-1.
    #[config(default = false)]
    pub gpt2_init: bool,
    /// GELU's tanh approximation, which OpenAI's code for GPT-1 and GPT-2 used, instead of
    /// the exact erf form of the course's own models; for the published weights (chapter 8).
    #[config(default = false)]
    pub gelu_tanh: bool,
}
// ANCHOR_END: config

// ANCHOR: gpt
#[derive(Module, Debug)]
pub struct Gpt {
    pub wte: Embedding, // [vocab, c]
    pub wpe: Embedding, // [block, c]
    pub drop: Dropout,
    pub blocks: Vec<Block>,
    /// Pre-LN only: the residual stream is never normalised inside the blocks.
    pub ln_f: Option<LayerNorm>,
    /// Untied only: otherwise the head reuses `wte`.
    pub lm_head: Option<Linear>,
    pub block_size: usize,
    #[module(skip)]
    pub kernels: Kernels,
}

impl LanguageModel for Gpt {
    fn forward(&self, idx: Tensor<2, Int>) -> Tensor<3> {
        self.logits(self.hidden(idx))
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn loss(&self, idx: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        self.kernels.cross_entropy(self.forward(idx), targets)
    }

    fn has_dropout(&self) -> bool {
        self.drop.prob > 0.0 // every dropout of the model has the config's probability
    }
}

impl Gpt {
    /// Token ids `[b, t]` -> the residual stream after the last block, `[b, t, c]`.
    pub fn hidden(&self, idx: Tensor<2, Int>) -> Tensor<3> {
        let [_, t] = idx.dims();
        let pos = positions(t, self.block_size, &idx.device()); // [1, t]
        let x = self.wte.forward(idx) + self.wpe.forward(pos); // [b, t, c]
        let mut x = self.kernels.dropout(&self.drop, x); // self.drop.forward(x) until chapter 5
        for block in &self.blocks {
            x = block.forward(x);
        }
        x
    }

    /// The final LayerNorm (pre-LN) and the output head: `[b, t, c]` -> `[b, t, vocab]`.
    pub fn logits(&self, mut x: Tensor<3>) -> Tensor<3> {
        if let Some(ln_f) = &self.ln_f {
            x = self.kernels.layer_norm(ln_f, x);
        }
        match &self.lm_head {
            Some(head) => self.kernels.linear(head, x), // [b, t, vocab]
            // Tied: score each token by its embedding's dot product with x.
            None if self.kernels.fused_on(&x.device()) => {
                let [b, t, c] = x.dims();
                let wte_t = self.wte.weight.val().transpose(); // [c, vocab]
                let v = wte_t.dims()[1];
                self.kernels
                    .matmul(x.reshape([b * t, c]), wte_t)
                    .reshape([b, t, v])
            }
            None => x.matmul(self.wte.weight.val().transpose().unsqueeze::<3>()),
        }
    }
}
// ANCHOR_END: gpt

// ANCHOR: init
impl GptConfig {
    /// Refuses shapes the model cannot have, with a message naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        let sizes = [
            self.n_layer,
            self.n_head,
            self.n_embd,
            self.block_size,
            self.vocab_size,
        ];
        if sizes.contains(&0) {
            anyhow::bail!("layers, heads, width, block size and vocabulary must all be at least 1");
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            anyhow::bail!(
                "n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd,
                self.n_head
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            anyhow::bail!("dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }

    /// Builds the model; panics on a config that `validate` refuses.
    pub fn init(&self, device: &Device) -> Gpt {
        self.validate().expect("a valid GptConfig");
        let (c, std) = (self.n_embd, 0.02);
        // GPT-1 initialises every weight N(0, 0.02). GPT-2 also shrinks the layers that write
        // into the residual stream, so the stream's variance does not grow with depth.
        let proj_std = match self.gpt2_init {
            true => std / (2.0 * self.n_layer as f64).sqrt(),
            false => std,
        };
        let linear = |i, o, std| {
            LinearConfig::new(i, o)
                .with_bias(self.bias)
                .with_initializer(Initializer::Normal { mean: 0.0, std })
                .init(device)
        };
        let ln = || LayerNormConfig::new(c).with_bias(self.bias).init(device);
        let dropout = || DropoutConfig::new(self.dropout).init();
        let embedding = |n| {
            EmbeddingConfig::new(n, c)
                .with_initializer(Initializer::Normal { mean: 0.0, std })
                .init(device)
        };
        let block = |_| Block {
            ln_1: ln(),
            attn: CausalSelfAttention {
                c_attn: linear(c, 3 * c, std),
                c_proj: linear(c, c, proj_std),
                attn_dropout: dropout(),
                resid_dropout: dropout(),
                n_head: self.n_head,
                kernels: Kernels::BURN,
            },
            ln_2: ln(),
            mlp: FeedForward {
                c_fc: linear(c, 4 * c, std),
                gelu: match self.gelu_tanh {
                    true => Gelu::new_approximate(),
                    false => Gelu::new(),
                },
                c_proj: linear(4 * c, c, proj_std),
                dropout: dropout(),
                kernels: Kernels::BURN,
            },
            pre_norm: self.norm == Norm::Pre,
            kernels: Kernels::BURN,
        };
        Gpt {
            wte: embedding(self.vocab_size),
            wpe: embedding(self.block_size),
            drop: dropout(),
            blocks: (0..self.n_layer).map(block).collect(),
            ln_f: (self.norm == Norm::Pre).then(ln),
            lm_head: (!self.tie_weights).then(|| {
                LinearConfig::new(c, self.vocab_size)
                    .with_bias(false)
                    .with_initializer(Initializer::Normal { mean: 0.0, std })
                    .init(device)
            }),
            block_size: self.block_size,
            kernels: Kernels::BURN,
        }
    }
}
// ANCHOR_END: init

// ANCHOR: with_kernels
impl Gpt {
    /// The same model and weights, running `kernels` in every layer (chapter 5).
    pub fn with_kernels(mut self, kernels: Kernels) -> Gpt {
        self.kernels = kernels;
        for block in &mut self.blocks {
            block.kernels = kernels;
            block.attn.kernels = kernels;
            block.mlp.kernels = kernels;
        }
        self
    }
}
// ANCHOR_END: with_kernels

// ANCHOR: param_count
impl GptConfig {
    /// The parameter count from the architecture alone, term by term.
    pub fn param_count(&self) -> usize {
        let (v, p, c, l) = (self.vocab_size, self.block_size, self.n_embd, self.n_layer);
        let b = usize::from(self.bias); // one bias vector per layer when biases are on
        let ln = c + b * c; // gamma (+ beta)
        let attn = c * 3 * c + b * 3 * c + c * c + b * c; // c_attn + c_proj
        let mlp = c * 4 * c + b * 4 * c + 4 * c * c + b * c; // c_fc + c_proj
        let block = 2 * ln + attn + mlp; // = 12c^2 + 13c with biases
        let embeddings = v * c + p * c;
        let final_ln = if self.norm == Norm::Pre { ln } else { 0 };
        let head = if self.tie_weights { 0 } else { c * v };
        embeddings + l * block + final_ln + head
    }

    /// Training FLOPs per token: 6 per weight that takes part in a matrix product (forward 2,
    /// backward 4) plus the attention products `q k^T` and `att v` (12 * layers * T * c).
    /// Position embeddings are a lookup and cost nothing; a tied embedding counts once, as the
    /// output head. The same convention as nanoGPT's and PaLM's MFU estimates.
    pub fn flops_per_token(&self) -> f64 {
        let n = self.param_count() - self.block_size * self.n_embd;
        6.0 * n as f64 + 12.0 * (self.n_layer * self.block_size * self.n_embd) as f64
    }

    /// GPT-1's shape as published (Radford et al., 2018): 12 layers, 12 heads, 768 wide,
    /// 3072-wide MLP, 512 positions, a 40,478-token BPE vocabulary, post-LN, tied head.
    pub fn gpt1() -> Self {
        GptConfig::new(40_478, 512, 12, 12, 768)
            .with_dropout(0.1)
            .with_norm(Norm::Post)
    }
}
// ANCHOR_END: param_count

// ANCHOR: residual_stack
/// How much gradient reaches the first layer of a stack of `depth` small MLPs
/// (`c -> 4c -> GELU -> c`) initialised by `init`: returns the norm of its weight's gradient
/// without residual connections (`x = f(x)`) and with them (`x = x + f(x)`), for the same
/// weights and the same input.
pub fn first_layer_grad_norms(depth: usize, init: &Initializer, device: &Device) -> (f32, f32) {
    let c = 32;
    let layer = |i, o| {
        LinearConfig::new(i, o)
            .with_initializer(init.clone())
            .init(device)
    };
    let stack: Vec<(Linear, Linear)> = (0..depth)
        .map(|_| (layer(c, 4 * c), layer(4 * c, c)))
        .collect();
    let x0 = Tensor::<2>::random(
        [16, c],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        device,
    );
    let norm = |residual: bool| {
        let mut x = x0.clone();
        for (up, down) in &stack {
            let fx = down.forward(Gelu::new().forward(up.forward(x.clone())));
            x = if residual { x + fx } else { fx };
        }
        let grads = x.square().mean().backward();
        let g = stack[0]
            .0
            .weight
            .val()
            .grad(&grads)
            .expect("a gradient for layer 1");
        g.square().sum().sqrt().into_scalar::<f32>()
    };
    (norm(false), norm(true))
}
// ANCHOR_END: residual_stack
