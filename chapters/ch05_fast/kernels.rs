//! The fused kernels themselves: plain Rust over slices of `f32`, forward and backward. They
//! know nothing about Burn; `extension.rs` wires them into its autodiff tape.
//!
//! Two tools make them fast on a CPU: `rayon` hands chunks of rows to every core, and
//! [`simd`] compiles the innermost loops a second time for AVX2 + FMA, which the compiler then
//! vectorises (8 floats per instruction) because they contain no calls and no branches.

use super::gemm;
use super::profile::{ProductShape, ProductTimer};
use rayon::prelude::*;
use std::mem::MaybeUninit;

// ANCHOR: simd
/// Defines `fn name(..)` whose body is compiled three times: for AVX-512, for AVX2 + FMA and for
/// the baseline target; the best one the CPU has is chosen when called ([`gemm::isa`], cached;
/// `GPT_PORTABLE=1` picks the baseline).
/// The body is inlined into each copy, so its loops are vectorised 16 or 8 floats at a time.
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? $body:block) => {
        $(#[$m])* fn $name($($a: $t),*) $(-> $r)? {
            #![allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn imp($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($a: $t),*) $(-> $r)? { imp($($a),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512($($a: $t),*) $(-> $r)? { imp($($a),*) }
            #[cfg(target_arch = "x86_64")]
            match gemm::isa() {
                // SAFETY: `isa` checked that the CPU has these features.
                Some(gemm::Isa::Avx512) => return unsafe { avx512($($a),*) },
                // SAFETY: as above.
                Some(gemm::Isa::Avx2) => return unsafe { avx2($($a),*) },
                None => {}
            }
            imp($($a),*)
        }
    };
}
// ANCHOR_END: simd

// ANCHOR: exp
/// `e^x` without a library call, so that a loop over it vectorises: write `x = n ln2 + r` with
/// an integer `n` and `|r| <= ln2 / 2`, take `e^r` from a degree-7 polynomial (Cephes' `expf`
/// coefficients, about 1 ulp) and build `2^n` straight from the bits of a float.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0); // keeps 2^n a normal float
    let k = x * std::f32::consts::LOG2_E + 12_582_912.0; // 1.5 * 2^23: rounds n into the mantissa
    let n = k - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4; // ln2 split in two for precision
    let mut p: f32 = 1.987_569_1e-4;
    p = fma(p, r, 1.398_2e-3); // p * r + c
    p = fma(p, r, 8.333_452e-3);
    p = fma(p, r, 4.166_579_6e-2);
    p = fma(p, r, 1.666_666_5e-1);
    p = fma(p, r, 0.5); // Cephes: 5.0000001e-1, which is 0.5 in f32
    let e_r = fma(p * r, r, r) + 1.0;
    let two_n = f32::from_bits((k.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127)) << 23);
    e_r * two_n
}

/// `a * b + c`. Where the whole crate is compiled for FMA (`-C target-cpu=native` on a CPU
/// that has it) one fused instruction; elsewhere a multiply and an add, because
/// `f32::mul_add` on a target without FMA is a call into the C library for every element,
/// which computes the fused result in software and stops the loop from vectorising.
#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    match cfg!(target_feature = "fma") {
        true => a.mul_add(b, c),
        false => a * b + c,
    }
}
// ANCHOR_END: exp

/// Elements per rayon task in the element-wise kernels: big enough to pay for the hand-off.
const CHUNK: usize = 16 * 1024;

// ANCHOR: uninit
/// Room for a kernel's output of `len` floats, *not* set to zero. `vec![0.0; len]` would write
/// every float twice: zeros first, on one core while the other waits, then the kernel's
/// values. The kernels take their outputs as `&mut [MaybeUninit<f32>]`, which they can only
/// write (`y.write(v)`), never read.
fn uninit(len: usize) -> Box<[MaybeUninit<f32>]> {
    Box::new_uninit_slice(len)
}

/// The output once the kernel has written it.
///
/// # Safety
/// Every element of `out` must have been written: the compiler cannot check this, so each
/// caller says why it holds.
unsafe fn written(out: Box<[MaybeUninit<f32>]>) -> Vec<f32> {
    // SAFETY: as the caller promised.
    unsafe { out.assume_init() }.into_vec()
}
// ANCHOR_END: uninit

// ANCHOR: gelu
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `Φ(x)` through `erf(x / √2)` by Abramowitz and Stegun 7.1.26 (absolute error below
/// 1.5e-7), and `e^{-x²/2}`, which that formula needs and the normal density reuses.
#[inline(always)]
fn cdf_and_gauss(x: f32) -> (f32, f32) {
    let a = x.abs() * FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let gauss = exp(-a * a); // e^{-x²/2}
    let erf = (1.0 - poly * gauss).copysign(x);
    (0.5 * (1.0 + erf), gauss)
}

simd_fn! {
    /// `GELU(x) = x Φ(x)`, with `Φ(x) = (1 + erf(x / √2)) / 2` the normal distribution's CDF.
    fn gelu_chunk(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x * cdf_and_gauss(x).0);
        }
    }
}

simd_fn! {
    /// `dGELU/dx = Φ(x) + x φ(x)`, with `φ(x) = e^{-x²/2} / √(2π)` the normal density.
    fn gelu_backward_chunk(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let (cdf, gauss) = cdf_and_gauss(x);
            dx.write(dy * (cdf + x * FRAC_1_SQRT_2PI * gauss)); // φ(x) = e^{-x²/2} / √(2π)
        }
    }
}

/// GELU over all of `x`, a chunk per rayon task; `approximate` picks the tanh form.
pub fn gelu_forward(x: &[f32], approximate: bool) -> Vec<f32> {
    let mut y = uninit(x.len());
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| match approximate {
            false => gelu_chunk(x, y),
            true => gelu_tanh_chunk(x, y),
        });
    // SAFETY: each chunk of `y` was written in full, from a chunk of `x` of the same length.
    unsafe { written(y) }
}

/// GELU's gradient: `dx = dy ⊙ GELU'(x)`.
pub fn gelu_backward(x: &[f32], dy: &[f32], approximate: bool) -> Vec<f32> {
    assert_eq!(
        x.len(),
        dy.len(),
        "gelu_backward: x and dy differ in length"
    );
    let mut dx = uninit(x.len());
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| match approximate {
            false => gelu_backward_chunk(x, dy, dx),
            true => gelu_tanh_backward_chunk(x, dy, dx),
        });
    // SAFETY: each chunk of `dx` was written in full, from chunks of `x` and `dy` of the same
    // length.
    unsafe { written(dx) }
}
// ANCHOR_END: gelu

// ANCHOR: gelu_tanh
/// GPT-2's GELU (chapter 8): `x (1 + tanh(u)) / 2` with `u = √(2/π) (x + 0.044715 x³)`.
/// Since `(1 + tanh(u)) / 2 = σ(2u) = 1 / (1 + e^{-2u})`, the logistic sigmoid, it is
/// `x σ(2u)`: one `exp`. Returns `σ(2u)`, `e^{-2u}` and `du/dx`.
#[inline(always)]
fn sigmoid_2u(x: f32) -> (f32, f32, f32) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x);
    let e = exp(-2.0 * u);
    (1.0 / (1.0 + e), e, du)
}

simd_fn! {
    fn gelu_tanh_chunk(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x * sigmoid_2u(x).0);
        }
    }
}

simd_fn! {
    /// `d/dx x σ(2u) = σ(2u) + x σ'(2u) 2 du/dx`, with `σ' = σ (1 − σ) = e^{-2u} σ²`: the
    /// second form keeps its precision where `σ` is close to 1 and `1 − σ` would cancel.
    /// It is taken as `(e^{-2u} σ) σ`: `e^{-2u} σ = 1 − σ` lies in `[0, 1]`, while
    /// `e^{-2u}` alone reaches 1e38 for `x <= -10`, where `x e^{-2u}` would overflow.
    fn gelu_tanh_backward_chunk(x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let (s, e, du) = sigmoid_2u(x);
            let ds = (e * s) * s; // σ'(2u), never above 1/4
            dx.write(dy * (s + x * ds * 2.0 * du));
        }
    }
}
// ANCHOR_END: gelu_tanh

// ANCHOR: dropout
/// Dropout's mask, never stored: whether element `i` is kept is a hash of `i` and a seed, so the
/// backward pass computes the very same mask again, any core can compute any part of it, and the
/// loop vectorises. Element `i` is kept when `hash(i) >= p * 2^32`, which happens with
/// probability `1 - p`; a kept element is scaled by `1 / (1 - p)`, dropout's rule.
#[derive(Clone, Copy, Debug)]
pub struct DropMask {
    threshold: u32,
    scale: f32,
    key: [u32; 2],
    /// The counter of the tensor's first element: 0, unless the tensor is one slice of a
    /// larger one whose mask it must share (chapter 11: one rank's part of a global batch).
    start: u32,
}

/// Chris Wellons' `lowbias32`: a bijection of `u32` in which every input bit flips about half of
/// the output bits. Two rounds with a key in between make a counter-based generator.
#[inline(always)]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

impl DropMask {
    /// The mask that drops with probability `prob` (in `[0, 1)`), drawn by `seed`.
    pub fn new(prob: f64, seed: u64) -> Self {
        assert!(
            (0.0..1.0).contains(&prob),
            "dropout probability {prob} outside [0, 1)"
        );
        DropMask {
            threshold: (prob * 4_294_967_296.0) as u32,
            scale: (1.0 / (1.0 - prob)) as f32,
            key: [mix32(seed as u32), mix32((seed >> 32) as u32 ^ 0x9e37_79b9)],
            start: 0,
        }
    }

    /// The same mask, read from element `start` on: element `i` of the tensor gets the
    /// factor of element `start + i` of the mask.
    pub fn starting_at(self, start: u64) -> Self {
        assert!(
            start < 1 << 32,
            "a dropout mask covers at most 2^32 elements"
        );
        DropMask {
            start: start as u32,
            ..self
        }
    }

    /// The factor (0 or `1 / (1 - p)`) of element `i` of the masked tensor.
    #[inline(always)]
    fn factor(&self, i: u32) -> f32 {
        let [k0, k1] = self.key;
        match mix32(mix32(i ^ k0).wrapping_add(k1)) >= self.threshold {
            true => self.scale,
            false => 0.0,
        }
    }

    /// `out[j]` = the factor of element `offset + j` of the masked tensor.
    pub fn fill(&self, offset: usize, out: &mut [f32]) {
        let offset = offset + self.start as usize;
        check_mask_range(offset, out.len());
        fill_mask(out, offset as u32, *self);
    }

    /// `out = x ⊙ mask` for the elements `offset..` of the masked tensor, in one pass;
    /// returns `out`, now written.
    pub fn apply<'a>(
        &self,
        offset: usize,
        x: &[f32],
        out: &'a mut [MaybeUninit<f32>],
    ) -> &'a mut [f32] {
        assert_eq!(x.len(), out.len(), "dropout: input and output differ");
        let offset = offset + self.start as usize;
        check_mask_range(offset, out.len());
        mask_chunk(x, out, offset as u32, *self);
        // SAFETY: `mask_chunk` wrote every element of `out`, which is as long as `x`.
        unsafe { out.assume_init_mut() }
    }
}

fn check_mask_range(offset: usize, len: usize) {
    assert!(
        offset + len <= 1 << 32,
        "a dropout mask covers at most 2^32 elements"
    );
}

simd_fn! {
    fn fill_mask(out: &mut [f32], start: u32, mask: DropMask) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = mask.factor(start.wrapping_add(j as u32));
        }
    }
}

simd_fn! {
    /// `y = x ⊙ mask` for the elements `start..` of the masked tensor.
    fn mask_chunk(x: &[f32], y: &mut [MaybeUninit<f32>], start: u32, mask: DropMask) {
        for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
            y.write(x * mask.factor(start.wrapping_add(j as u32)));
        }
    }
}

/// `x ⊙ mask`: dropout's forward pass, and (applied to `dy`) its backward pass.
pub fn dropout(x: &[f32], mask: DropMask) -> Vec<f32> {
    let mut y = uninit(x.len());
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(i, (y, x))| {
            mask.apply(i * CHUNK, x, y);
        });
    // SAFETY: each chunk of `y` was written in full, from a chunk of `x` of the same length.
    unsafe { written(y) }
}

simd_fn! {
    /// `y = y ⊙ x`.
    fn mul_in_place(y: &mut [f32], x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y *= x);
    }
}
// ANCHOR_END: dropout

/// Rows per rayon task in the row-wise kernels (LayerNorm, cross-entropy).
const ROWS: usize = 32;

// ANCHOR: layer_norm
/// What LayerNorm's forward pass keeps for its backward pass: each row's mean and `1/σ`.
#[derive(Clone, Debug)]
pub struct NormStats {
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// `y = (x - mean) / √(var + eps) * gamma + beta` over each row of `x: [rows, c]`, in one
/// pass to find the mean and variance and one to write `y`.
pub fn layer_norm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, NormStats) {
    let c = gamma.len();
    let rows = x.len() / c;
    let whole_rows = x.len() == rows * c && beta.len() == c;
    assert!(whole_rows, "layer_norm: x, gamma and beta do not fit");
    let (mut y, mut mean, mut rstd) = (uninit(x.len()), vec![0.0; rows], vec![0.0; rows]);
    y.par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .zip(mean.par_chunks_mut(ROWS).zip(rstd.par_chunks_mut(ROWS)))
        .for_each(|((y, x), (mean, rstd))| layer_norm_rows(x, gamma, beta, eps, y, mean, rstd));
    // SAFETY: each task wrote every element of its rows of `y` (`beta` is as long as a row).
    (unsafe { written(y) }, NormStats { mean, rstd })
}

simd_fn! {
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_rows(
        x: &[f32], gamma: &[f32], beta: &[f32], eps: f32,
        y: &mut [MaybeUninit<f32>], mean: &mut [f32], rstd: &mut [f32]
    ) {
        let c = gamma.len();
        for (((y, x), mean), rstd) in y.chunks_mut(c).zip(x.chunks(c)).zip(mean).zip(rstd) {
            let mu = sum(x) / c as f32;
            let var = x.iter().map(|&v| (v - mu) * (v - mu)).fold(0.0, |a, b| a + b) / c as f32;
            let r = 1.0 / (var + eps).sqrt();
            for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                y.write((x - mu) * r * g + b);
            }
            (*mean, *rstd) = (mu, r);
        }
    }
}

/// A sum the compiler may vectorise: 8 running sums, added at the end (floating-point addition
/// is not associative, so `iter().sum()` must add one element at a time, in order).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The gradients of LayerNorm. With `x̂ = (x - mean) / σ` and `g = dy ⊙ gamma`:
/// `dx = (g - mean(g) - x̂ · mean(g ⊙ x̂)) / σ` per row, `dgamma = Σ_rows dy ⊙ x̂`,
/// `dbeta = Σ_rows dy`. Returns `(dx, dgamma, dbeta)`.
pub fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    stats: &NormStats,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    let rows = stats.mean.len();
    let fits = x.len() == rows * c && dy.len() == x.len() && stats.rstd.len() == rows;
    assert!(
        fits,
        "layer_norm_backward: x, dy, gamma and the statistics do not fit"
    );
    let mut dx = uninit(x.len());
    // Each task sums dgamma and dbeta over its own rows; the partial sums are added at the end.
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c).zip(dy.par_chunks(ROWS * c)))
        .zip(stats.mean.par_chunks(ROWS).zip(stats.rstd.par_chunks(ROWS)))
        .map(|((dx, (x, dy)), (mean, rstd))| {
            let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
            layer_norm_backward_rows(x, gamma, mean, rstd, dy, dx, &mut dgamma, &mut dbeta);
            (dgamma, dbeta)
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0.0; c], vec![0.0; c]);
    for (g, b) in partial {
        dgamma.iter_mut().zip(g).for_each(|(s, v)| *s += v);
        dbeta.iter_mut().zip(b).for_each(|(s, v)| *s += v);
    }
    // SAFETY: each task wrote all `c` elements of each of its rows of `dx`.
    (unsafe { written(dx) }, dgamma, dbeta)
}

simd_fn! {
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward_rows(
        x: &[f32], gamma: &[f32], mean: &[f32], rstd: &[f32], dy: &[f32],
        dx: &mut [MaybeUninit<f32>], dgamma: &mut [f32], dbeta: &mut [f32]
    ) {
        let c = gamma.len();
        let mut xhat = vec![0.0f32; c];
        let mut g = vec![0.0f32; c];
        for ((((dx, x), dy), &mu), &r) in
            dx.chunks_mut(c).zip(x.chunks(c)).zip(dy.chunks(c)).zip(mean).zip(rstd)
        {
            for i in 0..c {
                xhat[i] = (x[i] - mu) * r;
                g[i] = dy[i] * gamma[i];
                dgamma[i] += dy[i] * xhat[i];
                dbeta[i] += dy[i];
            }
            let mean_g = sum(&g) / c as f32;
            let mean_gx = dot(&g, &xhat) / c as f32;
            for i in 0..c {
                dx[i].write((g[i] - mean_g - xhat[i] * mean_gx) * r);
            }
        }
    }
}

/// `Σ a_i b_i` with 8 running sums, as [`sum`].
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}
// ANCHOR_END: layer_norm

// ANCHOR: cross_entropy
/// Each row's log-sum-exp `max + ln Σ e^{x - max}`, kept in its two parts: at logits of
/// 1e4 one f32 holding the sum is only good to about 1e-3 (its spacing there), which would
/// put an error of 1e-3 into every `e^{x - lse}` of the backward pass.
#[derive(Clone, Debug, Default)]
pub struct LogSumExp {
    pub max: Vec<f32>,
    pub log_sum: Vec<f32>,
}

/// Mean cross-entropy of `logits: [n, v]` against `targets: [n]`, as log-softmax and the
/// negative log-likelihood in one pass: `loss_i = logsumexp(x_i) - x_i[target_i]`.
/// Returns the mean loss and each row's log-sum-exp (the backward pass needs it).
pub fn cross_entropy_forward(logits: &[f32], targets: &[usize], v: usize) -> (f32, LogSumExp) {
    let n = targets.len();
    let (mut max, mut log_sum) = (vec![0.0; n], vec![0.0; n]);
    let total: f64 = max
        .par_chunks_mut(ROWS)
        .zip(log_sum.par_chunks_mut(ROWS))
        .zip(logits.par_chunks(ROWS * v).zip(targets.par_chunks(ROWS)))
        .map(|((max, log_sum), (x, targets))| cross_entropy_rows(x, targets, v, max, log_sum))
        .sum();
    ((total / n as f64) as f32, LogSumExp { max, log_sum })
}

simd_fn! {
    /// Writes each row's log-sum-exp and returns the rows' summed loss.
    fn cross_entropy_rows(
        x: &[f32], targets: &[usize], v: usize, max: &mut [f32], log_sum: &mut [f32]
    ) -> f64 {
        let mut total = 0.0f64;
        let mut e = vec![0.0f32; v];
        for (((max, log_sum), x), &target) in
            max.iter_mut().zip(log_sum.iter_mut()).zip(x.chunks(v)).zip(targets)
        {
            *max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            e.iter_mut().zip(x).for_each(|(e, &x)| *e = exp(x - *max));
            *log_sum = sum(&e).ln();
            total += (*max - x[target]) as f64 + *log_sum as f64;
        }
        total
    }
}

/// `d loss / d logits = (softmax(x) - onehot(target)) / n`, times the incoming gradient.
pub fn cross_entropy_backward(
    logits: &[f32],
    targets: &[usize],
    lse: &LogSumExp,
    v: usize,
    grad: f32,
) -> Vec<f32> {
    let scale = grad / targets.len() as f32;
    let mut dx = vec![0.0; logits.len()];
    dx.par_chunks_mut(ROWS * v)
        .zip(logits.par_chunks(ROWS * v))
        .zip(targets.par_chunks(ROWS))
        .zip(lse.max.par_chunks(ROWS).zip(lse.log_sum.par_chunks(ROWS)))
        .for_each(|(((dx, x), targets), (max, log_sum))| {
            cross_entropy_backward_rows(x, targets, max, log_sum, scale, dx)
        });
    dx
}

simd_fn! {
    fn cross_entropy_backward_rows(
        x: &[f32], targets: &[usize], max: &[f32], log_sum: &[f32], scale: f32, dx: &mut [f32]
    ) {
        let v = x.len() / targets.len();
        let rows = dx.chunks_mut(v).zip(x.chunks(v)).zip(targets).zip(max.iter().zip(log_sum));
        for (((dx, x), &target), (&max, &log_sum)) in rows {
            for (dx, &x) in dx.iter_mut().zip(x) {
                *dx = exp((x - max) - log_sum) * scale; // softmax, from the two parts
            }
            dx[target] -= scale;
        }
    }
}
// ANCHOR_END: cross_entropy

// ANCHOR: gemm
/// A matrix of `f32` inside a slice: element `(i, j)` is `data[offset + i * rs + j * cs]`.
/// Strides let a product read one head's queries straight out of the `[b, t, 3c]` buffer,
/// or read a matrix transposed, without copying it first.
#[derive(Clone, Copy)]
pub struct View {
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl View {
    pub fn rows(offset: usize, rs: usize) -> Self {
        View { offset, rs, cs: 1 }
    }
    /// The same matrix read transposed.
    pub fn t(self) -> Self {
        View {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
    /// The same matrix from row `i` and column `j` on.
    pub fn at(self, i: usize, j: usize) -> Self {
        View {
            offset: self.offset + i * self.rs + j * self.cs,
            ..self
        }
    }
    fn check(&self, len: usize, rows: usize, cols: usize) {
        assert!(rows > 0 && cols > 0, "an empty matrix view");
        let last = self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(last < len, "matrix view out of bounds");
    }

    /// True when the view's `rows x cols` elements are all different floats: sorted by
    /// stride, each dimension (of more than one element) must step past the whole extent
    /// of the one before it.
    fn disjoint(&self, rows: usize, cols: usize) -> bool {
        let mut dims: Vec<(usize, usize)> = [(self.rs, rows), (self.cs, cols)]
            .into_iter()
            .filter(|&(_, n)| n > 1)
            .collect();
        dims.sort();
        match dims[..] {
            [] => true,
            [(s, _)] => s > 0,
            [(s0, n0), (s1, _)] => s0 > 0 && s1 >= s0 * n0,
            _ => unreachable!("two dimensions"),
        }
    }
}

/// `C = alpha * A @ B` with `A: [m, k]`, `B: [k, n]`, `C: [m, n]`: every element of `C`'s
/// view is written, none is read, so `C` may be an output not yet written. The
/// `matrixmultiply` crate does the blocking and the vector instructions.
pub fn gemm(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    (a, va): (&[f32], View),
    (b, vb): (&[f32], View),
    (c, vc): (&mut [MaybeUninit<f32>], View),
) {
    va.check(a.len(), m, k);
    vb.check(b.len(), k, n);
    vc.check(c.len(), m, n);
    // Several threads write `C` at once, each its own tiles: two elements of the view that
    // were one float would be written by two threads (a data race).
    assert!(vc.disjoint(m, n), "gemm: the output view's rows overlap");
    // SAFETY: the three views were just checked to stay inside their slices, the output's
    // elements to be distinct, and `c` is a unique borrow, so it overlaps neither `a` nor
    // `b`. With beta = 0 nothing reads `C`.
    unsafe {
        sgemm(
            (m, k, n),
            alpha,
            (a, va),
            (b, vb),
            0.0,
            (c.as_mut_ptr().cast(), vc),
        )
    }
}

/// `A @ B` with `A: [m, k]` and `B: [k, n]` read through their views, into a new row-major
/// `[m, n]`. One call: `matrixmultiply` (feature `threading`) splits a large product over the
/// cores by itself.
pub fn matmul(
    (m, k, n): (usize, usize, usize),
    (a, va): (&[f32], View),
    (b, vb): (&[f32], View),
) -> Vec<f32> {
    va.check(a.len(), m, k);
    vb.check(b.len(), k, n);
    if m <= FEW_ROWS && va.cs == 1 && (vb.cs == 1 || vb.rs == 1) {
        return few_rows((m, k, n), (a, va), (b, vb));
    }
    let mut c = uninit(m * n);
    gemm((m, k, n), 1.0, (a, va), (b, vb), (&mut c, View::rows(0, n)));
    // SAFETY: `gemm` wrote every element of the `[m, n]` view, which is all of `c`.
    unsafe { written(c) }
}

// ANCHOR: few_rows
/// Up to this many rows of `A`, `matmul` multiplies row by row instead of calling `sgemm`.
const FEW_ROWS: usize = 4;

/// `A @ B` for a handful of rows of `A`, such as the one new token of cached generation
/// (chapter 6): each output row is a matrix-vector product, whose cost is reading `B` once.
/// `sgemm` would first copy all of `B` into blocks ("packing") and then compute 16 rows
/// where one is needed. The columns of `C` are split into chunks, one task each.
fn few_rows(
    (m, k, n): (usize, usize, usize),
    (a, va): (&[f32], View),
    (b, vb): (&[f32], View),
) -> Vec<f32> {
    // About four tasks per core, so that no core waits long for another at the end; one
    // task for a matrix under 4 MB (all of chapter 4's presets): waking the other core for
    // each of a token's small products cost more than it saved (`lecture`: 204 against 318
    // tokens/s with the cache).
    let tasks = match k * n < 1 << 20 {
        true => 1,
        false => 4 * rayon::current_num_threads(),
    };
    let chunk = n.div_ceil(tasks).next_multiple_of(16);
    let rows: Vec<&[f32]> = (0..m).map(|i| &a[va.offset + i * va.rs..][..k]).collect();
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|part| {
            let cols = part * chunk..(part * chunk + chunk).min(n);
            let mut out = vec![0.0; m * cols.len()]; // [m, cols]
            match vb.cs {
                // `B` row-major: add `a[i, p]` times row `p` of `B`, for every `p`.
                1 => rows_times_rows(&rows, b, vb, cols, &mut out),
                // `B` is a row-major matrix read transposed (a tied head `wteᵀ`): column
                // `j` of `B` is a contiguous row, so each output is a dot product.
                _ => rows_dot_columns(&rows, b, vb, cols, &mut out),
            }
            out
        })
        .collect();
    let mut c = vec![0.0; m * n];
    for (part, out) in parts.iter().enumerate() {
        let width = out.len() / m;
        for (i, row) in out.chunks(width).enumerate() {
            c[i * n + part * chunk..][..width].copy_from_slice(row);
        }
    }
    c
}

simd_fn! {
    fn rows_times_rows(
        rows: &[&[f32]], b: &[f32], vb: View, cols: std::ops::Range<usize>, out: &mut [f32]
    ) {
        let (width, k) = (cols.len(), rows[0].len());
        let b_row = |p: usize| &b[vb.offset + p * vb.rs + cols.start..][..width];
        // Four rows of `B` per pass over `out`: a quarter of the loads and stores of `out`.
        for p in (0..k).step_by(4) {
            let ps = p..(p + 4).min(k);
            let [b0, b1, b2, b3] = std::array::from_fn(|i| b_row((p + i).min(k - 1)));
            for (row, out) in rows.iter().zip(out.chunks_mut(width)) {
                let mut x = [0.0; 4]; // a[i, p..p + 4], zeros past the end
                x[..ps.len()].copy_from_slice(&row[ps.clone()]);
                let bs = b0.iter().zip(b1).zip(b2.iter().zip(b3));
                for (o, ((w0, w1), (w2, w3))) in out.iter_mut().zip(bs) {
                    *o += x[0] * w0 + x[1] * w1 + x[2] * w2 + x[3] * w3;
                }
            }
        }
    }
}

simd_fn! {
    fn rows_dot_columns(
        rows: &[&[f32]], b: &[f32], vb: View, cols: std::ops::Range<usize>, out: &mut [f32]
    ) {
        let (width, k) = (cols.len(), rows[0].len());
        for (j, col) in cols.enumerate() {
            let b_col = &b[vb.offset + col * vb.cs..][..k];
            for (i, row) in rows.iter().enumerate() {
                out[i * width + j] = dot(row, b_col);
            }
        }
    }
}
// ANCHOR_END: few_rows

/// # Safety
/// The views must lie inside `a`, `b` and the `m * n` elements behind `c`.
unsafe fn sgemm(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    (a, va): (&[f32], View),
    (b, vb): (&[f32], View),
    beta: f32,
    (c, vc): (*mut f32, View),
) {
    // Timed while section 5.7 traces a training step (`profile::trace_products`).
    let _timer = ProductTimer::start(ProductShape {
        m,
        k,
        n,
        a_transposed: va.cs != 1,
        b_transposed: vb.cs != 1,
    });
    let strided = |x: &[f32], v: View| gemm::Strided {
        ptr: x[v.offset..].as_ptr(),
        rs: v.rs as isize,
        cs: v.cs as isize,
    };
    #[cfg(target_arch = "x86_64")]
    if let (Some(isa), true, 1) = (gemm::isa(), gemm::supported(&strided(a, va)), vc.cs) {
        // SAFETY: as this function's caller promised.
        return unsafe {
            gemm::sgemm(
                isa,
                (m, k, n),
                alpha,
                strided(a, va),
                strided(b, vb),
                beta,
                (c.add(vc.offset), vc.rs),
            )
        };
    }
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr().add(va.offset),
            va.rs as isize,
            va.cs as isize,
            b.as_ptr().add(vb.offset),
            vb.rs as isize,
            vb.cs as isize,
            beta,
            c.add(vc.offset),
            vc.rs as isize,
            vc.cs as isize,
        )
    }
}
// ANCHOR_END: gemm

// ANCHOR: attention_forward
/// The shape of one attention call: `qkv: [b, t, 3c]` with `nh` heads of `hs = c / nh`.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub hs: usize,
}

impl AttnShape {
    fn c(&self) -> usize {
        self.nh * self.hs
    }
    /// Where head `h`'s queries (part 0), keys (1) or values (2) start in one batch row of
    /// `[t, 3c]`: a `[t, hs]` matrix with row stride `3c`.
    fn part(&self, part: usize, h: usize) -> View {
        View::rows(part * self.c() + h * self.hs, 3 * self.c())
    }
}

/// Causal self-attention of every head, reading `q`, `k`, `v` from `qkv: [b, t, 3c]` in place:
/// `S = q kᵀ / √hs`, softmax over the keys `j <= i`, `P ⊙ mask` (dropout, when given; the mask's
/// element `(b, h, i, j)` is that of a `[b, nh, t, t]` tensor) times `v`.
/// Returns `y: [b, t, c]` (the heads side by side, as `merge_heads` would leave them) and the
/// weights `P: [b, nh, t, t]` before dropout, which the backward pass needs.
pub fn attention_forward(
    qkv: &[f32],
    mask: Option<DropMask>,
    s: AttnShape,
) -> (Vec<f32>, Vec<f32>) {
    let AttnShape { t, nh, hs, .. } = s;
    let (c, tt) = (s.c(), t * t);
    let scale = 1.0 / (hs as f32).sqrt();
    let (mut y, mut p) = (uninit(s.b * t * c), uninit(s.b * nh * tt));
    // One task per batch row: each writes only its own rows of `y` and `p`.
    y.par_chunks_mut(t * c)
        .zip(p.par_chunks_mut(nh * tt))
        .enumerate()
        .for_each(|(bi, (y, p))| {
            let qkv = &qkv[bi * t * 3 * c..(bi + 1) * t * 3 * c]; // [t, 3c]
            let mut dropped = uninit(tt);
            for h in 0..nh {
                let p = &mut p[h * tt..(h + 1) * tt]; // [t, t]
                let (q, k, v) = (s.part(0, h), s.part(1, h), s.part(2, h));
                let square = View::rows(0, t);
                // Rows r0..r1 of the scores only need the keys 0..r1: the rest is the future.
                // The scores go by blocks of keys: keys c0..c1 only matter to the queries
                // from c0 on, the ones at or after them.
                for (c0, c1) in causal_blocks(t) {
                    let (n, q, p_cols) = (c1 - c0, q.at(c0, 0), square.at(c0, c0));
                    gemm(
                        (t - c0, hs, n),
                        scale,
                        (qkv, q),
                        (qkv, k.t().at(0, c0)),
                        (p, p_cols),
                    );
                    // For the queries before c0 these keys are the future: weight 0.
                    for row in p[..c0 * t].chunks_mut(t) {
                        row[c0..c1].fill(MaybeUninit::new(0.0));
                    }
                }
                // SAFETY: each block of columns of `p` was written: from row c0 on by the
                // product, above it just above.
                let p = unsafe { p.assume_init_mut() };
                causal_softmax(p, t);
                let weights = match mask {
                    Some(mask) => &*mask.apply((bi * nh + h) * tt, p, &mut dropped),
                    None => &*p,
                };
                let out = View::rows(h * hs, c); // head h's columns of y: [t, hs]
                for (r0, r1) in causal_blocks(t) {
                    let (m, w_rows, y_rows) = (r1 - r0, square.at(r0, 0), out.at(r0, 0));
                    gemm((m, r1, hs), 1.0, (weights, w_rows), (qkv, v), (y, y_rows));
                }
            }
        });
    // SAFETY: every row of `p` was written above, and every head wrote its columns of every
    // row of `y`.
    unsafe { (written(y), written(p)) }
}

/// Rows (or columns) per block of causal attention's products: a block of rows of the
/// weights is computed against the keys up to its last row only, a block of columns (keys)
/// against the queries from its first column on. At `t = 256` either is 62.5% of the square;
/// at `t = 64`, one block, the whole square.
const CAUSAL_BLOCK: usize = 64;

/// `(r0, r1)`: the row (or column) blocks of a `[t, t]` attention matrix.
fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(CAUSAL_BLOCK)
        .map(move |r0| (r0, (r0 + CAUSAL_BLOCK).min(t)))
}

simd_fn! {
    /// Row `i` of `s: [t, t]` becomes the softmax of its first `i + 1` entries; the rest (the
    /// future) become exactly 0, which is what the -inf mask of chapter 2 does.
    fn causal_softmax(s: &mut [f32], t: usize) {
        for (i, row) in s.chunks_mut(t).enumerate() {
            let (past, future) = row.split_at_mut(i + 1);
            let max = past.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            past.iter_mut().for_each(|v| *v = exp(*v - max));
            let inv = 1.0 / sum(past);
            past.iter_mut().for_each(|v| *v *= inv);
            future.fill(0.0);
        }
    }
}

// ANCHOR_END: attention_forward

// ANCHOR: attention_backward
/// The gradient of [`attention_forward`] with respect to `qkv`, from `dy: [b, t, c]`. With
/// `P̃ = P ⊙ keep` the weights that multiplied `v` (`keep` the dropout mask, computed again):
/// `dv = P̃ᵀ dy`, `dP = (dy vᵀ) ⊙ keep`, `dS = P ⊙ (dP - rowsum(dP ⊙ P))` (softmax's
/// derivative), then `dq = dS k / √hs` and `dk = dSᵀ q / √hs`. Returns `dqkv: [b, t, 3c]`.
pub fn attention_backward(
    qkv: &[f32],
    p: &[f32],
    mask: Option<DropMask>,
    dy: &[f32],
    s: AttnShape,
) -> Vec<f32> {
    let AttnShape { t, nh, .. } = s;
    let (c, tt) = (s.c(), t * t);
    let mut dqkv = uninit(s.b * t * 3 * c);
    dqkv.par_chunks_mut(t * 3 * c)
        .enumerate()
        .for_each(|(bi, dqkv)| {
            let qkv = &qkv[bi * t * 3 * c..][..t * 3 * c]; // [t, 3c]
            let dy = &dy[bi * t * c..][..t * c]; // [t, c]
            let (mut mask_buf, mut dropped) = (vec![0.0; tt], vec![0.0; tt]);
            let mut ds = Box::new_zeroed_slice(tt); // [t, t], see `Head::backward`
            for h in 0..nh {
                let p = &p[(bi * nh + h) * tt..][..tt]; // [t, t]
                // The forward's mask again, and the weights it left: P̃ = P ⊙ keep.
                let (keep, weights) = match mask {
                    Some(mask) => {
                        mask.fill((bi * nh + h) * tt, &mut mask_buf);
                        dropped.copy_from_slice(&mask_buf);
                        mul_in_place(&mut dropped, p);
                        (Some(&mask_buf[..]), &dropped[..])
                    }
                    None => (None, p),
                };
                let head = Head { s, h, qkv, dy, p };
                head.backward((keep, weights), dqkv, &mut ds);
            }
        });
    // SAFETY: each head wrote its columns of `dq`, `dk` and `dv` for every row of `dqkv`.
    unsafe { written(dqkv) }
}

/// One head of one sequence in the backward pass: `qkv: [t, 3c]`, `dy: [t, c]` and the
/// head's weights `p: [t, t]`.
struct Head<'a> {
    s: AttnShape,
    h: usize,
    qkv: &'a [f32],
    dy: &'a [f32],
    p: &'a [f32],
}

impl Head<'_> {
    /// Writes the head's `dq`, `dk` and `dv` into `dqkv: [t, 3c]`, with `ds: [t, t]` as
    /// scratch (zeros when first given), given the dropout mask `keep` and the weights `P̃`
    /// it left.
    fn backward(
        &self,
        (keep, weights): (Option<&[f32]>, &[f32]),
        dqkv: &mut [MaybeUninit<f32>],
        ds: &mut [MaybeUninit<f32>],
    ) {
        let Head { s, h, qkv, dy, p } = *self;
        let (t, hs, c) = (s.t, s.hs, s.c());
        let scale = 1.0 / (hs as f32).sqrt();
        let square = View::rows(0, t);
        let (q, k, v) = (s.part(0, h), s.part(1, h), s.part(2, h));
        let dout = View::rows(h * hs, c); // head h's columns of dy: [t, hs]
        // Blocks as in the forward pass. A block of columns r0..r1 of `P` (and of `dS`) is
        // zero above row r0, so the products that read it by columns start at row r0. The
        // entries of `dS` that no product writes stay 0: they start at 0, and
        // `softmax_backward` leaves every future entry at 0 (`P` is 0 there).
        for (r0, r1) in causal_blocks(t) {
            let (m, rest) = (r1 - r0, t - r0);
            // dv = P̃ᵀ dy (rows r0..r1 of dv: columns r0..r1 of P̃, from row r0 on)
            let w_cols = square.t().at(r0, r0);
            let dy_rows = (dy, dout.at(r0, 0));
            let dv_rows = (&mut *dqkv, v.at(r0, 0));
            gemm((m, rest, hs), 1.0, (weights, w_cols), dy_rows, dv_rows);
            // dP = dy vᵀ by blocks of columns, as the scores, then ⊙ keep
            let v_cols = (qkv, v.t().at(0, r0));
            gemm(
                (rest, hs, m),
                1.0,
                dy_rows,
                v_cols,
                (&mut *ds, square.at(r0, r0)),
            );
        }
        // SAFETY: `ds` started as zeros, and nothing but floats was ever written to it.
        let ds = unsafe { ds.assume_init_mut() };
        softmax_backward(ds, p, keep, t);
        for (r0, r1) in causal_blocks(t) {
            let (m, rest) = (r1 - r0, t - r0);
            // dq = dS k / √hs and dk = dSᵀ q / √hs
            let ds_rows = (&ds[..], square.at(r0, 0));
            gemm((m, r1, hs), scale, ds_rows, (qkv, k), (dqkv, q.at(r0, 0)));
            let ds_cols = (&ds[..], square.t().at(r0, r0));
            let q_rows = (qkv, q.at(r0, 0));
            gemm((m, rest, hs), scale, ds_cols, q_rows, (dqkv, k.at(r0, 0)));
        }
    }
}

simd_fn! {
    /// In place: `dP` (the gradient of the dropped weights) becomes `dS`, the gradient of the
    /// scores, row by row: `dS_ij = P_ij (dP_ij keep_ij - Σ_k dP_ik keep_ik P_ik)`.
    fn softmax_backward(dp: &mut [f32], p: &[f32], keep: Option<&[f32]>, t: usize) {
        if let Some(keep) = keep {
            dp.iter_mut().zip(keep).for_each(|(d, k)| *d *= k);
        }
        for (dp, p) in dp.chunks_mut(t).zip(p.chunks(t)) {
            let dot = dot(dp, p);
            dp.iter_mut().zip(p).for_each(|(d, p)| *d = p * (*d - dot));
        }
    }
}
// ANCHOR_END: attention_backward
