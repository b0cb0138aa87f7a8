//! Chapter 11 as a notebook: data-parallel training of chapter 4's GPT on several processes,
//! on one machine or several, with MPI carrying the gradients.
//!
//! One process:  `cargo run --release --bin ch11_distributed -- --preset tiny`
//! Two ranks:    `cargo build --release --features mpi`, then
//!               `mpirun -np 2 target/release/ch11_distributed --preset tiny`

use anyhow::Result;
use burn::module::Module;
use clap::Parser;
use course::ch03_gpt::{Gpt, GptConfig};
use course::ch04_pretrain::{Overrides, PretrainConfig, known_preset, optimizer};
use course::ch05_fast::KernelChoice;
use course::ch08_pretrained::tokenizer::Tokenizer;
use course::ch11_distributed::comm::{self, Collective, local_rank, ring_all_reduce_seconds};
use course::ch11_distributed::dropout::SampleDropout;
use course::ch11_distributed::ring::{draw_ring, ring_all_reduce};
use course::ch11_distributed::{
    Job, Log, Plan, broadcast_model, check_batch, check_replicas, resume, shard, train,
    weights_hash,
};
use course::common::cli::{self, CommonArgs};
use course::common::dataset::Dataset;
use course::common::report::{Curve, Summary, write_run};
use course::common::train::{TrainReport, human};
use course::common::{Run, section};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

const CHAPTER: &str = "ch11_distributed";

/// Chapter 11: data-parallel training across processes and machines (MPI).
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Chapter 4's preset to start from: tiny, baby, medium, lecture or gpt1. Its batch size
    /// is the global batch, shared out among the ranks.
    #[arg(long, default_value = "baby")]
    preset: String,
    #[command(flatten)]
    overrides: Overrides,
    /// Continue from ckpt/last in the output folder (made by any number of ranks, or by
    /// chapter 4 with the same settings).
    #[arg(long)]
    resume: bool,
    /// Stop after this step (with a checkpoint), as if interrupted; `--resume` continues.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Also save ckpt/last every N steps between evaluations (0: only at evaluations).
    #[arg(long, value_name = "N", default_value_t = 0)]
    ckpt_interval: usize,
    /// Megabytes of gradients per all-reduce call (the buckets).
    #[arg(long, default_value_t = 4.0, value_parser = cli::positive)]
    bucket_mb: f64,
    /// Burn's operations, or chapter 5's fused kernels where the backend runs them.
    #[arg(long, value_enum, default_value_t = KernelChoice::Fused)]
    kernels: KernelChoice,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let cli = Cli::parse();
        // MPI starts here, on the thread that will make every MPI call.
        let comm = comm::connect()?;
        let result = notebook(&cli, comm.as_ref());
        if let Err(e) = &result
            && comm.size() > 1
        {
            // The other ranks may be waiting for this one in a collective: end them all.
            eprintln!("error: rank {}: {e:#}", comm.rank());
            comm.abort();
        }
        result
    })
}

fn notebook(a: &Cli, comm: &dyn Collective) -> Result<()> {
    the_ranks(comm)?;
    // Only rank 0 writes into the output folder; the others get a folder of their own to
    // check (so that no two ranks of one machine race on it), removed when they end.
    let mut common = a.common.clone();
    let scratch = std::env::temp_dir().join(format!("{CHAPTER}-rank-{}", std::process::id()));
    if comm.rank() > 0 {
        common.out = Some(scratch.clone());
    }
    let run = common.start(CHAPTER, "Chapter 11: data-parallel training", None)?;
    let _cleanup = RemoveOnDrop((comm.rank() > 0).then_some(scratch));
    let device = run.backend.device_for_local_rank(local_rank());
    device.seed(run.seed);
    let tokenizer = Tokenizer::choose("char", &run.corpus.text)?;
    let cfg = PretrainConfig::build(&a.preset, tokenizer.vocab_size(), &a.overrides, run.seed)?;
    check_batch(cfg.batch_size, comm.size())?;
    let data = Dataset::tokenized(&run.corpus.text, tokenizer)?;
    data.check_block_size(cfg.model.block_size)?;
    let (kernels, dropout) = SampleDropout::install(a.kernels.kernels(), run.seed);
    let model = one_model_everywhere(&cfg, &device, kernels, comm)?;
    sharding(&cfg, comm);
    let bucket = ((a.bucket_mb * 1e6 / 4.0) as usize).max(1);
    let rate = all_reduce_here(model.num_params(), bucket, comm, &run.out)?;
    let job = Job {
        comm,
        cfg: &cfg,
        data: &data,
        dropout,
        bucket,
    };
    let (report, log) = training(a, &run, model, &job)?;
    if comm.rank() == 0 {
        let mut files = write_files(&run, &job, &report, &log, rate)?;
        files.push("ring_all_reduce.svg".into());
        more_ranks(&report, &log, &cfg, rate);
        println!("\nwrote {} into {}", files.join(", "), run.out.display());
    }
    Ok(())
}

// ANCHOR: ranks
fn the_ranks(comm: &dyn Collective) -> Result<()> {
    // Every rank runs this same program; only rank 0 speaks. The others' printing goes to
    // /dev/null (their errors still reach the terminal, on stderr).
    if comm.rank() > 0 {
        silence_stdout()?;
    }
    section("11.1", "The ranks");
    let pids = comm.all_gather_u64(std::process::id() as u64);
    println!("{} rank(s); rank 0 runs {}", comm.size(), comm.describe());
    for (rank, pid) in pids.iter().enumerate() {
        println!("  rank {rank}: pid {pid}");
    }
    Ok(())
}
// ANCHOR_END: ranks

/// Removes a rank's scratch folder when it ends.
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn silence_stdout() -> Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    // SAFETY: dup2 on two open descriptors; stdout now writes to /dev/null.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) } < 0 {
        anyhow::bail!("cannot silence this rank's output");
    }
    Ok(())
}

// ANCHOR: one_model
fn one_model_everywhere(
    cfg: &PretrainConfig,
    device: &burn::tensor::Device,
    kernels: course::ch03_gpt::Kernels,
    comm: &dyn Collective,
) -> Result<Gpt> {
    section("11.2", "One model on every rank");
    let model = cfg
        .model
        .init(&device.clone().autodiff())
        .with_kernels(kernels);
    let before = comm.all_gather_u64(weights_hash(&model));
    let same = before.iter().all(|&h| h == before[0]);
    println!(
        "{} parameters initialised on every rank from seed {}: weights {} before the broadcast",
        model.num_params(),
        cfg.seed,
        if same { "equal" } else { "different" }
    );
    // The same seed draws the same weights only with the same backend, build and generator;
    // a broadcast from rank 0 does not depend on any of that.
    let model = broadcast_model(model, comm)?;
    let hash = check_replicas(&model, comm, 0)?;
    println!("after rank 0's broadcast: every rank holds weights {hash:016x}");
    Ok(model)
}
// ANCHOR_END: one_model

fn sharding(cfg: &PretrainConfig, comm: &dyn Collective) {
    section("11.3", "Sharding the global batch");
    let (b, p) = (cfg.batch_size, comm.size());
    println!(
        "global batch {b} x {} tokens = {p} rank(s) x {} samples",
        cfg.model.block_size,
        b / p
    );
    for rank in 0..p.min(4) {
        let s = shard(b, rank, p);
        println!(
            "  rank {rank}: samples {}..{} of every step's batch",
            s.start, s.end
        );
    }
    match cfg.model.dropout {
        0.0 => println!("no dropout in this preset"),
        d => println!(
            "dropout {d}: each mask is drawn per sample of the global batch, from (seed, step, \
             site, sample), so it does not depend on which rank holds the sample"
        ),
    }
}

/// What one all-reduce of the whole gradient costs on these ranks.
#[derive(Clone, Copy, Debug, Serialize)]
struct Rate {
    ranks: usize,
    bytes: usize,
    /// Milliseconds per all-reduce of `bytes`.
    ms: f64,
    /// The bytes each rank sent per second, by the ring formula: 2 (p - 1) / p * bytes / time.
    bus_gbytes_per_s: f64,
    /// Microseconds per all-reduce of one value (the latency).
    latency_us: f64,
}

// ANCHOR: all_reduce_here
fn all_reduce_here(
    values: usize,
    bucket: usize,
    comm: &dyn Collective,
    out: &Path,
) -> Result<Option<Rate>> {
    section("11.4", "What an all-reduce costs here");
    if comm.rank() == 0 {
        the_ring(values, out)?;
    }
    let p = comm.size();
    if p == 1 {
        println!("one rank: nothing to exchange (start it with `mpirun -np 2` to see one)");
        return Ok(None);
    }
    let mut buf = vec![1.0f32; values];
    let time = |buf: &mut [f32], reps: usize| {
        comm.barrier();
        let tick = Instant::now();
        for _ in 0..reps {
            for chunk in buf.chunks_mut(bucket) {
                comm.all_reduce_sum(chunk);
            }
        }
        tick.elapsed().as_secs_f64() / reps as f64
    };
    time(&mut buf, 2); // warm-up: connections, buffers
    let seconds = time(&mut buf, 10);
    let latency = time(&mut buf[..1], 200);
    let bytes = values * 4;
    let bus = 2.0 * (p - 1) as f64 / p as f64 * bytes as f64 / seconds;
    println!(
        "all-reduce of the gradients ({values} values, {:.1} MB, buckets of {:.1} MB): {:.2} ms",
        bytes as f64 / 1e6,
        (bucket * 4) as f64 / 1e6,
        seconds * 1e3
    );
    println!(
        "  each rank sends 2 (p - 1) / p of the buffer: {:.2} GB/s per rank; one value: {:.1} µs",
        bus / 1e9,
        latency * 1e6
    );
    Ok(Some(Rate {
        ranks: p,
        bytes,
        ms: seconds * 1e3,
        bus_gbytes_per_s: bus / 1e9,
        latency_us: latency * 1e6,
    }))
}
// ANCHOR_END: all_reduce_here

/// The ring written out, on four buffers the size of the gradients, in this process.
fn the_ring(values: usize, out: &Path) -> Result<()> {
    let p = 4;
    let mut bufs: Vec<Vec<f32>> = (0..p)
        .map(|r| {
            (0..values)
                .map(|i| ((i * 7 + r * 13) % 17) as f32)
                .collect()
        })
        .collect();
    let sum: Vec<f32> = (0..values)
        .map(|i| bufs.iter().map(|b| b[i]).sum())
        .collect();
    let sent = ring_all_reduce(&mut bufs);
    let equal = bufs.iter().all(|b| *b == sum);
    println!(
        "the ring on {p} buffers of {values} values (in memory): every buffer {} the sum; each \
         rank sent {sent} values = 2(p-1)/p = {:.2} of a buffer",
        if equal { "holds" } else { "DOES NOT hold" },
        sent as f64 / values as f64
    );
    draw_ring(&out.join("ring_all_reduce.svg"), p)
}

fn training(a: &Cli, run: &Run, model: Gpt, job: &Job) -> Result<(TrainReport, Log)> {
    section("11.5", "Training on every rank");
    let (comm, cfg) = (job.comm, job.cfg);
    let ckpt = run.out.join("ckpt");
    let mut log = Log::new();
    let optim = optimizer(cfg);
    let (model, mut optim, start) = match a.resume {
        true => {
            let (m, o, step) = resume(model, optim, job, &ckpt, &mut log)?;
            println!("resuming from step {step} on {} rank(s)", comm.size());
            (m, o, step)
        }
        false => (model, optim, 0),
    };
    let plan = Plan {
        start,
        stop_after: a.stop_after,
        ckpt_interval: a.ckpt_interval,
        ckpt,
        backend: format!("{}, {} rank(s)", run.backend, comm.size()),
    };
    let (_, report) = train(model, &mut optim, job, &plan, &mut log)?;
    if let Some(step) = a.stop_after.filter(|&s| s < cfg.steps) {
        println!("stopped after step {step}: saved ckpt/last; --resume continues");
        return Ok((report, log));
    }
    let last = log.losses.last().expect("evaluated");
    let steps = report.steps.len().max(1) as f64;
    let share = log.all_reduce_seconds / report.train_seconds.max(1e-9);
    println!(
        "step {}: train {:.4}, val {:.4}; {:.1} s, {} tokens/s on {} rank(s)",
        last.step,
        last.train,
        last.val,
        report.wall_seconds,
        human(report.tokens_per_second),
        comm.size()
    );
    println!(
        "gradient exchange (copies out and back, all-reduce, waits): {:.2} ms per step, {:.1}% \
         of the step time",
        log.all_reduce_seconds * 1e3 / steps,
        100.0 * share
    );
    // The steady state, for book/turns.py: the first steps warm caches and allocators up.
    let mut ms: Vec<f64> = report.steps.iter().skip(3).map(|s| s.ms).collect();
    if !ms.is_empty() {
        ms.sort_by(f64::total_cmp);
        println!("median of {}: {:.1} ms/step", ms.len(), ms[ms.len() / 2]);
    }
    Ok((report, log))
}

#[derive(Serialize)]
struct Hyper<'a> {
    #[serde(flatten)]
    config: &'a PretrainConfig,
    ranks: usize,
    transport: String,
    all_reduce_ms_per_step: f64,
    all_reduce_share: f64,
    all_reduce: Option<Rate>,
}

fn write_files(
    run: &Run,
    job: &Job,
    report: &TrainReport,
    log: &Log,
    rate: Option<Rate>,
) -> Result<Vec<String>> {
    let steps = report.steps.len().max(1) as f64;
    let hyper = Hyper {
        config: job.cfg,
        ranks: job.comm.size(),
        transport: job.comm.describe(),
        all_reduce_ms_per_step: log.all_reduce_seconds * 1e3 / steps,
        all_reduce_share: log.all_reduce_seconds / report.train_seconds.max(1e-9),
        all_reduce: rate,
    };
    let params = job.cfg.model.param_count();
    let summary = Summary::new(CHAPTER, run, hyper, params, report);
    let curve = Curve {
        name: "",
        losses: &log.losses,
        steps: &log.steps,
    };
    let title = format!("{} on {} rank(s)", job.cfg.preset, job.comm.size());
    write_run(&run.out, &summary, &title, &[curve])
}

// ANCHOR: more_ranks
/// What p ranks would give, from this run's compute rate per rank and the ring formula at
/// a few link speeds: each rank keeps its batch (so p ranks see p times the tokens per step).
fn more_ranks(report: &TrainReport, log: &Log, cfg: &PretrainConfig, rate: Option<Rate>) {
    section("11.6", "What more ranks would give");
    let p_here = rate.map_or(1, |r| r.ranks);
    // FLOP/s of one rank on its own slice, all-reduce time left out.
    let compute_s = (report.train_seconds - log.all_reduce_seconds).max(1e-9);
    let tokens = (report.steps.len() * cfg.batch_size * cfg.model.block_size) as f64;
    let flops = cfg.model.flops_per_token() * tokens / p_here as f64 / compute_s;
    println!("one rank computes {:.1} GFLOP/s here", flops / 1e9);
    // (name, shape, tokens per sample, samples per rank)
    let lecture = known_preset("lecture", cfg.model.vocab_size)
        .expect("a preset")
        .model;
    let gpt2 = GptConfig::new(50_257, 1024, 12, 12, 768);
    let models = [("lecture", lecture, 8.0), ("GPT-2 124M", gpt2, 8.0)];
    // Ranks like this one compute so slowly that even the worst link hardly shows.
    for (name, shape, batch) in &models {
        let compute = shape.flops_per_token() * shape.block_size as f64 * batch / flops;
        let comm = ring_all_reduce_seconds(4.0 * shape.param_count() as f64, 64, 10e9 / 8.0, 5e-6);
        println!(
            "  {name}: {:.1} s of compute per step on such a rank; the all-reduce on 64 ranks \
             at 10 Gb/s, {:.0} ms, would be {:.1}% of the step",
            compute,
            comm * 1e3,
            100.0 * comm / (compute + comm)
        );
    }
    // A GPU computes a thousand times faster; 100 TFLOP/s is about what an H100 sustains in
    // bf16 (40% of its peak), assumed here, not measured.
    let gpu = 100e12;
    println!("\nGPUs at 100 TFLOP/s (assumed): step = compute + all-reduce, not overlapped");
    println!(
        "  {:<11} {:>5} {:>9} {:>11} {:>12} {:>11} {:>14}",
        "model", "ranks", "link", "compute ms", "all-red. ms", "efficiency", "even at batch"
    );
    for (name, shape, batch) in &models {
        let (params, block) = (shape.param_count() as f64, shape.block_size as f64);
        let compute = shape.flops_per_token() * block * batch / gpu;
        for gbps in [10.0, 25.0, 100.0] {
            for p in [2, 8, 64] {
                let comm = ring_all_reduce_seconds(4.0 * params, p, gbps * 1e9 / 8.0, 5e-6);
                // The per-rank batch at which compute time equals all-reduce time.
                let even = comm / (compute / *batch);
                println!(
                    "  {name:<11} {p:>5} {:>4} Gb/s {:>11.1} {:>12.1} {:>10.0}% {:>14.0}",
                    gbps,
                    compute * 1e3,
                    comm * 1e3,
                    100.0 * compute / (compute + comm),
                    even
                );
            }
        }
    }
    println!(
        "\n(compute: 6 FLOPs per weight per token plus attention, at 8 samples per rank; \
         all-reduce: the ring formula with 5 µs per message; efficiency: compute / step)"
    );
}
// ANCHOR_END: more_ranks
