//! Chapter 10's GPU kernels, in CubeCL: the language Burn's wgpu, vulkan and cuda backends
//! compile their own kernels from. One cube (a workgroup) per row; its units (threads) stride
//! over the row's columns and meet in shared memory to add their partial sums.

use cubecl::prelude::*;

// ANCHOR: block_reduce
/// The sum (or, with `max`, the largest) over the cube of one `value` per unit. A tree in
/// shared memory: half the units combine the other half's values with theirs, then a
/// quarter, ...; `sync_cube` makes every unit wait until all have written. The cube's size
/// must be a power of two. The last barrier lets the caller reuse `smem` at once. `max` is
/// known when the kernel is compiled, so each kernel gets the one loop it asks for.
#[cube]
pub fn block_reduce<F: Float>(smem: &mut Shared<[F]>, value: F, #[comptime] max: bool) -> F {
    smem[UNIT_POS as usize] = value;
    sync_cube();
    let mut active = CUBE_DIM / 2;
    while active > 0 {
        if UNIT_POS < active {
            let other = smem[(UNIT_POS + active) as usize];
            let mine = smem[UNIT_POS as usize];
            if max {
                smem[UNIT_POS as usize] = select(other > mine, other, mine);
            } else {
                smem[UNIT_POS as usize] = mine + other;
            }
        }
        sync_cube();
        active /= 2;
    }
    let total = smem[0];
    sync_cube();
    total
}
// ANCHOR_END: block_reduce

// ANCHOR: layer_norm_forward
/// LayerNorm of each row of `x: [rows, c]` (contiguous): `y = (x - mean) * rstd * gamma +
/// beta`, with `rstd = 1 / sqrt(var + eps)`. One cube per row.
///
/// The sums run over `x - x[0]`, the row shifted by its first value: a row near 30 with a
/// spread of 0.01 would otherwise add up numbers near 30 in f32, whose rounding (1e-6 each)
/// is a hundredth of the spread, and the normalised values would be off by 1e-4. Shifted, the
/// numbers are of the spread's size and the sums exact to f32's precision. The row's shifted
/// mean and `rstd` are saved for the backward pass, which shifts by `x[0]` the same way.
#[cube(launch)]
pub fn layer_norm_forward<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    beta: &Tensor<F>,
    y: &mut Tensor<F>,
    shifted_mean_out: &mut Tensor<F>,
    rstd_out: &mut Tensor<F>,
    eps: f32,
    #[comptime] block: usize,
    #[define(F)] _dtype: ElemType,
) {
    let row = CUBE_POS;
    let c = x.shape(1);
    let start = row * c;
    let shift = x[start];
    let step = CUBE_DIM as usize;
    let n = F::cast_from(c as u32);
    let mut smem = Shared::new_slice(block);

    let mut sum = F::new(0.0);
    let mut j = UNIT_POS as usize;
    while j < c {
        sum += x[start + j] - shift;
        j += step;
    }
    let mean = block_reduce::<F>(&mut smem, sum, false) / n; // of the shifted row

    // The variance from the centred values: a second pass, no cancellation.
    let mut squares = F::new(0.0);
    let mut k = UNIT_POS as usize;
    while k < c {
        let d = x[start + k] - shift - mean;
        squares += d * d;
        k += step;
    }
    let var = block_reduce::<F>(&mut smem, squares, false) / n;
    let rstd = F::new(1.0) / F::sqrt(var + F::cast_from(eps));

    let mut i = UNIT_POS as usize;
    while i < c {
        y[start + i] = (x[start + i] - shift - mean) * rstd * gamma[i] + beta[i];
        i += step;
    }
    if UNIT_POS == 0 {
        shifted_mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}
// ANCHOR_END: layer_norm_forward

// ANCHOR: layer_norm_backward
/// LayerNorm's backward pass for each row, as chapter 5 derives it: with `xhat = (x - mean) *
/// rstd` (computed shifted, as the forward pass did) and `g = dy * gamma`, `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`. Also
/// writes `dy * xhat`, whose column sums are `gamma`'s gradient (the host sums them, as it
/// sums `dy` for `beta`'s).
#[cube(launch)]
pub fn layer_norm_backward<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    shifted_mean: &Tensor<F>,
    rstd: &Tensor<F>,
    dy: &Tensor<F>,
    dx: &mut Tensor<F>,
    dy_xhat: &mut Tensor<F>,
    #[comptime] block: usize,
    #[define(F)] _dtype: ElemType,
) {
    let row = CUBE_POS;
    let c = x.shape(1);
    let start = row * c;
    let step = CUBE_DIM as usize;
    let n = F::cast_from(c as u32);
    let shift = x[start];
    let (m, r) = (shifted_mean[row], rstd[row]);
    let mut smem = Shared::new_slice(block);

    let mut sum_g = F::new(0.0);
    let mut sum_gx = F::new(0.0);
    let mut j = UNIT_POS as usize;
    while j < c {
        let xhat = (x[start + j] - shift - m) * r;
        let g = dy[start + j] * gamma[j];
        sum_g += g;
        sum_gx += g * xhat;
        j += step;
    }
    let mean_g = block_reduce::<F>(&mut smem, sum_g, false) / n;
    let mean_gx = block_reduce::<F>(&mut smem, sum_gx, false) / n;

    let mut k = UNIT_POS as usize;
    while k < c {
        let xhat = (x[start + k] - shift - m) * r;
        let d = dy[start + k];
        dx[start + k] = r * (d * gamma[k] - mean_g - xhat * mean_gx);
        dy_xhat[start + k] = d * xhat;
        k += step;
    }
}
// ANCHOR_END: layer_norm_backward

// ANCHOR: gelu
/// `Φ(x)`, the normal distribution's CDF, through `erf(x / √2)` by Abramowitz and Stegun
/// 7.1.26 (absolute error below 1.5e-7): chapter 5's formula, so both chapters' kernels give
/// the same numbers.
#[cube]
fn normal_cdf<F: Float>(x: F) -> F {
    let a = select(x < F::new(0.0), -x, x) * F::new(std::f32::consts::FRAC_1_SQRT_2);
    let t = F::new(1.0) / (F::new(1.0) + F::new(0.327_591_1) * a);
    let poly = ((((F::new(1.061_405_4) * t - F::new(1.453_152_1)) * t + F::new(1.421_413_8)) * t
        - F::new(0.284_496_74))
        * t
        + F::new(0.254_829_6))
        * t;
    let erf_abs = F::new(1.0) - poly * F::exp(-a * a);
    let erf = select(x < F::new(0.0), -erf_abs, erf_abs);
    F::new(0.5) * (F::new(1.0) + erf)
}

/// GPT-2's tanh form as chapter 5 writes it: `x σ(2u)` with `u = √(2/π) (x + 0.044715 x³)`,
/// `σ(2u) = 1 / (1 + e^{-2u})`. The exponent is capped at 80 (e^80 = 5.5e34, inside f32), so
/// `e^{-2u}` stays finite for x far below 0, where `σ(2u)` is 0 to f32 precision anyway.
#[cube]
fn exp_minus_2u<F: Float>(x: F) -> F {
    let u = F::new(0.797_884_6) * (x + F::new(0.044_715) * x * x * x);
    let exponent = F::new(-2.0) * u;
    F::exp(select(exponent > F::new(80.0), F::new(80.0), exponent))
}

/// GELU of every element: the exact form, or (`approximate`) GPT-2's tanh form. One unit per
/// element; the choice is made when the kernel is compiled (`comptime`), not per element.
#[cube(launch)]
pub fn gelu_forward<F: Float>(
    x: &Tensor<F>,
    y: &mut Tensor<F>,
    #[comptime] approximate: bool,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= x.len() {
        terminate!();
    }
    let v = x[i];
    if approximate {
        y[i] = v / (F::new(1.0) + exp_minus_2u::<F>(v));
    } else {
        y[i] = v * normal_cdf::<F>(v);
    }
}

/// `dx = dy ⊙ GELU'(x)`: `Φ(x) + x φ(x)` for the exact form; for the tanh form
/// `σ(2u) + x σ'(2u) 2 du/dx` with `σ' = (e^{-2u} σ) σ`, chapter 5's overflow-free order.
#[cube(launch)]
pub fn gelu_backward<F: Float>(
    x: &Tensor<F>,
    dy: &Tensor<F>,
    dx: &mut Tensor<F>,
    #[comptime] approximate: bool,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= x.len() {
        terminate!();
    }
    let v = x[i];
    if approximate {
        let e = exp_minus_2u::<F>(v);
        let s = F::new(1.0) / (F::new(1.0) + e);
        let du = F::new(0.797_884_6) * (F::new(1.0) + F::new(3.0 * 0.044_715) * v * v);
        let ds = (e * s) * s; // σ'(2u), never above 1/4
        dx[i] = dy[i] * (s + v * ds * F::new(2.0) * du);
    } else {
        let a = select(v < F::new(0.0), -v, v) * F::new(std::f32::consts::FRAC_1_SQRT_2);
        let density = F::new(0.398_942_3) * F::exp(-a * a); // φ(x) = e^{-x²/2} / √(2π)
        dx[i] = dy[i] * (normal_cdf::<F>(v) + v * density);
    }
}
// ANCHOR_END: gelu

// ANCHOR: cross_entropy
/// The cross-entropy of each row of `logits: [rows, v]` against its target: `lse - x[target]`,
/// with `lse = m + ln Σ e^{x - m}` and `m` the row's largest logit, so that no `e^x` overflows
/// (logits of 1e4 are fine). One cube per row; also writes each row's `lse` for the backward
/// pass. A target outside `0..v` gives a NaN loss rather than a read out of bounds.
#[cube(launch)]
pub fn cross_entropy_forward<F: Float, I: Int>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    loss: &mut Tensor<F>,
    lse_out: &mut Tensor<F>,
    #[comptime] block: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let row = CUBE_POS;
    let v = logits.shape(1);
    let start = row * v;
    let step = CUBE_DIM as usize;
    let mut smem = Shared::new_slice(block);

    let mut m = F::min_value();
    let mut j = UNIT_POS as usize;
    while j < v {
        m = select(logits[start + j] > m, logits[start + j], m);
        j += step;
    }
    let m = block_reduce::<F>(&mut smem, m, true);

    let mut sum = F::new(0.0);
    let mut k = UNIT_POS as usize;
    while k < v {
        sum += F::exp(logits[start + k] - m);
        k += step;
    }
    let lse = m + F::ln(block_reduce::<F>(&mut smem, sum, false));

    if UNIT_POS == 0 {
        let t = u32::cast_from(targets[row]) as usize; // a negative one wraps: out of range too
        if t < v {
            loss[row] = lse - logits[start + t];
        } else {
            // NaN, made at run time from a number below zero: a NaN constant is no valid
            // WGSL, and CubeCL folds `lse - lse` to one.
            let negative = F::new(-1.0) - select(lse < F::new(0.0), -lse, lse);
            loss[row] = F::sqrt(negative);
        }
        lse_out[row] = lse;
    }
}

/// The gradient of the mean cross-entropy over `rows` rows, scaled by the loss's own gradient
/// `dloss[0]`: `(softmax(x) - onehot(target)) * dloss / rows`, with `softmax = e^{x - lse}`.
/// One unit per element.
#[cube(launch)]
pub fn cross_entropy_backward<F: Float, I: Int>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    lse: &Tensor<F>,
    dloss: &Tensor<F>,
    dlogits: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let i = ABSOLUTE_POS;
    if i >= logits.len() {
        terminate!();
    }
    let v = logits.shape(1);
    let rows = logits.shape(0);
    let (row, col) = (i / v, i % v);
    let p = F::exp(logits[i] - lse[row]);
    let hit = select(
        u32::cast_from(targets[row]) as usize == col,
        F::new(1.0),
        F::new(0.0),
    );
    dlogits[i] = (p - hit) * dloss[0] / F::cast_from(rows as u32);
}
// ANCHOR_END: cross_entropy

// ANCHOR: step_marker
/// A kernel that does nothing useful: launched between training steps, its line in CubeCL's
/// profile log marks where one step ends and the next begins.
#[cube(launch)]
pub fn step_marker<F: Float>(x: &mut Tensor<F>, #[define(F)] _dtype: ElemType) {
    if ABSOLUTE_POS < x.len() {
        x[ABSOLUTE_POS] += F::new(0.0);
    }
}
// ANCHOR_END: step_marker
