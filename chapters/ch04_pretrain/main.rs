//! Chapter 4 as a notebook: pre-train the chapter 3 decoder on Tiny Shakespeare, keep
//! checkpoints, and sample from them. This is the course's main job.
//!
//! Train:  `cargo run --release --bin ch04_pretrain -- --preset baby`
//! Sample: `cargo run --release --bin ch04_pretrain -- sample --prompt "ROMEO:"`

use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use clap::{Args as ClapArgs, Parser, Subcommand};
use course::ch03_gpt::Gpt;
use course::ch03_gpt::Kernels;
use course::ch04_pretrain::bench::{Bench, time_steps};
use course::ch04_pretrain::checkpoint::{self, Meta};
use course::ch04_pretrain::{
    Overrides, PretrainConfig, learning_rate, mfu, optimizer, param_groups, train_settings,
};
use course::ch05_fast::KernelChoice;
use course::ch07_bpe::Bpe;
use course::common::backend::Backend;
use course::common::cli::{self, CommonArgs, SampleArgs, parse_backend};
use course::common::dataset::{Dataset, Split, rng_for, stream};
use course::common::report::{Curve, Summary, plot_schedule, write_json, write_run};
use course::common::sample::{SampleOptions, generate_fixed_shape};
// The tokenizer is chapter 8's choice of all the course's tokenizers (characters, chapter 7's
// BPE files): this binary reaches ahead for it, as for chapter 5's kernels.
use course::ch08_pretrained::tokenizer::Tokenizer;
use course::common::tokenizer::StreamDecoder;
use course::common::train::{
    LossRecord, StepRecord, TrainHooks, TrainReport, human, model_device, train,
};
use course::common::{Run, section};
use std::io::Write;
use std::path::PathBuf;

const CHAPTER: &str = "ch04_pretrain";

/// Chapter 4: pre-train a GPT on Tiny Shakespeare, then sample from it.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainCmd,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a saved checkpoint.
    Sample(SampleCmd),
}

#[derive(ClapArgs, Debug)]
struct TrainCmd {
    #[command(flatten)]
    common: CommonArgs,
    /// Starting point for every setting below: tiny, baby, medium, lecture or gpt1.
    #[arg(long, default_value = "baby")]
    preset: String,
    #[command(flatten)]
    overrides: Overrides,
    /// Continue from the last checkpoint in the output folder (with --bench: time its
    /// trained weights).
    #[arg(long)]
    resume: bool,
    /// Stop after this step (with a checkpoint), as if interrupted; `--resume` continues.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Also save ckpt/last every N steps between evaluations (0: only at evaluations), so that
    /// a run killed half-way loses at most N steps; `--resume` continues from it. (Ctrl-C
    /// saves it too, at the end of the current step, and exits with code 130.)
    #[arg(long, value_name = "N", default_value_t = 0)]
    ckpt_interval: usize,
    /// Benchmark instead of training: time this many steps after the warm-up steps, write
    /// bench.json.
    #[arg(long, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    bench: Option<usize>,
    /// Untimed steps before a benchmark's timed ones (the first compiles a GPU's kernels).
    #[arg(long, value_name = "N", default_value_t = 3)]
    bench_warmup: usize,
    /// Peak GFLOP/s of your hardware, for the model-FLOPs-utilisation estimate (default:
    /// about the fp32 peak of the 2-core AVX-512 CPU the course was measured on).
    #[arg(long, default_value_t = 180.0, value_parser = cli::positive)]
    peak_gflops: f64,
    /// Tokens to sample from the best checkpoint after training (characters, with the
    /// character tokenizer).
    #[arg(long, default_value_t = 500)]
    sample_chars: usize,
    /// What the model reads: `char` (every character of the text is a token) or a BPE
    /// tokenizer file made by chapter 7 (`runs/ch07_bpe/bpe-1024.txt`).
    #[arg(long, value_name = "char|FILE", default_value = "char")]
    tokenizer: String,
    /// Burn's operations, or chapter 5's fused kernels (used where the backend runs them:
    /// flex; elsewhere this falls back to Burn's).
    #[arg(long, value_enum, default_value_t = KernelChoice::Fused)]
    kernels: KernelChoice,
}

#[derive(ClapArgs, Debug)]
struct SampleCmd {
    /// Checkpoint folder (default: runs/ch04_pretrain/ckpt/best).
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// Text to continue (with a character tokenizer, every character must be in the model's
    /// vocabulary).
    #[arg(long, default_value = "")]
    prompt: String,
    /// The tokenizer file the model should have been trained with (checked against the one
    /// the checkpoint stores, which is the one used).
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    sampling: SampleArgs,
    /// Seed of the first sample (sample i uses seed + i).
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Which Burn backend runs the model.
    #[arg(long, default_value = "flex", value_parser = parse_backend)]
    backend: Backend,
    /// Burn's operations or chapter 5's fused kernels (see training's --kernels).
    #[arg(long, value_enum, default_value_t = KernelChoice::Fused)]
    kernels: KernelChoice,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| match Cli::parse() {
        Cli {
            command: Some(Command::Sample(cmd)),
            ..
        } => sample(cmd),
        Cli { train, .. } => pretrain(train),
    })
}

fn pretrain(a: TrainCmd) -> Result<()> {
    let run = a.common.start(CHAPTER, "Chapter 4: pre-training", None)?;
    let (cfg, data) = data_and_configuration(&a, &run)?;
    let model = the_model(&cfg, &run.device).with_kernels(a.kernels.kernels());
    let optim = optimizer_groups(&cfg, &model);
    schedule(&cfg);
    if let Some(n) = a.bench {
        return benchmark(&a, cfg, model, &run, &data, n);
    }
    let (report, hooks) = training(&a, &cfg, model, optim, &run, &data)?;
    let best = sample_from_best(&run, &data, a.sample_chars, a.kernels.kernels())?;
    what_the_run_wrote(&run, &cfg, &best, &report, &hooks)
}

// ANCHOR: build_config
fn data_and_configuration(a: &TrainCmd, run: &Run) -> Result<(PretrainConfig, Dataset<Tokenizer>)> {
    section("4.1", "Data and presets");
    let tok = Tokenizer::choose(&a.tokenizer, &run.corpus.text)?;
    let cfg = PretrainConfig::build(&a.preset, tok.vocab_size(), &a.overrides, run.seed)?;
    let data = Dataset::tokenized(&run.corpus.text, tok)?;
    data.check_block_size(cfg.model.block_size)?;
    let (chars, tokens) = (
        data.train_chars + data.val_chars,
        data.train.len() + data.val.len(),
    );
    println!(
        "{}: {chars} characters; tokenizer: {} -> {tokens} tokens ({:.3} characters per token)",
        run.corpus.path.display(),
        data.tokenizer.describe(),
        chars as f64 / tokens as f64
    );
    let m = &cfg.model;
    println!(
        "preset {}: {} layers, {} heads, {} wide, block {}, batch {}, dropout {}, {:?}-LN, bias {}, tied {}, GPT-2 init {}",
        cfg.preset,
        m.n_layer,
        m.n_head,
        m.n_embd,
        m.block_size,
        cfg.batch_size,
        m.dropout,
        m.norm,
        m.bias,
        m.tie_weights,
        m.gpt2_init
    );
    Ok((cfg, data))
}
// ANCHOR_END: build_config

fn the_model(cfg: &PretrainConfig, device: &Device) -> Gpt {
    section("4.2", "The model");
    let model = cfg.model.init(&device.clone().autodiff());
    let flops = cfg.model.flops_per_token();
    println!(
        "parameters: {} (formula: {})",
        model.num_params(),
        cfg.model.param_count()
    );
    let tokens = (cfg.batch_size * cfg.model.block_size) as f64;
    println!(
        "training FLOPs per token: {:.2} M (6N + attention); per step: {:.2} G",
        flops / 1e6,
        flops * tokens / 1e9
    );
    model
}

// ANCHOR: optimizer_demo
fn optimizer_groups(cfg: &PretrainConfig, model: &Gpt) -> ModuleOptimizer {
    section("4.3", "The optimizer: AdamW with two groups");
    let ((n_decayed, decayed), (n_kept, kept)) = param_groups(model);
    let (b1, b2, wd) = (cfg.beta1, cfg.beta2, cfg.weight_decay);
    println!(
        "AdamW, betas ({b1}, {b2}), weight decay {wd} on {n_decayed} weight matrices ({decayed} values);"
    );
    println!(
        "  no decay on the {n_kept} other tensors: biases, LayerNorm gains, embeddings ({kept} values)"
    );
    optimizer(cfg)
}
// ANCHOR_END: optimizer_demo

fn schedule(cfg: &PretrainConfig) {
    section("4.4", "The schedule: warmup, then cosine decay");
    let (w, n) = (cfg.warmup_steps, cfg.steps);
    for step in [0, w / 2, w, n / 2, n.saturating_sub(1)] {
        println!("  lr at step {step:>6}: {:.3e}", learning_rate(cfg, step));
    }
}

// ANCHOR: hooks
/// The training loop's hooks for pre-training: the schedule, checkpoints and a progress line
/// with the learning rate and model FLOPs utilisation.
struct Pretrain<'a> {
    config: &'a PretrainConfig,
    tokenizer: &'a Tokenizer,
    ckpt: PathBuf,
    backend: Backend,
    losses: Vec<LossRecord>,
    steps: Vec<StepRecord>,
    best_val: f64,
    peak_flops: f64,
    /// Save `last` every this many steps as well as at evaluations (0: only at evaluations).
    ckpt_interval: usize,
    /// The step of the `last` checkpoint on disk, so that no step is saved twice.
    saved_at: Option<usize>,
    /// Where Ctrl-C stopped the run (after saving `last`).
    interrupted: Option<usize>,
}

impl Pretrain<'_> {
    /// What a checkpoint after `step` steps records; between evaluations, the val loss of the
    /// last one.
    fn meta(&self, step: usize) -> Result<Meta<Tokenizer>> {
        let last = self
            .losses
            .last()
            .context("no evaluation yet to record with the checkpoint")?;
        Ok(Meta {
            format: checkpoint::FORMAT,
            step,
            config: self.config.clone(),
            tokenizer: self.tokenizer.clone(),
            val_loss: last.val,
            best_val_loss: self.best_val,
            losses: self.losses.clone(),
            steps: self.steps.clone(),
            backend: self.backend.to_string(),
        })
    }
}

impl TrainHooks<Gpt> for Pretrain<'_> {
    fn learning_rate(&self, step: usize) -> f64 {
        learning_rate(self.config, step)
    }

    fn on_step(&mut self, record: &StepRecord) {
        self.steps.push(*record);
    }

    fn on_eval(&mut self, record: &LossRecord, model: &Gpt, optim: &ModuleOptimizer) -> Result<()> {
        self.losses.push(*record);
        let improved = record.val < self.best_val;
        self.best_val = self.best_val.min(record.val);
        let meta = self.meta(record.step)?;
        checkpoint::save(&self.ckpt.join("last"), model, Some(optim), &meta)?;
        self.saved_at = Some(record.step);
        if improved {
            checkpoint::save(&self.ckpt.join("best"), model, None, &meta)?;
        }
        Ok(())
    }

    fn between_steps(
        &mut self,
        steps_done: usize,
        model: &Gpt,
        optim: &ModuleOptimizer,
    ) -> Result<std::ops::ControlFlow<()>> {
        // Read once: a Ctrl-C that lands during the save below waits for the next step, and
        // never stops a run whose last steps went unsaved.
        let interrupted = course::ch04_pretrain::interrupt::requested();
        let due = self.ckpt_interval > 0 && steps_done.is_multiple_of(self.ckpt_interval);
        if (due || interrupted) && self.saved_at != Some(steps_done) {
            let meta = self.meta(steps_done)?;
            checkpoint::save(&self.ckpt.join("last"), model, Some(optim), &meta)?;
            self.saved_at = Some(steps_done);
        }
        if interrupted {
            self.interrupted = Some(steps_done);
            return Ok(std::ops::ControlFlow::Break(()));
        }
        Ok(std::ops::ControlFlow::Continue(()))
    }

    fn progress_extra(&self, step: usize, tokens_per_second: f64) -> String {
        let gflops = self.config.model.flops_per_token() * tokens_per_second / 1e9;
        let mfu = 100.0 * mfu(&self.config.model, tokens_per_second, self.peak_flops);
        let lr = learning_rate(self.config, step);
        format!(" | lr {lr:.2e} | {gflops:.1} GFLOP/s, MFU {mfu:.1}%")
    }
}
// ANCHOR_END: hooks

// ANCHOR: train
fn training<'a>(
    a: &TrainCmd,
    cfg: &'a PretrainConfig,
    model: Gpt,
    optim: ModuleOptimizer,
    run: &'a Run,
    data: &'a Dataset<Tokenizer>,
) -> Result<(TrainReport, Pretrain<'a>)> {
    section("4.5", "Training, with gradient clipping and checkpoints");
    let mut hooks = Pretrain {
        config: cfg,
        tokenizer: &data.tokenizer,
        ckpt: run.out.join("ckpt"),
        backend: run.backend,
        losses: Vec::new(),
        steps: Vec::new(),
        best_val: f64::INFINITY,
        peak_flops: a.peak_gflops * 1e9,
        ckpt_interval: a.ckpt_interval,
        saved_at: None,
        interrupted: None,
    };
    let (model, mut optim, start) = match a.resume {
        true => resume(a, &mut hooks, &model_device(&model), optim)?,
        false => {
            if hooks.ckpt.join("last").exists() {
                let dir = hooks.ckpt.display();
                println!(
                    "(starting afresh: the checkpoints in {dir} will be replaced; --resume continues them)"
                );
            }
            (model, optim, 0)
        }
    };
    let settings = train_settings(cfg, a.stop_after);
    // Caught only while training: a Ctrl-C before or after ends the process as usual.
    let ctrl_c = course::ch04_pretrain::interrupt::catch()?;
    let (_, report) = train(model, &mut optim, data, &settings, start, &mut hooks)?;
    drop(ctrl_c);
    if let Some(step) = hooks.interrupted {
        let last = hooks.ckpt.join("last");
        println!(
            "interrupted at step {step}: saved {}; --resume continues",
            last.display()
        );
        // 130 (128 + SIGINT), as a shell reports a process that Ctrl-C ended: a script sees
        // that the run did not finish. The unfinished run writes no summary or plots.
        std::io::stdout().flush()?;
        std::process::exit(130);
    }
    let last = hooks.losses.last().expect("evaluated");
    let gflops = cfg.model.flops_per_token() * report.tokens_per_second / 1e9;
    println!(
        "step {}: train {:.4}, val {:.4} (best {:.4}); {:.1} s, {} tokens/s, {gflops:.1} GFLOP/s",
        last.step,
        last.train,
        last.val,
        hooks.best_val,
        report.wall_seconds,
        human(report.tokens_per_second)
    );
    println!(
        "val {:.4} nats per token = {:.4} bits per character of the validation text",
        last.val,
        data.bits_per_char(Split::Val, last.val)
    );
    clipping_summary(&hooks.steps, cfg.grad_clip);
    Ok((report, hooks))
}

/// `--resume`: the model, the optimizer and the step of `ckpt/last`, with the hooks' logs
/// and best loss as they were there. Only the number of steps and the evaluations may
/// change, and each change is named.
fn resume(
    a: &TrainCmd,
    hooks: &mut Pretrain,
    device: &Device,
    optim: ModuleOptimizer,
) -> Result<(Gpt, ModuleOptimizer, usize)> {
    let (model, optim, meta) = checkpoint::load(&hooks.ckpt.join("last"), device, Some(optim))?;
    let changes = checkpoint::check_compatible(&meta, hooks.config, hooks.tokenizer)?;
    println!(
        "resuming from step {} (best val so far {:.4})",
        meta.step, meta.best_val_loss
    );
    for change in changes {
        println!("resuming with {change}");
    }
    hooks.saved_at = Some(meta.step);
    (hooks.losses, hooks.steps, hooks.best_val) = (meta.losses, meta.steps, meta.best_val_loss);
    let model = model.with_kernels(a.kernels.kernels());
    Ok((model, optim.expect("optimizer state"), meta.step))
}

/// How large the gradients were before clipping, and how often clipping fired.
fn clipping_summary(steps: &[StepRecord], clip: f64) {
    let mut norms: Vec<f64> = steps.iter().map(|s| s.grad_norm).collect();
    norms.sort_by(f64::total_cmp);
    let Some(&max) = norms.last() else { return };
    let clipped = norms.iter().filter(|&&n| clip > 0.0 && n > clip).count();
    let median = norms[norms.len() / 2];
    println!(
        "gradient norm before clipping: median {median:.3}, max {max:.3}; clipped (> {clip}) at {clipped} of {} steps",
        norms.len()
    );
}
// ANCHOR_END: train

fn sample_from_best(
    run: &Run,
    data: &Dataset<Tokenizer>,
    tokens: usize,
    kernels: Kernels,
) -> Result<Gpt> {
    section("4.6", "Sampling from the best checkpoint");
    let (best, _, meta) =
        checkpoint::load::<Tokenizer>(&run.out.join("ckpt/best"), &run.device, None)?;
    let best = best.with_kernels(kernels);
    println!(
        "(step {}, val {:.4}, temperature 0.8)",
        meta.step, meta.val_loss
    );
    let opts = SampleOptions {
        temperature: 0.8,
        top_k: None,
        top_p: None,
    };
    stream_sample(&best, &data.tokenizer, "\n", tokens, opts, run.seed)?;
    Ok(best)
}

fn what_the_run_wrote(
    run: &Run,
    cfg: &PretrainConfig,
    best: &Gpt,
    report: &TrainReport,
    hooks: &Pretrain,
) -> Result<()> {
    section("4.7", "What the run wrote");
    // The whole history, also when this process resumed a run half-way.
    let history = TrainReport {
        losses: hooks.losses.clone(),
        steps: hooks.steps.clone(),
        ..report.clone()
    };
    let summary = Summary::new(CHAPTER, run, cfg, best.num_params(), &history);
    let title = format!("Chapter 4: pre-training ({} preset)", cfg.preset);
    let files = write_run(&run.out, &summary, &title, &[Curve::of("", &history)])?;
    let clip = (cfg.grad_clip > 0.0).then_some(cfg.grad_clip);
    let title = "Chapter 4: learning rate and gradient norm, every step";
    plot_schedule(&run.out.join("schedule.svg"), title, &history.steps, clip)?;
    println!(
        "{}: {}, schedule.svg, ckpt/last, ckpt/best",
        run.out.display(),
        files.join(", ")
    );
    Ok(())
}

// ANCHOR: sample
fn sample(cmd: SampleCmd) -> Result<()> {
    let opts = cmd.sampling.options()?;
    let dir = cmd
        .checkpoint
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(CHAPTER).join("ckpt/best"));
    let device = cmd.backend.open()?;
    let (model, _, meta) = checkpoint::load(&dir, &device, None)?;
    let model = model.with_kernels(cmd.kernels.kernels());
    if let Some(file) = &cmd.tokenizer {
        let asked = Tokenizer::Bpe(Bpe::load(file)?);
        checkpoint::check_tokenizer(&meta, &asked).with_context(|| {
            format!(
                "the checkpoint {} does not read {}",
                dir.display(),
                file.display()
            )
        })?;
    }
    let tok = meta.tokenizer.clone();
    let prompt = if cmd.prompt.is_empty() {
        "\n"
    } else {
        &cmd.prompt
    };
    tok.encode(prompt)
        .map_err(|e| anyhow::anyhow!("the prompt cannot be encoded: {e}"))?;
    let (step, val) = (meta.step, meta.val_loss);
    eprintln!(
        "checkpoint {} (step {step}, val {val:.4}), backend {}",
        dir.display(),
        cmd.backend
    );
    for i in 0..cmd.sampling.num_samples {
        if i > 0 {
            println!("\n---------------");
        }
        let seed = cmd.seed + i as u64;
        stream_sample(
            &model,
            &tok,
            prompt,
            cmd.sampling.max_new_tokens,
            opts,
            seed,
        )?;
    }
    Ok(())
}

/// Prints `prompt`, then the text the model generates, as it comes. The model always
/// sees one shape (see `generate_fixed_shape`), so wgpu compiles its kernels only once.
fn stream_sample(
    model: &Gpt,
    tok: &Tokenizer,
    prompt: &str,
    n: usize,
    opts: SampleOptions,
    seed: u64,
) -> Result<()> {
    let context = tok.encode(prompt)?;
    let mut rng = rng_for(seed, stream::SAMPLE, 4);
    let mut stdout = std::io::stdout();
    let mut text = StreamDecoder::default();
    print!("{prompt}");
    generate_fixed_shape(model, &context, n, opts, &mut rng, |t| {
        print!("{}", text.push(tok, t));
        let _ = stdout.flush();
    });
    println!("{}", text.finish());
    Ok(())
}
// ANCHOR_END: sample

// ANCHOR: bench
/// `--bench N`: times N training steps after `--bench-warmup` (3) untimed ones and writes
/// bench.json. With
/// `--resume`, the trained weights of DIR/ckpt/last (with the settings they were trained with):
/// on the CPU backends some operations (GELU's erf) slow down as the activations widen.
fn benchmark(
    a: &TrainCmd,
    cfg: PretrainConfig,
    model: Gpt,
    run: &Run,
    data: &Dataset<Tokenizer>,
    n: usize,
) -> Result<()> {
    let (cfg, model, trained_steps) = if a.resume {
        let ckpt = run.out.join("ckpt/last");
        let (trained, _, meta) = checkpoint::load(&ckpt, &model_device(&model), None)?;
        checkpoint::check_tokenizer(&meta, &data.tokenizer)?;
        data.check_block_size(meta.config.model.block_size)?;
        (
            meta.config,
            trained.with_kernels(a.kernels.kernels()),
            meta.step,
        )
    } else {
        (cfg, model, 0)
    };
    let weights = match trained_steps {
        0 => "fresh weights".to_string(),
        s => format!("the weights of step {s}"),
    };
    section("4.8", &format!("Benchmark: {n} steps from {weights}"));
    let parameters = model.num_params();
    let times = time_steps(&cfg, model, data, a.bench_warmup, n)?;
    println!(
        "first step {:.1} ms; median of {n}: {:.1} ms/step, {} tokens/s, {:.1} GFLOP/s",
        times.first_step_ms,
        times.median_ms_per_step,
        human(times.tokens_per_s),
        times.gflops
    );
    let result = Bench::new(
        &cfg,
        run.backend,
        a.kernels.kernels(),
        trained_steps,
        parameters,
        times,
    );
    write_json(&run.out.join("bench.json"), &result)?;
    println!("wrote {}", run.out.join("bench.json").display());
    Ok(())
}
// ANCHOR_END: bench
