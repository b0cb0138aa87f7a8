//! Chapter 10 as a notebook: a kernel of the course's own on the GPU, in CubeCL, checked
//! against Burn's operations forward and backward, then a model trained with it.
//!
//! Run: `cargo run --release --bin ch10_gpu -- --backend wgpu` (any GPU backend; on a CPU
//! backend the kernels fall back to chapter 5's, and the notebook says so).

use anyhow::Result;
use burn::nn::LayerNormConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use clap::Parser;
use course::ch03_gpt::Kernels;
use course::ch04_pretrain::bench::{StepTimes, time_steps};
use course::ch04_pretrain::known_preset;
use course::ch05_fast::train_twice;
use course::ch10_gpu::{GPU, gpu_available};
use course::common::cli::CommonArgs;
use course::common::report::{Machine, plot_curves, write_json};
use course::common::{max_rel_diff, section};
use serde::Serialize;
use std::time::Instant;

const CHAPTER: &str = "ch10_gpu";

/// Chapter 10: fast training on a GPU.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Whose shapes to time: tiny, baby, medium or lecture.
    #[arg(long, default_value = "baby")]
    preset: String,
    /// Repetitions of each kernel timing (median).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    reps: u64,
    /// Training steps of the side-by-side run in section 10.3.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    train_steps: u64,
    /// Timed training steps per kernel choice in section 10.4 (0 skips it).
    #[arg(long, default_value_t = 5)]
    bench_steps: usize,
}

#[derive(Serialize)]
struct Summary {
    machine: Machine,
    backend: String,
    preset: String,
    gpu_kernels_run_here: bool,
    /// Largest relative differences from Burn's LayerNorm: output, dx, dgamma.
    layer_norm_errors: [f32; 3],
    /// Milliseconds for a forward and backward pass: Burn's, the GPU kernel's.
    layer_norm_ms: [f64; 2],
    /// GPT-2's tanh GELU: the largest relative differences from Burn's (y, dx), and times.
    gelu_errors: [f32; 2],
    gelu_ms: [f64; 2],
    /// Cross-entropy: the largest relative differences from Burn's (loss, dlogits), and times.
    cross_entropy_errors: [f32; 2],
    cross_entropy_ms: [f64; 2],
    training_max_loss_diff: f64,
    steps: Vec<(String, StepTimes)>,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        let run = args
            .common
            .start(CHAPTER, "Chapter 10: fast training on a GPU", None)?;
        let cfg = known_preset(&args.preset, run.data.tokenizer.vocab_size())?;
        run.data.check_block_size(cfg.model.block_size)?;
        let here = where_the_kernels_run(&run.device);
        let shape = [cfg.batch_size, cfg.model.block_size, cfg.model.n_embd];
        let ad = run.device.clone().autodiff();
        let (layer_norm_errors, layer_norm_ms) =
            layer_norm_on_the_gpu(&ad, shape, args.reps as usize);
        let (gelu_errors, gelu_ms) =
            gelu_on_the_gpu(&ad, [shape[0], shape[1], 4 * shape[2]], args.reps as usize); // the MLP's width
        let logits = [shape[0], shape[1], cfg.model.vocab_size];
        let (cross_entropy_errors, cross_entropy_ms) =
            cross_entropy_on_the_gpu(&ad, logits, args.reps as usize);
        let training_max_loss_diff = the_same_training(&run, args.train_steps as usize)?;
        let mut steps = Vec::new();
        if args.bench_steps > 0 {
            section("10.4", &format!("Training steps ({})", args.preset));
            for kernels in [Kernels::BURN, GPU] {
                let device = run.device.clone().autodiff();
                let model = cfg.model.init(&device).with_kernels(kernels);
                let t = time_steps(&cfg, model, &run.data, 1, args.bench_steps)?;
                println!(
                    "{:<5} first step {:>8.0} ms, then {:>8.1} ms/step ({:.0} tokens/s)",
                    kernels.name(),
                    t.first_step_ms,
                    t.median_ms_per_step,
                    t.tokens_per_s
                );
                steps.push((kernels.name().to_string(), t));
            }
        }
        let summary = Summary {
            machine: Machine::detect(here),
            backend: run.backend.to_string(),
            preset: args.preset.clone(),
            gpu_kernels_run_here: here,
            layer_norm_errors,
            layer_norm_ms,
            gelu_errors,
            gelu_ms,
            cross_entropy_errors,
            cross_entropy_ms,
            training_max_loss_diff,
            steps,
        };
        write_json(&run.out.join("summary.json"), &summary)?;
        println!("{}: summary.json, same_training.svg", run.out.display());
        Ok(())
    })
}

// ANCHOR: where
/// 10.1: the device, and whether chapter 10's kernels run on it.
fn where_the_kernels_run(device: &Device) -> bool {
    section("10.1", "Where the kernels run");
    let here = gpu_available(device);
    match here {
        true => println!("{device:?}: a GPU backend (CubeCL): chapter 10's kernels run here"),
        false => println!(
            "{device:?}: not a GPU backend; the GPU kernels fall back to chapter 5's (pass \
             --backend wgpu, vulkan, cuda or metal)"
        ),
    }
    here
}
// ANCHOR_END: where

// ANCHOR: layer_norm_on_the_gpu
/// 10.2: LayerNorm at the model's shape, the GPU kernel against Burn's composed operations:
/// the largest differences in the output and the gradients, and the time of a forward and
/// backward pass (median of `reps`, after one that compiles the kernels).
fn layer_norm_on_the_gpu(ad: &Device, shape: [usize; 3], reps: usize) -> ([f32; 3], [f64; 2]) {
    section("10.2", "Three kernels against Burn's");
    let c = shape[2];
    let ln = LayerNormConfig::new(c).init(ad);
    let x0 = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), ad);
    let w = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), ad);
    let run = |k: Kernels| {
        let x = x0.clone().require_grad();
        let y = k.layer_norm(&ln, x.clone()); // [b, t, c]
        let grads = (y.clone() * w.clone()).sum().backward();
        let dgamma = ln.gamma.val().grad(&grads).expect("gamma's gradient");
        let dx = x.grad(&grads).expect("x's gradient");
        let floats = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let dgamma = dgamma
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        [floats(y), floats(dx), dgamma] // reading back waits for the device
    };
    let (ours, burns) = (run(GPU), run(Kernels::BURN));
    let errors = [0, 1, 2].map(|i| max_rel_diff(&ours[i], &burns[i]));
    println!(
        "LayerNorm of {shape:?}: largest difference from Burn's: y {:.1e}, dx {:.1e}, dgamma {:.1e}",
        errors[0], errors[1], errors[2]
    );
    let ms = [
        median_ms(reps, || run(Kernels::BURN)),
        median_ms(reps, || run(GPU)),
    ];
    println!(
        "forward + backward (with reading back): Burn's {:.2} ms, the GPU kernel's {:.2} ms",
        ms[0], ms[1]
    );
    (errors, ms)
}

/// GPT-2's GELU (the tanh form) at the MLP's shape, as LayerNorm above.
fn gelu_on_the_gpu(ad: &Device, shape: [usize; 3], reps: usize) -> ([f32; 2], [f64; 2]) {
    let gelu = burn::nn::Gelu { approximate: true };
    let x0 = Tensor::<3>::random(shape, Distribution::Normal(0.0, 2.0), ad);
    let w = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), ad);
    let run = |k: Kernels| {
        let x = x0.clone().require_grad();
        let y = k.gelu(&gelu, x.clone()); // [b, t, 4c]
        let grads = (y.clone() * w.clone()).sum().backward();
        let floats = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        [floats(y), floats(x.grad(&grads).expect("x's gradient"))]
    };
    let (ours, burns) = (run(GPU), run(Kernels::BURN));
    let errors = [0, 1].map(|i| max_rel_diff(&ours[i], &burns[i]));
    println!(
        "GELU (tanh form) of {shape:?}: largest difference from Burn's: y {:.1e}, dx {:.1e}",
        errors[0], errors[1]
    );
    let ms = [
        median_ms(reps, || run(Kernels::BURN)),
        median_ms(reps, || run(GPU)),
    ];
    println!(
        "forward + backward (with reading back): Burn's {:.2} ms, the GPU kernel's {:.2} ms",
        ms[0], ms[1]
    );
    (errors, ms)
}
/// The mean cross-entropy of the model's logits, as LayerNorm above.
fn cross_entropy_on_the_gpu(ad: &Device, shape: [usize; 3], reps: usize) -> ([f32; 2], [f64; 2]) {
    let [b, t, v] = shape;
    let logits0 = Tensor::<3>::random(shape, Distribution::Normal(0.0, 3.0), ad);
    let targets = Tensor::<2, Int>::random([b, t], Distribution::Uniform(0.0, v as f64), ad);
    let run = |k: Kernels| {
        let logits = logits0.clone().require_grad();
        let loss = k.cross_entropy(logits.clone(), targets.clone()); // [1]
        let grads = loss.clone().backward();
        let floats = |t: TensorData| t.convert::<f32>().try_to_vec::<f32>().unwrap();
        let dlogits = logits.grad(&grads).expect("the logits' gradient");
        [floats(loss.into_data()), floats(dlogits.into_data())]
    };
    let (ours, burns) = (run(GPU), run(Kernels::BURN));
    let errors = [0, 1].map(|i| max_rel_diff(&ours[i], &burns[i]));
    println!(
        "cross-entropy of {shape:?}: largest difference from Burn's: loss {:.1e}, dlogits {:.1e}",
        errors[0], errors[1]
    );
    let ms = [
        median_ms(reps, || run(Kernels::BURN)),
        median_ms(reps, || run(GPU)),
    ];
    println!(
        "forward + backward (with reading back): Burn's {:.2} ms, the GPU kernel's {:.2} ms",
        ms[0], ms[1]
    );
    (errors, ms)
}
// ANCHOR_END: layer_norm_on_the_gpu

/// The median time of `reps` calls of `f`, after one untimed call (which compiles kernels).
fn median_ms<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut ms: Vec<f64> = (0..=reps)
        .map(|_| {
            let tick = Instant::now();
            f();
            tick.elapsed().as_secs_f64() * 1e3
        })
        .skip(1)
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

/// 10.3: the tiny model trained twice from the same weights and batches, with Burn's
/// operations and with the GPU kernels.
fn the_same_training(run: &course::common::Run, steps: usize) -> Result<f64> {
    section("10.3", "The same training run with either kernels");
    let (curves, diff) = train_twice(run, steps, [Kernels::BURN, GPU])?;
    let last = |i: usize| curves[i].1.last().map_or(f64::NAN, |p| p.1);
    println!(
        "{steps} steps: last loss {:.4} (Burn) vs {:.4} (GPU kernels); largest difference at \
         any step {diff:.1e}",
        last(0),
        last(1)
    );
    plot_curves(
        &run.out.join("same_training.svg"),
        "Training loss with Burn's operations and with the GPU kernels",
        "step",
        &curves,
    )?;
    Ok(diff)
}
