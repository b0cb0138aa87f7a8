//! Dropout whose masks belong to the sample, not to the process. With Burn's dropout, a
//! mask is one random tensor the size of the whole batch: split the batch over two ranks and
//! each rank draws another mask, so two ranks would train another model than one rank.
//! Here the mask of sample `i` of the global batch, at dropout site `k` of step `s`, is
//! chapter 5's counter-based mask (`DropMask`) keyed by (seed, step, site), over the elements
//! `i * n .. (i + 1) * n` of the global batch's tensor: a rank holding samples `first..` fills
//! its mask from element `first * n` and gets exactly its slice of the one-rank mask.

use crate::ch02_attention::{causal_weights, merge_heads, split_heads};
use crate::ch03_gpt::{KernelOps, Kernels};
use crate::ch05_fast::extension::FusedOps;
use crate::ch05_fast::fused_available;
use crate::ch05_fast::kernels::DropMask;
use burn::backend::Dispatch;
use burn::nn::{Dropout, Gelu, LayerNorm, Linear};
use burn::prelude::*;
use rayon::prelude::*;
use std::sync::Mutex;

// ANCHOR: sample_dropout
/// The kernels `inner`, with every dropout mask drawn per sample of the global batch.
pub struct SampleDropout {
    inner: Kernels,
    seed: u64,
    at: Mutex<Position>,
}

/// Where the next mask is: the step, the first global sample this rank holds, and how many
/// dropout sites this forward pass has gone through (the embedding's, then three per block).
#[derive(Clone, Copy, Default)]
struct Position {
    step: usize,
    first_sample: usize,
    site: u64,
}

impl SampleDropout {
    /// Kernels for a model (`Gpt::with_kernels`), and the handle that tells them where each
    /// forward pass is. (Kernels are shared, `'static` pointers: one per process is leaked.)
    pub fn install(inner: Kernels, seed: u64) -> (Kernels, &'static SampleDropout) {
        let ops: &'static SampleDropout = Box::leak(Box::new(SampleDropout {
            inner,
            seed,
            at: Mutex::new(Position::default()),
        }));
        (Kernels(ops), ops)
    }

    /// Before the forward pass of `step` on the samples `first_sample..` of its global batch.
    pub fn begin(&self, step: usize, first_sample: usize) {
        *self.at.lock().expect("dropout position") = Position {
            step,
            first_sample,
            site: 0,
        };
    }

    /// The key of the next dropout site's mask, and the mask's element at which this rank's
    /// tensor starts (each sample holds `per_sample` elements).
    fn next_site(&self, per_sample: usize) -> (u64, u64) {
        let mut at = self.at.lock().expect("dropout position");
        at.site += 1;
        let key = mix(mix(self.seed, at.step as u64), at.site);
        (key, (at.first_sample * per_sample) as u64)
    }

    /// The mask (0 or `1 / (1 - p)` per element) of the next dropout site, on the host, for a
    /// tensor of `shape` whose first dimension is the batch.
    fn next_mask<const D: usize>(
        &self,
        shape: [usize; D],
        prob: f64,
        device: &Device,
    ) -> Tensor<D> {
        let per_sample: usize = shape[1..].iter().product();
        let (key, start) = self.next_site(per_sample);
        let mask = DropMask::new(prob, key).starting_at(start);
        let mut keep = vec![0.0f32; shape.iter().product()];
        keep.par_chunks_mut(per_sample.max(1))
            .enumerate()
            .for_each(|(j, out)| mask.fill(j * per_sample, out));
        Tensor::from_data(TensorData::new(keep, shape), device)
    }

    /// True when chapter 5's fused kernels run here: they take the mask's key and start.
    fn fused(&self, device: &Device) -> bool {
        self.inner.runs_on(device) && fused_available(device)
    }
}

/// Burn's rule for when dropout acts: training, on a device that records gradients.
fn active(dropout: &Dropout, device: &Device) -> bool {
    crate::ch05_fast::dropout_active(dropout, device)
}

/// SplitMix64's finaliser over `a` and `b`: a key for each (seed, step, site).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl KernelOps for SampleDropout {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn runs_on(&self, device: &Device) -> bool {
        self.inner.runs_on(device)
    }
    fn linear(&self, layer: &Linear, x: Tensor<3>) -> Tensor<3> {
        self.inner.linear(layer, x)
    }
    fn matmul(&self, a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
        self.inner.matmul(a, b)
    }
    fn gelu(&self, gelu: &Gelu, x: Tensor<3>) -> Tensor<3> {
        self.inner.gelu(gelu, x)
    }
    fn layer_norm(&self, ln: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
        self.inner.layer_norm(ln, x)
    }
    fn cross_entropy(&self, logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
        self.inner.cross_entropy(logits, targets)
    }
    fn dropout(&self, dropout: &Dropout, x: Tensor<3>) -> Tensor<3> {
        if !active(dropout, &x.device()) {
            return x;
        }
        let [_, t, c] = x.dims();
        if self.fused(&x.device()) {
            let (key, start) = self.next_site(t * c);
            let y = Dispatch::fused_dropout(x.into_dispatch(), dropout.prob, key, start);
            return Tensor::from_dispatch(y);
        }
        let mask = self.next_mask(x.dims(), dropout.prob, &x.device()); // [b, t, c]
        x * mask
    }
    /// Chapter 5's fused attention told where its mask starts, or Burn's operations with
    /// the mask made here; without dropout, the inner kernels' attention.
    fn attention(&self, qkv: Tensor<3>, n_head: usize, dropout: &Dropout) -> Tensor<3> {
        if !active(dropout, &qkv.device()) {
            return self.inner.attention(qkv, n_head, dropout);
        }
        if self.fused(&qkv.device()) {
            let t = qkv.dims()[1];
            let (key, start) = self.next_site(n_head * t * t); // weights [b, nh, t, t]
            let y =
                Dispatch::fused_attention(qkv.into_dispatch(), n_head, dropout.prob, key, start);
            return Tensor::from_dispatch(y);
        }
        let (q, k, v) = split_heads(qkv, n_head); // [b, nh, t, hs]
        let att = causal_weights(q, k); // [b, nh, t, t]
        let mask = self.next_mask(att.dims(), dropout.prob, &att.device());
        merge_heads((att * mask).matmul(v)) // [b, t, c]
    }
}
// ANCHOR_END: sample_dropout
