//! Chapter 2: averaging, causal attention, multi-head attention.

mod support;

use burn::prelude::*;
use burn::tensor::Distribution;
use course::ch02_attention::{
    AttentionLmConfig, Head, LinearRows, MultiHeadAttention, SelfAttention, average_loops,
    average_matmul, average_softmax, scaled_scores,
};
use course::common::dataset::{Dataset, Split, rng_for, stream};
use course::common::max_abs_diff;
use course::common::train::LanguageModel;

fn randn<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

#[test]
fn the_three_averaging_versions_agree() {
    let device = support::ndarray_device();
    device.seed(1);
    let x = randn([4, 8, 2], &device);
    let a = average_loops(&x);
    let (b, wb) = average_matmul(&x);
    let (c, wc) = average_softmax(&x);
    assert!(max_abs_diff(&a, &b) < 1e-5);
    assert!(max_abs_diff(&a, &c) < 1e-5);
    assert!(max_abs_diff(&wb, &wc) < 1e-6);
    // Row t of the weights is 1/(t+1) on and below the diagonal.
    let w = wb.to_data().try_to_vec::<f32>().unwrap();
    assert!((w[3 * 8 + 2] - 0.25).abs() < 1e-6 && w[3 * 8 + 4] == 0.0);
    // And the first position is x itself, the last the mean over all of time.
    let first = a.clone().slice(s![.., 0..1, ..]);
    assert!(max_abs_diff(&first, &x.clone().slice(s![.., 0..1, ..])) < 1e-6);
    let last = a.slice(s![.., 7..8, ..]);
    assert!(max_abs_diff(&last, &x.mean_dim(1)) < 1e-5);
}

/// Outputs at positions <= t must not change when inputs after t do.
fn assert_causal(f: impl Fn(Tensor<3>) -> Tensor<3>, device: &Device) {
    let (b, t, c) = (2, 8, 16);
    let x = randn([b, t, c], device);
    let y = f(x.clone());
    for cut in [0, 3, 6] {
        let tail = randn([b, t - cut - 1, c], device);
        let x2 = Tensor::cat(vec![x.clone().slice(s![.., 0..cut + 1, ..]), tail], 1);
        let y2 = f(x2);
        let keep = |y: &Tensor<3>| y.clone().slice(s![.., 0..cut + 1, ..]);
        assert!(
            max_abs_diff(&keep(&y), &keep(&y2)) < 1e-5,
            "position <= {cut} changed"
        );
        let later = |y: &Tensor<3>| y.clone().slice(s![.., cut + 1..t, ..]);
        assert!(
            max_abs_diff(&later(&y), &later(&y2)) > 1e-3,
            "later positions should change"
        );
    }
}

#[test]
fn forward_rows_is_the_linear_layer_applied_to_each_token() {
    let device = support::ndarray_device();
    device.seed(3);
    let linear = burn::nn::LinearConfig::new(8, 5).init(&device);
    let x = randn([3, 4, 8], &device);
    let folded = linear.forward_rows(x.clone()); // one [12, 8] @ [8, 5] product
    assert_eq!(folded.dims(), [3, 4, 5]);
    assert!(max_abs_diff(&folded, &linear.forward(x.clone())) < 1e-5);
    // Token (1, 2) on its own gives row (1, 2) of the result.
    let one = linear.forward(x.slice(s![1..2, 2..3, ..]));
    assert!(max_abs_diff(&one, &folded.slice(s![1..2, 2..3, ..])) < 1e-5);
}

#[test]
fn attention_is_causal_for_one_head_and_for_many() {
    let device = support::ndarray_device();
    device.seed(2);
    let head = Head::new(16, 8, &device);
    assert_causal(|x| head.forward(x), &device);
    let mha = MultiHeadAttention::new(16, 4, &device);
    assert_causal(|x| mha.forward(x), &device);
}

#[test]
fn attention_rows_are_distributions_over_the_past() {
    let device = support::ndarray_device();
    device.seed(3);
    let mha = MultiHeadAttention::new(16, 4, &device);
    let (y, wei) = mha.forward_with_weights(randn([2, 8, 16], &device));
    assert_eq!(y.dims(), [2, 8, 16]);
    assert_eq!(wei.dims(), [2, 4, 8, 8]);
    let w = wei.into_data().try_to_vec::<f32>().unwrap();
    for row in w.chunks(8).enumerate() {
        let (i, r) = row;
        let t = i % 8;
        let sum: f32 = r.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "row sums to {sum}");
        assert!(
            r[t + 1..].iter().all(|&v| v == 0.0),
            "weight above the diagonal in {r:?}"
        );
        assert!(r[..=t].iter().all(|&v| v > 0.0));
    }
    let head = Head::new(16, 8, &device);
    let (_, wei) = head.forward_with_weights(randn([1, 8, 16], &device));
    assert_eq!(wei.dims(), [1, 8, 8]);
}

#[test]
fn scaling_keeps_score_variance_near_one() {
    let device = support::ndarray_device();
    device.seed(4);
    let hs = 64;
    let q = randn([16, 32, hs], &device);
    let k = randn([16, 32, hs], &device);
    let var = |t: Tensor<3>| t.flatten::<1>(0, 2).var(0).into_scalar::<f32>();
    let scaled = var(scaled_scores(q.clone(), k.clone()));
    let raw = var(q.matmul(k.swap_dims(1, 2)));
    assert!((scaled - 1.0).abs() < 0.15, "scaled variance {scaled}");
    assert!(
        (raw / hs as f32 - 1.0).abs() < 0.15,
        "raw variance {raw} vs head size {hs}"
    );
}

#[test]
fn the_model_is_causal_in_its_tokens() {
    let device = support::ndarray_device();
    device.seed(5);
    let model = AttentionLmConfig::new(65, 8, 32, 4).init(&device);
    let ids = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [1, 8]), &device);
    let a = model.forward(ids(vec![1, 2, 3, 4, 5, 6, 7, 8]));
    let b = model.forward(ids(vec![1, 2, 3, 4, 60, 61, 62, 63]));
    let head = |t: &Tensor<3>| t.clone().slice(s![.., 0..4, ..]);
    assert!(max_abs_diff(&head(&a), &head(&b)) < 1e-5);
    assert!(max_abs_diff(&a, &b) > 1e-3);
}

#[test]
fn logits_on_wgpu_and_flex_equal_ndarray_for_the_same_weights() {
    let data = Dataset::new(&support::corpus()).unwrap();
    let nd = support::ndarray_device();
    nd.seed(6);
    for n_head in [1, 4] {
        let (x, _) = data.batch(Split::Val, 4, 8, &mut rng_for(6, stream::DEMO, 0), &nd);
        support::assert_same_logits(AttentionLmConfig::new(65, 8, 32, n_head).init(&nd), x);
    }
}

#[test]
fn model_a_is_the_one_head_of_section_2_2_and_model_b_multi_head() {
    let device = support::ndarray_device();
    let a = AttentionLmConfig::new(65, 8, 32, 1).init(&device);
    let b = AttentionLmConfig::new(65, 8, 32, 4).init(&device);
    assert!(matches!(a.sa, SelfAttention::One(_)));
    assert!(matches!(b.sa, SelfAttention::Multi(_)));
    // One head of 32: three bias-free [32, 32] projections, no output projection.
    let embeddings = 65 * 32 + 8 * 32 + (32 * 65 + 65);
    assert_eq!(a.num_params(), embeddings + 3 * 32 * 32);
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new((0..8).collect::<Vec<i64>>(), [1, 8]),
        &device,
    );
    let (_, wei) = a.forward_with_weights(ids);
    assert_eq!(wei.dims(), [1, 1, 8, 8]);
}

/// How far below the bigram floor (2.48) a short run must end: this one reaches 2.32.
const MARGIN: f64 = 0.1;

#[test]
fn a_short_training_run_learns() {
    let data = Dataset::new(&support::corpus()).unwrap();
    let device = support::flex_device().autodiff();
    device.seed(7);
    let model = AttentionLmConfig::new(65, 8, 32, 4).init(&device);
    let settings = support::settings(1500, 1500, 50, 7);
    let (_, report) = support::train_constant(model, &data, &settings, 3e-3);
    let last = report.losses.last().unwrap();
    // Below what any bigram table reaches: attention put the earlier characters to use.
    let floor = support::bigram_floor(&data);
    assert!(
        last.val < floor - MARGIN,
        "{last:?}, bigram floor {floor:.4}"
    );
}

#[test]
fn sequences_in_a_batch_never_talk_to_each_other() {
    let device = support::ndarray_device();
    device.seed(6);
    let mha = MultiHeadAttention::new(16, 4, &device);
    let x = randn([3, 8, 16], &device);
    let y = mha.forward(x.clone());
    // Replace sequence 1 entirely: sequences 0 and 2 must not notice.
    let other = randn([1, 8, 16], &device);
    let x2 = x.slice_assign(s![1..2, .., ..], other);
    let y2 = mha.forward(x2);
    for b in [0, 2] {
        let row = |t: &Tensor<3>| t.clone().slice(s![b..b + 1, .., ..]);
        assert!(
            max_abs_diff(&row(&y), &row(&y2)) < 1e-6,
            "sequence {b} changed"
        );
    }
    let one = |t: &Tensor<3>| t.clone().slice(s![1..2, .., ..]);
    assert!(max_abs_diff(&one(&y), &one(&y2)) > 1e-3);
}
