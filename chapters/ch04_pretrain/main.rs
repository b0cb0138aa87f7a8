//! Chapter 4 as a notebook: pre-train the chapter 3 decoder on Tiny Shakespeare, keep
//! checkpoints, and sample from them. This is the course's main job.
//!
//! Train:  `cargo run --release --bin ch04_pretrain -- --preset baby`
//! Sample: `cargo run --release --bin ch04_pretrain -- sample --prompt "ROMEO:"`

use anyhow::{Result, bail};
use burn::module::Module;
use burn::prelude::*;
use clap::{Args as ClapArgs, Parser, Subcommand};
use course::ch03_gpt::{Gpt, Norm};
use course::ch04_pretrain::checkpoint::{self, Meta};
use course::ch04_pretrain::{
    PRESETS, PretrainConfig, StepTimes, decayed_group, learning_rate, mfu, optimizer, preset,
    time_steps, train_settings,
};
use course::common::backend::Backend;
use course::common::cli::CommonArgs;
use course::common::data::load_corpus;
use course::common::dataset::{Dataset, rng_for, stream};
use course::common::report::{Machine, Summary, plot_losses, write_json, write_losses_csv};
use course::common::sample::{SampleOptions, print_sample};
use course::common::section;
use course::common::tokenizer::CharTokenizer;
use course::common::train::{LossRecord, TrainHooks, human, train};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
    /// Starting point for every setting below: tiny, baby, lecture or gpt1.
    #[arg(long, default_value = "baby")]
    preset: String,
    #[arg(long)]
    n_layer: Option<usize>,
    #[arg(long)]
    n_head: Option<usize>,
    #[arg(long)]
    n_embd: Option<usize>,
    /// Context length.
    #[arg(long)]
    block_size: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    dropout: Option<f64>,
    /// LayerNorm placement: pre (GPT-2) or post (GPT-1).
    #[arg(long, value_enum)]
    norm: Option<Norm>,
    /// Biases in Linear and LayerNorm layers.
    #[arg(long)]
    bias: Option<bool>,
    /// Separate output head instead of the tied token embedding.
    #[arg(long)]
    untie: bool,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate of the cosine decay.
    #[arg(long)]
    min_lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    beta1: Option<f64>,
    #[arg(long)]
    beta2: Option<f64>,
    /// Global gradient-norm clip (0: off).
    #[arg(long)]
    grad_clip: Option<f64>,
    #[arg(long)]
    eval_interval: Option<usize>,
    #[arg(long)]
    eval_iters: Option<usize>,
    /// Continue from the last checkpoint in the output folder (with --bench: time its
    /// trained weights).
    #[arg(long)]
    resume: bool,
    /// Stop after this step (with a checkpoint), as if interrupted; `--resume` continues.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Benchmark instead of training: time this many steps after 3 warm-up steps, write
    /// bench.json.
    #[arg(long, value_name = "N")]
    bench: Option<usize>,
    /// Peak GFLOP/s of your hardware, for the model-FLOPs-utilisation estimate (default:
    /// about the fp32 peak of the 2-core AVX-512 CPU the course was measured on).
    #[arg(long, default_value_t = 180.0)]
    peak_gflops: f64,
    /// Characters to sample from the best checkpoint after training.
    #[arg(long, default_value_t = 500)]
    sample_chars: usize,
}

#[derive(ClapArgs, Debug)]
struct SampleCmd {
    /// Checkpoint folder (default: runs/ch04_pretrain/ckpt/best).
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// Text to continue (every character must be in the model's vocabulary).
    #[arg(long, default_value = "")]
    prompt: String,
    /// Softmax temperature; 0 always picks the most likely character.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample only among the k most likely characters.
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    #[arg(long, default_value_t = 500)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, default_value = "ndarray", value_parser = |s: &str| s.parse::<Backend>())]
    backend: Backend,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(run)
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Sample(cmd)) => sample(cmd),
        None => pretrain(cli.train),
    }
}

// ANCHOR: build_config
/// The preset, then every flag that was given on top of it.
fn build_config(a: &TrainCmd, vocab_size: usize) -> Result<PretrainConfig> {
    let Some(mut c) = preset(&a.preset, vocab_size) else {
        bail!(
            "unknown preset '{}'; choose one of {}",
            a.preset,
            PRESETS.join(", ")
        );
    };
    let m = &mut c.model;
    m.n_layer = a.n_layer.unwrap_or(m.n_layer);
    m.n_head = a.n_head.unwrap_or(m.n_head);
    m.n_embd = a.n_embd.unwrap_or(m.n_embd);
    m.block_size = a.block_size.unwrap_or(m.block_size);
    m.dropout = a.dropout.unwrap_or(m.dropout);
    m.norm = a.norm.unwrap_or(m.norm);
    m.bias = a.bias.unwrap_or(m.bias);
    m.tie_weights &= !a.untie;
    c.batch_size = a.batch_size.unwrap_or(c.batch_size);
    c.steps = a.steps.unwrap_or(c.steps);
    c.lr = a.lr.unwrap_or(c.lr);
    c.min_lr = a.min_lr.unwrap_or(c.min_lr);
    c.warmup_steps = a.warmup_steps.unwrap_or(c.warmup_steps);
    c.weight_decay = a.weight_decay.unwrap_or(c.weight_decay);
    c.beta1 = a.beta1.unwrap_or(c.beta1);
    c.beta2 = a.beta2.unwrap_or(c.beta2);
    c.grad_clip = a.grad_clip.unwrap_or(c.grad_clip);
    c.eval_interval = a.eval_interval.unwrap_or(c.eval_interval);
    c.eval_iters = a.eval_iters.unwrap_or(c.eval_iters);
    c.seed = a.common.seed;
    validate(&c)?;
    Ok(c)
}
// ANCHOR_END: build_config

fn validate(c: &PretrainConfig) -> Result<()> {
    let m = &c.model;
    if m.n_layer == 0 || m.n_head == 0 || m.n_embd == 0 || m.block_size == 0 || c.batch_size == 0 {
        bail!("layers, heads, width, block size and batch size must all be at least 1");
    }
    if !m.n_embd.is_multiple_of(m.n_head) {
        bail!(
            "--n-embd ({}) must be a multiple of --n-head ({})",
            m.n_embd,
            m.n_head
        );
    }
    if !(0.0..1.0).contains(&m.dropout) {
        bail!("--dropout must be in [0, 1), got {}", m.dropout);
    }
    if !(c.lr > 0.0 && c.lr <= 1.0 && c.min_lr >= 0.0 && c.min_lr <= c.lr) {
        bail!(
            "need 0 < --lr <= 1 and 0 <= --min-lr <= --lr (got {} and {})",
            c.lr,
            c.min_lr
        );
    }
    if c.eval_interval == 0 || c.eval_iters == 0 {
        bail!("--eval-interval and --eval-iters must be at least 1");
    }
    if c.grad_clip < 0.0 {
        bail!("--grad-clip must be 0 (off) or positive");
    }
    Ok(())
}

// ANCHOR: hooks
/// The training loop's hooks for pre-training: the schedule, checkpoints and a progress line
/// with the learning rate and model FLOPs utilisation.
struct Pretrain<'a> {
    config: &'a PretrainConfig,
    tokenizer: &'a CharTokenizer,
    ckpt: PathBuf,
    backend: Backend,
    losses: Vec<LossRecord>,
    best_val: f64,
    peak_flops: f64,
}

impl TrainHooks<Gpt> for Pretrain<'_> {
    fn learning_rate(&self, step: usize) -> f64 {
        learning_rate(self.config, step)
    }

    fn on_eval(
        &mut self,
        record: &LossRecord,
        model: &Gpt,
        optim: &burn::optim::ModuleOptimizer,
    ) -> Result<()> {
        self.losses.push(*record);
        let improved = record.val < self.best_val;
        self.best_val = self.best_val.min(record.val);
        let meta = Meta {
            format: checkpoint::FORMAT,
            step: record.step,
            config: self.config.clone(),
            vocab: self.tokenizer.vocab_string(),
            val_loss: record.val,
            best_val_loss: self.best_val,
            losses: self.losses.clone(),
            backend: self.backend.to_string(),
        };
        checkpoint::save(&self.ckpt.join("last"), model, Some(optim), &meta)?;
        if improved {
            checkpoint::save(&self.ckpt.join("best"), model, None, &meta)?;
        }
        Ok(())
    }

    fn progress_extra(&self, step: usize, tokens_per_second: f64) -> String {
        let gflops = self.config.model.flops_per_token() * tokens_per_second / 1e9;
        format!(
            " | lr {:.2e} | {gflops:.1} GFLOP/s, MFU {:.1}%",
            learning_rate(self.config, step),
            100.0 * mfu(&self.config.model, tokens_per_second, self.peak_flops)
        )
    }
}
// ANCHOR_END: hooks

fn pretrain(a: TrainCmd) -> Result<()> {
    let out = a.common.out_dir(CHAPTER);
    let ckpt = out.join("ckpt");
    let device = a.common.backend.device();
    device.seed(a.common.seed);
    let ad = device.clone().autodiff();
    println!("Chapter 4: pre-training (backend: {})", a.common.backend);

    section("4.1", "Data and configuration");
    let corpus = load_corpus(a.common.data.as_deref())?;
    let data = Dataset::new(&corpus.text)?;
    let tok = &data.tokenizer;
    let cfg = build_config(&a, tok.vocab_size())?;
    data.check_block_size(cfg.model.block_size)?;
    println!(
        "{}: {} characters, vocabulary {}",
        corpus.path.display(),
        corpus.text.chars().count(),
        tok.vocab_size()
    );
    println!(
        "preset {}: {} layers, {} heads, {} wide, block {}, batch {}, dropout {}, {:?}-LN, bias {}, tied {}",
        cfg.preset,
        cfg.model.n_layer,
        cfg.model.n_head,
        cfg.model.n_embd,
        cfg.model.block_size,
        cfg.batch_size,
        cfg.model.dropout,
        cfg.model.norm,
        cfg.model.bias,
        cfg.model.tie_weights
    );

    section("4.2", "The model");
    let model = cfg.model.init(&ad);
    let flops = cfg.model.flops_per_token();
    println!(
        "parameters: {} (formula: {})",
        model.num_params(),
        cfg.model.param_count()
    );
    println!(
        "training FLOPs per token: {:.2} M (6N + attention); per step: {:.2} G",
        flops / 1e6,
        flops * (cfg.batch_size * cfg.model.block_size) as f64 / 1e9
    );

    // ANCHOR: optimizer_demo
    section("4.3", "Optimizer and schedule");
    let mut optim = optimizer(&cfg);
    let (decayed, kept) = param_groups(&model);
    println!(
        "AdamW, betas ({}, {}), weight decay {} on {} weight matrices ({} values);",
        cfg.beta1, cfg.beta2, cfg.weight_decay, decayed.0, decayed.1
    );
    println!(
        "  no decay on {} biases, LayerNorm gains and embeddings ({} values)",
        kept.0, kept.1
    );
    println!("gradient clipping: global norm {}", cfg.grad_clip);
    for step in [
        0,
        cfg.warmup_steps / 2,
        cfg.warmup_steps,
        cfg.steps / 2,
        cfg.steps - 1,
    ] {
        println!("  lr at step {step:>6}: {:.3e}", learning_rate(&cfg, step));
    }
    // ANCHOR_END: optimizer_demo

    if let Some(n) = a.bench {
        // With --resume, time the trained weights of DIR/ckpt/last (with the settings they were
        // trained with) instead of fresh ones: on the CPU backends some operations (GELU's
        // erf) slow down as the activations widen.
        if a.resume {
            let (trained, _, meta) = checkpoint::load(&ckpt.join("last"), &ad, None)?;
            checkpoint::check_vocab(&meta, tok)?;
            data.check_block_size(meta.config.model.block_size)?;
            return bench(&a, &meta.config, trained, meta.step, &data, n, &out);
        }
        return bench(&a, &cfg, model, 0, &data, n, &out);
    }

    // ANCHOR: train
    section("4.4", "Training");
    let mut hooks = Pretrain {
        config: &cfg,
        tokenizer: tok,
        ckpt: ckpt.clone(),
        backend: a.common.backend,
        losses: Vec::new(),
        best_val: f64::INFINITY,
        peak_flops: a.peak_gflops * 1e9,
    };
    let (mut model, mut start) = (model, 0);
    if a.resume {
        let (m, o, meta) = checkpoint::load(&ckpt.join("last"), &ad, Some(optim))?;
        checkpoint::check_compatible(&meta, &cfg, tok)?;
        println!(
            "resuming from step {} (best val so far {:.4})",
            meta.step, meta.best_val_loss
        );
        (model, optim, start) = (m, o.expect("optimizer state"), meta.step);
        hooks.losses = meta.losses;
        hooks.best_val = meta.best_val_loss;
    } else if ckpt.join("last").exists() {
        println!(
            "(starting afresh: the checkpoints in {} will be replaced; --resume continues them)",
            ckpt.display()
        );
    }
    let started = Instant::now();
    let run = train_settings(&cfg, a.stop_after);
    let (_, report) = train(model, &mut optim, &data, &run, start, &mut hooks)?;
    let losses = hooks.losses.clone();
    let last = *losses.last().expect("evaluated");
    println!(
        "step {}: train {:.4}, val {:.4} (best {:.4}); {:.1} s, {} tokens/s, {:.1} GFLOP/s",
        last.step,
        last.train,
        last.val,
        hooks.best_val,
        report.wall_seconds,
        human(report.tokens_per_second),
        flops * report.tokens_per_second / 1e9
    );
    // ANCHOR_END: train

    section("4.5", "A sample from the best checkpoint");
    let (best, _, meta) = checkpoint::load(&ckpt.join("best"), &device, None)?;
    println!(
        "(step {}, val {:.4}, temperature 0.8)",
        meta.step, meta.val_loss
    );
    stream_sample(
        &best,
        tok,
        "\n",
        a.sample_chars,
        SampleOptions {
            temperature: 0.8,
            top_k: None,
        },
        a.common.seed,
    )?;

    section("4.6", "What the run wrote");
    write_losses_csv(&out.join("losses.csv"), &losses)?;
    plot_losses(
        &out.join("loss_curve.svg"),
        &format!("Chapter 4: pre-training ({} preset)", cfg.preset),
        &[("", &losses)],
    )?;
    let summary = Summary {
        chapter: CHAPTER,
        backend: a.common.backend.to_string(),
        seed: cfg.seed,
        hyperparameters: &cfg,
        learning_rate: cfg.lr,
        parameters: best.num_params(),
        steps: last.step,
        final_train_loss: last.train,
        final_val_loss: last.val,
        wall_seconds: started.elapsed().as_secs_f64(),
        train_seconds: report.train_seconds,
        tokens_per_second: report.tokens_per_second,
        data: corpus.path.display().to_string(),
        variants: vec![],
    };
    write_json(&out.join("summary.json"), &summary)?;
    println!(
        "{}/summary.json, losses.csv, loss_curve.svg, ckpt/last, ckpt/best",
        out.display()
    );
    Ok(())
}

/// (count, values) of the decayed parameters and of the rest.
fn param_groups(model: &Gpt) -> ((usize, usize), (usize, usize)) {
    struct Groups {
        group: burn::module::ParamGroup,
        path: Vec<String>,
        decayed: (usize, usize),
        kept: (usize, usize),
    }
    impl burn::module::ModuleVisitor for Groups {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let n = param.shape().num_elements();
            let path = self.path.join("."); // e.g. "blocks.0.attn.c_attn.weight"
            let g = if self.group.matches(&param.id, Some(&path)) {
                &mut self.decayed
            } else {
                &mut self.kept
            };
            *g = (g.0 + 1, g.1 + n);
        }
    }
    let mut g = Groups {
        group: decayed_group(),
        path: vec![],
        decayed: (0, 0),
        kept: (0, 0),
    };
    model.visit(&mut g);
    (g.decayed, g.kept)
}

// ANCHOR: sample
fn sample(cmd: SampleCmd) -> Result<()> {
    let dir = cmd
        .checkpoint
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(CHAPTER).join("ckpt/best"));
    let device = cmd.backend.device();
    device.seed(cmd.seed);
    let (model, _, meta) = checkpoint::load(&dir, &device, None)?;
    let tok = CharTokenizer::from_chars(meta.vocab.chars().collect());
    let prompt = if cmd.prompt.is_empty() {
        "\n".to_string()
    } else {
        cmd.prompt.clone()
    };
    tok.encode(&prompt)
        .map_err(|e| anyhow::anyhow!("the prompt cannot be encoded: {e}"))?;
    eprintln!(
        "checkpoint {} (step {}, val {:.4}), backend {}",
        dir.display(),
        meta.step,
        meta.val_loss,
        cmd.backend
    );
    let opts = SampleOptions {
        temperature: cmd.temperature,
        top_k: cmd.top_k,
    };
    for i in 0..cmd.num_samples {
        if i > 0 {
            println!("\n---------------");
        }
        stream_sample(
            &model,
            &tok,
            &prompt,
            cmd.max_new_tokens,
            opts,
            cmd.seed + i as u64,
        )?;
    }
    Ok(())
}

/// Prints `prompt`, then the characters the model generates, as they come.
fn stream_sample(
    model: &Gpt,
    tok: &CharTokenizer,
    prompt: &str,
    n: usize,
    opts: SampleOptions,
    seed: u64,
) -> Result<()> {
    let context = tok.encode(prompt)?;
    let mut rng = rng_for(seed, stream::SAMPLE, 4);
    print!("{prompt}");
    print_sample(model, tok, &context, n, model.block_size, opts, &mut rng);
    Ok(())
}
// ANCHOR_END: sample

// ANCHOR: bench
#[derive(Serialize)]
struct Bench<'a> {
    preset: &'a str,
    backend: String,
    /// 0: fresh weights; otherwise the step of the checkpoint whose weights were timed.
    trained_steps: usize,
    #[serde(flatten)]
    times: StepTimes,
    flops_per_token: f64,
    tokens_per_step: usize,
    parameters: usize,
    config: &'a PretrainConfig,
    machine: Machine,
}

/// `--bench N`: times N training steps after 3 warm-up steps and writes bench.json.
fn bench(
    a: &TrainCmd,
    cfg: &PretrainConfig,
    model: Gpt,
    trained_steps: usize,
    data: &Dataset,
    n: usize,
    out: &Path,
) -> Result<()> {
    let weights = match trained_steps {
        0 => "fresh weights".to_string(),
        s => format!("the weights of step {s}"),
    };
    section("4.4", &format!("Benchmark: {n} steps from {weights}"));
    let parameters = model.num_params();
    let times = time_steps(cfg, model, data, 3, n)?;
    println!(
        "first step {:.1} ms; median of {n}: {:.1} ms/step, {} tokens/s, {:.1} GFLOP/s",
        times.first_step_ms,
        times.median_ms_per_step,
        human(times.tokens_per_s),
        times.gflops
    );
    let result = Bench {
        preset: &cfg.preset,
        backend: a.common.backend.to_string(),
        trained_steps,
        times,
        flops_per_token: cfg.model.flops_per_token(),
        tokens_per_step: cfg.batch_size * cfg.model.block_size,
        parameters,
        config: cfg,
        machine: Machine::detect(),
    };
    std::fs::create_dir_all(out)?;
    write_json(&out.join("bench.json"), &result)?;
    println!("wrote {}", out.join("bench.json").display());
    Ok(())
}
// ANCHOR_END: bench
