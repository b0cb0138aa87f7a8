//! Runs the same models on every Burn backend compiled in, and compares speed and results.
//!
//! Run: `cargo run --release --bin compare_backends -- --out runs/compare_backends`
//! (`--quick` for a reduced set in a few minutes, `--large` adds the `lecture` preset).

use anyhow::{Result, bail};
use clap::Parser;
use course::ch04_pretrain::{PretrainConfig, preset};
use course::common::backend::Backend;
use course::common::data::load_corpus;
use course::common::dataset::Dataset;
use course::common::report::{Machine, PALETTE, draw_legend, write_atomic, write_json};
use course::common::{section, worst};
use course::compare_backends::{
    GenerationResult, MatmulResult, OpCost, ParityResult, TrainResult, generation_speed,
    matmul_gflops, op_costs, parity, train_speed,
};
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Compare Burn backends: matmul throughput, training steps, generation, parity.
#[derive(Parser, Debug)]
#[command(name = "compare_backends", version)]
struct Args {
    /// Backends to compare, comma-separated (default: every backend in this build).
    #[arg(long, value_delimiter = ',', value_parser = |s: &str| s.parse::<Backend>())]
    backends: Vec<Backend>,
    /// A reduced set (small sizes, the tiny preset, few steps): minutes, for tests.
    #[arg(long)]
    quick: bool,
    /// Also time the `lecture` preset (slow on a CPU).
    #[arg(long)]
    large: bool,
    /// Instead: time the element-wise operations of a training step, one by one
    /// (writes ops.md and ops.json).
    #[arg(long)]
    ops: bool,
    /// Timed training steps per preset (after warm-up); default 20, or 2 with --quick.
    #[arg(long)]
    steps: Option<usize>,
    /// A UTF-8 text file (default: $GPT_DATA, else the downloaded Tiny Shakespeare).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Output folder for results.json, results.md and the chart.
    #[arg(long, value_name = "DIR", default_value = "runs/compare_backends")]
    out: PathBuf,
}

#[derive(Serialize)]
struct BackendResults {
    backend: String,
    matmul: Vec<MatmulResult>,
    train: Vec<TrainResult>,
    generation: Vec<GenerationResult>,
    parity: Vec<ParityResult>,
    /// Largest absolute logit difference from ndarray over every chapter's model.
    max_abs_diff: f32,
}

#[derive(Serialize)]
struct Results {
    machine: Machine,
    /// The vector instructions chapter 5's kernels ran with on flex ("avx512", "avx2" or
    /// "portable").
    fused_instruction_set: &'static str,
    quick: bool,
    command: String,
    backends: Vec<BackendResults>,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    let backends = if args.backends.is_empty() {
        Backend::ALL.to_vec()
    } else {
        args.backends.clone()
    };
    // Every backend checked before any work: a missing GPU driver is one line at the start,
    // not an error after the CPU backends' minutes.
    for backend in &backends {
        backend.open()?;
    }
    if args.ops {
        return ops(&args, &backends);
    }
    let corpus = load_corpus(args.data.as_deref())?;
    let data = Dataset::new(&corpus.text)?;
    let plan = Plan::new(&args, data.tokenizer.vocab_size());
    for c in &plan.configs {
        data.check_block_size(c.model.block_size)?;
    }
    let machine = Machine::detect(backends.iter().any(|b| !b.is_cpu()));
    println!(
        "Comparing backends: {} on {} ({} cores)",
        names(&backends),
        machine.cpu,
        machine.cores
    );
    for a in &machine.gpu_adapters {
        println!("  wgpu adapter: {a}");
    }
    let mut results = Vec::new();
    for (i, &backend) in backends.iter().enumerate() {
        section(&format!("{}", i + 1), &format!("Backend {backend}"));
        results.push(measure(backend, &plan, &data, args.seed)?);
    }
    section(&format!("{}", backends.len() + 1), "Summary");
    let table = markdown(&results, &plan.sizes);
    println!("{table}");
    std::fs::create_dir_all(&args.out)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    write_atomic(&args.out.join("results.md"), table.as_bytes())?;
    chart(&args.out.join("chart.svg"), &results)?;
    let quick = args.quick;
    let all = Results {
        machine,
        fused_instruction_set: course::ch05_fast::gemm::isa_name(),
        quick,
        command,
        backends: results,
    };
    write_json(&args.out.join("results.json"), &all)?;
    println!(
        "wrote {}/results.json, results.md, chart.svg",
        args.out.display()
    );
    Ok(())
}

/// What to measure on every backend.
struct Plan {
    configs: Vec<PretrainConfig>,
    /// Square matmul sizes.
    sizes: Vec<usize>,
    warmup: usize,
    steps: usize,
    gen_tokens: usize,
}

impl Plan {
    fn new(args: &Args, vocab_size: usize) -> Self {
        let mut presets = vec!["tiny"];
        if !args.quick {
            presets.push("baby");
        }
        if args.large {
            presets.push("lecture");
        }
        let configs = presets
            .iter()
            .map(|p| PretrainConfig {
                seed: args.seed,
                ..preset(p, vocab_size).expect("known preset")
            })
            .collect();
        let (sizes, warmup, gen_tokens) = match args.quick {
            true => (vec![64, 128], 1, 10),
            false => (vec![128, 256, 512, 1024, 2048], 3, 200),
        };
        let steps = args.steps.unwrap_or(if args.quick { 2 } else { 20 });
        Plan {
            configs,
            sizes,
            warmup,
            steps,
            gen_tokens,
        }
    }
}

/// Parity, matmul, training and generation on one backend.
fn measure(backend: Backend, plan: &Plan, data: &Dataset, seed: u64) -> Result<BackendResults> {
    let device = backend.open()?;
    let parity = parity(data, &device, seed);
    let max_abs_diff = worst(parity.iter().map(|p| p.max_abs_diff as f64)) as f32;
    for p in &parity {
        println!(
            "parity with ndarray, {}: max |diff| {:.2e}",
            p.model, p.max_abs_diff
        );
    }
    if max_abs_diff > 1e-4 {
        bail!("{backend} disagrees with ndarray by {max_abs_diff} (more than 1e-4)");
    }
    let mut matmul = Vec::new();
    for &n in &plan.sizes {
        let reps = (1usize << 31).div_ceil(n * n * n).clamp(2, 50);
        let gflops = matmul_gflops(&device, n, reps);
        println!("matmul {n}x{n}: {gflops:.1} GFLOP/s");
        matmul.push(MatmulResult { size: n, gflops });
    }
    let mut train = Vec::new();
    for c in &plan.configs {
        let r = train_speed(c, data, &device, plan.warmup, plan.steps)?;
        let t = &r.times;
        println!(
            "train {}: first step {:.0} ms, median {:.1} ms/step, {:.0} tokens/s, {:.1} GFLOP/s",
            r.preset, t.first_step_ms, t.median_ms_per_step, t.tokens_per_s, t.gflops
        );
        train.push(r);
    }
    let mut generation = Vec::new();
    for c in &plan.configs {
        let g = generation_speed(c, &device, plan.gen_tokens, !backend.is_cpu());
        println!(
            "generate {} tokens ({}): {:.1} tokens/s recomputing, {:.1} with the KV cache ({:.1}x)",
            g.new_tokens, g.preset, g.tokens_per_s, g.cached_tokens_per_s, g.cache_speedup
        );
        generation.push(g);
    }
    let backend = backend.to_string();
    Ok(BackendResults {
        backend,
        matmul,
        train,
        generation,
        parity,
        max_abs_diff,
    })
}

#[derive(Serialize)]
struct OpResults {
    machine: Machine,
    command: String,
    shape: [usize; 2],
    backends: Vec<(String, Vec<OpCost>)>,
}

/// `--ops`: one table, an operation a row and a backend a column pair (µs, ns per element).
fn ops(args: &Args, backends: &[Backend]) -> Result<()> {
    let shape = if args.quick { [96, 64] } else { [768, 512] };
    let reps = if args.quick { 2 } else { 10 };
    let machine = Machine::detect(backends.iter().any(|b| !b.is_cpu()));
    println!(
        "Element-wise operations on a {shape:?} tensor, {} on {} ({} cores)",
        names(backends),
        machine.cpu,
        machine.cores
    );
    let mut results = Vec::new();
    for (i, &backend) in backends.iter().enumerate() {
        section(&format!("{}", i + 1), &format!("Backend {backend}"));
        let costs = op_costs(&backend.device(), shape, reps);
        for c in &costs {
            println!(
                "{:42} {:10.1} us {:8.2} ns/element",
                c.op, c.micros, c.ns_per_element
            );
        }
        results.push((backend.to_string(), costs));
    }
    let mut table = String::from("| operation |");
    for (b, _) in &results {
        table += &format!(" {b}: µs | {b}: ns/element |");
    }
    table += "\n|---|";
    table += &"---:|".repeat(2 * results.len());
    for (row, c) in results[0].1.iter().enumerate() {
        table += &format!("\n| `{}` |", c.op);
        for (_, costs) in &results {
            table += &format!(
                " {:.1} | {:.2} |",
                costs[row].micros, costs[row].ns_per_element
            );
        }
    }
    table.push('\n');
    section(&format!("{}", backends.len() + 1), "Summary");
    println!("{table}");
    std::fs::create_dir_all(&args.out)?;
    write_atomic(&args.out.join("ops.md"), table.as_bytes())?;
    write_json(
        &args.out.join("ops.json"),
        &OpResults {
            machine,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            shape,
            backends: results,
        },
    )?;
    println!("wrote {}/ops.md, ops.json", args.out.display());
    Ok(())
}

/// "ndarray, flex, wgpu".
fn names(backends: &[Backend]) -> String {
    backends
        .iter()
        .map(|b| b.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn markdown(results: &[BackendResults], sizes: &[usize]) -> String {
    let mut s = String::from("| backend |");
    for n in sizes {
        s += &format!(" matmul {n} GFLOP/s |");
    }
    let presets: Vec<&str> = results[0].train.iter().map(|t| t.preset.as_str()).collect();
    for p in &presets {
        s += &format!(" {p}: first step ms | {p}: ms/step | {p}: tokens/s |");
    }
    for p in &presets {
        s += &format!(" {p}: generation tokens/s, cache off / on |");
    }
    s += " max abs diff vs ndarray |\n|---|";
    s += &"---:|".repeat(sizes.len() + 4 * presets.len() + 1);
    s.push('\n');
    for r in results {
        s += &format!("| {} |", r.backend);
        for m in &r.matmul {
            s += &format!(" {:.1} |", m.gflops);
        }
        for t in &r.train {
            s += &format!(
                " {:.0} | {:.1} | {:.0} |",
                t.times.first_step_ms, t.times.median_ms_per_step, t.times.tokens_per_s
            );
        }
        for g in &r.generation {
            s += &format!(" {:.0} / {:.0} |", g.tokens_per_s, g.cached_tokens_per_s);
        }
        s += &format!(" {:.1e} |\n", r.max_abs_diff);
    }
    s
}

/// Training tokens/s per preset, one bar per backend (log scale).
fn chart(path: &Path, results: &[BackendResults]) -> Result<()> {
    let presets: Vec<String> = results[0].train.iter().map(|t| t.preset.clone()).collect();
    let (min, max) = throughput_range(results);
    let path_str = path.to_string_lossy().to_string();
    let root = SVGBackend::new(&path_str, (800, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Training throughput by backend (tokens/s, log scale)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            0f64..presets.len() as f64,
            ((min / 2.0)..(max * 2.0)).log_scale(),
        )?;
    let labels = presets.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(presets.len() * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < labels.len() {
                labels[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc("tokens/s")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    draw_bars(&mut chart, results, min / 2.0)?;
    draw_legend(&mut chart, SeriesLabelPosition::MiddleRight)?;
    root.present()?;
    Ok(())
}

/// The lowest and highest training tokens/s of any backend and preset.
fn throughput_range(results: &[BackendResults]) -> (f64, f64) {
    let rates = || {
        results
            .iter()
            .flat_map(|r| r.train.iter().map(|t| t.times.tokens_per_s))
    };
    let max = rates().fold(1.0, f64::max);
    (rates().fold(max, f64::min), max)
}

/// One bar from `floor` up per backend and preset, each backend in its own colour, with
/// its legend entry.
fn draw_bars<'a>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, LogCoord<f64>>,
    >,
    results: &[BackendResults],
    floor: f64,
) -> Result<()> {
    let width = 0.8 / results.len() as f64;
    for (b, r) in results.iter().enumerate() {
        let color = PALETTE[b % PALETTE.len()];
        chart
            .draw_series(r.train.iter().enumerate().map(|(p, t)| {
                let x0 = p as f64 + 0.1 + b as f64 * width;
                Rectangle::new(
                    [(x0, floor), (x0 + width * 0.9, t.times.tokens_per_s)],
                    color.filled(),
                )
            }))?
            .label(r.backend.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    Ok(())
}
