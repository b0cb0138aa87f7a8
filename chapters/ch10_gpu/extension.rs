//! The GPU kernels as Burn operations, as chapter 5 adds its CPU kernels: a backend extension
//! trait, implemented for Burn's CubeCL backend (every GPU runtime: wgpu, vulkan, cuda, metal)
//! and for autodiff over it, whose node on the tape calls the backward kernel.

use super::kernels;
use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Cube, Shape, TensorMetadata, backend_extension};
use burn_cubecl::{CubeBackend, kernel::into_contiguous, tensor::CubeTensor};
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::{CubeCount, CubeDim};

// ANCHOR: trait
/// The kernels themselves, forward and backward, for the CubeCL backend. Burn wraps that
/// backend in its operation fuser (`Fusion`), which must know each output's shape and type
/// without running the kernel: the `fusion(...)` attributes say where to find them.
#[backend_extension(Cube, Fusion)]
pub trait GpuKernels: Backend {
    /// LayerNorm over the last dimension: `(y, mean, rstd)`, the two per row (the mean of the
    /// row shifted by its first value: see the kernel).
    #[fusion(meta = layer_norm_meta)]
    fn gpu_layer_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// `(dx, dgamma, dbeta)` from the forward pass's input, row statistics and `dy`.
    #[fusion(meta = layer_norm_backward_meta)]
    fn gpu_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// GELU, exact or (`approximate`) GPT-2's tanh form.
    #[fusion(dtype = x, shape = x)]
    fn gpu_gelu_forward(x: FloatTensor<Self>, approximate: bool) -> FloatTensor<Self>;
    /// `dy ⊙ GELU'(x)`.
    #[fusion(dtype = x, shape = x)]
    fn gpu_gelu_backward(
        x: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        approximate: bool,
    ) -> FloatTensor<Self>;
    /// Each row's cross-entropy against its target, and its log-sum-exp: `(loss, lse)`.
    #[fusion(meta = cross_entropy_meta)]
    fn gpu_cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Launches `step_marker` on `x` and returns it: a mark in CubeCL's profile log.
    #[fusion(dtype = x, shape = x)]
    fn gpu_step_marker(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The mean cross-entropy's gradient, times `dloss` (`[1]`).
    #[fusion(dtype = logits, shape = logits)]
    fn gpu_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        dloss: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// What the model calls: the forward kernel, with the backward kernel on autodiff's tape.
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait GpuOps: Backend {
    #[fusion(dtype = x, shape = x)]
    fn gpu_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    #[fusion(dtype = x, shape = x)]
    fn gpu_gelu(x: FloatTensor<Self>, approximate: bool) -> FloatTensor<Self>;
    /// The mean cross-entropy of `logits: [rows, v]` against `targets: [rows]`, as `[1]`.
    #[fusion(meta = mean_meta)]
    fn gpu_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;
}
// ANCHOR_END: trait

/// One number per row of `x` (all dimensions but the last).
fn per_row(x: &TensorSpec) -> TensorSpec {
    let c = x.shape[x.shape.num_dims() - 1];
    TensorSpec::new(Shape::new([x.shape.num_elements() / c]), x.dtype)
}

fn layer_norm_meta(
    x: &TensorSpec,
    _: &TensorSpec,
    _: &TensorSpec,
    _: &f64,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    (x.clone(), per_row(x), per_row(x))
}

fn layer_norm_backward_meta(
    x: &TensorSpec,
    gamma: &TensorSpec,
    _: &TensorSpec,
    _: &TensorSpec,
    _: &TensorSpec,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    (x.clone(), gamma.clone(), gamma.clone())
}

fn cross_entropy_meta(logits: &TensorSpec, _: &TensorSpec) -> (TensorSpec, TensorSpec) {
    (per_row(logits), per_row(logits))
}

fn mean_meta(logits: &TensorSpec, _: &TensorSpec) -> TensorSpec {
    TensorSpec::new(Shape::new([1]), logits.dtype)
}

// ANCHOR: host
/// Units per cube: a power of two (the tree sum needs it), at most what any GPU allows.
const BLOCK: usize = 128;

/// A fresh, contiguous tensor on `like`'s device.
fn empty(like: &CubeTensor, shape: Shape) -> CubeTensor {
    let bytes = shape.num_elements() * like.dtype.size();
    let handle = like.client.empty(bytes);
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        like.dtype,
    )
}

/// Any tensor as contiguous `[rows, c]` rows of its last dimension, with its shape.
fn as_rows(t: CubeTensor) -> (CubeTensor, Shape, usize, usize) {
    let shape = t.shape();
    let c = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / c;
    let t = CubeBackend::float_reshape(into_contiguous(t), Shape::new([rows, c]));
    (t, shape, rows, c)
}

impl GpuKernels for CubeBackend {
    fn gpu_layer_norm_forward(
        x: CubeTensor,
        gamma: CubeTensor,
        beta: CubeTensor,
        eps: f64,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let (x, shape, rows, c) = as_rows(x);
        let y = empty(&x, Shape::new([rows, c]));
        let (mean, rstd) = (empty(&x, Shape::new([rows])), empty(&x, Shape::new([rows])));
        let (client, dtype) = (x.client.clone(), x.dtype);
        kernels::layer_norm_forward::launch(
            &client,
            CubeCount::Static(rows as u32, 1, 1), // one cube per row
            CubeDim::new_1d(BLOCK as u32),
            x.into_tensor_arg(),
            into_contiguous(gamma).into_tensor_arg(),
            into_contiguous(beta).into_tensor_arg(),
            y.clone().into_tensor_arg(),
            mean.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            eps as f32,
            BLOCK,
            dtype_to_storage_type(dtype),
        );
        (CubeBackend::float_reshape(y, shape), mean, rstd)
    }

    fn gpu_layer_norm_backward(
        x: CubeTensor,
        gamma: CubeTensor,
        mean: CubeTensor,
        rstd: CubeTensor,
        dy: CubeTensor,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let (x, shape, rows, c) = as_rows(x);
        let (dy, ..) = as_rows(dy);
        let (dx, dy_xhat) = (
            empty(&x, Shape::new([rows, c])),
            empty(&x, Shape::new([rows, c])),
        );
        let (client, dtype) = (x.client.clone(), x.dtype);
        kernels::layer_norm_backward::launch(
            &client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(BLOCK as u32),
            x.into_tensor_arg(),
            into_contiguous(gamma).into_tensor_arg(),
            mean.into_tensor_arg(),
            rstd.into_tensor_arg(),
            dy.clone().into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            dy_xhat.clone().into_tensor_arg(),
            BLOCK,
            dtype_to_storage_type(dtype),
        );
        // The parameters' gradients are column sums over the rows: Burn's reduction.
        let column_sum =
            |t| CubeBackend::float_reshape(CubeBackend::float_sum_dim(t, 0), Shape::new([c]));
        (
            CubeBackend::float_reshape(dx, shape),
            column_sum(dy_xhat),
            column_sum(dy),
        )
    }

    fn gpu_gelu_forward(x: CubeTensor, approximate: bool) -> CubeTensor {
        let x = into_contiguous(x);
        let y = empty(&x, x.shape());
        let (client, dtype, n) = (x.client.clone(), x.dtype, x.shape().num_elements());
        let units = CubeDim::new_1d(256);
        kernels::gelu_forward::launch(
            &client,
            calculate_cube_count_elemwise(&client, n, units), // one unit per element
            units,
            x.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            approximate,
            dtype_to_storage_type(dtype),
        );
        y
    }

    fn gpu_gelu_backward(x: CubeTensor, dy: CubeTensor, approximate: bool) -> CubeTensor {
        let (x, dy) = (into_contiguous(x), into_contiguous(dy));
        let dx = empty(&x, x.shape());
        let (client, dtype, n) = (x.client.clone(), x.dtype, x.shape().num_elements());
        let units = CubeDim::new_1d(256);
        kernels::gelu_backward::launch(
            &client,
            calculate_cube_count_elemwise(&client, n, units),
            units,
            x.into_tensor_arg(),
            dy.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            approximate,
            dtype_to_storage_type(dtype),
        );
        dx
    }

    fn gpu_step_marker(x: CubeTensor) -> CubeTensor {
        let x = into_contiguous(x);
        let client = x.client.clone();
        kernels::step_marker::launch(
            &client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(32),
            x.clone().into_tensor_arg(),
            dtype_to_storage_type(x.dtype),
        );
        x
    }

    fn gpu_cross_entropy_forward(
        logits: CubeTensor,
        targets: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        let (logits, _, rows, _) = as_rows(logits);
        let targets = into_contiguous(targets);
        let (loss, lse) = (
            empty(&logits, Shape::new([rows])),
            empty(&logits, Shape::new([rows])),
        );
        let (client, dtypes) = (logits.client.clone(), [logits.dtype, targets.dtype]);
        kernels::cross_entropy_forward::launch(
            &client,
            CubeCount::Static(rows as u32, 1, 1), // one cube per row
            CubeDim::new_1d(BLOCK as u32),
            logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            loss.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            BLOCK,
            dtypes.map(dtype_to_storage_type),
        );
        (loss, lse)
    }

    fn gpu_cross_entropy_backward(
        logits: CubeTensor,
        targets: CubeTensor,
        lse: CubeTensor,
        dloss: CubeTensor,
    ) -> CubeTensor {
        let (logits, shape, ..) = as_rows(logits);
        let dlogits = empty(&logits, logits.shape());
        let (client, n) = (logits.client.clone(), logits.shape().num_elements());
        let dtypes = [logits.dtype, targets.dtype];
        let units = CubeDim::new_1d(256);
        kernels::cross_entropy_backward::launch(
            &client,
            calculate_cube_count_elemwise(&client, n, units), // one unit per element
            units,
            logits.into_tensor_arg(),
            into_contiguous(targets).into_tensor_arg(),
            lse.into_tensor_arg(),
            into_contiguous(dloss).into_tensor_arg(),
            dlogits.clone().into_tensor_arg(),
            dtypes.map(dtype_to_storage_type),
        );
        CubeBackend::float_reshape(dlogits, shape)
    }
}
// ANCHOR_END: host

/// Inference: the forward kernel, its statistics dropped.
impl GpuOps for CubeBackend {
    fn gpu_layer_norm(x: CubeTensor, gamma: CubeTensor, beta: CubeTensor, eps: f64) -> CubeTensor {
        <Self as GpuKernels>::gpu_layer_norm_forward(x, gamma, beta, eps).0
    }

    fn gpu_gelu(x: CubeTensor, approximate: bool) -> CubeTensor {
        <Self as GpuKernels>::gpu_gelu_forward(x, approximate)
    }

    fn gpu_cross_entropy(logits: CubeTensor, targets: CubeTensor) -> CubeTensor {
        let (loss, _) = <Self as GpuKernels>::gpu_cross_entropy_forward(logits, targets);
        CubeBackend::float_mean(loss)
    }
}

// ANCHOR: autodiff
/// Training: the forward kernel, and a node on the tape that keeps `x`, `gamma` and the row
/// statistics for the backward kernel.
impl<C: CheckpointStrategy> GpuOps for Autodiff<Cube, C> {
    fn gpu_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormBackward;

        impl Backward<Cube, 3> for LayerNormBackward {
            // x, gamma, mean and rstd
            type State = (
                FloatTensor<Cube>,
                FloatTensor<Cube>,
                FloatTensor<Cube>,
                FloatTensor<Cube>,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<Cube>(&ops.node);
                let (x, gamma, mean, rstd) = ops.state;
                let (dx, dgamma, dbeta) =
                    <Cube as GpuKernels>::gpu_layer_norm_backward(x, gamma, mean, rstd, dy);
                let [px, pg, pb] = ops.parents;
                for (parent, grad) in [(px, dx), (pg, dgamma), (pb, dbeta)] {
                    if let Some(parent) = parent {
                        grads.register::<Cube>(parent.id, grad);
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
                let (x, gamma) = (x.primitive().clone(), gamma.primitive().clone());
                let (y, mean, rstd) = <Cube as GpuKernels>::gpu_layer_norm_forward(
                    x.clone(),
                    gamma.clone(),
                    beta.primitive().clone(),
                    eps,
                );
                prep.finish((x, gamma, mean, rstd), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(<Cube as GpuOps>::gpu_layer_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                eps,
            )),
        }
    }

    fn gpu_gelu(x: FloatTensor<Self>, approximate: bool) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward {
            approximate: bool,
        }

        impl Backward<Cube, 1> for GeluBackward {
            type State = FloatTensor<Cube>; // x

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<Cube>(&ops.node);
                let dx = <Cube as GpuKernels>::gpu_gelu_backward(ops.state, dy, self.approximate);
                let [parent] = ops.parents;
                if let Some(parent) = parent {
                    grads.register::<Cube>(parent.id, dx);
                }
            }
        }

        match (GeluBackward { approximate })
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.primitive().clone();
                let y = <Cube as GpuKernels>::gpu_gelu_forward(x.clone(), approximate);
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(<Cube as GpuOps>::gpu_gelu(x.into_primitive(), approximate))
            }
        }
    }

    fn gpu_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CrossEntropyBackward;

        impl Backward<Cube, 1> for CrossEntropyBackward {
            // logits, targets, each row's log-sum-exp
            type State = (FloatTensor<Cube>, IntTensor<Cube>, FloatTensor<Cube>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dloss = grads.consume::<Cube>(&ops.node); // [1]
                let (logits, targets, lse) = ops.state;
                if let [Some(parent)] = ops.parents {
                    let dlogits = <Cube as GpuKernels>::gpu_cross_entropy_backward(
                        logits, targets, lse, dloss,
                    );
                    grads.register::<Cube>(parent.id, dlogits);
                }
            }
        }

        match CrossEntropyBackward
            .prepare::<C>([logits.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let logits = logits.primitive().clone();
                let (loss, lse) = <Cube as GpuKernels>::gpu_cross_entropy_forward(
                    logits.clone(),
                    targets.clone(),
                );
                prep.finish((logits, targets, lse), Cube::float_mean(loss))
            }
            OpsKind::UnTracked(prep) => prep.finish(<Cube as GpuOps>::gpu_cross_entropy(
                logits.into_primitive(),
                targets,
            )),
        }
    }
}
// ANCHOR_END: autodiff
