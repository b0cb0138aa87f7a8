//! Chapter 10: the GPU kernels equal Burn's operations, forward and in every gradient, on
//! awkward shapes and at extreme inputs; a whole model trains to the same losses with them.
//! On wgpu (CI: Mesa's lavapipe, a software Vulkan driver); `GPT_SKIP_WGPU=1` skips.

mod support;

use burn::nn::LayerNormConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use course::ch03_gpt::{GptConfig, Kernels};
use course::ch09_finetune::lora::param_values;
use course::ch10_gpu::{GPU, gpu_available};
use course::common::max_rel_diff;
use course::common::train::LanguageModel;

fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// `|a - b| / max(1, |b|)` at most `tol` everywhere (NaN fails).
fn assert_close<const D: usize>(what: &str, a: &Tensor<D>, b: &Tensor<D>, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let d = max_rel_diff(&values(a), &values(b));
    assert!(d <= tol, "{what}: off by {d:e} (at most {tol:e})");
}

/// LayerNorm of rows of `c` in f64, and the gradients of `sum(y * w)`: `(y, dx, dgamma,
/// dbeta)`, rounded to f32.
fn layer_norm_f64(
    x: &[f32],
    gamma: &[f32],
    beta: Option<&[f32]>,
    w: &[f32],
    c: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut y, mut dx) = (vec![], vec![]);
    let (mut dgamma, mut dbeta) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (row, wr) in x.chunks(c).zip(w.chunks(c)) {
        let n = c as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + 1e-5).sqrt();
        let xhat: Vec<f64> = row.iter().map(|&v| (v as f64 - mean) * rstd).collect();
        let g: Vec<f64> = (0..c).map(|i| wr[i] as f64 * gamma[i] as f64).collect();
        let mean_g = g.iter().sum::<f64>() / n;
        let mean_gx = (0..c).map(|i| g[i] * xhat[i]).sum::<f64>() / n;
        for i in 0..c {
            let b = beta.map_or(0.0, |b| b[i] as f64);
            y.push((xhat[i] * gamma[i] as f64 + b) as f32);
            dx.push((rstd * (g[i] - mean_g - xhat[i] * mean_gx)) as f32);
            dgamma[i] += wr[i] as f64 * xhat[i];
            dbeta[i] += wr[i] as f64;
        }
    }
    let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (y, dx, f32s(dgamma), f32s(dbeta))
}

#[test]
fn the_kernels_run_on_gpu_devices_only() {
    assert!(!gpu_available(&support::flex_device()));
    assert!(!gpu_available(&support::ndarray_device()));
    if let Some(device) = support::wgpu_device() {
        assert!(gpu_available(&device) && gpu_available(&device.clone().autodiff()));
        assert!(GPU.runs_on(&device));
    }
}

/// LayerNorm: rows shorter and longer than a cube (7 and 300 columns against 128 units), one
/// row alone, and rows at |x| = 30 with a spread of 0.01 (where a one-pass variance cancels).
#[test]
fn gpu_layer_norm_matches_burn_forward_and_every_gradient() {
    let Some(device) = support::wgpu_device() else {
        return;
    };
    let ad = device.autodiff();
    ad.seed(3);
    let cases: [([usize; 3], bool, f64, f64); 5] = [
        ([1, 1, 7], true, 0.0, 1.0),
        ([2, 5, 7], true, 0.5, 3.0),
        ([2, 3, 300], false, 0.0, 1.0),
        ([3, 17, 128], true, 0.0, 1.0),
        ([2, 4, 64], true, 30.0, 0.01),
    ];
    for (shape, bias, offset, std) in cases {
        let c = shape[2];
        let mut ln = LayerNormConfig::new(c).with_bias(bias).init(&ad);
        let random =
            |shape: [usize; 1]| Tensor::<1>::random(shape, Distribution::Normal(0.0, 1.0), &ad);
        ln.gamma = burn::module::Param::from_tensor(random([c]) + 1.0);
        if bias {
            ln.beta = Some(burn::module::Param::from_tensor(random([c])));
        }
        let x0 = Tensor::<3>::random(shape, Distribution::Normal(offset, std), &ad);
        let w = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &ad);
        let run = |k: Kernels| {
            let x = x0.clone().require_grad();
            let y = k.layer_norm(&ln, x.clone());
            let grads = (y.clone() * w.clone()).sum().backward();
            let dgamma = ln.gamma.val().grad(&grads).unwrap();
            let dbeta = ln.beta.as_ref().map(|b| b.val().grad(&grads).unwrap());
            (y, x.grad(&grads).unwrap(), dgamma, dbeta)
        };
        let (a, b) = (run(GPU), run(Kernels::BURN));
        let what = format!("{shape:?}, mean {offset}, std {std}");
        // Against LayerNorm and its gradients in f64 on the host, everywhere ...
        let gamma = values(&ln.gamma.val());
        let beta = ln.beta.as_ref().map(|b| values(&b.val()));
        let exact = layer_norm_f64(&values(&x0), &gamma, beta.as_deref(), &values(&w), c);
        let got = [&a.0, &a.1].map(values);
        for (name, got, exact) in [("y", &got[0], &exact.0), ("dx", &got[1], &exact.1)] {
            let d = max_rel_diff(got, exact);
            assert!(d <= 1e-4, "{name} {what}: {d:e} from f64");
        }
        let d = max_rel_diff(&values(&a.2), &exact.2);
        assert!(d <= 1e-4, "dgamma {what}: {d:e} from f64");
        if let Some(dbeta) = &a.3 {
            let d = max_rel_diff(&values(dbeta), &exact.3);
            assert!(d <= 1e-4, "dbeta {what}: {d:e} from f64");
        }
        // ... and against Burn's composed operations where f32 lets those be exact too (a row
        // at 30 with a spread of 0.01 costs Burn's unshifted sums more).
        let tol = if offset.abs() > 1.0 { 1e-2 } else { 1e-4 };
        assert_close(&format!("y {what}"), &a.0, &b.0, tol);
        assert_close(&format!("dx {what}"), &a.1, &b.1, tol);
        assert_close(&format!("dgamma {what}"), &a.2, &b.2, tol);
        if let (Some(x), Some(y)) = (a.3, b.3) {
            assert_close(&format!("dbeta {what}"), &x, &y, tol);
        }
        // Inference too: the same kernel without the tape.
        let (ln_inner, x_inner) = (ln.valid(), x0.clone().inner());
        assert_close(
            &format!("inference {what}"),
            &GPU.layer_norm(&ln_inner, x_inner.clone()),
            &Kernels::BURN.layer_norm(&ln_inner, x_inner),
            tol,
        );
    }
}

/// A tiny GPT trained for 8 steps of AdamW on one batch: the same losses with the GPU kernels
/// as with Burn's operations.
#[test]
fn a_model_trains_to_the_same_losses_with_the_gpu_kernels() {
    let Some(device) = support::wgpu_device() else {
        return;
    };
    let ad = device.autodiff();
    let config = GptConfig::new(17, 12, 2, 2, 16);
    let idx: Vec<i64> = (0..2 * 12).map(|i| (i * 7 % 17) as i64).collect();
    let tgt: Vec<i64> = (0..2 * 12).map(|i| ((i * 7 + 3) % 17) as i64).collect();
    let x = Tensor::<2, Int>::from_data(TensorData::new(idx, [2, 12]), &ad);
    let y = Tensor::<2, Int>::from_data(TensorData::new(tgt, [2, 12]), &ad);
    ad.seed(11);
    let init = config.init(&ad);
    param_values(&init); // every weight drawn now, once: both runs start from these
    let losses = |kernels: Kernels| {
        let mut model = init.clone().with_kernels(kernels);
        let mut optim = AdamWConfig::new().init();
        (0..8)
            .map(|_| {
                let loss = model.loss(x.clone(), y.clone());
                let value = loss.clone().into_scalar::<f32>();
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(1e-2, model.clone(), grads);
                value
            })
            .collect::<Vec<f32>>()
    };
    let (gpu, burn) = (losses(GPU), losses(Kernels::BURN));
    assert!(gpu.iter().all(|l| l.is_finite()), "{gpu:?}");
    assert!(gpu[7] < gpu[0] - 0.3, "the loss does not fall: {gpu:?}");
    let d = max_rel_diff(&gpu, &burn);
    assert!(d < 1e-4, "GPU kernels {gpu:?}\nBurn's {burn:?}");
}

/// GELU in f64: `(y, dy/dx)`, the exact form or GPT-2's tanh form.
fn gelu_f64(x: f64, approximate: bool) -> (f64, f64) {
    if approximate {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let u = k * (x + 0.044715 * x.powi(3));
        let t = u.tanh();
        let du = k * (1.0 + 3.0 * 0.044715 * x * x);
        (
            0.5 * x * (1.0 + t),
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du,
        )
    } else {
        let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
        let density = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        (x * cdf, cdf + x * density)
    }
}

/// GELU, both forms: the output and the gradient equal f64's within 1e-4 from -30 to 30 (no
/// overflow in the tanh form's backward far below 0), and Burn's GELU at ordinary inputs, on
/// a shape that is not a multiple of the 256 units of a cube.
#[test]
fn gpu_gelu_matches_f64_and_burn_at_extreme_inputs() {
    let Some(device) = support::wgpu_device() else {
        return;
    };
    let ad = device.autodiff();
    let n = 3 * 7 * 61; // 1,281 elements: 5 cubes, the last one partly idle
    let xs: Vec<f32> = (0..n)
        .map(|i| -30.0 + 60.0 * i as f32 / (n - 1) as f32)
        .collect();
    let x0 = Tensor::<3>::from_data(TensorData::new(xs.clone(), [3, 7, 61]), &ad);
    let w = Tensor::<3>::random([3, 7, 61], Distribution::Normal(0.0, 1.0), &ad);
    for approximate in [false, true] {
        let gelu = burn::nn::Gelu { approximate };
        let run = |k: Kernels, x0: &Tensor<3>| {
            let x = x0.clone().require_grad();
            let y = k.gelu(&gelu, x.clone());
            let grads = (y.clone() * w.clone()).sum().backward();
            (values(&y), values(&x.grad(&grads).unwrap()))
        };
        let (y, dx) = run(GPU, &x0);
        let ws = values(&w);
        let (ey, edx): (Vec<f32>, Vec<f32>) = (xs.iter().zip(&ws))
            .map(|(&x, &w)| {
                let (y, d) = gelu_f64(x as f64, approximate);
                (y as f32, (d * w as f64) as f32)
            })
            .unzip();
        assert!(
            max_rel_diff(&y, &ey) <= 1e-4,
            "approximate {approximate}: y"
        );
        assert!(
            max_rel_diff(&dx, &edx) <= 1e-4,
            "approximate {approximate}: dx"
        );
        // Burn's GELU at ordinary inputs (std 2).
        let x1 = Tensor::<3>::random([3, 7, 61], Distribution::Normal(0.0, 2.0), &ad);
        let (a, b) = (run(GPU, &x1), run(Kernels::BURN, &x1));
        let (x1s, ws) = (values(&x1), values(&w));
        let exact_dx: Vec<f32> = (x1s.iter().zip(&ws))
            .map(|(&x, &w)| (gelu_f64(x as f64, approximate).1 * w as f64) as f32)
            .collect();
        let (ours, burns) = (max_rel_diff(&a.1, &exact_dx), max_rel_diff(&b.1, &exact_dx));
        eprintln!("approximate {approximate}: dx from f64: ours {ours:e}, Burn's {burns:e}");
        assert!(
            ours <= 1e-4,
            "approximate {approximate}: dx {ours:e} from f64"
        );
        let (dy, ddx) = (max_rel_diff(&a.0, &b.0), max_rel_diff(&a.1, &b.1));
        assert!(
            dy <= 1e-4,
            "approximate {approximate}: y {dy:e} from Burn's"
        );
        // Burn's exact GELU derivative on wgpu is itself 2e-3 from f64 (measured here): the
        // check against f64 above is the one that holds the kernel to 1e-4.
        let tol = if approximate { 1e-4 } else { 1e-2 };
        assert!(
            ddx <= tol,
            "approximate {approximate}: dx {ddx:e} from Burn's"
        );
    }
}

/// The mean cross-entropy and its gradient against f64, at ordinary logits and at logits of
/// 1e4 (where `e^x` alone overflows), on vocabularies shorter and longer than a cube; and a
/// target out of range gives NaN, not a read past the row.
#[test]
fn gpu_cross_entropy_matches_f64_with_huge_logits() {
    let Some(device) = support::wgpu_device() else {
        return;
    };
    let ad = device.clone().autodiff();
    for (rows, v, scale) in [(5, 65, 3.0), (3, 300, 1.0), (4, 50, 1e4)] {
        let logits0 = Tensor::<2>::random([rows, v], Distribution::Normal(0.0, scale), &ad);
        let t: Vec<i64> = (0..rows).map(|r| ((r * 37 + 11) % v) as i64).collect();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [rows]), &ad);
        let logits = logits0.clone().require_grad();
        let loss = course::ch10_gpu::gpu_cross_entropy(logits.clone(), targets.clone());
        let grads = (loss.clone() * 3.0).backward(); // a loss gradient other than 1
        let got = (values(&loss)[0], values(&logits.grad(&grads).unwrap()));
        // f64: lse - x[t] per row, mean; gradient (softmax - onehot) * 3 / rows.
        let x = values(&logits0);
        let (mut loss64, mut grad64) = (0.0f64, vec![0f32; rows * v]);
        for r in 0..rows {
            let row: Vec<f64> = x[r * v..(r + 1) * v].iter().map(|&a| a as f64).collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
            loss64 += (lse - row[t[r] as usize]) / rows as f64;
            for j in 0..v {
                let hit = if j == t[r] as usize { 1.0 } else { 0.0 };
                grad64[r * v + j] = (((row[j] - lse).exp() - hit) * 3.0 / rows as f64) as f32;
            }
        }
        let what = format!("{rows} x {v}, scale {scale}");
        assert!(
            max_rel_diff(&[got.0], &[loss64 as f32]) <= 1e-4,
            "{what}: loss {} vs {loss64}",
            got.0
        );
        assert!(max_rel_diff(&got.1, &grad64) <= 1e-4, "{what}: gradient");
    }
    let logits = Tensor::<2>::random([2, 10], Distribution::Normal(0.0, 1.0), &device);
    let bad = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 10], [2]), &device);
    let loss = values(&course::ch10_gpu::gpu_cross_entropy(logits, bad))[0];
    assert!(loss.is_nan(), "a target out of range gave {loss}");
}

/// Reading CubeCL's profile log: a launch is a line with a duration first; a kernel's hash
/// suffix is dropped; the summary table and the kernels' sources are not launches; the last
/// step is what lies between the last two markers.
#[test]
fn the_profile_log_is_read_step_by_step() {
    use course::ch10_gpu::profile::{last_step, launches};
    let log = "\
[START_KERNEL_COMPILATION]
name: LayerNormForward
source:
| fake | line | in | a | source |
| 101.2ms | PrngKernel | NormalFamily_75b4d705
| 5.1µs  | StepMarker_0a1b2c3d
| 104.0µs  | ElemwiseFuse_1056600c
| 35.5µs   | ElemwiseFuse_551f0830
| 50.8µs   | ReduceKernel | TensorArgs_7e7e63e0
| 7.0µs  | StepMarker_0a1b2c3d
| 78.0µs  | ElemwiseFuse_1056600c
| 2.5ms   | LayerNormForward_419aabc7
| 6.0µs  | StepMarker_0a1b2c3d
| Name | Duration | Num Computed | Ratio |
| PrngKernel | NormalFamily_75b4d705 | 101.374378ms | 2 | 37 % |
";
    let all = launches(log);
    assert_eq!(all["ElemwiseFuse"], 3);
    assert_eq!(all["StepMarker"], 3);
    assert_eq!(all["PrngKernel"], 1); // its summary row is no launch
    assert_eq!(all.values().sum::<usize>(), 9);
    let last = last_step(log).unwrap();
    assert_eq!(
        last,
        [
            ("ElemwiseFuse".to_string(), 1),
            ("LayerNormForward".to_string(), 1)
        ]
    );
    assert!(last_step("| 5.1µs | StepMarker_0a1b2c3d\n").is_none());
}
