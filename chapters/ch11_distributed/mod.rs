//! Chapter 11: data-parallel training across processes and machines. Every rank holds the
//! whole model and takes its own slice of each global batch; the ranks average their
//! gradients with an all-reduce and take one identical AdamW step, so the replicas stay equal
//! and p ranks train the model one rank would train on the same global batch.

pub mod comm;
pub mod dropout;
pub mod ring;

use crate::ch03_gpt::Gpt;
use crate::ch04_pretrain::checkpoint::{self, Meta};
use crate::ch04_pretrain::{PretrainConfig, learning_rate};
use crate::ch08_pretrained::tokenizer::Tokenizer;
use crate::common::dataset::{Dataset, Split, ids_tensor, rng_for, stream};
use crate::common::train::{
    LanguageModel, LossRecord, StepRecord, TrainReport, clip_grad_norm, model_device,
};
use anyhow::{Result, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
pub use comm::{Collective, Solo, broadcast_bytes, broadcast_result, connect};
use dropout::SampleDropout;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

// ANCHOR: shard
/// The samples `rank` holds of a global batch of `batch` samples shared by `size` ranks: a
/// contiguous slice, the same size on every rank.
pub fn shard(batch: usize, rank: usize, size: usize) -> Range<usize> {
    let n = batch / size;
    rank * n..(rank + 1) * n
}

/// Refuses a global batch the ranks cannot share equally.
pub fn check_batch(batch: usize, size: usize) -> Result<()> {
    if size == 0 || !batch.is_multiple_of(size) {
        bail!(
            "the global batch ({batch}) must be a multiple of the number of ranks ({size}): each \
             rank takes batch / ranks samples (change --batch-size or the number of ranks)"
        );
    }
    Ok(())
}
// ANCHOR_END: shard

// ANCHOR: all_reduce
/// Averages every rank's gradients: all of them copied into one flat buffer (parameter by
/// parameter, in the model's order, the same on every rank), summed over the ranks in
/// buckets of `bucket` values, divided by the number of ranks, and put back. Returns the
/// averaged gradients and the seconds all this took (copies and any wait for a slower rank
/// included).
pub fn all_reduce_mean<M: Module>(
    mut grads: GradientsParams,
    model: &M,
    comm: &dyn Collective,
    bucket: usize,
) -> (GradientsParams, f64) {
    if comm.size() == 1 {
        return (grads, 0.0); // the mean of one is itself
    }
    let tick = Instant::now();
    let mut flat = Flatten {
        grads: &mut grads,
        values: Vec::new(),
        device: None,
    };
    model.visit(&mut flat);
    let (mut values, device) = (flat.values, flat.device);
    for chunk in values.chunks_mut(bucket.max(1)) {
        comm.all_reduce_sum(chunk); // [bucket], summed over the ranks
    }
    let scale = 1.0 / comm.size() as f32;
    values.iter_mut().for_each(|g| *g *= scale);
    if let Some(device) = device {
        model.visit(&mut Unflatten {
            grads: &mut grads,
            values: &values,
            offset: 0,
            device,
        });
    }
    (grads, tick.elapsed().as_secs_f64())
}

/// Takes each gradient out of `grads` into `values` (zeros for a parameter without one, so
/// that every rank's buffer has the same layout).
struct Flatten<'a> {
    grads: &'a mut GradientsParams,
    values: Vec<f32>,
    device: Option<Device>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        match self.grads.remove::<D>(param.id) {
            Some(g) => {
                self.device.get_or_insert_with(|| g.device());
                let data = g.into_data().convert::<f32>();
                self.values
                    .extend_from_slice(data.as_slice::<f32>().expect("f32"));
            }
            None => {
                let n = param.val().shape().num_elements();
                self.values.extend(std::iter::repeat_n(0.0, n));
            }
        }
    }
}

/// Puts the averaged values back as each parameter's gradient, in the same order.
struct Unflatten<'a> {
    grads: &'a mut GradientsParams,
    values: &'a [f32],
    offset: usize,
    device: Device,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.val().shape();
        let n = shape.num_elements();
        let values = self.values[self.offset..self.offset + n].to_vec();
        self.offset += n;
        let g = Tensor::<D>::from_data(TensorData::new(values, shape), &self.device);
        self.grads.register(param.id, g);
    }
}
// ANCHOR_END: all_reduce

// ANCHOR: replicas
/// A fingerprint of every weight of `model` (FNV-1a over the bits of each value, parameter by
/// parameter): equal on two ranks exactly when their weights are, bit for bit.
pub fn weights_hash<M: Module>(model: &M) -> u64 {
    struct Hash(u64);
    impl ModuleVisitor for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data().convert::<f32>();
            for v in data.as_slice::<f32>().expect("f32") {
                for byte in v.to_bits().to_le_bytes() {
                    self.0 = (self.0 ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
    }
    let mut h = Hash(0xcbf2_9ce4_8422_2325);
    model.visit(&mut h);
    h.0
}

/// Checks that every rank holds the same weights; an error names the ranks that differ.
pub fn check_replicas<M: Module>(model: &M, comm: &dyn Collective, step: usize) -> Result<u64> {
    let hashes = comm.all_gather_u64(weights_hash(model));
    let differ: Vec<String> = (1..hashes.len())
        .filter(|&r| hashes[r] != hashes[0])
        .map(|r| r.to_string())
        .collect();
    if !differ.is_empty() {
        bail!(
            "the replicas diverged at step {step}: the weights of rank(s) {} differ from rank 0's",
            differ.join(", ")
        );
    }
    Ok(hashes[0])
}

/// Rank 0's model on every rank: its weights (and parameter ids) travel as the bytes of a
/// checkpoint and replace the others'.
pub fn broadcast_model(model: Gpt, comm: &dyn Collective) -> Result<Gpt> {
    if comm.size() == 1 {
        return Ok(model);
    }
    let mine = (comm.rank() == 0).then(|| model.clone().into_record().into_bytes());
    let bytes = broadcast_result(comm, mine.map(|r| Ok(r?.to_vec())))?;
    if comm.rank() == 0 {
        return Ok(model);
    }
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|e| anyhow::anyhow!("rank 0's weights did not arrive whole: {e:?}"))?;
    model
        .try_load_record(record)
        .map_err(|e| anyhow::anyhow!("rank 0's weights do not fit this rank's model: {e:?}"))
}

/// Rank 0's optimizer state on every rank (after a resume: only rank 0 reads the checkpoint).
pub fn broadcast_optimizer(
    optim: ModuleOptimizer,
    comm: &dyn Collective,
) -> Result<ModuleOptimizer> {
    if comm.size() == 1 {
        return Ok(optim);
    }
    let mine = (comm.rank() == 0).then(|| optim.into_bytes());
    let bytes = broadcast_result(comm, mine.map(|r| Ok(r?.to_vec())))?;
    if comm.rank() == 0 {
        return Ok(optim);
    }
    optim
        .from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|e| anyhow::anyhow!("rank 0's optimizer state did not arrive whole: {e:?}"))
}
// ANCHOR_END: replicas

/// What every rank trains with.
pub struct Job<'a> {
    pub comm: &'a dyn Collective,
    pub cfg: &'a PretrainConfig,
    pub data: &'a Dataset<Tokenizer>,
    /// Where the next dropout mask is (see [`dropout`]).
    pub dropout: &'a SampleDropout,
    /// Values per all-reduce call.
    pub bucket: usize,
}

/// One data-parallel step, as one rank saw it.
#[derive(Clone, Copy, Debug)]
pub struct StepOut {
    /// The global batch's mean loss (the mean of the ranks' means).
    pub loss: f64,
    /// The norm of the averaged gradient, before clipping.
    pub grad_norm: f64,
    /// Seconds in the gradients' all-reduce.
    pub all_reduce: f64,
}

// ANCHOR: step
/// One optimizer step of data-parallel training, on every rank at once.
pub fn data_parallel_step(
    model: Gpt,
    optim: &mut ModuleOptimizer,
    job: &Job,
    step: usize,
) -> (Gpt, StepOut) {
    let (comm, cfg) = (job.comm, job.cfg);
    let (b, t) = (cfg.batch_size, cfg.model.block_size);
    // 1. Every rank draws the whole global batch of this step (the same on every rank: it
    //    depends only on (seed, step)) and keeps its own slice of it.
    let mut rng = rng_for(cfg.seed, stream::TRAIN, step);
    let (x, y) = job.data.sample_ids(Split::Train, b, t, &mut rng); // [b * t] each
    let mine = shard(b, comm.rank(), comm.size());
    let rows = mine.start * t..mine.end * t;
    let device = model_device(&model);
    let x = ids_tensor(x[rows.clone()].to_vec(), [mine.len(), t], &device); // [b / p, t]
    let y = ids_tensor(y[rows].to_vec(), [mine.len(), t], &device);
    // 2. Forward and backward on the slice, dropout masks drawn per global sample.
    job.dropout.begin(step, mine.start);
    let loss = model.loss(x, y); // [1], the mean over this rank's slice
    let mut global = [loss.clone().into_scalar::<f32>() as f64];
    comm.all_reduce_sum_f64(&mut global);
    let loss_value = global[0] / comm.size() as f64;
    if !loss_value.is_finite() {
        // Every rank sees the same global loss, so every rank stops here together.
        let out = StepOut {
            loss: loss_value,
            grad_norm: f64::NAN,
            all_reduce: 0.0,
        };
        return (model, out);
    }
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    // 3. The all-reduce: each rank now holds the gradient of the whole batch's mean loss.
    let (grads, all_reduce) = all_reduce_mean(grads, &model, comm, job.bucket);
    // 4. Clipping on the global norm, then the same AdamW step on every rank.
    let clip = (cfg.grad_clip > 0.0).then_some(cfg.grad_clip);
    let (grads, grad_norm) = clip_grad_norm(grads, &model, clip);
    let lr = learning_rate(cfg, step);
    let out = StepOut {
        loss: loss_value,
        grad_norm,
        all_reduce,
    };
    (optim.step(lr, model, grads), out)
}
// ANCHOR_END: step

// ANCHOR: estimate
/// The loss estimate of chapter 4 (`eval_iters` batches of each split, drawn from
/// (seed, step)), its batches shared out among the ranks: batch `i` is rank `i mod p`'s.
/// Every rank draws every batch's ids, so each batch is the one a single rank would use.
pub fn estimate_loss(model: &Gpt, job: &Job, step: usize) -> LossRecord {
    let (comm, cfg) = (job.comm, job.cfg);
    let model = model.valid();
    let device = model_device(&model);
    let (b, t) = (cfg.batch_size, cfg.model.block_size);
    let mut sums = [0.0f64; 2];
    for (sum, (split, purpose)) in sums.iter_mut().zip([
        (Split::Train, stream::EVAL_TRAIN),
        (Split::Val, stream::EVAL_VAL),
    ]) {
        let mut rng = rng_for(cfg.seed, purpose, step);
        for i in 0..cfg.eval_iters {
            let (x, y) = job.data.sample_ids(split, b, t, &mut rng);
            if i % comm.size() == comm.rank() {
                let (x, y) = (
                    ids_tensor(x, [b, t], &device),
                    ids_tensor(y, [b, t], &device),
                );
                *sum += model.loss(x, y).into_scalar::<f32>() as f64;
            }
        }
    }
    comm.all_reduce_sum_f64(&mut sums);
    let n = cfg.eval_iters as f64;
    LossRecord {
        step,
        train: sums[0] / n,
        val: sums[1] / n,
    }
}
// ANCHOR_END: estimate

/// How long a run goes and where rank 0 keeps its checkpoints.
pub struct Plan {
    /// Steps already done (0, or the resumed checkpoint's step).
    pub start: usize,
    /// End after this step, as if interrupted (with a checkpoint).
    pub stop_after: Option<usize>,
    /// Also save `ckpt/last` every this many steps (0: only at evaluations).
    pub ckpt_interval: usize,
    pub ckpt: PathBuf,
    /// What the checkpoints record as their backend.
    pub backend: String,
}

/// The log rank 0 keeps (and a checkpoint carries): evaluations, steps, the best loss.
#[derive(Clone, Debug, Default)]
pub struct Log {
    pub losses: Vec<LossRecord>,
    pub steps: Vec<StepRecord>,
    pub best_val: f64,
    /// Seconds spent in gradient all-reduces over the steps of this run.
    pub all_reduce_seconds: f64,
}

impl Log {
    pub fn new() -> Self {
        Log {
            best_val: f64::INFINITY,
            ..Default::default()
        }
    }

    fn meta(&self, job: &Job, plan: &Plan, step: usize) -> Meta<Tokenizer> {
        let last = self.losses.last().map_or(f64::NAN, |l| l.val);
        Meta {
            format: checkpoint::FORMAT,
            step,
            config: job.cfg.clone(),
            tokenizer: job.data.tokenizer.clone(),
            val_loss: last,
            best_val_loss: self.best_val,
            losses: self.losses.clone(),
            steps: self.steps.clone(),
            backend: plan.backend.clone(),
        }
    }
}

// ANCHOR: train
/// Trains on every rank from `plan.start` to the config's last step. At every evaluation the
/// ranks check that their weights are still equal; rank 0 alone prints and saves checkpoints
/// (`last` with the optimizer, `best` without), in chapter 4's format.
pub fn train(
    mut model: Gpt,
    optim: &mut ModuleOptimizer,
    job: &Job,
    plan: &Plan,
    log: &mut Log,
) -> Result<(Gpt, TrainReport)> {
    let (comm, cfg) = (job.comm, job.cfg);
    let lead = comm.rank() == 0;
    let mut report = TrainReport::default();
    let started = Instant::now();
    let end = plan.stop_after.map_or(cfg.steps, |s| s.min(cfg.steps));
    let is_eval = |s: usize| s.is_multiple_of(cfg.eval_interval) || s == cfg.steps || s == end;
    let mut saved_at = (plan.start > 0).then_some(plan.start);
    let save = |dir: &str, model: &Gpt, optim: Option<&ModuleOptimizer>, log: &Log, step| {
        let meta = log.meta(job, plan, step);
        checkpoint::save(&plan.ckpt.join(dir), model, optim, &meta)
    };
    for step in plan.start..=end {
        if is_eval(step) && (step > plan.start || plan.start == 0) {
            let record = estimate_loss(&model, job, step);
            check_replicas(&model, comm, step)?;
            log.losses.push(record);
            let improved = record.val < log.best_val;
            log.best_val = log.best_val.min(record.val);
            if lead {
                println!(
                    "step {step:>5}: train loss {:.4}, val loss {:.4}",
                    record.train, record.val
                );
                save("last", &model, Some(optim), log, step)?;
                if improved {
                    save("best", &model, None, log, step)?;
                }
            }
            saved_at = Some(step);
        }
        if step == end {
            break;
        }
        let due = plan.ckpt_interval > 0 && step.is_multiple_of(plan.ckpt_interval);
        if due && saved_at != Some(step) && !log.losses.is_empty() {
            if lead {
                save("last", &model, Some(optim), log, step)?;
            }
            saved_at = Some(step);
        }
        let tick = Instant::now();
        let (next, out) = data_parallel_step(model, optim, job, step);
        model = next;
        if !out.loss.is_finite() {
            bail!(
                "the training loss became {} at step {step}; stopping (try a lower learning \
                 rate; the last checkpoint, if any, is kept)",
                out.loss
            );
        }
        let ms = tick.elapsed().as_secs_f64() * 1e3;
        log.all_reduce_seconds += out.all_reduce;
        let record = StepRecord {
            step,
            loss: out.loss,
            lr: learning_rate(cfg, step),
            grad_norm: out.grad_norm,
            ms,
        };
        log.steps.push(record);
        report.steps.push(record);
        report.train_seconds += ms / 1e3;
    }
    report.losses = log.losses.clone();
    report.wall_seconds = started.elapsed().as_secs_f64();
    let tokens = report.steps.len() * cfg.batch_size * cfg.model.block_size;
    report.tokens_per_second = match tokens {
        0 => 0.0,
        _ => tokens as f64 / report.train_seconds,
    };
    Ok((model, report))
}
// ANCHOR_END: train

/// Resumes `ckpt/last`: rank 0 reads it and sends the weights, the optimizer state and the
/// step to the others, so only rank 0's machine needs the file. The checkpoint may come from
/// a run on any number of ranks, or from chapter 4.
pub fn resume(
    model: Gpt,
    optim: ModuleOptimizer,
    job: &Job,
    ckpt: &std::path::Path,
    log: &mut Log,
) -> Result<(Gpt, ModuleOptimizer, usize)> {
    let comm = job.comm;
    let (device, kernels) = (model_device(&model), model.kernels);
    // Only rank 0 reads the files; the others keep their model and optimizer to load into.
    let (loaded, kept) = match comm.rank() {
        0 => {
            let load = || -> Result<_> {
                let (m, o, meta) =
                    checkpoint::load::<Tokenizer>(&ckpt.join("last"), &device, Some(optim))?;
                checkpoint::check_compatible(&meta, job.cfg, &job.data.tokenizer)?;
                Ok((m.with_kernels(kernels), o.expect("optimizer state"), meta))
            };
            (Some(load()), None)
        }
        _ => (None, Some((model, optim))),
    };
    // The step travels first, with any error rank 0 met, so that every rank stops on it.
    let header = loaded.as_ref().map(|r| match r {
        Ok((_, _, meta)) => Ok((meta.step as u64).to_le_bytes().to_vec()),
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    });
    let step_bytes = broadcast_result(comm, header)?;
    let step = u64::from_le_bytes(step_bytes.try_into().expect("8 bytes")) as usize;
    let (model, optim) = match (loaded, kept) {
        (Some(Ok((m, o, meta))), _) => {
            (log.losses, log.steps, log.best_val) = (meta.losses, meta.steps, meta.best_val_loss);
            (m, o)
        }
        (_, Some(kept)) => kept,
        _ => unreachable!("rank 0 returned above on an error"),
    };
    let model = broadcast_model(model, comm)?;
    let optim = broadcast_optimizer(optim, comm)?;
    Ok((model, optim, step))
}
