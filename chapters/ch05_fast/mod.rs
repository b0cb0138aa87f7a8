//! Chapter 5: fast training. The operations a training step spends its time in, written
//! again as fused kernels with hand-written backward passes, and plugged into chapter 3's
//! model through one switch, [`Kernels`].

pub mod extension;
pub mod gemm;
pub mod kernels;
pub mod profile;

use crate::ch02_attention::{LinearRows, causal_weights, merge_heads, split_heads};
use crate::common::train::cross_entropy as burn_cross_entropy;
use burn::backend::{Dispatch, DispatchDevice};
use burn::nn::{Dropout, Gelu, LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::Distribution;
use extension::FusedOps;
use serde::{Deserialize, Serialize};

// ANCHOR: kernels
/// Which implementation of GELU, LayerNorm, attention and cross-entropy the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// Burn's own tensor operations, composed as chapters 2 and 3 wrote them.
    #[default]
    Burn,
    /// Chapter 5's fused kernels where the device runs them (Flex, the CPU backend), Burn's
    /// operations everywhere else: asking for them on wgpu is not an error.
    Fused,
}

impl Kernels {
    /// True when the fused kernels will run for tensors on `device`.
    pub fn fused_on(self, device: &Device) -> bool {
        self == Kernels::Fused && fused_available(device)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernels::Burn => "burn",
            Kernels::Fused => "fused",
        }
    }
}

/// The extension is implemented for Flex, and for autodiff over Flex.
pub fn fused_available(device: &Device) -> bool {
    matches!(
        device.as_dispatch().clone().inner(),
        DispatchDevice::Flex(_)
    )
}
// ANCHOR_END: kernels

// ANCHOR: ops
/// LayerNorm's epsilon: Burn's default, which every model of the course uses.
const LN_EPS: f64 = 1e-5;

impl Kernels {
    /// A Linear layer on `x: [b, t, c_in]` as one product over all `b * t` rows (chapter 2's
    /// `forward_rows`).
    pub fn linear(self, layer: &Linear, x: Tensor<3>) -> Tensor<3> {
        if !self.fused_on(&x.device()) {
            return layer.forward_rows(x);
        }
        let [b, t, c] = x.dims();
        let y = self.matmul(x.reshape([b * t, c]), layer.weight.val()); // [b*t, c_out]
        let y = match &layer.bias {
            Some(bias) => y + bias.val().unsqueeze::<2>(),
            None => y,
        };
        let c_out = y.dims()[1];
        y.reshape([b, t, c_out])
    }

    /// `a @ b` for `a: [m, k]`, `b: [k, n]`.
    pub fn matmul(self, a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
        match self.fused_on(&a.device()) {
            true => {
                Tensor::from_dispatch(Dispatch::fused_matmul(a.into_dispatch(), b.into_dispatch()))
            }
            false => a.matmul(b),
        }
    }

    /// `gelu.forward(x)`: the exact (erf) form, or GPT-2's tanh form when `gelu.approximate`.
    pub fn gelu<const D: usize>(self, gelu: &Gelu, x: Tensor<D>) -> Tensor<D> {
        match self.fused_on(&x.device()) {
            true => {
                Tensor::from_dispatch(Dispatch::fused_gelu(x.into_dispatch(), gelu.approximate))
            }
            false => gelu.forward(x),
        }
    }

    /// `ln.forward(x)` over the last dimension of `x: [b, t, c]`.
    pub fn layer_norm(self, ln: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
        if !self.fused_on(&x.device()) {
            return ln.forward(x);
        }
        let gamma = ln.gamma.val();
        let beta = match &ln.beta {
            Some(beta) => beta.val(),
            None => gamma.zeros_like(), // no bias: add a constant 0
        };
        Tensor::from_dispatch(Dispatch::fused_layer_norm(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            LN_EPS,
        ))
    }

    /// `dropout.forward(x)`: the fused version draws its mask from a hash (`kernels::DropMask`)
    /// instead of a stored random tensor.
    pub fn dropout<const D: usize>(self, dropout: &Dropout, x: Tensor<D>) -> Tensor<D> {
        let device = x.device();
        if !self.fused_on(&device) || !dropout_active(dropout, &device) {
            return dropout.forward(x);
        }
        let seed = draw_seed(&device);
        Tensor::from_dispatch(Dispatch::fused_dropout(
            x.into_dispatch(),
            dropout.prob,
            seed,
        ))
    }

    /// Mean cross-entropy of `logits: [b, t, v]` against `targets: [b, t]`.
    pub fn cross_entropy(self, logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
        if !self.fused_on(&logits.device()) {
            return burn_cross_entropy(logits, targets);
        }
        let [b, t, v] = logits.dims();
        let (logits, targets) = (logits.reshape([b * t, v]), targets.reshape([b * t]));
        Tensor::from_dispatch(Dispatch::fused_cross_entropy(
            logits.into_dispatch(),
            targets.into_dispatch(),
        ))
    }
}

/// Causal self-attention of all heads, straight from `qkv: [b, t, 3c]` to `y: [b, t, c]`, with
/// `dropout` on the weights. Where the extension does not run, chapter 3's composed version.
pub fn fused_attention(qkv: Tensor<3>, n_head: usize, dropout: &Dropout) -> Tensor<3> {
    let device = qkv.device();
    if !fused_available(&device) {
        return composed_attention(qkv, n_head, dropout);
    }
    let (prob, seed) = match dropout_active(dropout, &device) {
        true => (dropout.prob, draw_seed(&device)),
        false => (0.0, 0),
    };
    Tensor::from_dispatch(Dispatch::fused_attention(
        qkv.into_dispatch(),
        n_head,
        prob,
        seed,
    ))
}
// ANCHOR_END: ops

// ANCHOR: seed
/// Burn's own rule for when `Dropout` acts: while training, on a device that records gradients.
fn dropout_active(dropout: &Dropout, device: &Device) -> bool {
    dropout.prob > 0.0 && dropout.training.is_enabled() && device.is_autodiff()
}

/// A seed for one dropout mask, drawn from Burn's random generator: the one `device.seed(..)`
/// seeds, so a run with fused dropout is as reproducible as one with Burn's.
pub fn draw_seed(device: &Device) -> u64 {
    let u = Tensor::<1>::random([2], Distribution::Uniform(0.0, 1.0), device);
    let u = u.into_data().try_to_vec::<f32>().expect("f32 values");
    let bits = |u: f32| (u * (1 << 24) as f32) as u64; // the 24 random bits of an f32 in [0, 1)
    (bits(u[0]) << 24) | bits(u[1])
}

// ANCHOR_END: seed

/// The mask that the fused kernels apply for `(prob, seed)` to a tensor of `shape`, as a
/// tensor of 0s and `1 / (1 - prob)`: for the tests and the notebook, which multiply by it.
pub fn dropout_mask<const D: usize>(
    shape: [usize; D],
    prob: f64,
    seed: u64,
    device: &Device,
) -> Tensor<D> {
    let mut keep = vec![0.0; shape.iter().product()];
    kernels::DropMask::new(prob, seed).fill(0, &mut keep);
    Tensor::from_data(TensorData::new(keep, shape), device)
}

/// The same attention as Burn operations, as chapter 3 composes it: heads apart, weights,
/// dropout, values, heads together. The fallback, and the reference the tests compare with.
pub fn composed_attention(qkv: Tensor<3>, n_head: usize, dropout: &Dropout) -> Tensor<3> {
    let (q, k, v) = split_heads(qkv, n_head); // [b, nh, t, hs]
    merge_heads(dropout.forward(causal_weights(q, k)).matmul(v)) // [b, t, c]
}
