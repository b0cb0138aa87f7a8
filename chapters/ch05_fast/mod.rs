//! Chapter 5: fast training. The operations a training step spends its time in, written
//! again as fused kernels with hand-written backward passes, and plugged into chapter 3's
//! model through chapter 3's switch, [`Kernels`]: [`FUSED`].

pub mod extension;
pub mod gemm;
pub mod kernels;
pub mod profile;

pub use crate::ch03_gpt::composed_attention;
use crate::ch03_gpt::{BurnOps, KernelOps, Kernels};
use burn::backend::{Dispatch, DispatchDevice};
use burn::nn::{Dropout, Gelu, LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::Distribution;
use extension::FusedOps;

// ANCHOR: kernels
/// Chapter 5's fused kernels, as an implementation of chapter 3's [`KernelOps`]: used where
/// the device runs them (Flex, the CPU backend), Burn's operations everywhere else, so that
/// asking for them on wgpu is not an error.
pub struct Fused;

/// The model's switch set to chapter 5's kernels: `model.with_kernels(FUSED)`.
pub const FUSED: Kernels = Kernels(&Fused);

/// The choice on the command line: `--kernels burn|fused`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// Burn's own tensor operations, composed as chapters 2 and 3 wrote them.
    Burn,
    /// Chapter 5's fused kernels where the backend runs them (flex), Burn's elsewhere.
    #[default]
    Fused,
}

impl KernelChoice {
    pub fn kernels(self) -> Kernels {
        match self {
            KernelChoice::Burn => Kernels::BURN,
            KernelChoice::Fused => FUSED,
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

impl KernelOps for Fused {
    fn name(&self) -> &'static str {
        "fused"
    }

    fn runs_on(&self, device: &Device) -> bool {
        fused_available(device)
    }

    /// A Linear layer on `x: [b, t, c_in]` as one product over all `b * t` rows.
    fn linear(&self, layer: &Linear, x: Tensor<3>) -> Tensor<3> {
        if !fused_available(&x.device()) {
            return BurnOps.linear(layer, x);
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

    fn matmul(&self, a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
        match fused_available(&a.device()) {
            true => {
                Tensor::from_dispatch(Dispatch::fused_matmul(a.into_dispatch(), b.into_dispatch()))
            }
            false => BurnOps.matmul(a, b),
        }
    }

    /// The exact (erf) form, or GPT-2's tanh form when `gelu.approximate`.
    fn gelu(&self, gelu: &Gelu, x: Tensor<3>) -> Tensor<3> {
        match fused_available(&x.device()) {
            true => {
                Tensor::from_dispatch(Dispatch::fused_gelu(x.into_dispatch(), gelu.approximate))
            }
            false => BurnOps.gelu(gelu, x),
        }
    }

    fn layer_norm(&self, ln: &LayerNorm, x: Tensor<3>) -> Tensor<3> {
        if !fused_available(&x.device()) {
            return BurnOps.layer_norm(ln, x);
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

    /// The fused version draws its mask from a hash (`kernels::DropMask`) instead of a
    /// stored random tensor.
    fn dropout(&self, dropout: &Dropout, x: Tensor<3>) -> Tensor<3> {
        let device = x.device();
        if !fused_available(&device) || !dropout_active(dropout, &device) {
            return BurnOps.dropout(dropout, x);
        }
        let seed = draw_seed(&device);
        Tensor::from_dispatch(Dispatch::fused_dropout(
            x.into_dispatch(),
            dropout.prob,
            seed,
            0, // the mask from its first element: the tensor is the whole batch
        ))
    }

    /// Straight from `qkv: [b, t, 3c]` to `y: [b, t, c]`: [`fused_attention`].
    fn attention(&self, qkv: Tensor<3>, n_head: usize, dropout: &Dropout) -> Tensor<3> {
        fused_attention(qkv, n_head, dropout)
    }

    fn cross_entropy(&self, logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
        if !fused_available(&logits.device()) {
            return BurnOps.cross_entropy(logits, targets);
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
        0,
    ))
}
// ANCHOR_END: ops

// ANCHOR: seed
/// Burn's own rule for when `Dropout` acts: while training, on a device that records gradients.
pub fn dropout_active(dropout: &Dropout, device: &Device) -> bool {
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

// ANCHOR: train_twice
/// A loss curve, (step, loss), named by the kernels that gave it.
pub type NamedCurve = (&'static str, Vec<(f64, f64)>);

/// The `tiny` model trained for `steps` steps twice, once with each of `kernels`, from the
/// same seed: both runs draw the same weights and batches, so their (step, loss) curves
/// should be one. Returns the curves, named by the kernels, and their largest difference.
pub fn train_twice(
    run: &crate::common::Run,
    steps: usize,
    kernels: [Kernels; 2],
) -> anyhow::Result<(Vec<NamedCurve>, f64)> {
    use crate::ch04_pretrain::{preset, train_settings};
    use crate::common::train::{ConstantLr, TrainSettings, train};
    let tiny = preset("tiny", run.data.tokenizer.vocab_size()).expect("the tiny preset");
    let settings = TrainSettings {
        steps,
        eval_interval: steps,
        eval_iters: 2,
        seed: run.seed,
        ..train_settings(&tiny, None)
    };
    let mut curves = Vec::new();
    for kernels in kernels {
        let device = run.device.clone().autodiff();
        device.seed(run.seed); // both runs draw the same weights and batches
        let model = tiny.model.clone().init(&device).with_kernels(kernels);
        let mut optim = burn::optim::AdamWConfig::new().init();
        let (_, report) = train(
            model,
            &mut optim,
            &run.data,
            &settings,
            0,
            &mut ConstantLr(3e-3),
        )?;
        let losses: Vec<(f64, f64)> = (report.steps.iter())
            .map(|s| (s.step as f64, s.loss))
            .collect();
        curves.push((kernels.name(), losses));
    }
    let pairs = curves[0].1.iter().zip(&curves[1].1);
    let diff = crate::common::worst(pairs.map(|(a, b)| crate::common::abs_diff(a.1, b.1)));
    Ok((curves, diff))
}
// ANCHOR_END: train_twice
