//! Chapter 5: every fused operation equals Burn's composed version, forward and every gradient,
//! on awkward shapes, with and without autodiff; a whole model trains the same with either
//! kernels; devices the extension does not cover fall back to Burn's operations.

mod support;

use burn::nn::{DropoutConfig, Gelu, LayerNormConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use course::ch02_attention::{causal_weights, merge_heads, split_heads};
use course::ch03_gpt::{GptConfig, Kernels};
use course::ch05_fast::kernels::DropMask;
use course::ch05_fast::{
    FUSED, composed_attention as burn_attention, draw_seed, dropout_mask, fused_attention,
    fused_available,
};
use course::common::max_abs_diff;
use course::common::train::cross_entropy;

/// Flex's random generator is one per process and the tests run on parallel threads: each test
/// holds this lock, so a seeded test draws exactly the numbers it seeded.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn ad() -> Device {
    support::flex_device().autodiff()
}

/// `|a - b| <= tol * max(1, |b|)` element by element: relative where values are large.
fn assert_close<const D: usize>(what: &str, a: &Tensor<D>, b: &Tensor<D>, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a = a.to_data().try_to_vec::<f32>().unwrap();
    let b = b.to_data().try_to_vec::<f32>().unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let err = (x - y).abs() / y.abs().max(1.0);
        assert!(
            err <= tol,
            "{what}: element {i} is {x}, Burn's is {y} (error {err:e})"
        );
    }
}

fn random<const D: usize>(shape: [usize; D], std: f64, device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, std), device)
}

#[test]
fn the_extension_covers_flex_only() {
    let _rng = rng_lock();
    assert!(fused_available(&support::flex_device()));
    assert!(fused_available(&ad()));
    assert!(!fused_available(&support::ndarray_device()));
    assert!(FUSED.fused_on(&ad()) && !Kernels::BURN.fused_on(&ad()));
}

#[test]
fn matmul_and_linear_match_burn_forward_and_backward() {
    let _rng = rng_lock();
    for (m, k, n) in [(1, 1, 1), (7, 5, 3), (768, 128, 65)] {
        let a0 = random([m, k], 1.0, &ad());
        let b0 = random([n, k], 1.0, &ad()); // used transposed: not contiguous
        let w = random([m, n], 1.0, &ad());
        let run = |kernels: Kernels| {
            let (a, b) = (a0.clone().require_grad(), b0.clone().require_grad());
            let c = kernels.matmul(a.clone(), b.clone().transpose());
            let grads = (c.clone() * w.clone()).sum().backward();
            (c, a.grad(&grads).unwrap(), b.grad(&grads).unwrap())
        };
        let (f, r) = (run(FUSED), run(Kernels::BURN));
        // db sums m = 768 products of size ~1 in f32: two kernels that add them in a different
        // order differ by a few 1e-6 in relative terms (measured up to 1.4e-5).
        assert_close("matmul", &f.0, &r.0, 1e-5);
        assert_close("matmul da", &f.1, &r.1, 1e-5);
        assert_close("matmul db", &f.2, &r.2, 5e-5);
    }
    let layer = burn::nn::LinearConfig::new(6, 10).init(&support::flex_device());
    let x = random([2, 3, 6], 1.0, &support::flex_device());
    assert_close(
        "linear with a bias (inference)",
        &FUSED.linear(&layer, x.clone()),
        &Kernels::BURN.linear(&layer, x),
        1e-5,
    );
}

/// A small deterministic generator, so that this test needs no global one.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

#[test]
#[cfg(target_arch = "x86_64")]
fn chapter_5s_gemm_matches_a_plain_product_with_every_kernel() {
    use course::ch05_fast::gemm::{Isa, Strided, sgemm};
    let isas = [
        (Isa::Avx512, std::is_x86_feature_detected!("avx512f")),
        (
            Isa::Avx2,
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
        ),
    ];
    // Every edge: fewer rows and columns than a tile and one more than a tile (12 and 32 for
    // AVX-512, 6 and 16 for AVX2), one step and one more than a block of 256 steps, and a
    // product big enough to be split over the cores (over 8 MFLOP: 9 here).
    let shapes = [
        (1, 1, 1),
        (5, 3, 17),
        (13, 257, 33),
        (25, 600, 65),
        (150, 300, 100),
        (12, 256, 32),
    ];
    for (isa, _) in isas.iter().filter(|(_, has)| *has) {
        for (m, k, n) in shapes {
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a, b) = (values(m * k, 1), values(k * n, 2));
                // Row-major, or the same numbers stored transposed.
                let view = |x: &[f32], rows, cols, t: bool| Strided {
                    ptr: x.as_ptr(),
                    rs: if t { 1 } else { cols as isize },
                    cs: if t { rows as isize } else { 1 },
                };
                let (va, vb) = (view(&a, m, k, a_t), view(&b, k, n, b_t));
                let at = |x: &[f32], v: Strided, i: usize, j: usize| {
                    x[(i as isize * v.rs + j as isize * v.cs) as usize] as f64
                };
                // C has a wider row (stride n + 3) whose extra columns must stay untouched.
                let rsc = n + 3;
                let c0 = values(m * rsc, 3);
                for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)] {
                    // With beta = 0, C's old values are NaN: they must not be read.
                    let mut c: Vec<f32> = match beta {
                        0.0 => vec![f32::NAN; m * rsc],
                        _ => c0.clone(),
                    };
                    // SAFETY: every view lies inside its vector and `c` is its own.
                    unsafe { sgemm(*isa, (m, k, n), alpha, va, vb, beta, (c.as_mut_ptr(), rsc)) };
                    for i in 0..m {
                        for j in 0..rsc {
                            let got = c[i * rsc + j];
                            if j >= n {
                                assert!(
                                    got.to_bits() == c0[i * rsc + j].to_bits()
                                        || got.is_nan() && beta == 0.0,
                                    "{isa:?}: column {j} past the end was written"
                                );
                                continue;
                            }
                            let dot: f64 =
                                (0..k).map(|p| at(&a, va, i, p) * at(&b, vb, p, j)).sum();
                            let want = alpha as f64 * dot + beta as f64 * c0[i * rsc + j] as f64;
                            let what = format!(
                                "{isa:?} [{m}, {k}] @ [{k}, {n}] (a_t {a_t}, b_t {b_t}, alpha {alpha}, beta {beta}) at ({i}, {j})"
                            );
                            assert!(
                                (got as f64 - want).abs()
                                    <= 1e-5 * (1.0 + k as f64).sqrt() * want.abs().max(1.0),
                                "{what}: {got}, want {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The product every kernel calls, on whichever path this process chose: AVX-512 or AVX2
/// here, the portable one (the `matrixmultiply` crate) on a CPU without AVX2 or with
/// `GPT_PORTABLE=1`, as CI runs this file a second time.
#[test]
fn the_chosen_matrix_product_matches_a_plain_product() {
    use course::ch05_fast::gemm::isa_name;
    use course::ch05_fast::kernels::{View, gemm};
    use std::mem::MaybeUninit;
    if std::env::var("GPT_PORTABLE").is_ok_and(|v| v == "1") {
        assert_eq!(isa_name(), "portable");
    }
    let shapes = [(1, 1, 1), (5, 3, 17), (13, 257, 33), (150, 300, 100)];
    for (m, k, n) in shapes {
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let (a, b) = (values(m * k, 4), values(k * n, 5));
            // Row-major, or the same numbers stored transposed.
            let view = |rows: usize, cols: usize, t: bool| match t {
                false => View::rows(0, cols),
                true => View::rows(0, rows).t(),
            };
            let (va, vb) = (view(m, k, a_t), view(k, n, b_t));
            let at = |x: &[f32], v: View, i: usize, j: usize| x[i * v.rs + j * v.cs] as f64;
            let rsc = n + 3; // a wider row, whose extra columns stay unwritten
            let mut c = vec![MaybeUninit::new(f32::NAN); m * rsc];
            gemm(
                (m, k, n),
                -2.0,
                (&a, va),
                (&b, vb),
                (&mut c, View::rows(0, rsc)),
            );
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: every element was initialised (NaN) above.
                    let got = unsafe { c[i * rsc + j].assume_init() };
                    let dot: f64 = (0..k).map(|p| at(&a, va, i, p) * at(&b, vb, p, j)).sum();
                    let want = -2.0 * dot;
                    let tol = 1e-5 * (1.0 + k as f64).sqrt() * want.abs().max(1.0);
                    assert!(
                        (got as f64 - want).abs() <= tol, // NaN fails
                        "{} [{m}, {k}] @ [{k}, {n}] (a_t {a_t}, b_t {b_t}) at ({i}, {j}): {got}, want {want}",
                        isa_name()
                    );
                }
            }
        }
    }
}

#[test]
fn gemm_refuses_an_output_whose_rows_overlap() {
    use course::ch05_fast::kernels::{View, gemm};
    use std::mem::MaybeUninit;
    let (a, b) = (values(64 * 64, 6), values(64 * 64, 7));
    let mut c = vec![MaybeUninit::new(0.0f32); 64 * 64];
    let views = (View::rows(0, 64), View::rows(0, 64));
    // Row stride 32 for rows of 64: row i's second half is row i + 1's first half, which two
    // threads would write at once. Inside the buffer, so only the overlap check can catch it.
    let overlapping = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gemm(
            (64, 64, 64),
            1.0,
            (&a, views.0),
            (&b, views.1),
            (&mut c, View::rows(0, 32)),
        )
    }));
    let message = *overlapping.unwrap_err().downcast::<&str>().unwrap();
    assert!(message.contains("overlap"), "{message}");
    // Column-major (a transposed view) is fine, and so is a single row with any stride.
    gemm(
        (64, 64, 64),
        1.0,
        (&a, views.0),
        (&b, views.1),
        (&mut c, View::rows(0, 64).t()),
    );
    gemm(
        (1, 64, 64),
        1.0,
        (&a, views.0),
        (&b, views.1),
        (&mut c, View::rows(0, 0)),
    );
}

#[test]
fn matmul_of_a_few_rows_matches_burn() {
    // Up to 4 rows of `a` (a token at a time in generation), `b` row-major or read transposed
    // (a tied head), and `a` itself a strided view: row by row, not sgemm.
    let _rng = rng_lock();
    let dev = support::flex_device();
    for (m, k, n) in [
        (1, 1, 1),
        (1, 77, 1000),
        (2, 5, 33),
        (3, 130, 37),
        (4, 64, 2304),
    ] {
        let a = random([k + 3, m], 1.0, &dev)
            .transpose()
            .slice(s![.., 1..k + 1]); // [m, k]
        let b = random([k, n], 1.0, &dev);
        let b_t = random([n, k], 1.0, &dev);
        let pairs = [(b.clone(), "row-major"), (b_t.transpose(), "transposed")];
        for (b, layout) in pairs {
            let (f, r) = (
                FUSED.matmul(a.clone(), b.clone()),
                Kernels::BURN.matmul(a.clone(), b),
            );
            assert_close(
                &format!("[{m}, {k}] @ [{k}, {n}], b {layout}"),
                &f,
                &r,
                1e-5,
            );
        }
    }
}

#[test]
fn gelu_matches_burn_forward_and_backward() {
    let _rng = rng_lock();
    // The exact (erf) form of chapters 3-5 and GPT-2's tanh form (chapter 8).
    for gelu in [Gelu::new(), Gelu::new_approximate()] {
        for shape in [[1, 1, 1], [3, 5, 7], [2, 64, 512]] {
            let x0 = random(shape, 2.0, &ad());
            let w = random(shape, 1.0, &ad()); // a random upstream gradient
            let run = |k: Kernels| {
                let x = x0.clone().require_grad();
                let y = k.gelu(&gelu, x.clone());
                let grads = (y.clone() * w.clone()).sum().backward();
                (y, x.grad(&grads).unwrap())
            };
            let ((y, dx), (y_ref, dx_ref)) = (run(FUSED), run(Kernels::BURN));
            let form = format!("{gelu:?}");
            // Burn's tanh rounds to ±1 once |u| > 9 (x < -5), so its gradient there is 0
            // where the true one is a few 1e-7 (times the upstream gradient, up to ~4).
            let tol = if gelu.approximate { 2e-6 } else { 1e-6 };
            assert_close(&form, &y, &y_ref, 1e-6);
            assert_close(&format!("{form} dx"), &dx.clone(), &dx_ref.clone(), tol);
        }
    }
}

#[test]
fn gelu_handles_non_contiguous_input_and_inference() {
    let _rng = rng_lock();
    let x = random([4, 6, 9], 2.0, &support::flex_device()).swap_dims(0, 2); // [9, 6, 4]
    for gelu in [Gelu::new(), Gelu::new_approximate()] {
        let (y, y_ref) = (
            FUSED.gelu(&gelu, x.clone()),
            Kernels::BURN.gelu(&gelu, x.clone()),
        );
        assert_close("gelu (no autodiff, transposed)", &y, &y_ref, 1e-6);
    }
}

/// GELU and its derivative in f64, from the definitions: the exact form `x Φ(x)` through
/// `erfc`, and GPT-2's `x (1 + tanh(u)) / 2` with `u = √(2/π) (x + 0.044715 x³)`.
fn gelu_f64(x: f64, tanh: bool) -> (f64, f64) {
    use std::f64::consts::{FRAC_1_SQRT_2, PI};
    match tanh {
        false => {
            let cdf = 0.5 * libm::erfc(-x * FRAC_1_SQRT_2);
            let pdf = (-0.5 * x * x).exp() / (2.0 * PI).sqrt();
            (x * cdf, cdf + x * pdf)
        }
        true => {
            let k = (2.0 / PI).sqrt();
            let th = (k * (x + 0.044715 * x.powi(3))).tanh();
            let du = k * (1.0 + 3.0 * 0.044715 * x * x);
            let dy = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
            (0.5 * x * (1.0 + th), dy)
        }
    }
}

#[test]
fn gelu_holds_against_f64_out_to_30() {
    use course::ch05_fast::kernels::{gelu_backward, gelu_forward};
    // -30 to 30 by 1/64 (exact in f32), past where e^{-2u} and e^{-x²/2} leave f32's range.
    let x: Vec<f32> = (-1920..=1920).map(|i| i as f32 / 64.0).collect();
    for tanh in [false, true] {
        let y = gelu_forward(&x, tanh);
        let dx = gelu_backward(&x, &vec![1.0; x.len()], tanh);
        for ((&x, &y), &dx) in x.iter().zip(&y).zip(&dx) {
            let (y_ref, dx_ref) = gelu_f64(x as f64, tanh);
            for (what, got, want) in [("gelu", y, y_ref), ("gelu'", dx, dx_ref)] {
                let err = (got as f64 - want).abs() / want.abs().max(1.0);
                assert!(
                    err <= 2e-6, // NaN fails too
                    "{what} (tanh: {tanh}) at x = {x}: {got}, in f64 {want}"
                );
            }
        }
        // No gradient in, none out: 0, not 0 times an overflow (NaN).
        let zero = gelu_backward(&x, &vec![0.0; x.len()], tanh);
        assert!(zero.iter().all(|&d| d == 0.0), "tanh: {tanh}");
    }
}

#[test]
fn layer_norm_of_a_constant_row_is_beta_with_finite_gradients() {
    let _rng = rng_lock();
    let c = 13;
    let mut ln = LayerNormConfig::new(c).init(&ad());
    ln.gamma = burn::module::Param::from_tensor(random([c], 1.0, &ad()) + 1.0);
    let beta = random([c], 1.0, &ad());
    ln.beta = Some(burn::module::Param::from_tensor(beta.clone()));
    // Rows of one value each (variance 0), beside an ordinary row.
    let rows: Vec<f32> = [7.0f32, -3.5, 1e4, 0.0]
        .iter()
        .flat_map(|&v| vec![v; c])
        .chain((0..c).map(|i| i as f32))
        .collect();
    let x0 = Tensor::<3>::from_data(TensorData::new(rows, [1, 5, c]), &ad());
    let w = random([1, 5, c], 1.0, &ad());
    let run = |k: Kernels| {
        let x = x0.clone().require_grad();
        let y = k.layer_norm(&ln, x.clone());
        let grads = (y.clone() * w.clone()).sum().backward();
        let dgamma = ln.gamma.val().grad(&grads).unwrap();
        (y, x.grad(&grads).unwrap(), dgamma)
    };
    let (a, b) = (run(FUSED), run(Kernels::BURN));
    assert_close("layer_norm, constant rows", &a.0, &b.0, 1e-5);
    assert_close("layer_norm dx, constant rows", &a.1, &b.1, 1e-5);
    assert_close("layer_norm dgamma, constant rows", &a.2, &b.2, 1e-5);
    let first_rows = a.0.slice(s![.., 0..4, ..]);
    assert_close(
        "constant rows become beta",
        &first_rows,
        &beta.reshape([1, 1, c]).expand([1, 4, c]),
        1e-6,
    );
}

#[test]
fn cross_entropy_holds_at_logits_of_1e4() {
    let _rng = rng_lock();
    let v = 5;
    let rows: [[f32; 5]; 4] = [
        [1e4, -1e4, 0.0, -1e4, 1e4],          // two equal winners
        [-1e4, -1e4, -1e4, -1e4, 1e4],        // one winner, the target far below it
        [1e4, 1e4, 1e4, 1e4, 1e4],            // uniform
        [-1e4, -1e4, -1e4, -1e4, -1e4 + 1.0], // all far below 0
    ];
    let targets = [4usize, 0, 2, 4];
    // In f64 from the definition: logsumexp(x) - x[target] and softmax(x) - onehot.
    let (mut loss, mut grad) = (0.0f64, vec![0.0f32; 4 * v]);
    for (i, (row, &target)) in rows.iter().zip(&targets).enumerate() {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        loss += max + sum.ln() - row[target] as f64;
        for j in 0..v {
            let p = (row[j] as f64 - max).exp() / sum;
            grad[i * v + j] = ((p - f64::from(j == target)) / 4.0) as f32;
        }
    }
    let logits0 = Tensor::<3>::from_data(TensorData::new(rows.concat(), [1, 4, v]), &ad());
    let targets = Tensor::<2, Int>::from_data(
        TensorData::new(targets.map(|t| t as i64).to_vec(), [1, 4]),
        &ad(),
    );
    let want_loss = Tensor::<1>::from_data([(loss / 4.0) as f32], &ad());
    let want_grad = Tensor::<3>::from_data(TensorData::new(grad, [1, 4, v]), &ad());
    for k in [FUSED, Kernels::BURN] {
        let logits = logits0.clone().require_grad();
        let loss = k.cross_entropy(logits.clone(), targets.clone());
        let dlogits = logits.grad(&loss.clone().backward()).unwrap();
        assert_close(
            &format!("{k:?} cross-entropy at 1e4"),
            &loss,
            &want_loss,
            1e-6,
        );
        assert_close(&format!("{k:?} dlogits at 1e4"), &dlogits, &want_grad, 1e-6);
    }
}

#[test]
fn attention_holds_at_scores_of_1e4() {
    let _rng = rng_lock();
    // Head size 1, so a score is q k exactly: queries and keys of ±100 give scores of ±1e4,
    // so that every row's softmax is one-hot or uniform over tied keys; the first row has
    // one key only. One sequence (batch 1), and t = 1.
    for t in [1, 6] {
        let (nh, hs) = (2, 1);
        let c = nh * hs;
        let sign = |i: usize| {
            if (i * 7 + 3) % 5 < 2 {
                -100.0f32
            } else {
                100.0
            }
        };
        let mut qkv = vec![0.0f32; t * 3 * c];
        for (i, x) in qkv.iter_mut().enumerate() {
            *x = match (i % (3 * c)) / c {
                2 => (i as f32 * 0.37).sin(), // values of order 1
                _ => sign(i),
            };
        }
        let qkv0 = Tensor::<3>::from_data(TensorData::new(qkv, [1, t, 3 * c]), &ad());
        attention_matches_burn_at(&format!("scores of 1e4, t = {t}"), qkv0, nh);
    }
}

#[test]
fn layer_norm_matches_burn_forward_and_every_gradient() {
    let _rng = rng_lock();
    for (shape, bias) in [([1, 1, 13], true), ([2, 7, 24], true), ([3, 5, 128], false)] {
        let c = shape[2];
        let mut ln = LayerNormConfig::new(c).with_bias(bias).init(&ad());
        // Non-trivial gamma and beta, so that their gradients mean something.
        ln.gamma = burn::module::Param::from_tensor(random([c], 1.0, &ad()) + 1.0);
        if bias {
            ln.beta = Some(burn::module::Param::from_tensor(random([c], 1.0, &ad())));
        }
        let x0 = random(shape, 3.0, &ad()) + 0.5;
        let w = random(shape, 1.0, &ad());
        let run = |k: Kernels| {
            let x = x0.clone().require_grad();
            let y = k.layer_norm(&ln, x.clone());
            let grads = (y.clone() * w.clone()).sum().backward();
            let dgamma = ln.gamma.val().grad(&grads).unwrap();
            let dbeta = ln.beta.as_ref().map(|b| b.val().grad(&grads).unwrap());
            (y, x.grad(&grads).unwrap(), dgamma, dbeta)
        };
        let (a, b) = (run(FUSED), run(Kernels::BURN));
        assert_close("layer_norm", &a.0, &b.0, 1e-5);
        assert_close("layer_norm dx", &a.1, &b.1, 1e-5);
        assert_close("layer_norm dgamma", &a.2, &b.2, 1e-5);
        if let (Some(x), Some(y)) = (a.3, b.3) {
            assert_close("layer_norm dbeta", &x, &y, 1e-5);
        }
        // Inference (no autodiff) as well, on a transposed input.
        let x = random([shape[1], shape[0], c], 3.0, &support::flex_device()).swap_dims(0, 1);
        let ln = ln.valid();
        assert_close(
            "layer_norm (inference)",
            &FUSED.layer_norm(&ln, x.clone()),
            &ln.forward(x),
            1e-5,
        );
    }
}

#[test]
fn cross_entropy_matches_burn_forward_and_backward() {
    let _rng = rng_lock();
    for (b, t, v) in [(1, 1, 2), (3, 5, 11), (12, 64, 65)] {
        let logits0 = random([b, t, v], 3.0, &ad());
        let targets = Tensor::<2, Int>::random([b, t], Distribution::Uniform(0.0, v as f64), &ad());
        let run = |k: Kernels| {
            let logits = logits0.clone().require_grad();
            let loss = k.cross_entropy(logits.clone(), targets.clone());
            let grads = (loss.clone() * 3.0).backward();
            (loss, logits.grad(&grads).unwrap())
        };
        let (a, b) = (run(FUSED), run(Kernels::BURN));
        assert_close("cross-entropy", &a.0, &b.0, 1e-5);
        assert_close("cross-entropy dlogits", &a.1, &b.1, 1e-5);
    }
    let logits = random([2, 3, 7], 3.0, &support::flex_device());
    let targets = Tensor::<2, Int>::from_data([[0, 6, 3], [1, 1, 5]], &support::flex_device());
    assert_close(
        "cross-entropy (inference)",
        &FUSED.cross_entropy(logits.clone(), targets.clone()),
        &cross_entropy(logits, targets),
        1e-5,
    );
}

/// The fused attention against Burn's composed one on `qkv0: [b, t, 3c]`, without dropout:
/// the output and the gradient of a random weighting of it, within 1e-5.
fn attention_matches_burn_at(what: &str, qkv0: Tensor<3>, nh: usize) {
    let [b, t, c3] = qkv0.dims();
    let w = random([b, t, c3 / 3], 1.0, &ad());
    let none = DropoutConfig::new(0.0).init();
    let run = |fused: bool| {
        let qkv = qkv0.clone().require_grad();
        let y = match fused {
            true => fused_attention(qkv.clone(), nh, &none),
            false => burn_attention(qkv.clone(), nh, &none),
        };
        let grads = (y.clone() * w.clone()).sum().backward();
        (y, qkv.grad(&grads).unwrap())
    };
    let (a, r) = (run(true), run(false));
    assert_close(&format!("attention ({what})"), &a.0, &r.0, 1e-5);
    assert_close(&format!("attention dqkv ({what})"), &a.1, &r.1, 1e-5);
}

#[test]
fn attention_matches_burn_forward_and_backward() {
    let _rng = rng_lock();
    // (b, t, n_head, head size): one token, batch 1, odd sizes, the baby model's shape.
    // t = 150: three blocks of causal rows (64, 64, 22), the last one short.
    for (b, t, nh, hs) in [
        (1, 1, 1, 4),
        (1, 7, 3, 5),
        (2, 9, 2, 3),
        (12, 64, 4, 32),
        (2, 150, 2, 8),
    ] {
        let c = nh * hs;
        attention_matches_burn_at("random", random([b, t, 3 * c], 1.0, &ad()), nh);
        let none = DropoutConfig::new(0.0).init();
        // Inference, on an input that is a slice of a bigger tensor (not contiguous).
        let big = random([b, t, 3 * c + 2], 1.0, &support::flex_device());
        let qkv = big.slice(s![.., .., 1..3 * c + 1]);
        assert_close(
            "attention (inference, sliced)",
            &fused_attention(qkv.clone(), nh, &none),
            &burn_attention(qkv, nh, &none),
            1e-5,
        );
    }
}

/// The seed the next dropout on `device` will draw, with the generator left where it was.
fn next_seed(device: &Device, seed: u64) -> u64 {
    device.seed(seed);
    let next = draw_seed(device);
    device.seed(seed);
    next
}

#[test]
fn attention_dropout_applies_its_mask_in_both_passes() {
    let _rng = rng_lock();
    let (b, t, nh, hs) = (2, 70, 3, 4); // two blocks of causal rows
    let qkv0 = random([b, t, 3 * nh * hs], 1.0, &ad());
    let (dropout, p) = (DropoutConfig::new(0.3).init(), 0.3);
    let upstream = random([b, t, nh * hs], 1.0, &ad());
    let seed = next_seed(&ad(), 7);
    let qkv = qkv0.clone().require_grad();
    let y = fused_attention(qkv.clone(), nh, &dropout);
    let dqkv = qkv
        .grad(&(y.clone() * upstream.clone()).sum().backward())
        .unwrap();
    // Chapter 3's composition, with the kernel's own mask multiplied in by hand.
    let mask = dropout_mask([b, nh, t, t], p, seed, &ad());
    let qkv = qkv0.clone().require_grad();
    let (q, k, v) = split_heads(qkv.clone(), nh);
    let r = merge_heads((causal_weights(q, k) * mask).matmul(v));
    let dr = qkv.grad(&(r.clone() * upstream).sum().backward()).unwrap();
    assert_close("attention with dropout", &y, &r, 1e-5);
    assert_close("attention with dropout, dqkv", &dqkv, &dr, 1e-5);
    let plain = fused_attention(qkv0.clone(), nh, &DropoutConfig::new(0.0).init());
    assert!(max_abs_diff(&y, &plain) > 1e-3, "dropout changed nothing");
    let inference = qkv0.inner();
    let unmasked = fused_attention(inference.clone(), nh, &dropout);
    assert!(max_abs_diff(&unmasked, &burn_attention(inference, nh, &dropout)) < 1e-5);
}

#[test]
fn fused_dropout_multiplies_by_its_mask_forward_and_backward() {
    let _rng = rng_lock();
    let dropout = DropoutConfig::new(0.25).init();
    let x0 = random([3, 5, 7], 1.0, &ad());
    let seed = next_seed(&ad(), 11);
    let x = x0.clone().require_grad();
    let y = FUSED.dropout(&dropout, x.clone());
    let upstream = random([3, 5, 7], 1.0, &ad());
    let dx = x
        .grad(&(y.clone() * upstream.clone()).sum().backward())
        .unwrap();
    let mask = dropout_mask([3, 5, 7], 0.25, seed, &ad());
    assert_close("dropout", &y, &(x0.clone() * mask.clone()), 1e-6);
    assert_close("dropout, dx", &dx, &(upstream * mask), 1e-6);
    // Off the training device, as Burn's: the identity.
    let x = x0.inner();
    assert_eq!(max_abs_diff(&FUSED.dropout(&dropout, x.clone()), &x), 0.0);
}

#[test]
fn the_dropout_mask_keeps_one_minus_p_independently() {
    let n = 1 << 20;
    let mask = |p: f64, seed: u64| {
        let mut keep = vec![0.0f32; n];
        DropMask::new(p, seed).fill(0, &mut keep);
        keep
    };
    let a = mask(0.2, 1);
    assert!(a.iter().all(|&k| k == 0.0 || k == 1.25), "0 or 1 / (1 - p)");
    let kept = |m: &[f32]| m.iter().filter(|&&k| k > 0.0).count() as f64 / m.len() as f64;
    // 1M draws: the standard deviation of the kept share is 0.0004; allow 5 of them.
    assert!((kept(&a) - 0.8).abs() < 0.002, "kept {}", kept(&a));
    let pairs = a.windows(2).filter(|w| w[0] > 0.0 && w[1] > 0.0).count() as f64 / n as f64;
    assert!(
        (pairs - 0.64).abs() < 0.003,
        "neighbours kept together {pairs}"
    );
    // Any part of the mask can be made alone (the backward pass and each core rely on it).
    let mut part = vec![0.0f32; 1000];
    DropMask::new(0.2, 1).fill(12_345, &mut part);
    assert_eq!(part, a[12_345..13_345]);
    // Every bit of the seed matters, the high ones too.
    for other in [2, 1 | 1 << 40] {
        let b = mask(0.2, other);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / n as f64;
        assert!((same - 0.68).abs() < 0.003, "seed {other}: {same} agree"); // .8² + .2²
    }
    assert!(mask(0.0, 5).iter().all(|&k| k == 1.0));
}

#[test]
fn a_tiny_model_trains_the_same_with_either_kernels() {
    let _rng = rng_lock();
    let data = course::common::dataset::Dataset::new(&support::corpus()).unwrap();
    // No dropout: the fused kernels draw their masks their own way (the tests above).
    let config = GptConfig::new(data.tokenizer.vocab_size(), 16, 2, 2, 32);
    let settings = support::settings(50, 1000, 1, 42);
    let losses = |k: Kernels, dropout: f64| {
        let device = ad();
        device.seed(42);
        let model = config
            .clone()
            .with_dropout(dropout)
            .init(&device)
            .with_kernels(k);
        let (model, report) = support::train_constant(model, &data, &settings, 3e-3);
        assert_eq!(model.kernels, k, "the optimizer kept the kernel choice");
        report.steps.iter().map(|s| s.loss).collect::<Vec<_>>()
    };
    let (fused, burn) = (losses(FUSED, 0.0), losses(Kernels::BURN, 0.0));
    assert_eq!(fused.len(), 50);
    for (step, (a, b)) in fused.iter().zip(&burn).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4,
            "step {step}: loss {a} fused, {b} with Burn's kernels"
        );
    }
    assert!(
        fused[49] < fused[0] - 0.5,
        "the model learned: {} -> {}",
        fused[0],
        fused[49]
    );
    // With dropout, the seed still decides everything, and the masks do act.
    let dropped = losses(FUSED, 0.1);
    assert_eq!(dropped, losses(FUSED, 0.1), "the same seed, the same run");
    assert!(dropped.iter().zip(&fused).all(|(a, b)| a != b));
}

#[test]
fn fused_kernels_fall_back_to_burn_where_the_extension_does_not_run() {
    let _rng = rng_lock();
    let mut devices = vec![support::ndarray_device()];
    devices.extend(support::wgpu_device());
    for device in devices {
        assert!(!FUSED.fused_on(&device));
        device.seed(3);
        let model = GptConfig::new(11, 8, 1, 2, 8).init(&device);
        let x = Tensor::<2, Int>::from_data([[1, 2, 3, 4, 5]], &device);
        let burn = model.clone().forward_logits(x.clone());
        let fused = model.with_kernels(FUSED).forward_logits(x);
        assert_eq!(max_abs_diff(&burn, &fused), 0.0, "on {device:?}");
        // The operations called one by one fall back too, instead of panicking.
        let qkv = Tensor::<3>::ones([1, 3, 6], &device);
        let none = DropoutConfig::new(0.0).init();
        let y = fused_attention(qkv.clone(), 2, &none);
        assert_eq!(max_abs_diff(&y, &burn_attention(qkv, 2, &none)), 0.0);
    }
}

trait Logits {
    fn forward_logits(&self, x: Tensor<2, Int>) -> Tensor<3>;
}

impl Logits for course::ch03_gpt::Gpt {
    fn forward_logits(&self, x: Tensor<2, Int>) -> Tensor<3> {
        course::common::train::LanguageModel::forward(self, x)
    }
}

#[test]
fn the_product_trace_counts_each_shape_and_keeps_the_fastest() {
    use course::ch05_fast::kernels::{View, gemm};
    use course::ch05_fast::profile::{ProductTime, fastest, trace_products};
    // A shape no other test multiplies (tests run side by side, and the trace sees them all).
    let (m, k, n) = (7, 11, 13);
    let (a, b) = (values(k * m, 1), values(k * n, 2));
    let mut c = vec![std::mem::MaybeUninit::new(0.0); m * n];
    let mut product = || {
        // `a` holds `[k, m]`: A is read transposed.
        let a = (&a[..], View::rows(0, m).t());
        gemm(
            (m, k, n),
            1.0,
            a,
            (&b, View::rows(0, n)),
            (&mut c, View::rows(0, n)),
        );
    };
    product(); // not traced
    let ((), lines) = trace_products(|| (0..3).for_each(|_| product()));
    let line = lines.iter().find(|l| l.shape == "7 x 11 x 13, Aᵀ");
    let line = line.unwrap_or_else(|| panic!("not traced: {lines:?}"));
    assert_eq!(line.calls, 3);
    assert!(line.ms > 0.0 && line.gflops > 0.0, "{line:?}");
    let time = |shape: &str, ms: f64| ProductTime {
        shape: shape.to_string(),
        calls: 1,
        ms,
        gflops: 1.0 / ms,
    };
    let best = fastest(vec![
        vec![time("x", 5.0), time("y", 1.0)],
        vec![time("x", 3.0), time("z", 4.0)],
    ]);
    let got: Vec<(&str, f64)> = best.iter().map(|l| (l.shape.as_str(), l.ms)).collect();
    assert_eq!(got, [("z", 4.0), ("x", 3.0), ("y", 1.0)]);
}

#[test]
fn the_notebook_runs_and_refuses_bad_input() {
    let out = support::tempdir();
    let corpus = support::corpus_path().to_string_lossy().into_owned();
    let dir = out.path().to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_ch05_fast");
    let fast = [
        "--preset",
        "tiny",
        "--reps",
        "1",
        "--bench-steps",
        "2",
        "--train-steps",
        "3",
    ];
    let (code, stdout, err) = support::run_bin(
        bin,
        &[&fast[..], &["--data", &corpus, "--out", dir]].concat(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    for section in ["5.1", "5.2", "5.3", "5.4", "5.5", "5.6", "5.7"] {
        assert!(
            stdout.contains(&format!("== {section} ")),
            "section {section} missing"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["fused_runs_here"], true);
    // Section 5.7 traced the products of a step: the model's first linear layer among them.
    let products = summary["products"].as_array().unwrap();
    assert!(
        products.iter().any(|p| p["calls"].as_u64() > Some(0)),
        "{products:?}"
    );
    assert!(out.path().join("same_training.svg").exists());
    // On ndarray the fused kernels do not run, and the notebook says so instead of failing.
    let nd = [
        "--backend",
        "ndarray",
        "--data",
        &corpus,
        "--out",
        dir,
        "--bench-steps",
        "0",
    ];
    let (code, stdout, err) =
        support::run_bin(bin, &[&fast[..4], &nd[..], &fast[6..]].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("do not run on this backend"), "{stdout}");
    assert!(
        stdout.contains("(none: chapter 5's kernels do not run on ndarray)"),
        "{stdout}"
    );
    let (code, _, err) = support::run_bin(bin, &["--preset", "huge", "--data", &corpus], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown preset") && err.contains("baby"),
        "{err}"
    );
}
