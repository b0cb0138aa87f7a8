//! Chapter 10's GPU kernels, in CubeCL: the language Burn's wgpu, vulkan and cuda backends
//! compile their own kernels from. One cube (a workgroup) per row; its units (threads) stride
//! over the row's columns and meet in shared memory to add their partial sums.

use cubecl::prelude::*;

// ANCHOR: block_sum
/// The sum over the cube of one `value` per unit. A tree in shared memory: half the units add
/// the other half's values, then a quarter, ...; `sync_cube` makes every unit wait until all
/// have written. The cube's size must be a power of two. The last barrier lets the caller
/// reuse `smem` at once.
#[cube]
pub fn block_sum<F: Float>(smem: &mut Shared<[F]>, value: F) -> F {
    smem[UNIT_POS as usize] = value;
    sync_cube();
    let mut active = CUBE_DIM / 2;
    while active > 0 {
        if UNIT_POS < active {
            let other = smem[(UNIT_POS + active) as usize];
            smem[UNIT_POS as usize] += other;
        }
        sync_cube();
        active /= 2;
    }
    let total = smem[0];
    sync_cube();
    total
}
// ANCHOR_END: block_sum

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
    let mean = block_sum::<F>(&mut smem, sum) / n; // of the shifted row

    // The variance from the centred values: a second pass, no cancellation.
    let mut squares = F::new(0.0);
    let mut k = UNIT_POS as usize;
    while k < c {
        let d = x[start + k] - shift - mean;
        squares += d * d;
        k += step;
    }
    let var = block_sum::<F>(&mut smem, squares) / n;
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
    let mean_g = block_sum::<F>(&mut smem, sum_g) / n;
    let mean_gx = block_sum::<F>(&mut smem, sum_gx) / n;

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
