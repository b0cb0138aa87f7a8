//! Measuring the operations: each one's forward + backward time with Burn's kernels and with
//! the fused ones, and how far apart their results are.

use super::extension::FusedOps;
use super::{FUSED, composed_attention, dropout_mask, fused_attention};
use crate::ch02_attention::{causal_weights, merge_heads, split_heads};
use crate::ch03_gpt::GptConfig;
use crate::ch03_gpt::Kernels;
use crate::common::{max_rel_diff, worst};
use burn::backend::Dispatch;
use burn::nn::{DropoutConfig, Gelu, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

// ANCHOR: op_timing
/// One operation at one shape: the median time of a forward and backward pass.
#[derive(Clone, Debug, Serialize)]
pub struct OpTiming {
    pub op: &'static str,
    pub shape: String,
    pub burn_ms: f64,
    pub fused_ms: f64,
}

/// One run's output and the gradient of each input, flattened.
pub type Outcome = (Vec<f32>, Vec<Vec<f32>>);

/// An operation as a test case: builds its inputs (tracked for gradients) and runs it with
/// the given kernels, returning the output and every input gradient, flattened.
pub struct OpCase {
    pub op: &'static str,
    pub shape: String,
    run: Box<dyn Fn(Kernels) -> Outcome>,
}

impl OpCase {
    pub fn run(&self, kernels: Kernels) -> Outcome {
        (self.run)(kernels)
    }

    /// Median milliseconds of `reps` runs with each kernel choice, taken in turns so that a
    /// busy moment of the machine hits both alike.
    pub fn time(&self, reps: usize) -> OpTiming {
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..reps.max(1) {
            for (i, k) in [Kernels::BURN, FUSED].into_iter().enumerate() {
                let tick = Instant::now();
                self.run(k);
                times[i].push(tick.elapsed().as_secs_f64() * 1e3);
            }
        }
        let [burn_ms, fused_ms] = times.map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        });
        OpTiming {
            op: self.op,
            shape: self.shape.clone(),
            burn_ms,
            fused_ms,
        }
    }

    /// The largest difference between the two kernels' outputs and gradients, relative where
    /// values are larger than 1: `(output, gradients)`.
    pub fn max_error(&self) -> (f32, f32) {
        let (burn, fused) = (self.run(Kernels::BURN), self.run(FUSED));
        let grads = fused.1.iter().zip(&burn.1);
        let grads = worst(grads.map(|(f, b)| max_rel_diff(f, b) as f64)) as f32;
        (max_rel_diff(&fused.0, &burn.0), grads)
    }
}
// ANCHOR_END: op_timing

// ANCHOR: cases
/// The operations of one layer of `cfg` at batch `b`, on `device` (an autodiff device).
pub fn model_ops(cfg: &GptConfig, b: usize, device: &Device) -> Vec<OpCase> {
    let (t, c, nh, v) = (cfg.block_size, cfg.n_embd, cfg.n_head, cfg.vocab_size);
    vec![
        matmul_case(b * t, c, 4 * c, device),
        gelu_case([b, t, 4 * c], device),
        layer_norm_case([b, t, c], device),
        attention_case([b, t, 3 * c], nh, device),
        cross_entropy_case([b, t, v], device),
    ]
}

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn flat<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 values")
}

/// Runs `f` on fresh tracked copies of `inputs`, backpropagates `sum(f(..) * w)` with a fixed
/// random `w` (so every output element gets its own gradient) and returns the output and the
/// inputs' gradients.
fn with_grads<const D: usize, const E: usize>(
    inputs: &[Tensor<D>],
    w: &Tensor<E>,
    f: impl Fn(Vec<Tensor<D>>) -> Tensor<E>,
) -> Outcome {
    let xs: Vec<Tensor<D>> = inputs.iter().map(|x| x.clone().require_grad()).collect();
    let y = f(xs.clone());
    let grads = (y.clone() * w.clone()).sum().backward();
    let g = xs.iter().map(|x| flat(x.grad(&grads).expect("a gradient")));
    (flat(y), g.collect())
}

fn matmul_case(m: usize, k: usize, n: usize, device: &Device) -> OpCase {
    let (ab, w) = (
        [random([m, k], device), random([k, n], device)],
        random([m, n], device),
    );
    OpCase {
        op: "matmul (Linear)",
        shape: format!("[{m}, {k}] @ [{k}, {n}]"),
        run: Box::new(move |kn| with_grads(&ab, &w, |x| kn.matmul(x[0].clone(), x[1].clone()))),
    }
}

fn gelu_case(shape: [usize; 3], device: &Device) -> OpCase {
    let (x, w) = ([random(shape, device) * 2.0], random(shape, device));
    OpCase {
        op: "GELU",
        shape: format!("{shape:?}"),
        run: Box::new(move |k| with_grads(&x, &w, |x| k.gelu(&Gelu::new(), x[0].clone()))),
    }
}

fn layer_norm_case(shape: [usize; 3], device: &Device) -> OpCase {
    let mut ln = LayerNormConfig::new(shape[2]).init(device);
    ln.gamma = burn::module::Param::from_tensor(random([shape[2]], device) + 1.0);
    let (x, w) = ([random(shape, device) * 3.0 + 0.5], random(shape, device));
    OpCase {
        op: "LayerNorm",
        shape: format!("{shape:?}"),
        run: Box::new(move |k| with_grads(&x, &w, |x| k.layer_norm(&ln, x[0].clone()))),
    }
}

/// Chapter 3's attention core as Burn operations, or the fused one.
fn attention_case(shape: [usize; 3], nh: usize, device: &Device) -> OpCase {
    let [b, t, c3] = shape;
    let (qkv, w) = ([random(shape, device)], random([b, t, c3 / 3], device));
    let none = DropoutConfig::new(0.0).init();
    OpCase {
        op: "attention core",
        shape: format!("{shape:?}, {nh} heads"),
        run: Box::new(move |k| {
            with_grads(&qkv, &w, |x| match k == FUSED {
                true => fused_attention(x[0].clone(), nh, &none),
                false => composed_attention(x[0].clone(), nh, &none),
            })
        }),
    }
}

/// Dropout at probability [`P`] with the fixed seed [`SEED`], checked against Burn's operations
/// multiplying by the same mask ([`dropout_mask`]): the fused kernels draw their masks from a
/// hash, not from Burn's generator, so only the same mask can give the same numbers.
pub fn dropout_ops(cfg: &GptConfig, b: usize, device: &Device) -> Vec<OpCase> {
    let (t, c, nh) = (cfg.block_size, cfg.n_embd, cfg.n_head);
    vec![
        dropout_case([b, t, c], device),
        attention_dropout_case([b, t, 3 * c], nh, device),
    ]
}

const P: f64 = 0.2;
const SEED: u64 = 2024;

fn dropout_case(shape: [usize; 3], device: &Device) -> OpCase {
    let (x, w) = ([random(shape, device)], random(shape, device));
    let mask = dropout_mask(shape, P, SEED, device);
    OpCase {
        op: "dropout",
        shape: format!("{shape:?}, p = {P}"),
        run: Box::new(move |k| {
            with_grads(&x, &w, |x| {
                let x = x[0].clone();
                match k.fused_on(&x.device()) {
                    true => Tensor::from_dispatch(Dispatch::fused_dropout(
                        x.into_dispatch(),
                        P,
                        SEED,
                        0,
                    )),
                    false => x * mask.clone(),
                }
            })
        }),
    }
}

fn attention_dropout_case(shape: [usize; 3], nh: usize, device: &Device) -> OpCase {
    let [b, t, c3] = shape;
    let (qkv, w) = ([random(shape, device)], random([b, t, c3 / 3], device));
    let mask = dropout_mask([b, nh, t, t], P, SEED, device);
    OpCase {
        op: "attention+drop",
        shape: format!("{shape:?}, p = {P}"),
        run: Box::new(move |k| {
            with_grads(&qkv, &w, |x| {
                let qkv = x[0].clone();
                if k.fused_on(&qkv.device()) {
                    let y = Dispatch::fused_attention(qkv.into_dispatch(), nh, P, SEED, 0);
                    return Tensor::from_dispatch(y);
                }
                let (q, k, v) = split_heads(qkv, nh); // [b, nh, t, hs]
                merge_heads((causal_weights(q, k) * mask.clone()).matmul(v))
            })
        }),
    }
}

fn cross_entropy_case(shape: [usize; 3], device: &Device) -> OpCase {
    let [b, t, v] = shape;
    let logits = [random(shape, device) * 2.0];
    let targets = Tensor::<2, Int>::random([b, t], Distribution::Uniform(0.0, v as f64), device);
    let w = Tensor::<1>::ones([1], device);
    OpCase {
        op: "cross-entropy",
        shape: format!("{shape:?}"),
        run: Box::new(move |k| {
            with_grads(&logits, &w, |x| {
                k.cross_entropy(x[0].clone(), targets.clone())
            })
        }),
    }
}
// ANCHOR_END: cases

// ANCHOR: product_trace
/// A product as `kernels::gemm` sees it: `[m, k] @ [k, n]`, with `A` or `B` read transposed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct ProductShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a_transposed: bool,
    pub b_transposed: bool,
}

/// Calls and seconds per shape, gathered while `trace_products` runs.
static TRACING: AtomicBool = AtomicBool::new(false);
static PRODUCTS: Mutex<BTreeMap<ProductShape, (usize, f64)>> = Mutex::new(BTreeMap::new());

/// Times one product, from its start to its drop, while tracing is on; costs one atomic
/// load otherwise.
pub struct ProductTimer(Option<(ProductShape, Instant)>);

impl ProductTimer {
    pub fn start(shape: ProductShape) -> Self {
        Self(
            TRACING
                .load(Ordering::Relaxed)
                .then(|| (shape, Instant::now())),
        )
    }
}

impl Drop for ProductTimer {
    fn drop(&mut self) {
        if let Some((shape, tick)) = self.0.take() {
            let seconds = tick.elapsed().as_secs_f64();
            let mut products = PRODUCTS.lock().unwrap_or_else(|e| e.into_inner());
            let (calls, total) = products.entry(shape).or_default();
            *calls += 1;
            *total += seconds;
        }
    }
}

/// One shape's line of a trace.
#[derive(Clone, Debug, Serialize)]
pub struct ProductTime {
    /// `m x k x n`, with `Aᵀ` or `Bᵀ` for an operand read transposed.
    pub shape: String,
    pub calls: usize,
    /// The calls' time added up (calls that run side by side on two cores count twice).
    pub ms: f64,
    /// The shape's arithmetic over its calls' time.
    pub gflops: f64,
}

/// Runs `f` with every product of chapter 5's kernels timed; returns `f`'s result and one
/// line per shape, the most time first.
pub fn trace_products<R>(f: impl FnOnce() -> R) -> (R, Vec<ProductTime>) {
    PRODUCTS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    TRACING.store(true, Ordering::Relaxed);
    let result = f();
    TRACING.store(false, Ordering::Relaxed);
    let products = std::mem::take(&mut *PRODUCTS.lock().unwrap_or_else(|e| e.into_inner()));
    let mut lines: Vec<ProductTime> = products
        .into_iter()
        .map(|(s, (calls, seconds))| ProductTime {
            shape: format!(
                "{} x {} x {}{}{}",
                s.m,
                s.k,
                s.n,
                if s.a_transposed { ", Aᵀ" } else { "" },
                if s.b_transposed { ", Bᵀ" } else { "" }
            ),
            calls,
            ms: seconds * 1e3,
            gflops: 2.0 * (s.m * s.k * s.n * calls) as f64 / seconds / 1e9,
        })
        .collect();
    lines.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    (result, lines)
}

/// Each shape's fastest line over several traces of the same work (a busy moment of the
/// machine slows one trace, not all), the most time first.
pub fn fastest(traces: Vec<Vec<ProductTime>>) -> Vec<ProductTime> {
    let mut best: Vec<ProductTime> = Vec::new();
    for line in traces.into_iter().flatten() {
        match best.iter_mut().find(|b| b.shape == line.shape) {
            Some(b) if b.ms <= line.ms => {}
            Some(b) => *b = line,
            None => best.push(line),
        }
    }
    best.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    best
}
// ANCHOR_END: product_trace
