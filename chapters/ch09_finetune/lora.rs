//! LoRA (Hu et al., 2021): the pre-trained weight `W` is frozen and learns through a low-rank
//! update, `W + (alpha / r) A B` with `A: [in, r]` and `B: [r, out]`; `B` starts at zero, so
//! training starts from the pre-trained model exactly. Burn 0.22 implements it as a
//! reparameterisation of any `Param` (`Module::apply_lora`); this file chooses where, counts
//! what trains, and merges the update back into `W` for inference.

use super::classify::LoraSettings;
use crate::ch03_gpt::GptConfig;
use burn::module::{Lora, Module, ModuleVisitor, Param, ParamGroup};
use burn::prelude::*;

// ANCHOR: lora_on_blocks
/// The four weight matrices of every block: attention's `c_attn` and `c_proj`, the MLP's
/// `c_fc` and `c_proj`. Embeddings, LayerNorms, biases and the head get no adapter.
pub fn lora_on_blocks(s: LoraSettings) -> Lora {
    let targets = ParamGroup::from_any_predicates(vec![
        "attn.c_attn.weight",
        "attn.c_proj.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    ]);
    Lora::new(s.rank, s.alpha).set_param_group(targets)
}

/// What LoRA trains in a model of shape `config`: `r (in + out)` per adapted matrix, which for
/// one block's four is `r (c + 3c) + r (c + c) + r (c + 4c) + r (4c + c) = 16 r c`.
pub fn lora_params(config: &GptConfig, rank: usize) -> usize {
    16 * rank * config.n_embd * config.n_layer
}
// ANCHOR_END: lora_on_blocks

// ANCHOR: trainable
/// Counts the numbers in a module's parameters: all of them, and those that train (that
/// require a gradient). A LoRA-adapted weight shows up as its frozen base and its two factors.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCount {
    pub total: usize,
    pub trainable: usize,
}

impl ModuleVisitor for ParamCount {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let base = param.base();
        let n = base.shape().num_elements();
        self.total += n;
        if base.is_require_grad() {
            self.trainable += n;
        }
    }
}

pub fn count_params<M: Module>(model: &M) -> ParamCount {
    let mut count = ParamCount::default();
    model.visit(&mut count);
    count
}
// ANCHOR_END: trainable

/// Every parameter's values, in the order the module visits them (to see which changed).
pub fn param_values<M: Module>(model: &M) -> Vec<(bool, Vec<f32>)> {
    struct Values(Vec<(bool, Vec<f32>)>);
    impl ModuleVisitor for Values {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let base = param.base();
            let trains = base.is_require_grad();
            let v = base.into_data().convert::<f32>().try_to_vec::<f32>();
            self.0.push((trains, v.expect("f32 parameter")));
        }
    }
    let mut values = Values(Vec::new());
    model.visit(&mut values);
    values.0
}

// ANCHOR: merge
/// The adapted model with every update folded into its weight, `W' = W + (alpha / r) A B`,
/// and the adapters gone: inference then costs what the original model costs.
pub fn merge<M: Module>(model: M) -> M {
    model.materialize()
}
// ANCHOR_END: merge
