//! Chapter 10 as a notebook: a kernel of the course's own on the GPU, in CubeCL, checked
//! against Burn's operations forward and backward, then a model trained with it.
//!
//! Run: `cargo run --release --bin ch10_gpu -- --backend wgpu` (any GPU backend; on a CPU
//! backend the kernels fall back to chapter 5's, and the notebook says so).

use anyhow::{Context, Result};
use burn::nn::LayerNormConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use clap::Parser;
use course::ch03_gpt::Kernels;
use course::ch04_pretrain::bench::{StepTimes, time_steps};
use course::ch04_pretrain::known_preset;
use course::ch05_fast::train_twice;
use course::ch10_gpu::profile::last_step;
use course::ch10_gpu::{GPU, gpu_available, mark_step};
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
    /// Section 10.4 also counts the kernels a training step launches, per kernel, from
    /// CubeCL's profile log (four more runs of this binary, on a GPU backend).
    #[arg(long)]
    profile: bool,
    /// Internal, for `--profile`: only train this many steps with `--profile-kernels`.
    #[arg(long, hide = true)]
    profile_child: Option<usize>,
    #[arg(long, hide = true, default_value = "gpu")]
    profile_kernels: String,
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
    /// Per kernel choice, the launches of one training step, per kernel.
    launches_per_step: Vec<(String, Vec<(String, usize)>)>,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        let run = args
            .common
            .start(CHAPTER, "Chapter 10: fast training on a GPU", None)?;
        let cfg = known_preset(&args.preset, run.data.tokenizer.vocab_size())?;
        run.data.check_block_size(cfg.model.block_size)?;
        if let Some(steps) = args.profile_child {
            let kernels = if args.profile_kernels == "burn" {
                Kernels::BURN
            } else {
                GPU
            };
            return marked_steps(&cfg, &run, kernels, steps);
        }
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
        let mut launches_per_step = Vec::new();
        if args.profile && here {
            for kernels in ["burn", "gpu"] {
                let rows = launches_of_a_step(&args, &run, kernels)?;
                let total: usize = rows.iter().map(|r| r.1).sum();
                let top: Vec<String> = (rows.iter().take(6))
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                println!(
                    "{kernels:<5} {total} kernel launches per step; most: {}",
                    top.join(", ")
                );
                launches_per_step.push((kernels.to_string(), rows));
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
            launches_per_step,
        };
        write_json(&run.out.join("summary.json"), &summary)?;
        println!("{}: summary.json, same_training.svg", run.out.display());
        Ok(())
    })
}

// ANCHOR: launches_of_a_step
/// The kernels one training step launches, per kernel: this binary run again with CubeCL's
/// profile log on, for 3 training steps with a marker kernel after each; the launches between
/// the last two markers are a whole step's, after the first step's compiling and tuning.
fn launches_of_a_step(
    args: &Args,
    run: &course::common::Run,
    kernels: &str,
) -> Result<Vec<(String, usize)>> {
    let dir = run.out.join("profile");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join(format!("{kernels}.log"));
    let _ = std::fs::remove_file(&log);
    let mut child = std::process::Command::new(std::env::current_exe()?);
    child
        .env("CUBECL_DEBUG_OPTION", "profile")
        .env("CUBECL_DEBUG_LOG", &log)
        .args(["--backend", &args.common.backend.to_string()])
        .args([
            "--preset",
            &args.preset,
            "--seed",
            &args.common.seed.to_string(),
        ])
        .arg("--out")
        .arg(&dir)
        .args(["--profile-child", "3", "--profile-kernels", kernels]);
    if let Some(data) = &args.common.data {
        child.arg("--data").arg(data);
    }
    let out = child.output()?;
    anyhow::ensure!(
        out.status.success(),
        "the profiled run failed: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    last_step(&std::fs::read_to_string(&log)?)
        .context("the profile log has no two step markers (is CubeCL's profiling on?)")
}

/// `steps` training steps, each followed by a marker kernel (for `launches_of_a_step`).
fn marked_steps(
    cfg: &course::ch04_pretrain::PretrainConfig,
    run: &course::common::Run,
    kernels: Kernels,
    steps: usize,
) -> Result<()> {
    let device = run.device.clone().autodiff();
    let mut model = cfg.model.init(&device).with_kernels(kernels);
    let mut optim = course::ch04_pretrain::optimizer(cfg);
    let settings = course::ch04_pretrain::train_settings(cfg, None);
    for step in 0..steps {
        let lr = course::ch04_pretrain::learning_rate(cfg, step);
        let next =
            course::common::train::train_step(model, &mut optim, &run.data, &settings, step, lr);
        model = next.0;
        mark_step(&run.device);
    }
    Ok(())
}
// ANCHOR_END: launches_of_a_step

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
