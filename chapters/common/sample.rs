//! Autoregressive generation: feed the context, take the logits of the last position,
//! pick the next token, append it, repeat.

use crate::common::dataset::ids_tensor;
use crate::common::tokenizer::CharTokenizer;
use crate::common::train::{LanguageModel, model_device};
use burn::prelude::*;
use rand::RngExt;
use rand::rngs::StdRng;
use std::io::Write;

/// How the next token is picked from the logits.
#[derive(Clone, Copy, Debug)]
pub struct SampleOptions {
    /// Divides the logits; 0 means greedy (always the most likely token).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens before sampling.
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep only the most likely tokens whose probabilities first add up
    /// to `p` (in (0, 1]; 1 keeps everything).
    pub top_p: Option<f64>,
}

impl SampleOptions {
    /// Always the most likely token.
    pub const GREEDY: SampleOptions = SampleOptions {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }
}

// ANCHOR: pick_token
/// Picks a token from one row of logits (on the host: a vocabulary is small, and a seeded
/// host generator makes samples identical on every backend).
pub fn pick_token(logits: &[f32], opts: SampleOptions, rng: &mut StdRng) -> usize {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .expect("non-empty logits")
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let mut scaled: Vec<f64> = logits
        .iter()
        .map(|&l| l as f64 / opts.temperature)
        .collect();
    if let Some(k) = opts.top_k.filter(|&k| k > 0 && k < scaled.len()) {
        // Everything below the k-th largest logit gets probability zero.
        let mut sorted = scaled.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        let mut kept = 0;
        for l in scaled.iter_mut() {
            // Ties at the threshold: keep only as many as fit in k.
            if *l > kth || (*l == kth && kept < k) {
                kept += 1;
            } else {
                *l = f64::NEG_INFINITY;
            }
        }
    }
    // Softmax, then inverse-CDF sampling.
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<f64> = scaled.iter().map(|&l| (l - max).exp()).collect();
    if let Some(p) = opts.top_p.filter(|&p| p < 1.0) {
        keep_nucleus(&mut probs, p);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, &p) in probs.iter().enumerate() {
        if u < p {
            return i;
        }
        u -= p;
    }
    // Rounding left a sliver at the end: return the last token that had any mass.
    probs.iter().rposition(|&p| p > 0.0).unwrap_or_else(argmax)
}

/// Top-p: zeroes every probability outside the nucleus, the smallest set of most likely
/// tokens whose share of the mass reaches `p`. Unlike top-k, the set is small where the
/// model is sure and large where it is not.
fn keep_nucleus(probs: &mut [f64], p: f64) {
    let total: f64 = probs.iter().sum();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let (mut mass, mut kept) = (0.0, order.len());
    for (n, &i) in order.iter().enumerate() {
        mass += probs[i] / total;
        if mass >= p {
            kept = n + 1;
            break;
        }
    }
    for &i in &order[kept..] {
        probs[i] = 0.0;
    }
}
// ANCHOR_END: pick_token

// ANCHOR: generate
/// Generates `max_new_tokens` after `context`: run the model on the last `block_size` tokens,
/// pick the next token from the logits of the last position, append it, repeat. `on_token`
/// sees each new token as it is made (so a binary can stream it to the terminal).
pub fn generate<M: LanguageModel>(
    model: &M,
    context: &[usize],
    max_new_tokens: usize,
    opts: SampleOptions,
    rng: &mut StdRng,
    on_token: impl FnMut(usize),
) -> Vec<usize> {
    let model = model.valid(); // dropout off
    let device = model_device(&model);
    let next_logits = |tokens: &[usize]| {
        let ctx = &tokens[tokens.len().saturating_sub(model.block_size())..];
        let ids = ctx.iter().map(|&t| t as i64).collect();
        logits_at(&model, ids, ctx.len() - 1, &device)
    };
    sample_loop(context, max_new_tokens, opts, rng, next_logits, on_token)
}

/// The loop every generator shares: ask `next_logits` for the scores of the token after
/// `tokens`, pick one, append it, repeat. An empty context starts from token 0.
pub fn sample_loop(
    context: &[usize],
    max_new_tokens: usize,
    opts: SampleOptions,
    rng: &mut StdRng,
    mut next_logits: impl FnMut(&[usize]) -> Vec<f32>,
    mut on_token: impl FnMut(usize),
) -> Vec<usize> {
    let mut tokens = if context.is_empty() {
        vec![0]
    } else {
        context.to_vec()
    };
    let start = tokens.len();
    for _ in 0..max_new_tokens {
        let next = pick_token(&next_logits(&tokens), opts, rng);
        on_token(next);
        tokens.push(next);
    }
    tokens.split_off(start)
}

/// Runs `model` on one sequence of token ids and returns the logits at position `t`, on the
/// host.
fn logits_at<M: LanguageModel>(model: &M, ids: Vec<i64>, t: usize, device: &Device) -> Vec<f32> {
    let n = ids.len();
    let logits = model.forward(ids_tensor(ids, [1, n], device)); // [1, n, vocab]
    let [_, _, vocab] = logits.dims();
    logits
        .slice(s![0..1, t..t + 1, 0..vocab])
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 logits")
}
// ANCHOR_END: generate

// ANCHOR: generate_fixed_shape
/// `generate` with a tensor of one shape for every token: the context sits at the left of a
/// `[1, block_size]` tensor, padding at the right, and the logits are read at the last real
/// position. Causal attention never looks right, so the padding changes nothing; a backend
/// that compiles a kernel per shape (wgpu) compiles once instead of once per length.
pub fn generate_fixed_shape<M: LanguageModel>(
    model: &M,
    context: &[usize],
    max_new_tokens: usize,
    opts: SampleOptions,
    rng: &mut StdRng,
    on_token: impl FnMut(usize),
) -> Vec<usize> {
    let model = model.valid();
    let device = model_device(&model);
    let window = model.block_size();
    let next_logits = |tokens: &[usize]| {
        let ctx = &tokens[tokens.len().saturating_sub(window)..];
        let mut ids: Vec<i64> = ctx.iter().map(|&t| t as i64).collect();
        ids.resize(window, 0); // padding the model never attends to
        logits_at(&model, ids, ctx.len() - 1, &device)
    };
    sample_loop(context, max_new_tokens, opts, rng, next_logits, on_token)
}
// ANCHOR_END: generate_fixed_shape

/// `generate`, printing each new character to stdout as soon as it exists.
pub fn print_sample<M: LanguageModel>(
    model: &M,
    tok: &CharTokenizer,
    context: &[usize],
    max_new_tokens: usize,
    opts: SampleOptions,
    rng: &mut StdRng,
) -> Vec<usize> {
    let mut stdout = std::io::stdout();
    let out = generate(model, context, max_new_tokens, opts, rng, |t| {
        print!("{}", tok.decode(&[t]));
        let _ = stdout.flush();
    });
    println!();
    out
}
