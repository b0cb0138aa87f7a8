//! Comparing backends: the same models, timed and checked on every backend compiled in.

use crate::ch01_bigram::BigramConfig;
use crate::ch02_attention::AttentionLmConfig;
use crate::ch03_gpt::{GptConfig, Norm};
use crate::ch04_pretrain::PretrainConfig;
use crate::ch04_pretrain::bench::{StepTimes, time_steps};
use crate::ch05_fast::FUSED;
use crate::ch06_generate::{Generation, Window, generate};
use crate::common::dataset::{Dataset, Split, rng_for, stream};
use crate::common::max_abs_diff;
use crate::common::sample::{SampleOptions, generate_fixed_shape};
use crate::common::train::LanguageModel;
use burn::prelude::*;
use burn::tensor::Distribution;
use rand::rngs::StdRng;
use serde::Serialize;
use std::time::Instant;

// ANCHOR: matmul
/// Square matrix-multiply throughput: `reps` products of two `[n, n]` matrices. Three
/// untimed products first, each waited for: on GPU backends they compile the kernel and let
/// the autotuner pick its fastest variant for this shape. `device.sync()` waits for all
/// queued work, so the timer stops when the last product is really done.
pub fn matmul_gflops(device: &Device, n: usize, reps: usize) -> f64 {
    let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), device);
    for _ in 0..3 {
        let _ = a.clone().matmul(b.clone()).into_data();
    }
    device.sync().expect("the device runs");
    let start = Instant::now();
    let products: Vec<Tensor<2>> = (0..reps).map(|_| a.clone().matmul(b.clone())).collect();
    device.sync().expect("the device runs");
    let seconds = start.elapsed().as_secs_f64();
    drop(products);
    2.0 * (n * n * n * reps) as f64 / seconds / 1e9
}
// ANCHOR_END: matmul

#[derive(Serialize, Clone, Debug)]
pub struct MatmulResult {
    pub size: usize,
    pub gflops: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct TrainResult {
    pub preset: String,
    #[serde(flatten)]
    pub times: StepTimes,
}

#[derive(Serialize, Clone, Debug)]
pub struct GenerationResult {
    pub preset: String,
    pub new_tokens: usize,
    /// Recomputing the whole context for every token.
    pub tokens_per_s: f64,
    /// With chapter 6's KV cache.
    pub cached_tokens_per_s: f64,
    /// `cached_tokens_per_s / tokens_per_s`.
    pub cache_speedup: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct ParityResult {
    pub model: String,
    pub max_abs_diff: f32,
}

/// Trains `steps` timed steps of `cfg`'s model on `device` (autodiff added here).
pub fn train_speed(
    cfg: &PretrainConfig,
    data: &Dataset,
    device: &Device,
    warmup: usize,
    steps: usize,
) -> anyhow::Result<TrainResult> {
    let ad = device.clone().autodiff();
    ad.seed(cfg.seed);
    let model = cfg.model.init(&ad).with_kernels(FUSED); // Burn's ops where not flex
    let times = time_steps(cfg, model, data, warmup, steps)?;
    Ok(TrainResult {
        preset: cfg.preset.clone(),
        times,
    })
}

/// Tokens per second generating `n` tokens (after 2 untimed ones: kernel compilation on GPU
/// backends), recomputing the context for every token as chapter 4 does (a fixed window),
/// and with chapter 6's cache of keys and values (restarting from the last half of the
/// block when it is full). `fixed_shape` for backends that compile a kernel per shape.
pub fn generation_speed(
    cfg: &PretrainConfig,
    device: &Device,
    n: usize,
    fixed_shape: bool,
) -> GenerationResult {
    device.seed(cfg.seed);
    let model = cfg.model.init(device).with_kernels(FUSED);
    let opts = SampleOptions {
        temperature: 1.0,
        top_k: None,
        top_p: None,
    };
    let rate = |run: &mut dyn FnMut(usize, &mut StdRng)| {
        let mut rng = rng_for(cfg.seed, stream::SAMPLE, 0);
        run(2, &mut rng);
        let start = Instant::now();
        run(n, &mut rng);
        n as f64 / start.elapsed().as_secs_f64()
    };
    let uncached = rate(&mut |k, rng| {
        generate_fixed_shape(&model, &[0], k, opts, rng, |_| {});
    });
    let how = Generation {
        opts,
        window: Window::Restart {
            keep: cfg.model.block_size / 2,
        },
        cached: true,
        fixed_shape,
    };
    let cached = rate(&mut |k, rng| {
        generate(&model, &[0], 1, k, how, rng, |_, _| {});
    });
    GenerationResult {
        preset: cfg.preset.clone(),
        new_tokens: n,
        tokens_per_s: uncached,
        cached_tokens_per_s: cached,
        cache_speedup: cached / uncached,
    }
}

// ANCHOR: parity
/// Every chapter's model, built once on ndarray, copied with the same weights to `device`:
/// the largest absolute difference of their logits on one validation batch.
pub fn parity(data: &Dataset, device: &Device, seed: u64) -> Vec<ParityResult> {
    let nd = crate::common::backend::Backend::Ndarray.device();
    nd.seed(seed);
    let v = data.tokenizer.vocab_size();
    let (x, _) = data.batch(Split::Val, 4, 32, &mut rng_for(seed, stream::DEMO, 0), &nd);
    let x_dev = x.clone().to_device(device);
    fn diff<M: LanguageModel>(
        m: M,
        x: &Tensor<2, Int>,
        x_dev: &Tensor<2, Int>,
        device: &Device,
    ) -> f32 {
        let reference = m.forward(x.clone());
        max_abs_diff(&reference, &m.to_device(device).forward(x_dev.clone()))
    }
    vec![
        ParityResult {
            model: "ch01 bigram".into(),
            max_abs_diff: diff(BigramConfig::new(v).init(&nd), &x, &x_dev, device),
        },
        ParityResult {
            model: "ch02 attention (4 heads)".into(),
            max_abs_diff: diff(
                AttentionLmConfig::new(v, 32, 32, 4).init(&nd),
                &x,
                &x_dev,
                device,
            ),
        },
        ParityResult {
            model: "ch03 GPT pre-LN".into(),
            max_abs_diff: diff(
                GptConfig::new(v, 32, 2, 4, 64)
                    .init(&nd)
                    .with_kernels(FUSED),
                &x,
                &x_dev,
                device,
            ),
        },
        ParityResult {
            model: "ch03 GPT post-LN".into(),
            max_abs_diff: diff(
                GptConfig::new(v, 32, 2, 4, 64)
                    .with_norm(Norm::Post)
                    .init(&nd)
                    .with_kernels(FUSED),
                &x,
                &x_dev,
                device,
            ),
        },
    ]
}
// ANCHOR_END: parity

// ANCHOR: op_costs
/// What one operation costs on one backend.
#[derive(Serialize, Clone, Debug)]
pub struct OpCost {
    pub op: String,
    /// Microseconds per call.
    pub micros: f64,
    /// Nanoseconds per element of a `[rows, cols]` tensor.
    pub ns_per_element: f64,
}

/// Time of one call of `op`: the median over 5 rounds of `reps` calls each, after 3 untimed
/// calls (the median shrugs off a round that another process slowed down). Each round keeps
/// its results until the clock stops, so that a lazy backend cannot skip the work.
fn time_op<const D: usize>(device: &Device, reps: usize, op: impl Fn() -> Tensor<D>) -> f64 {
    for _ in 0..3 {
        let _ = op().into_data();
    }
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            device.sync().expect("the device runs");
            let start = Instant::now();
            let results: Vec<Tensor<D>> = (0..reps).map(|_| op()).collect();
            device.sync().expect("the device runs");
            let seconds = start.elapsed().as_secs_f64() / reps as f64;
            drop(results);
            seconds
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

/// The operations a training step is made of besides the big matrix products, timed on a
/// `[rows, cols]` input of N(0, 1) values (`[768, 512]` is the `baby` model's MLP activation:
/// 12 x 64 tokens, 512 wide). Training rows run forward and backward on an autodiff device.
pub fn op_costs(device: &Device, [rows, cols]: [usize; 2], reps: usize) -> Vec<OpCost> {
    use burn::tensor::activation::{gelu, sigmoid, softmax};
    use burn::tensor::module::linear;
    let x = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 1.0), device);
    let y = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 1.0), device);
    let ad = device.clone().autodiff();
    let xa = Tensor::<2>::from_data(x.to_data(), &ad).require_grad();
    let ya = Tensor::<2>::from_data(y.to_data(), &ad);
    // The first Linear of the MLP, for rows = b * t tokens of width c = cols / 4.
    let (b, c) = (12.min(rows), cols / 4);
    let x3 =
        Tensor::<3>::random([b, rows / b, c], Distribution::Normal(0.0, 1.0), &ad).require_grad();
    let w = Tensor::<2>::random([c, cols], Distribution::Normal(0.0, 0.02), &ad).require_grad();
    let weight_grad = |out: Tensor<3>| w.grad(&out.sum().backward()).expect("w is tracked");
    let input_grad = |out: Tensor<2>| xa.grad(&out.sum().backward()).expect("x is tracked");
    let mut costs = Vec::new();
    let mut time = |name: &str, seconds: f64| {
        costs.push(OpCost {
            op: name.to_string(),
            micros: seconds * 1e6,
            ns_per_element: seconds * 1e9 / (rows * cols) as f64,
        })
    };
    // Untimed: the first operation would also pay for the allocator's first pages.
    time_op(device, reps, || x.clone() + y.clone());
    time("x + y", time_op(device, reps, || x.clone() + y.clone()));
    time("x * 0.5", time_op(device, reps, || x.clone() * 0.5));
    time("exp(x)", time_op(device, reps, || x.clone().exp()));
    time("erf(x)", time_op(device, reps, || x.clone().erf()));
    time("tanh(x)", time_op(device, reps, || x.clone().tanh()));
    time("sigmoid(x)", time_op(device, reps, || sigmoid(x.clone())));
    time("gelu(x)", time_op(device, reps, || gelu(x.clone())));
    time(
        "softmax(x) over rows",
        time_op(device, reps, || softmax(x.clone(), 1)),
    );
    time(
        "train: x + y",
        time_op(&ad, reps, || input_grad(xa.clone() + ya.clone())),
    );
    time(
        "train: gelu(x)",
        time_op(&ad, reps, || input_grad(gelu(xa.clone()))),
    );
    time(
        "train: softmax(x)",
        time_op(&ad, reps, || input_grad(softmax(xa.clone(), 1))),
    );
    time(
        "train: Linear on [b, t, c] (b products)",
        time_op(&ad, reps, || {
            weight_grad(linear(x3.clone(), w.clone(), None))
        }),
    );
    time(
        "train: Linear on [b*t, c] (forward_rows)",
        time_op(&ad, reps, || {
            let [b, t, c] = x3.dims();
            weight_grad(linear(x3.clone().reshape([b * t, c]), w.clone(), None).unsqueeze())
        }),
    );
    costs
}
// ANCHOR_END: op_costs
