//! The exercise solutions in `chapters/exercises/` do what the book says they do.

mod support;

use burn::prelude::*;
use burn::tensor::Distribution;
use course::ch01_bigram::{Bigram, BigramConfig};
use course::ch02_attention::{MultiHeadAttention, causal_attention};
use course::ch03_gpt::{GptConfig, layer_norm};
use course::ch04_pretrain::preset;
use course::common::dataset::{Dataset, rng_for, stream};
use course::common::max_abs_diff;
use course::common::train::{EvalSettings, TrainSettings, estimate_loss};
use course::exercises::*;

fn eval(batch_size: usize, block_size: usize, iters: usize, seed: u64) -> EvalSettings {
    EvalSettings {
        batch_size,
        block_size,
        iters,
        seed,
    }
}

fn data() -> Dataset {
    Dataset::new(&support::corpus()).unwrap()
}

fn randn<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// The validation loss of a bigram trained with block size 8 (trained once, shared).
fn trained_bigram_val_loss(data: &Dataset) -> f64 {
    static LOSS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *LOSS.get_or_init(|| {
        estimate_loss(
            &trained_bigram(data, 8, 1500),
            data,
            &eval(32, 8, 100, 1),
            0,
        )
        .val
    })
}

fn trained_bigram(data: &Dataset, block: usize, steps: usize) -> Bigram {
    let device = support::flex_device().autodiff();
    device.seed(9);
    let settings = TrainSettings {
        block_size: block,
        ..support::settings(steps, steps, 1, 9)
    };
    support::train_constant(BigramConfig::new(65).init(&device), data, &settings, 1e-2).0
}

#[test]
fn ch01_block_size_does_not_matter_to_a_bigram() {
    let data = data();
    let a = trained_bigram_val_loss(&data);
    let b = estimate_loss(
        &trained_bigram(&data, 16, 1500),
        &data,
        &eval(32, 8, 100, 1),
        0,
    )
    .val;
    assert!((a - b).abs() < 0.05, "block 8: {a}, block 16: {b}");
}

#[test]
fn ch01_a_little_smoothing_beats_none_and_too_much() {
    let data = data();
    let sweep = smoothing_sweep(&data, &[1e-4, 0.1, 100.0]);
    let (tiny, good, huge) = (sweep[0].1, sweep[1].1, sweep[2].1);
    assert!(good < tiny && good < huge, "{sweep:?}");
    // Gradient descent lands near the counted table.
    let learned = trained_bigram_val_loss(&data);
    assert!(
        (learned - good).abs() < 0.05,
        "learned {learned} vs counted {good}"
    );
}

#[test]
fn ch01_temperature_raises_entropy() {
    let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0, -3.0];
    let h: Vec<f64> = [0.1, 0.5, 1.0, 2.0, 100.0]
        .iter()
        .map(|&t| entropy_at_temperature(&logits, t))
        .collect();
    assert!(h.windows(2).all(|w| w[0] < w[1]), "{h:?}");
    assert!(h[0] < 0.01 && (h[4] - 6f64.ln()).abs() < 0.01, "{h:?}");
}

#[test]
fn ch02_the_loop_over_heads_equals_batched_attention() {
    let device = support::ndarray_device();
    device.seed(1);
    let mha = MultiHeadAttention::new(32, 4, &device);
    let x = randn([2, 8, 32], &device);
    assert!(max_abs_diff(&multi_head_as_loop(&mha, x.clone()), &mha.forward(x)) < 1e-5);
}

#[test]
fn ch02_without_the_mask_the_past_sees_the_future() {
    let device = support::ndarray_device();
    device.seed(2);
    let x = randn([1, 8, 16], &device);
    let mut later = x.clone();
    later = later.slice_assign(s![.., 7..8, ..], randn([1, 1, 16], &device));
    let first = |y: Tensor<3>| y.slice(s![.., 0..1, ..]);
    let open = max_abs_diff(
        &first(unmasked_attention(x.clone(), x.clone(), x.clone())),
        &first(unmasked_attention(
            later.clone(),
            later.clone(),
            later.clone(),
        )),
    );
    let causal = max_abs_diff(
        &first(causal_attention(x.clone(), x.clone(), x).0),
        &first(causal_attention(later.clone(), later.clone(), later).0),
    );
    assert!(
        open > 1e-4 && causal < 1e-6,
        "unmasked {open}, causal {causal}"
    );
}

#[test]
fn ch02_without_scaling_softmax_turns_one_hot() {
    let device = support::ndarray_device();
    device.seed(3);
    let (q, k) = (randn([8, 16, 64], &device), randn([8, 16, 64], &device));
    let scaled = mean_row_max(q.clone(), k.clone(), 1.0 / 8.0);
    let unscaled = mean_row_max(q, k, 1.0);
    assert!(
        unscaled > 0.8 && scaled < 0.5,
        "unscaled {unscaled}, scaled {scaled}"
    );
}

#[test]
fn ch03_gpt2_small_has_124m_parameters() {
    // 50,257 tokens, 1,024 positions, 12 layers, 12 heads, 768 wide, pre-LN, tied, biases.
    assert_eq!(
        GptConfig::new(50_257, 1024, 12, 12, 768).param_count(),
        124_439_808
    );
}

#[test]
fn ch03_rms_norm_is_layer_norm_for_zero_mean_inputs() {
    let device = support::ndarray_device();
    device.seed(4);
    let x = randn([2, 4, 16], &device);
    let centered = x.clone() - x.clone().mean_dim(2);
    let gamma = randn([16], &device);
    let ln = layer_norm(centered.clone(), gamma.clone(), None, 1e-5);
    assert!(max_abs_diff(&rms_norm(centered, gamma.clone(), 1e-5), &ln) < 1e-5);
    let shifted = x + 3.0;
    let differ = max_abs_diff(
        &rms_norm(shifted.clone(), gamma.clone(), 1e-5),
        &layer_norm(shifted, gamma, None, 1e-5),
    );
    assert!(differ > 0.1, "{differ}");
}

#[test]
fn ch03_an_untrained_gpt_guesses_uniformly() {
    let data = data();
    let device = support::ndarray_device();
    device.seed(5);
    let model = GptConfig::new(65, 32, 2, 4, 64).init(&device);
    let loss = estimate_loss(&model, &data, &eval(8, 32, 10, 5), 0).val;
    assert!((loss - 65f64.ln()).abs() < 0.1, "{loss}");
}

#[test]
fn ch04_top_p_stays_in_the_nucleus() {
    // Probabilities about 0.64, 0.24, 0.09, 0.03: p = 0.8 keeps the first two only.
    let logits = [3.0f32, 2.0, 1.0, 0.0];
    let mut rng = rng_for(0, stream::SAMPLE, 0);
    let mut seen = [0usize; 4];
    for _ in 0..3000 {
        seen[pick_top_p(&logits, 0.8, &mut rng)] += 1;
    }
    assert!(
        seen[0] > 0 && seen[1] > 0 && seen[2] == 0 && seen[3] == 0,
        "{seen:?}"
    );
    let mut all = [0usize; 4];
    for _ in 0..3000 {
        all[pick_top_p(&logits, 1.0, &mut rng)] += 1;
    }
    assert!(all.iter().all(|&n| n > 0), "{all:?}");
}

#[test]
fn ch04_the_full_validation_loss_agrees_with_the_estimate() {
    let data = data();
    let model = trained_bigram(&data, 8, 800);
    let full = full_val_loss(&model, &data, 8, 512);
    let estimate = estimate_loss(&model, &data, &eval(32, 8, 200, 7), 0).val;
    assert!(
        (full - estimate).abs() < 0.05,
        "full {full}, estimate {estimate}"
    );
}

#[test]
fn ch04_linear_decay_goes_from_peak_to_floor() {
    let cfg = preset("baby", 65).unwrap();
    assert!((linear_decay_lr(&cfg, 0) - 1e-5).abs() < 1e-12);
    assert!((linear_decay_lr(&cfg, 100) - 1e-3).abs() < 1e-12);
    assert!((linear_decay_lr(&cfg, 1050) - 5.5e-4).abs() < 1e-9);
    assert!((linear_decay_lr(&cfg, 2000) - 1e-4).abs() < 1e-12);
    assert!((linear_decay_lr(&cfg, 5000) - 1e-4).abs() < 1e-12);
}
