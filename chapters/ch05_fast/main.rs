//! Chapter 5 as a notebook: from a profile of a training step to fused operations with their
//! own backward passes, checked against Burn's and timed.
//!
//! Run: `cargo run --release --bin ch05_fast` (flex, the `baby` preset's shapes).

use anyhow::Result;
use burn::nn::Gelu;
use burn::prelude::*;
use clap::Parser;
use course::ch03_gpt::GptConfig;
use course::ch03_gpt::Kernels;
use course::ch04_pretrain::bench::{StepTimes, time_steps};
use course::ch04_pretrain::{PretrainConfig, known_preset};
use course::ch05_fast::gemm::isa_name;
use course::ch05_fast::profile::{
    OpTiming, ProductTime, dropout_ops, fastest, model_ops, trace_products,
};
use course::ch05_fast::{FUSED, fused_available, train_twice};
use course::common::cli::CommonArgs;
use course::common::report::{Machine, plot_curves, write_json};
use course::common::train::human;
use course::common::{Run, section};
use serde::Serialize;

const CHAPTER: &str = "ch05_fast";

/// Chapter 5: fast training with fused operations.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Whose shapes to profile and time: tiny, baby, medium or lecture.
    #[arg(long, default_value = "baby")]
    preset: String,
    /// Repetitions per operation timing (median).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    reps: u64,
    /// Timed training steps per kernel choice in section 5.5 (0 skips it).
    #[arg(long, default_value_t = 20)]
    bench_steps: usize,
    /// Training steps of the side-by-side run in section 5.4.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    train_steps: u64,
}

#[derive(Serialize)]
struct Summary {
    machine: Machine,
    backend: String,
    preset: String,
    fused_runs_here: bool,
    /// The vector instructions the fused kernels and the product ran with ("avx512",
    /// "avx2" or "portable").
    instruction_set: &'static str,
    ops: Vec<OpTiming>,
    max_errors: Vec<(String, f32, f32)>,
    training_max_loss_diff: f64,
    steps: Vec<(String, StepTimes)>,
    /// (n, Burn's GFLOP/s, fused GFLOP/s) of an `n x n` by `n x n` product.
    peak: Vec<(usize, f64, f64)>,
    products: Vec<ProductTime>,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        let run = args
            .common
            .start(CHAPTER, "Chapter 5: fast training", None)?;
        let cfg = known_preset(&args.preset, run.data.tokenizer.vocab_size())?;
        run.data.check_block_size(cfg.model.block_size)?;
        let ad = run.device.clone().autodiff();
        let ops = the_profile(&cfg, &ad, args.reps as usize);
        a_node_on_the_tape(&ad);
        let max_errors = checked_against_burn(&ad);
        let training_max_loss_diff = the_same_training(&run, args.train_steps as usize)?;
        let steps = step_times(&cfg, &run, args.bench_steps)?;
        let peak = the_machines_peak(&run.device, args.reps as usize);
        let products = products_of_a_step(&cfg, &run)?;
        let summary = Summary {
            machine: Machine::detect(false),
            backend: run.backend.to_string(),
            preset: cfg.preset.clone(),
            fused_runs_here: fused_available(&run.device),
            instruction_set: isa_name(),
            ops,
            max_errors,
            training_max_loss_diff,
            steps,
            peak,
            products,
        };
        write_json(&run.out.join("summary.json"), &summary)?;
        println!("\nwrote {}", run.out.join("summary.json").display());
        Ok(())
    })
}

// ANCHOR: profile
/// 5.1: each operation of one layer, forward and backward, at the preset's shapes.
fn the_profile(cfg: &PretrainConfig, ad: &Device, reps: usize) -> Vec<OpTiming> {
    section("5.1", "Where a training step spends its time");
    if !fused_available(ad) {
        println!("(the fused kernels do not run on this backend: both columns are Burn's)");
    }
    println!(
        "the fused kernels' instructions on this CPU: {} (GPT_PORTABLE=1 forces the portable code)",
        isa_name()
    );
    println!(
        "{:<16} {:<30} {:>9} {:>9} {:>8}",
        "operation", "shape", "Burn ms", "fused ms", "speedup"
    );
    let timings: Vec<OpTiming> = model_ops(&cfg.model, cfg.batch_size, ad)
        .iter()
        .map(|case| case.time(reps))
        .collect();
    for t in &timings {
        println!(
            "{:<16} {:<30} {:>9.2} {:>9.2} {:>7.1}x",
            t.op,
            t.shape,
            t.burn_ms,
            t.fused_ms,
            t.burn_ms / t.fused_ms
        );
    }
    println!(
        "(forward + backward, median of {reps}; a step runs each once per layer, and matmul six times)"
    );
    timings
}
// ANCHOR_END: profile

// ANCHOR: tape
/// 5.2: one fused GELU on five numbers, and the gradient its backward pass hands back.
fn a_node_on_the_tape(ad: &Device) {
    section(
        "5.2",
        "A node on the tape: GELU forward, then its hand-written backward",
    );
    let x0 = Tensor::<3>::from_floats([[[-2.0, -1.0, 0.0, 1.0, 2.0]]], ad); // [1, 1, 5]
    for kernels in [Kernels::BURN, FUSED] {
        let x = x0.clone().require_grad();
        let y = kernels.gelu(&Gelu::new(), x.clone());
        let grads = y.clone().sum().backward(); // d(sum y)/dx = GELU'(x)
        let dx = x.grad(&grads).expect("x is tracked");
        println!("{:<5} GELU(x)  = {}", kernels.name(), fmt(y));
        println!("{:<5} GELU'(x) = {}", kernels.name(), fmt(dx));
    }
}

fn fmt(t: Tensor<3>) -> String {
    let v = t.into_data().try_to_vec::<f32>().expect("f32 values");
    v.iter()
        .map(|x| format!("{x:>9.6}"))
        .collect::<Vec<_>>()
        .join(" ")
}
// ANCHOR_END: tape

// ANCHOR: checks
/// 5.3: every fused operation against Burn's, on a small model with odd sizes.
fn checked_against_burn(ad: &Device) -> Vec<(String, f32, f32)> {
    section("5.3", "Checked against Burn: outputs and every gradient");
    let odd = GptConfig::new(11, 7, 1, 3, 12); // vocabulary 11, block 7, 3 heads of 4
    println!(
        "{:<16} {:<30} {:>12} {:>12}",
        "operation", "shape", "output err", "grad err"
    );
    let mut cases = model_ops(&odd, 3, ad);
    cases.extend(dropout_ops(&odd, 3, ad)); // Burn's side: the kernel's mask, multiplied in
    cases
        .iter()
        .map(|case| {
            let (out, grad) = case.max_error();
            println!(
                "{:<16} {:<30} {out:>12.1e} {grad:>12.1e}",
                case.op, case.shape
            );
            (case.op.to_string(), out, grad)
        })
        .collect()
}
// ANCHOR_END: checks

// ANCHOR: same_training
/// 5.4: the `tiny` model trained twice from the same seed, once per kernel choice: the two
/// loss curves should be one. (Without dropout: the fused kernels draw other masks.)
fn the_same_training(run: &Run, steps: usize) -> Result<f64> {
    section("5.4", "The same training run with either kernels");
    let (curves, diff) = train_twice(run, steps, [Kernels::BURN, FUSED])?;
    let last = |i: usize| curves[i].1.last().map_or(f64::NAN, |p| p.1);
    println!(
        "{steps} steps: last loss {:.4} (Burn) vs {:.4} (fused); largest difference at any step {diff:.1e}",
        last(0),
        last(1)
    );
    let path = run.out.join("same_training.svg");
    plot_curves(
        &path,
        "tiny model, Burn's kernels vs fused",
        "step",
        &curves,
    )?;
    println!("wrote {}", path.display());
    Ok(diff)
}
// ANCHOR_END: same_training

// ANCHOR: step_times
/// 5.5: whole training steps of the preset, Burn's kernels against the fused ones, in turns.
fn step_times(cfg: &PretrainConfig, run: &Run, n: usize) -> Result<Vec<(String, StepTimes)>> {
    section(
        "5.5",
        &format!("Whole training steps ({} preset)", cfg.preset),
    );
    if n == 0 {
        println!("(skipped: --bench-steps 0)");
        return Ok(Vec::new());
    }
    let mut best: Vec<(String, StepTimes)> = Vec::new();
    for _round in 0..2 {
        for kernels in [Kernels::BURN, FUSED] {
            let model = cfg
                .model
                .init(&run.device.clone().autodiff())
                .with_kernels(kernels);
            let t = time_steps(cfg, model, &run.data, 3, n.div_ceil(2))?;
            match best.iter_mut().find(|(k, _)| k == kernels.name()) {
                Some((_, b)) if b.median_ms_per_step <= t.median_ms_per_step => {}
                Some((_, b)) => *b = t,
                None => best.push((kernels.name().to_string(), t)),
            }
        }
    }
    for (k, t) in &best {
        println!(
            "{k:<5}: {:>8.1} ms/step, {:>6} tokens/s, {:>5.1} GFLOP/s",
            t.median_ms_per_step,
            human(t.tokens_per_s),
            t.gflops
        );
    }
    let speedup = best[0].1.median_ms_per_step / best[1].1.median_ms_per_step;
    println!("fused is {speedup:.2}x faster (best of two rounds, taken in turns)");
    Ok(best)
}
// ANCHOR_END: step_times

// ANCHOR: peak
/// 5.6: what the CPU can do at best: large square products, where the arithmetic dwarfs every
/// overhead. A training step's GFLOP/s is read against this.
fn the_machines_peak(device: &Device, reps: usize) -> Vec<(usize, f64, f64)> {
    section(
        "5.6",
        "The machine's practical peak: a large matrix product",
    );
    let mut rows = Vec::new();
    for n in [512, 1024, 2048] {
        let a = Tensor::<2>::random([n, n], burn::tensor::Distribution::Default, device);
        let b = Tensor::<2>::random([n, n], burn::tensor::Distribution::Default, device);
        let gflops = |kernels: Kernels| {
            let best = (0..reps.clamp(1, 10))
                .map(|_| {
                    let tick = std::time::Instant::now();
                    let c = kernels.matmul(a.clone(), b.clone());
                    c.into_data(); // waits for the result on any backend
                    tick.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            2.0 * (n * n * n) as f64 / best / 1e9
        };
        let (burn, fused) = (gflops(Kernels::BURN), gflops(FUSED));
        println!(
            "n = {n:>4}: Burn {burn:>6.1} GFLOP/s, fused {fused:>6.1} GFLOP/s (best of {})",
            reps.clamp(1, 10)
        );
        rows.push((n, burn, fused));
    }
    rows
}
// ANCHOR_END: peak

// ANCHOR: products
/// 5.7: every matrix product of a training step with the fused kernels, timed call by call,
/// each shape at its fastest of three steps: which run near the peak of 5.6, and which not.
fn products_of_a_step(cfg: &PretrainConfig, run: &Run) -> Result<Vec<ProductTime>> {
    section(
        "5.7",
        &format!("The matrix products of one step ({} preset)", cfg.preset),
    );
    if !fused_available(&run.device) {
        println!("(none: chapter 5's kernels do not run on {})", run.backend);
        return Ok(Vec::new());
    }
    let ad = run.device.clone().autodiff();
    let step = || {
        time_steps(
            cfg,
            cfg.model.init(&ad).with_kernels(FUSED),
            &run.data,
            0,
            1,
        )
    };
    step()?; // untraced: the first step also pays for memory touched for the first time
    let (mut traces, mut step_ms) = (Vec::new(), f64::INFINITY);
    for _ in 0..3 {
        let (times, products) = trace_products(step);
        step_ms = step_ms.min(times?.median_ms_per_step);
        traces.push(products);
    }
    let products = fastest(traces);
    println!(
        "{:<28} {:>6} {:>9} {:>8}",
        "m x k x n", "calls", "ms", "GFLOP/s"
    );
    for p in products.iter().take(12) {
        println!(
            "{:<28} {:>6} {:>9.1} {:>8.1}",
            p.shape, p.calls, p.ms, p.gflops
        );
    }
    let ms: f64 = products.iter().map(|p| p.ms).sum();
    let gflop: f64 = products.iter().map(|p| p.gflops * p.ms / 1e3).sum();
    println!(
        "{} shapes, {ms:.0} ms of calls at {:.1} GFLOP/s; the fastest step took {step_ms:.0} ms",
        products.len(),
        gflop / (ms / 1e3)
    );
    Ok(products)
}
// ANCHOR_END: products
