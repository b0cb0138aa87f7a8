//! Chapter 3: the GPT decoder.

mod support;

use burn::module::Module;
use burn::nn::LayerNormConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use course::ch03_gpt::{GptConfig, Norm, layer_norm};
use course::common::backend::Backend;
use course::common::dataset::{Dataset, Split, rng_for, stream};
use course::common::max_abs_diff;
use course::common::train::{LanguageModel, cross_entropy};

fn configs() -> Vec<GptConfig> {
    let mut out = Vec::new();
    for norm in [Norm::Pre, Norm::Post] {
        for tie in [true, false] {
            for bias in [true, false] {
                out.push(
                    GptConfig::new(65, 16, 2, 4, 32)
                        .with_norm(norm)
                        .with_tie_weights(tie)
                        .with_bias(bias),
                );
            }
        }
    }
    out.push(GptConfig::new(50, 64, 3, 6, 48));
    out
}

#[test]
fn the_formula_matches_num_params() {
    let device = support::ndarray_device();
    for cfg in configs() {
        assert_eq!(cfg.init(&device).num_params(), cfg.param_count(), "{cfg:?}");
    }
}

#[test]
fn gpt1_has_about_117m_parameters() {
    // 40,478 x 768 token + 512 x 768 position embeddings + 12 x (12 c^2 + 13 c).
    let gpt1 = GptConfig::gpt1();
    assert_eq!(gpt1.param_count(), 116_534_784);
    assert_eq!(
        gpt1.param_count(),
        40_478 * 768 + 512 * 768 + 12 * (12 * 768 * 768 + 13 * 768)
    );
}

#[test]
fn the_decoder_is_causal() {
    let device = support::ndarray_device();
    device.seed(1);
    for norm in [Norm::Pre, Norm::Post] {
        let model = GptConfig::new(65, 8, 2, 4, 32)
            .with_norm(norm)
            .init(&device);
        let ids = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [1, 8]), &device);
        let a = model.forward(ids(vec![10, 20, 30, 40, 50, 60, 1, 2]));
        let b = model.forward(ids(vec![10, 20, 30, 9, 9, 9, 9, 9]));
        let head = |t: &Tensor<3>| t.clone().slice(s![.., 0..3, ..]);
        assert!(max_abs_diff(&head(&a), &head(&b)) < 1e-5, "{norm:?}");
        assert!(max_abs_diff(&a, &b) > 1e-4, "{norm:?}");
    }
}

#[test]
fn a_tiny_model_overfits_one_batch_with_either_norm() {
    let data = Dataset::new(&support::corpus()).unwrap();
    for norm in [Norm::Pre, Norm::Post] {
        let device = support::ndarray_device().autodiff();
        device.seed(2);
        let mut model = GptConfig::new(65, 16, 2, 4, 64)
            .with_norm(norm)
            .init(&device);
        let (x, y) = data.batch(
            Split::Train,
            4,
            16,
            &mut rng_for(2, stream::DEMO, 0),
            &device,
        );
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
        let mut loss = f32::INFINITY;
        for _ in 0..300 {
            let l = cross_entropy(model.forward(x.clone()), y.clone());
            loss = l.clone().into_scalar::<f32>();
            if loss < 0.1 {
                break;
            }
            let grads = GradientsParams::from_grads(l.backward(), &model);
            model = optim.step(3e-3, model, grads);
        }
        assert!(
            loss < 0.1,
            "{norm:?}: loss {loss} after 300 steps on one batch"
        );
    }
}

#[test]
fn dropout_is_active_in_training_and_off_in_eval() {
    let device = support::ndarray_device().autodiff();
    device.seed(3);
    let model = GptConfig::new(65, 8, 2, 4, 32)
        .with_dropout(0.3)
        .init(&device);
    let x = Tensor::<2, Int>::from_data(
        TensorData::new((0..16).collect::<Vec<i64>>(), [2, 8]),
        &device,
    );
    let a = model.forward(x.clone());
    let b = model.forward(x.clone());
    assert!(max_abs_diff(&a, &b) > 1e-3, "training passes should differ");
    let eval = model.valid();
    let xe = x.clone().without_autodiff();
    assert_eq!(
        max_abs_diff(&eval.forward(xe.clone()), &eval.forward(xe.clone())),
        0.0
    );
    // Without dropout the training-mode pass equals the eval pass.
    let plain = GptConfig::new(65, 8, 2, 4, 32).init(&device);
    let diff = max_abs_diff(&plain.forward(x), &plain.valid().forward(xe));
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn our_layer_norm_equals_burns() {
    let device = support::ndarray_device();
    device.seed(4);
    for bias in [true, false] {
        let mut ln = LayerNormConfig::new(24).with_bias(bias).init(&device);
        // Non-trivial gain and shift, so both take part in the comparison.
        ln.gamma = ln
            .gamma
            .map(|g| g.random_like(Distribution::Normal(1.0, 0.5)));
        ln.beta = ln
            .beta
            .map(|b| b.map(|b| b.random_like(Distribution::Normal(0.0, 0.5))));
        let x = Tensor::<3>::random([3, 5, 24], Distribution::Normal(2.0, 3.0), &device);
        let ours = layer_norm(
            x.clone(),
            ln.gamma.val(),
            ln.beta.as_ref().map(|b| b.val()),
            1e-5,
        );
        let diff = max_abs_diff(&ours, &ln.forward(x));
        assert!(diff < 1e-5, "bias {bias}: {diff}");
    }
}

#[test]
fn logits_on_wgpu_and_flex_equal_ndarray_for_the_same_weights() {
    let data = Dataset::new(&support::corpus()).unwrap();
    let nd = support::ndarray_device();
    nd.seed(5);
    for norm in [Norm::Pre, Norm::Post] {
        let model = GptConfig::new(65, 16, 2, 4, 32).with_norm(norm).init(&nd);
        let (x, _) = data.batch(Split::Val, 2, 16, &mut rng_for(5, stream::DEMO, 0), &nd);
        let reference = model.forward(x.clone());
        let mut others = vec![Backend::Flex.device()];
        others.extend(support::wgpu_device());
        for dev in others {
            let logits = model
                .clone()
                .to_device(&dev)
                .forward(x.clone().to_device(&dev));
            let diff = max_abs_diff(&reference, &logits);
            assert!(diff <= 1e-4, "{norm:?}: max abs diff {diff} on {dev:?}");
        }
    }
}
