//! Chapter 10: fast training on a GPU. Chapter 5's idea, a kernel and its derivative in place
//! of a chain of Burn's operations, on the GPU: kernels in CubeCL, the language Burn's GPU
//! backends compile from, added to Burn as chapter 5 adds its CPU kernels, and plugged into
//! chapter 3's model through the same switch, [`Kernels`]: [`GPU`].

#[cfg(any(
    feature = "wgpu",
    feature = "vulkan",
    feature = "cuda",
    feature = "metal"
))]
pub mod extension;
#[cfg(any(
    feature = "wgpu",
    feature = "vulkan",
    feature = "cuda",
    feature = "metal"
))]
pub mod kernels;
pub mod profile;

use crate::ch03_gpt::{KernelOps, Kernels};
use crate::ch05_fast::Fused;
use burn::nn::{Dropout, Gelu, LayerNorm, Linear};
use burn::prelude::*;

// ANCHOR: kernels
/// Chapter 10's GPU kernels where the tensors live on a GPU backend (wgpu, vulkan, cuda,
/// metal: Burn's CubeCL backend), chapter 5's everywhere else (which are Burn's own
/// operations wherever chapter 5's do not run either). Any backend, never an error.
pub struct Gpu;

/// The model's switch set to chapter 10's kernels: `model.with_kernels(GPU)`.
pub const GPU: Kernels = Kernels(&Gpu);

/// Whether `device` is one of Burn's CubeCL (GPU) devices, where the kernels run.
pub fn gpu_available(device: &Device) -> bool {
    #[cfg(any(
        feature = "wgpu",
        feature = "vulkan",
        feature = "cuda",
        feature = "metal"
    ))]
    if matches!(
        device.as_dispatch().clone().inner(),
        burn::backend::DispatchDevice::Cube(_)
    ) {
        return true;
    }
    let _ = device;
    false
}
// ANCHOR_END: kernels

// ANCHOR: ops
impl KernelOps for Gpu {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn runs_on(&self, device: &Device) -> bool {
        gpu_available(device) || Fused.runs_on(device)
    }

    fn linear(&self, layer: &Linear, x: Tensor<3>) -> Tensor<3> {
        Fused.linear(layer, x)
    }

    fn matmul(&self, a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
        Fused.matmul(a, b)
    }

    /// The exact (erf) form, or GPT-2's tanh form when `gelu.approximate`.
    fn gelu(&self, gelu: &Gelu, x: Tensor<3>) -> Tensor<3> {
        match gpu_available(&x.device()) {
            true => gpu_gelu(x, gelu.approximate),
            false => Fused.gelu(gelu, x),
        }
    }

    fn layer_norm(&self, ln: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
        if !gpu_available(&x.device()) {
            return Fused.layer_norm(ln, x);
        }
        let gamma = ln.gamma.val();
        let beta = match &ln.beta {
            Some(beta) => beta.val(),
            None => gamma.zeros_like(), // no bias: add a constant 0
        };
        gpu_layer_norm(x, gamma, beta)
    }

    fn dropout(&self, dropout: &Dropout, x: Tensor<3>) -> Tensor<3> {
        Fused.dropout(dropout, x)
    }

    fn attention(&self, qkv: Tensor<3>, n_head: usize, dropout: &Dropout) -> Tensor<3> {
        Fused.attention(qkv, n_head, dropout)
    }

    fn cross_entropy(&self, logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
        if !gpu_available(&logits.device()) {
            return Fused.cross_entropy(logits, targets);
        }
        let [b, t, v] = logits.dims();
        gpu_cross_entropy(logits.reshape([b * t, v]), targets.reshape([b * t]))
    }
}
// ANCHOR_END: ops

/// LayerNorm over the last dimension of `x` with the GPU kernel (the device must be a GPU
/// one: see [`gpu_available`]).
pub fn gpu_layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
) -> Tensor<D> {
    #[cfg(any(
        feature = "wgpu",
        feature = "vulkan",
        feature = "cuda",
        feature = "metal"
    ))]
    {
        use burn::backend::Dispatch;
        use extension::GpuOps;
        /// LayerNorm's epsilon: Burn's default, which every model of the course uses.
        const LN_EPS: f64 = 1e-5;
        Tensor::from_dispatch(Dispatch::gpu_layer_norm(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            LN_EPS,
        ))
    }
    #[cfg(not(any(
        feature = "wgpu",
        feature = "vulkan",
        feature = "cuda",
        feature = "metal"
    )))]
    {
        let _ = (gamma, beta);
        unreachable!("no GPU backend in this build: {:?}", x.device())
    }
}

/// GELU of every element of `x` with the GPU kernel (the device must be a GPU one).
pub fn gpu_gelu<const D: usize>(x: Tensor<D>, approximate: bool) -> Tensor<D> {
    #[cfg(any(
        feature = "wgpu",
        feature = "vulkan",
        feature = "cuda",
        feature = "metal"
    ))]
    {
        use burn::backend::Dispatch;
        use extension::GpuOps;
        Tensor::from_dispatch(Dispatch::gpu_gelu(x.into_dispatch(), approximate))
    }
    #[cfg(not(any(
        feature = "wgpu",
        feature = "vulkan",
        feature = "cuda",
        feature = "metal"
    )))]
    {
        let _ = approximate;
        unreachable!("no GPU backend in this build: {:?}", x.device())
    }
}

/// The mean cross-entropy of `logits: [rows, v]` against `targets: [rows]` with the GPU
/// kernels (the device must be a GPU one).
pub fn gpu_cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    #[cfg(any(
        feature = "wgpu",
        feature = "vulkan",
        feature = "cuda",
        feature = "metal"
    ))]
    {
        use burn::backend::Dispatch;
        use extension::GpuOps;
        Tensor::from_dispatch(Dispatch::gpu_cross_entropy(
            logits.into_dispatch(),
            targets.into_dispatch(),
        ))
    }
    #[cfg(not(any(
        feature = "wgpu",
        feature = "vulkan",
        feature = "cuda",
        feature = "metal"
    )))]
    {
        let _ = targets;
        unreachable!("no GPU backend in this build: {:?}", logits.device())
    }
}

/// Marks the end of a training step in CubeCL's profile log (see [`profile`]); on a device
/// that is not a GPU one, nothing.
pub fn mark_step(device: &Device) {
    #[cfg(any(
        feature = "wgpu",
        feature = "vulkan",
        feature = "cuda",
        feature = "metal"
    ))]
    if gpu_available(device) {
        use burn::backend::Dispatch;
        use extension::GpuKernels;
        let x = Tensor::<1>::zeros([1], &device.clone().inner());
        let marked = Tensor::<1>::from_dispatch(Dispatch::gpu_step_marker(x.into_dispatch()));
        let _ = marked.into_data(); // waits for the launch, so the log line comes in order
    }
    let _ = device;
}
