//! Chapter 6: generation with a cache of keys and values. Each new token runs through the
//! model once; its query attends over the keys and values every earlier token left behind.

use crate::ch02_attention::{merge_heads, scaled_scores, split_heads};
use crate::ch03_gpt::{CausalSelfAttention, Gpt, GptConfig};
use crate::common::dataset::ids_tensor;
use crate::common::sample::{SampleOptions, pick_token};
use crate::common::train::model_device;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use rand::rngs::StdRng;

// ANCHOR: window
/// What the model sees once the text is longer than its `block_size` learned positions.
/// Both the cached and the uncached generators follow the same rule, so they see the same
/// context and give the same tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last `block_size` tokens, always (chapter 4's `generate`). Past the block every
    /// token shifts every position by one, so a cache must be rebuilt at every token.
    Slide,
    /// When the context is full, start again from its last `keep` tokens and grow from
    /// there: a rebuild every `block_size - keep + 1` tokens, at the price of a shorter
    /// context just after each rebuild.
    Restart { keep: usize },
}

impl Window {
    /// How many of the last tokens the model sees when `n` tokens exist.
    pub fn context_len(self, n: usize, block_size: usize) -> usize {
        match self {
            _ if n <= block_size => n,
            Window::Slide => block_size,
            Window::Restart { keep } => keep + (n - block_size - 1) % (block_size - keep + 1),
        }
    }

    /// Refuses a `keep` that leaves no room to grow.
    pub fn check(self, block_size: usize) -> anyhow::Result<()> {
        if let Window::Restart { keep } = self
            && !(1..block_size).contains(&keep)
        {
            anyhow::bail!(
                "the restart window must keep 1 to {} tokens, got {keep}",
                block_size - 1
            );
        }
        Ok(())
    }
}
// ANCHOR_END: window

// ANCHOR: cache
/// The keys and values of every layer for the tokens seen so far, `[b, n_head, block, hs]`
/// each, allocated once at full size: filling it never changes a tensor's shape.
pub struct KvCache {
    pub keys: Vec<Tensor<4>>,
    pub values: Vec<Tensor<4>>,
    /// Positions filled so far.
    pub len: usize,
    /// Attend over the whole block with the empty part masked, rather than over a slice of
    /// the filled part: one shape for every token, so wgpu compiles its kernels once.
    pub fixed_shape: bool,
}

impl KvCache {
    pub fn new(cfg: &GptConfig, batch: usize, fixed_shape: bool, device: &Device) -> Self {
        let (nh, hs) = (cfg.n_head, cfg.n_embd / cfg.n_head);
        let zeros = || Tensor::<4>::zeros([batch, nh, cfg.block_size, hs], device);
        KvCache {
            keys: (0..cfg.n_layer).map(|_| zeros()).collect(),
            values: (0..cfg.n_layer).map(|_| zeros()).collect(),
            len: 0,
            fixed_shape,
        }
    }

    /// Bytes the cache holds: keys and values, per layer, per position, per channel.
    pub fn bytes(cfg: &GptConfig, batch: usize) -> usize {
        2 * cfg.n_layer * cfg.block_size * cfg.n_embd * batch * std::mem::size_of::<f32>()
    }
}
// ANCHOR_END: cache

// ANCHOR: cached_attention
/// Attention for `t` new tokens at positions `start..start + t`: their keys and values go into
/// the layer's cache, and their queries attend over the first `width` cached positions, with
/// `later` (`[1, 1, t, width]`) hiding the keys after each query's own position.
fn attend_cached(
    attn: &CausalSelfAttention,
    x: Tensor<3>, // [b, t, c]: the new tokens only
    (keys, values): (&mut Tensor<4>, &mut Tensor<4>),
    start: usize,
    later: Tensor<4, Bool>,
) -> Tensor<3> {
    let kernels = attn.kernels; // chapter 5's products on CPU backends, else Burn's
    let (q, k, v) = split_heads(kernels.linear(&attn.c_attn, x), attn.n_head); // [b, nh, t, hs]
    let width = later.dims()[3];
    write_at(keys, k, start);
    write_at(values, v, start);
    let k = keys.clone().slice(s![.., .., 0..width, ..]); // [b, nh, width, hs]
    let v = values.clone().slice(s![.., .., 0..width, ..]);
    let scores = scaled_scores(q, k).mask_fill(later, f32::NEG_INFINITY); // [b, nh, t, width]
    let att = attn.attn_dropout.forward(softmax(scores, 3));
    let y = merge_heads(att.matmul(v)); // [b, t, c]
    attn.resid_dropout.forward(kernels.linear(&attn.c_proj, y))
}

/// Writes `new: [b, nh, t, hs]` into the cache at positions `start..start + t`.
fn write_at(cache: &mut Tensor<4>, new: Tensor<4>, start: usize) {
    let t = new.dims()[2];
    // Taken out of its slot, the cache has a single owner, so the backend may write into it
    // in place; a shared tensor would be copied whole first, at every token.
    let whole = std::mem::replace(cache, new.clone());
    *cache = whole.slice_assign(s![.., .., start..start + t, ..], new);
}

/// `[1, 1, t, width]`, true where key `j` comes after query `i` (at position `start + i`).
fn later_keys(start: usize, t: usize, width: usize, device: &Device) -> Tensor<4, Bool> {
    let mask: Vec<bool> = (0..t)
        .flat_map(|i| (0..width).map(move |j| j > start + i))
        .collect();
    Tensor::<2, Bool>::from_data(TensorData::new(mask, [t, width]), device).unsqueeze::<4>()
}

/// The decoder of chapter 3 on `t` new tokens `idx: [b, t]` that follow the `cache.len`
/// tokens already cached: returns their logits `[b, t, vocab]` and extends the cache.
pub fn forward_cached(model: &Gpt, idx: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
    let [_, t] = idx.dims();
    let start = cache.len;
    assert!(
        start + t <= model.block_size,
        "the cache holds {} positions",
        model.block_size
    );
    let device = idx.device();
    let pos = Tensor::<1, Int>::arange(start as i64..(start + t) as i64, &device).unsqueeze::<2>();
    let mut x = model
        .drop
        .forward(model.wte.forward(idx) + model.wpe.forward(pos)); // [b, t, c]
    // Keys 0..width: the whole block (one shape for every step) or just the filled part.
    let width = match cache.fixed_shape {
        true => model.block_size,
        false => start + t,
    };
    let later = later_keys(start, t, width, &device); // the same for every layer
    for (l, block) in model.blocks.iter().enumerate() {
        let kv = (&mut cache.keys[l], &mut cache.values[l]);
        x = block.forward_with(x, |attn, x| {
            attend_cached(attn, x, kv, start, later.clone())
        });
    }
    cache.len = start + t;
    model.logits(x)
}
// ANCHOR_END: cached_attention

// ANCHOR: generate
/// How `generate` runs the model.
#[derive(Clone, Copy, Debug)]
pub struct Generation {
    pub opts: SampleOptions,
    pub window: Window,
    /// With a cache of keys and values, or recomputing the whole context for every token.
    pub cached: bool,
    /// One tensor shape for every token (see `KvCache::fixed_shape`).
    pub fixed_shape: bool,
}

/// Continues `prompt` with `n` tokens in each of `batch` rows, one batch for all rows.
/// `on_token(row, token)` sees each token as it is made. Rows pick in order from one `rng`.
pub fn generate(
    model: &Gpt,
    prompt: &[usize],
    batch: usize,
    n: usize,
    how: Generation,
    rng: &mut StdRng,
    mut on_token: impl FnMut(usize, usize),
) -> Vec<Vec<usize>> {
    let model = model.valid(); // dropout off
    let mut rows = vec![prompt.to_vec(); batch];
    let mut step = Stepper::new(&model, batch, how);
    for _ in 0..n {
        let logits = step.next_logits(&rows); // [batch][vocab]
        for (r, row) in rows.iter_mut().enumerate() {
            let token = pick_token(&logits[r], how.opts, rng);
            on_token(r, token);
            row.push(token);
        }
    }
    rows.into_iter()
        .map(|r| r[prompt.len()..].to_vec())
        .collect()
}

/// The logits of the next token of every row, with or without a cache.
struct Stepper<'a> {
    model: &'a Gpt,
    how: Generation,
    cache: KvCache,
    /// Index of the token at the cache's position 0.
    cache_start: usize,
}

impl<'a> Stepper<'a> {
    fn new(model: &'a Gpt, batch: usize, how: Generation) -> Self {
        let cfg = config_of(model);
        let cache = KvCache::new(&cfg, batch, how.fixed_shape, &model_device(model));
        Stepper {
            model,
            how,
            cache,
            cache_start: 0,
        }
    }

    fn next_logits(&mut self, rows: &[Vec<usize>]) -> Vec<Vec<f32>> {
        let (n, block) = (rows[0].len(), self.model.block_size);
        let start = n - self.how.window.context_len(n, block);
        if !self.how.cached {
            return self.recompute(rows, start, n);
        }
        if start != self.cache_start {
            // The window moved: every position changed, so the cache starts again.
            self.cache.len = 0;
            self.cache_start = start;
        }
        let from = self.cache_start + self.cache.len; // first token not yet cached
        let logits = forward_cached(self.model, self.ids(rows, from, n), &mut self.cache);
        last_logits(logits, n - from - 1)
    }

    /// Without a cache: the whole context again, padded to the block when shapes are fixed
    /// (causal attention never looks at the padding on the right).
    fn recompute(&self, rows: &[Vec<usize>], start: usize, n: usize) -> Vec<Vec<f32>> {
        let width = match self.how.fixed_shape {
            true => self.model.block_size,
            false => n - start,
        };
        let ids = self.ids_padded(rows, start, n, width); // [batch, width]
        let t = n - start - 1; // the last token's position
        // Only the last position's logits are needed: the head runs on that one row.
        let h = self.model.hidden(ids).slice(s![.., t..t + 1, ..]); // [batch, 1, c]
        last_logits(self.model.logits(h), 0)
    }

    /// Tokens `from..to` of every row, `[batch, to - from]`.
    fn ids(&self, rows: &[Vec<usize>], from: usize, to: usize) -> Tensor<2, Int> {
        self.ids_padded(rows, from, to, to - from)
    }

    /// Tokens `from..to` of every row followed by zeros up to `width`, `[batch, width]`.
    fn ids_padded(
        &self,
        rows: &[Vec<usize>],
        from: usize,
        to: usize,
        width: usize,
    ) -> Tensor<2, Int> {
        let pad = width - (to - from);
        let ids = rows
            .iter()
            .flat_map(|r| {
                r[from..to]
                    .iter()
                    .map(|&t| t as i64)
                    .chain(std::iter::repeat_n(0, pad))
            })
            .collect();
        ids_tensor(ids, [rows.len(), width], &model_device(self.model))
    }
}

/// The logits at position `t` of every row, on the host.
fn last_logits(logits: Tensor<3>, t: usize) -> Vec<Vec<f32>> {
    let [b, _, vocab] = logits.dims();
    let last = logits.slice(s![.., t..t + 1, ..]).into_data();
    let flat = last.try_to_vec::<f32>().expect("f32 logits");
    (0..b)
        .map(|r| flat[r * vocab..(r + 1) * vocab].to_vec())
        .collect()
}
// ANCHOR_END: generate

/// The shape of `model` as a config (what a cache for it needs).
pub fn config_of(model: &Gpt) -> GptConfig {
    let [vocab, c] = model.wte.weight.val().dims();
    let n_head = model.blocks.first().map_or(1, |b| b.attn.n_head);
    GptConfig::new(vocab, model.block_size, model.blocks.len(), n_head, c)
}

// ANCHOR: flops
/// Multiply-adds a decoder spends to produce the next token when the context holds `ctx`
/// tokens: recomputing all of them, or only the newest with a cache. Per token and layer:
/// 12 c² for the weight matrices and 2 c per earlier position for the scores and the weighted
/// sum; plus c × vocab for the head (only the last position's logits are needed).
pub fn macs_per_token(cfg: &GptConfig, ctx: usize, cached: bool) -> f64 {
    let (c, l) = (cfg.n_embd as f64, cfg.n_layer as f64);
    let head = c * cfg.vocab_size as f64;
    let attention = |keys: f64| 2.0 * c * keys; // scores and weighted sum of one query
    if cached {
        l * (12.0 * c * c + attention(ctx as f64)) + head
    } else {
        // The query at position p sees p + 1 keys.
        let all_queries: f64 = (0..ctx).map(|p| attention(p as f64 + 1.0)).sum();
        l * (12.0 * c * c * ctx as f64 + all_queries) + head
    }
}
// ANCHOR_END: flops
