//! The fused kernels as Burn operations: a backend extension trait implemented for the Flex
//! backend (forward only) and for `Autodiff<Flex>` (forward, plus a node on the tape whose
//! `Backward` calls the hand-written gradient).

use super::kernels::{self, AttnShape, DropMask, NormStats, View};
use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Flex, Shape, TensorData, backend_extension};

// ANCHOR: trait
/// The operations chapter 5 adds to Burn. `backend_extension` generates the glue that routes
/// a call on Burn's run-time `Dispatch` backend to the implementation for the tensor's backend.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    fn fused_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
    /// GELU, exact or (`approximate`) GPT-2's tanh form.
    fn fused_gelu(x: FloatTensor<Self>, approximate: bool) -> FloatTensor<Self>;
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Dropout with probability `dropout` on the weights (none at 0), its mask drawn by `seed`
    /// and read from element `start` on (0 but in chapter 11).
    fn fused_attention(
        qkv: FloatTensor<Self>,
        n_head: usize,
        dropout: f64,
        seed: u64,
        start: u64,
    ) -> FloatTensor<Self>;
    fn fused_dropout(x: FloatTensor<Self>, prob: f64, seed: u64, start: u64) -> FloatTensor<Self>;
}
// ANCHOR_END: trait

// ANCHOR: host
/// A Flex tensor laid out row-major from offset 0 (a copy only when it is not already).
fn contiguous(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn floats(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("the fused kernels take f32 tensors")
}

/// The whole buffer behind a tensor, whatever its layout (for strided views).
fn buffer(t: &FlexTensor) -> &[f32] {
    t.storage::<f32>()
}

fn shape(t: &FlexTensor) -> Shape {
    t.layout().shape().clone()
}

fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}

/// Token ids as indices, whichever integer type the backend stores them in.
fn indices(t: &FlexTensor, v: usize) -> Vec<usize> {
    let t = contiguous(t);
    let ids: Vec<i64> = match t.as_slice::<i64>() {
        Some(s) => s.to_vec(),
        None => t
            .as_slice::<i32>()
            .expect("integer targets")
            .iter()
            .map(|&i| i as i64)
            .collect(),
    };
    ids.into_iter()
        .map(|i| {
            assert!(
                (0..v as i64).contains(&i),
                "target {i} outside the vocabulary of {v}"
            );
            i as usize
        })
        .collect()
}

/// The dropout mask of probability `prob` drawn by `seed`, from element `start` on; none when
/// `prob` is 0.
fn drop_mask(prob: f64, seed: u64, start: u64) -> Option<DropMask> {
    (prob > 0.0).then(|| DropMask::new(prob, seed).starting_at(start))
}

fn attn_shape(qkv: &FlexTensor, n_head: usize) -> AttnShape {
    let s = shape(qkv);
    let (b, t, c3) = (s[0], s[1], s[2]);
    AttnShape {
        b,
        t,
        nh: n_head,
        hs: c3 / 3 / n_head,
    }
}
// ANCHOR_END: host

// ANCHOR: flex
/// Inference (no autodiff): the forward kernels alone.
impl FusedOps for Flex {
    fn fused_matmul(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        matmul(&a, false, &b, false)
    }

    fn fused_gelu(x: FlexTensor, approximate: bool) -> FlexTensor {
        let x = contiguous(&x);
        tensor(kernels::gelu_forward(floats(&x), approximate), shape(&x))
    }

    fn fused_layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> FlexTensor {
        layer_norm(&contiguous(&x), &gamma, &beta, eps).0
    }

    fn fused_cross_entropy(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        let logits = contiguous(&logits);
        let v = shape(&logits)[1];
        let (loss, _) = kernels::cross_entropy_forward(floats(&logits), &indices(&targets, v), v);
        tensor(vec![loss], [1])
    }

    fn fused_attention(
        qkv: FlexTensor,
        n_head: usize,
        dropout: f64,
        seed: u64,
        start: u64,
    ) -> FlexTensor {
        attention(&contiguous(&qkv), drop_mask(dropout, seed, start), n_head).0
    }

    fn fused_dropout(x: FlexTensor, prob: f64, seed: u64, start: u64) -> FlexTensor {
        let x = contiguous(&x);
        let mask = DropMask::new(prob, seed).starting_at(start);
        tensor(kernels::dropout(floats(&x), mask), shape(&x))
    }
}

/// `a @ b` for 2-D tensors, each read transposed when asked (`a: [m, k]`, `b: [k, n]`
/// after the transposes).
fn matmul(a: &FlexTensor, a_t: bool, b: &FlexTensor, b_t: bool) -> FlexTensor {
    let view = |t: &FlexTensor, transposed: bool| {
        let (s, (data, v)) = (shape(t), matrix(t));
        match transposed {
            true => (s[1], s[0], (data, v.t())),
            false => (s[0], s[1], (data, v)),
        }
    };
    let ((m, k, a), (k2, n, b)) = (view(a, a_t), view(b, b_t));
    assert_eq!(k, k2, "matmul: inner sizes differ");
    let c = kernels::matmul((m, k, n), (buffer(&a.0), a.1), (buffer(&b.0), b.1));
    tensor(c, [m, n])
}

/// A 2-D tensor as a strided view of its whole buffer, read in place when its strides allow:
/// `wte.transpose()` (the tied head) is read transposed instead of copied first.
fn matrix(t: &FlexTensor) -> (FlexTensor, View) {
    let layout = t.layout();
    match layout.as_2d_strides() {
        Some((_, _, rs, cs)) if rs > 0 && cs > 0 => {
            let (rs, cs, offset) = (rs as usize, cs as usize, layout.start_offset());
            (t.clone(), View { offset, rs, cs })
        }
        _ => (contiguous(t), View::rows(0, shape(t)[1])),
    }
}

fn layer_norm(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    eps: f64,
) -> (FlexTensor, NormStats) {
    let (gamma, beta) = (contiguous(gamma), contiguous(beta));
    let (y, stats) =
        kernels::layer_norm_forward(floats(x), floats(&gamma), floats(&beta), eps as f32);
    (tensor(y, shape(x)), stats)
}

/// Returns `y: [b, t, c]` and the attention weights `[b, nh, t, t]`.
fn attention(qkv: &FlexTensor, mask: Option<DropMask>, n_head: usize) -> (FlexTensor, FlexTensor) {
    let s = attn_shape(qkv, n_head);
    let (y, p) = kernels::attention_forward(floats(qkv), mask, s);
    let c = s.nh * s.hs;
    (tensor(y, [s.b, s.t, c]), tensor(p, [s.b, s.nh, s.t, s.t]))
}
// ANCHOR_END: flex

// ANCHOR: autodiff_gelu
/// Training: each operation runs its forward kernel and, when an input needs a gradient, puts a
/// node on the tape holding what the backward pass will need (its "state").
impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MatmulBackward;

        impl Backward<Flex, 2> for MatmulBackward {
            type State = (FlexTensor, FlexTensor); // a, b

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dc = contiguous(&grads.consume::<Flex>(&ops.node));
                let (a, b) = ops.state;
                let [pa, pb] = ops.parents;
                if let Some(pa) = pa {
                    grads.register::<Flex>(pa.id, matmul(&dc, false, &b, true)); // dA = dC Bᵀ
                }
                if let Some(pb) = pb {
                    grads.register::<Flex>(pb.id, matmul(&a, true, &dc, false)); // dB = Aᵀ dC
                }
            }
        }

        match MatmulBackward
            .prepare::<C>([a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (a, b) = (a.primitive().clone(), b.primitive().clone());
                let c = matmul(&a, false, &b, false);
                prep.finish((a, b), c)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::fused_matmul(a.into_primitive(), b.into_primitive()))
            }
        }
    }

    fn fused_gelu(x: FloatTensor<Self>, approximate: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward {
            approximate: bool,
        }

        impl Backward<Flex, 1> for GeluBackward {
            type State = FlexTensor; // the input x

            fn backward(
                self,
                ops: Ops<FlexTensor, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = contiguous(&grads.consume::<Flex>(&ops.node));
                let x = ops.state;
                if let [Some(parent)] = ops.parents {
                    let dx = kernels::gelu_backward(floats(&x), floats(&dy), self.approximate);
                    grads.register::<Flex>(parent.id, tensor(dx, shape(&x)));
                }
            }
        }

        match (GeluBackward { approximate })
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = contiguous(x.primitive());
                let y = tensor(kernels::gelu_forward(floats(&x), approximate), shape(&x));
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::fused_gelu(x.into_primitive(), approximate))
            }
        }
    }
    // ANCHOR_END: autodiff_gelu

    // ANCHOR: autodiff_rest
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormBackward;

        impl Backward<Flex, 3> for LayerNormBackward {
            type State = (FlexTensor, FlexTensor, NormStats); // x, gamma, mean and 1/σ

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = contiguous(&grads.consume::<Flex>(&ops.node));
                let (x, gamma, stats) = ops.state;
                let (dx, dgamma, dbeta) =
                    kernels::layer_norm_backward(floats(&x), floats(&gamma), &stats, floats(&dy));
                let c = dgamma.len();
                let [px, pg, pb] = ops.parents;
                for (parent, grad, shape) in [
                    (px, dx, shape(&x)),
                    (pg, dgamma, [c].into()),
                    (pb, dbeta, [c].into()),
                ] {
                    if let Some(parent) = parent {
                        grads.register::<Flex>(parent.id, tensor(grad, shape));
                    }
                }
            }
        }

        let nodes = [x.node(), gamma.node(), beta.node()];
        match LayerNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, gamma) = (contiguous(x.primitive()), contiguous(gamma.primitive()));
                let (y, stats) = layer_norm(&x, &gamma, beta.primitive(), eps);
                prep.finish((x, gamma, stats), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::fused_layer_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                eps,
            )),
        }
    }

    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CrossEntropyBackward;

        impl Backward<Flex, 1> for CrossEntropyBackward {
            type State = (FlexTensor, Vec<usize>, kernels::LogSumExp); // logits, targets, rows' lse

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = floats(&contiguous(&grads.consume::<Flex>(&ops.node)))[0];
                let (logits, targets, lse) = ops.state;
                if let [Some(parent)] = ops.parents {
                    let v = shape(&logits)[1];
                    let dx =
                        kernels::cross_entropy_backward(floats(&logits), &targets, &lse, v, grad);
                    grads.register::<Flex>(parent.id, tensor(dx, shape(&logits)));
                }
            }
        }

        match CrossEntropyBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let logits = contiguous(logits.primitive());
                let v = shape(&logits)[1];
                let targets = indices(&targets, v);
                let (loss, lse) = kernels::cross_entropy_forward(floats(&logits), &targets, v);
                prep.finish((logits, targets, lse), tensor(vec![loss], [1]))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(Flex::fused_cross_entropy(logits.into_primitive(), targets))
            }
        }
    }

    /// Attention's node saves `qkv` and the weights `P`; of the dropout mask only its seed.
    fn fused_attention(
        qkv: FloatTensor<Self>,
        n_head: usize,
        dropout: f64,
        seed: u64,
        start: u64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AttentionBackward {
            n_head: usize,
            mask: Option<DropMask>,
        }

        impl Backward<Flex, 1> for AttentionBackward {
            type State = (FlexTensor, FlexTensor); // qkv, P

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = contiguous(&grads.consume::<Flex>(&ops.node));
                let (qkv, p) = ops.state;
                if let [Some(parent)] = ops.parents {
                    let s = attn_shape(&qkv, self.n_head);
                    let dqkv = kernels::attention_backward(
                        floats(&qkv),
                        floats(&p),
                        self.mask,
                        floats(&dy),
                        s,
                    );
                    grads.register::<Flex>(parent.id, tensor(dqkv, shape(&qkv)));
                }
            }
        }

        let mask = drop_mask(dropout, seed, start);
        match (AttentionBackward { n_head, mask })
            .prepare::<C>([qkv.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let qkv = contiguous(qkv.primitive());
                let (y, p) = attention(&qkv, mask, n_head);
                prep.finish((qkv, p), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(attention(&contiguous(&qkv.into_primitive()), mask, n_head).0)
            }
        }
    }

    /// Dropout's node saves nothing but the mask's seed: `dx = dy ⊙ mask`, the mask made again.
    fn fused_dropout(x: FloatTensor<Self>, prob: f64, seed: u64, start: u64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DropoutBackward {
            mask: DropMask,
        }

        impl Backward<Flex, 1> for DropoutBackward {
            type State = ();

            fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let dy = contiguous(&grads.consume::<Flex>(&ops.node));
                if let [Some(parent)] = ops.parents {
                    let dx = kernels::dropout(floats(&dy), self.mask);
                    grads.register::<Flex>(parent.id, tensor(dx, shape(&dy)));
                }
            }
        }

        let mask = DropMask::new(prob, seed).starting_at(start);
        let input = contiguous(x.primitive());
        let y = tensor(kernels::dropout(floats(&input), mask), shape(&input));
        (DropoutBackward { mask })
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateless(y)
    }
}
// ANCHOR_END: autodiff_rest
