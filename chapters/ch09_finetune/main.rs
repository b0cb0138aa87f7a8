//! Chapter 9 as a notebook: GPT-1's fine-tuning on a task cut from the corpus, four ways to
//! fine-tune measured side by side, LoRA merged, and GPT-2 taught to follow instructions.
//!
//! Run (after chapter 4 has saved a checkpoint):
//! `cargo run --release --bin ch09_finetune`

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::AdamWConfig;
use burn::prelude::{Int, Tensor};
use clap::Parser;
use course::ch03_gpt::{Gpt, GptConfig};
use course::ch04_pretrain::checkpoint;
use course::ch05_fast::FUSED;
use course::ch07_bpe::END_OF_TEXT;
use course::ch07_bpe::gpt2;
use course::ch08_pretrained::tokenizer::Tokenizer;
use course::ch08_pretrained::{load_openai, pretrained_weights, published};
use course::ch09_finetune::classify::{
    Classifier, Encoded, FineTuneSettings, LoraSettings, Method, Recipe, accuracy, encode_all,
    fine_tune, lm_scores, scores, threshold_accuracy,
};
use course::ch09_finetune::instruct::{
    self, InstructSettings, Record, Tokens, instruction_file, load_records, respond,
};
use course::ch09_finetune::lora::{count_params, merge};
use course::ch09_finetune::task::{Corruption, Task, corrupted_task, speaker_task};
use course::common::cli::{CommonArgs, positive};
use course::common::max_diff;
use course::common::report::{plot_curves_at, write_atomic, write_json};
use course::common::{Run, section};
use plotters::prelude::SeriesLabelPosition;
use serde::Serialize;
use std::io::{BufRead, Write};
use std::path::PathBuf;

const CHAPTER: &str = "ch09_finetune";

/// Chapter 9: fine-tuning.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The pre-trained model: a chapter 4 checkpoint folder.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "runs/ch04_pretrain/ckpt/best"
    )]
    checkpoint: PathBuf,
    /// Which parts to run.
    #[arg(long, value_enum, default_value = "all")]
    part: Part,
    /// The task: is a line's spelling, or its word order, as Shakespeare wrote it; or who says
    /// a speech.
    #[arg(long, value_enum, default_value = "spelling")]
    task: TaskKind,
    /// Speakers in the speaker task (the most frequent ones of the held-out text).
    #[arg(long, default_value_t = 4)]
    classes: usize,
    /// Optimizer steps of each fine-tuning run.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate of every method (warm-up over 10% of the steps, then linear decay).
    #[arg(long, default_value_t = 1e-3, value_parser = positive)]
    lr: f64,
    /// Seeds per method (the table gives mean and spread).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// The methods to compare.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "scratch,full,last-block,lora"
    )]
    methods: Vec<Method>,
    /// GPT-1's auxiliary language-modelling loss weight (0: off).
    #[arg(long, default_value_t = 0.5)]
    aux_weight: f64,
    /// Feed the bare text, read at its last token, instead of GPT-1's start/extract wrapping.
    #[arg(long)]
    no_transform: bool,
    /// LoRA's rank and alpha.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    #[arg(long, default_value_t = 16.0, value_parser = positive)]
    lora_alpha: f64,
    /// Instruction tuning: which published GPT-2 to download on first use.
    #[arg(long, default_value = "gpt2")]
    model: String,
    /// A GPT-2 `model.safetensors` instead of the download (or set GPT2_WEIGHTS).
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Instruction-tune this chapter 4 checkpoint (trained with a chapter 7 BPE tokenizer)
    /// instead of GPT-2.
    #[arg(long, value_name = "DIR")]
    instruct_checkpoint: Option<PathBuf>,
    /// The instruction records (default: $GPT_INSTRUCTIONS, else downloaded into data/).
    #[arg(long, value_name = "FILE")]
    instructions: Option<PathBuf>,
    #[arg(long, default_value_t = 230)]
    instruct_steps: usize,
    #[arg(long, default_value_t = 8)]
    instruct_batch_size: usize,
    #[arg(long, default_value_t = 5e-5, value_parser = positive)]
    instruct_lr: f64,
    /// Count the prompt's tokens in the loss too (LLMs-from-scratch's default does).
    #[arg(long)]
    keep_prompt_in_loss: bool,
    /// Test records to answer into responses.json (at most the 110 of the test split).
    #[arg(long, default_value_t = 110)]
    responses: usize,
    /// Tokens per answer at most.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// After instruction tuning, read instructions from stdin, one per line, and answer each.
    #[arg(long)]
    interactive: bool,
    /// `--part speed`: timed steps (after one untimed), at GPT-2 124M's shape with random
    /// weights (or the `--weights` given).
    #[arg(long, default_value_t = 3)]
    speed_steps: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TaskKind {
    Spelling,
    Order,
    Speaker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Classification, then instruction tuning.
    All,
    Classify,
    Instruct,
    /// The time of an instruction-tuning step at GPT-2 124M's shape (not part of `all`).
    Speed,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        check(&args)?;
        let run = args.common.start(CHAPTER, "Chapter 9: fine-tuning", None)?;
        if matches!(args.part, Part::All | Part::Classify) {
            classification(&args, &run)?;
        }
        if matches!(args.part, Part::All | Part::Instruct) {
            instruction_tuning(&args, &run)?;
        }
        if args.part == Part::Speed {
            speed(&args, &run)?;
        }
        Ok(())
    })
}

fn check(a: &Args) -> Result<()> {
    if a.steps == 0 || a.batch_size == 0 || a.seeds == 0 || a.methods.is_empty() {
        bail!("--steps, --batch-size, --seeds and --methods must be at least 1");
    }
    if !(a.aux_weight >= 0.0 && a.aux_weight.is_finite()) {
        bail!("--aux-weight must be 0 or positive, got {}", a.aux_weight);
    }
    if a.lora_rank == 0 || a.instruct_steps == 0 || a.instruct_batch_size == 0 || a.speed_steps == 0
    {
        bail!(
            "--lora-rank, --instruct-steps, --instruct-batch-size and --speed-steps must be at \
             least 1"
        );
    }
    Ok(())
}

/// One row of the table: a method's results over the seeds.
#[derive(Serialize)]
struct MethodResult {
    method: Method,
    accuracies: Vec<f64>,
    mean: f64,
    spread: f64,
    trainable: usize,
    total: usize,
    ms_per_step: f64,
}

#[derive(Serialize)]
struct ClassifySummary {
    task: String,
    checkpoint: String,
    classes: Vec<String>,
    train_counts: Vec<usize>,
    test_counts: Vec<usize>,
    majority_baseline: f64,
    settings: FineTuneSettings,
    lora: LoraSettings,
    /// GPT-1's zero-shot heuristic (two-class tasks): the pre-trained model's mean token
    /// log-probability, thresholded on the training split.
    zero_shot: Option<ZeroShot>,
    results: Vec<MethodResult>,
    lora_merge_max_diff: Option<f32>,
}

#[derive(Serialize)]
struct ZeroShot {
    threshold: f64,
    accuracy: f64,
}

fn classification(args: &Args, run: &Run) -> Result<()> {
    let task = the_task(args, run)?;
    let (gpt, config, tok) = pretrained(args, run)?;
    let recipe = Recipe {
        transform: !args.no_transform,
        aux_weight: args.aux_weight,
    };
    the_input_transformation(&gpt, &tok, &task, recipe)?;
    let zero_shot = zero_shot(&gpt, &tok, &task)?;
    let lora = LoraSettings {
        rank: args.lora_rank,
        alpha: args.lora_alpha,
    };
    let (results, curves, merge_diff) =
        four_ways(args, run, (&gpt, &config), &tok, &task, recipe, lora)?;
    let summary = ClassifySummary {
        task: format!("{:?}", args.task).to_lowercase(),
        checkpoint: args.checkpoint.display().to_string(),
        classes: task.classes.clone(),
        train_counts: task.counts(&task.train),
        test_counts: task.counts(&task.test),
        majority_baseline: task.majority_baseline(),
        zero_shot,
        settings: settings(args, 0, recipe),
        lora,
        results,
        lora_merge_max_diff: merge_diff,
    };
    write_table(&summary, &run.out)?;
    let train: Vec<(&str, Vec<(f64, f64)>)> = (curves.iter())
        .map(|(m, c, _)| (m.name(), c.clone()))
        .collect();
    plot_curves_at(
        &run.out.join("finetune_losses.svg"),
        &format!(
            "Training loss (task + {} LM, 25-step mean), mean of the seeds",
            args.aux_weight
        ),
        "step",
        &train,
        SeriesLabelPosition::UpperRight,
    )?;
    let test: Vec<(&str, Vec<(f64, f64)>)> = (curves.iter())
        .map(|(m, _, c)| (m.name(), c.clone()))
        .collect();
    plot_curves_at(
        &run.out.join("finetune_test_losses.svg"),
        "Task loss on the held-out test split, mean of the seeds",
        "step",
        &test,
        SeriesLabelPosition::UpperRight,
    )?;
    write_json(&run.out.join("classify.json"), &summary)?;
    println!(
        "{}: classify.json, classify.md, finetune_losses.svg, finetune_test_losses.svg",
        run.out.display()
    );
    Ok(())
}

// ANCHOR: the_task
/// 9.1: the task, its classes and split, and the accuracy that needs no model at all.
fn the_task(args: &Args, run: &Run) -> Result<Task> {
    section("9.1", "The task");
    let text = &run.corpus.text;
    let task = match args.task {
        TaskKind::Spelling => corrupted_task(text, Corruption::Spelling, 5)?,
        TaskKind::Order => corrupted_task(text, Corruption::WordOrder, 5)?,
        TaskKind::Speaker => speaker_task(text, args.classes, 5)?,
    };
    println!(
        "{} of the last 10% of the text (which chapter 4 never trains on), {} classes:",
        match args.task {
            TaskKind::Spelling => "is a line spelled as Shakespeare wrote it? Lines of 6+ words",
            TaskKind::Order => "is a line in Shakespeare's word order? Lines of 6+ words",
            TaskKind::Speaker => "who says this speech? Speeches",
        },
        task.classes.len()
    );
    let (train, test) = (task.counts(&task.train), task.counts(&task.test));
    for (i, name) in task.classes.iter().enumerate() {
        println!(
            "  {i} {name:<12} train {:>4}  test {:>4}",
            train[i], test[i]
        );
    }
    println!(
        "{} train, {} test; always answering the most frequent class: {:.1}% of the test",
        task.train.len(),
        task.test.len(),
        100.0 * task.majority_baseline()
    );
    for e in task.test.iter().take(2) {
        let shown: String = e.text.chars().take(120).collect();
        println!("test example ({}):\n  {shown}", task.classes[e.label]);
    }
    Ok(task)
}
// ANCHOR_END: the_task

/// The pre-trained model and its tokenizer, on the training device with chapter 5's kernels.
fn pretrained(args: &Args, run: &Run) -> Result<(Gpt, GptConfig, Tokenizer)> {
    if !args.checkpoint.exists() {
        bail!(
            "no checkpoint at {}: train one with `cargo run --release --bin ch04_pretrain` \
             (or pass --checkpoint DIR)",
            args.checkpoint.display()
        );
    }
    let (gpt, _, meta) =
        checkpoint::load::<Tokenizer>(&args.checkpoint, &run.device.clone().autodiff(), None)?;
    println!(
        "pre-trained: {} (preset {}, step {}, val loss {:.4}), {} parameters",
        args.checkpoint.display(),
        meta.config.preset,
        meta.step,
        meta.val_loss,
        gpt.num_params()
    );
    Ok((gpt.with_kernels(FUSED), meta.config.model, meta.tokenizer))
}

// ANCHOR: the_input_transformation
/// 9.2: one passage as the classifier reads it.
fn the_input_transformation(gpt: &Gpt, tok: &Tokenizer, task: &Task, recipe: Recipe) -> Result<()> {
    section("9.2", "GPT-1's input transformation");
    let model = Classifier::new(gpt.clone(), task.classes.len(), recipe.transform);
    let ids = model.encode(tok, &task.test[0].text)?;
    let (start, extract) = model.start_and_extract();
    let name = |id: usize| match id {
        _ if recipe.transform && id == start => "<start>".to_string(),
        _ if recipe.transform && id == extract => "<extract>".to_string(),
        _ => format!("{:?}", tok.decode(&[id])),
    };
    let shown: Vec<String> = ids.iter().take(6).map(|&i| name(i)).collect();
    let last: Vec<String> = ids.iter().rev().take(3).rev().map(|&i| name(i)).collect();
    println!(
        "{} tokens: {} ... {}",
        ids.len(),
        shown.join(" "),
        last.join(" ")
    );
    println!(
        "the head reads the state at the last token; new tokens: {}; auxiliary LM loss weight {}",
        match recipe.transform {
            true => format!("<start> = {start}, <extract> = {extract}"),
            false => "none (bare text)".into(),
        },
        recipe.aux_weight
    );
    Ok(())
}
// ANCHOR_END: the_input_transformation

// ANCHOR: zero_shot_main
/// GPT-1's zero-shot heuristic, for a task of two classes: what the pre-trained model knows
/// before any fine-tuning.
fn zero_shot(gpt: &Gpt, tok: &Tokenizer, task: &Task) -> Result<Option<ZeroShot>> {
    if task.classes.len() != 2 {
        return Ok(None);
    }
    let train = lm_scores(gpt, tok, &task.train)?;
    let test = lm_scores(gpt, tok, &task.test)?;
    let (threshold, accuracy) = threshold_accuracy((&train, &task.train), (&test, &task.test));
    println!(
        "zero-shot (no training): a passage is '{}' when the pre-trained model's mean token \
         log-probability is above {threshold:.3} (the best cut on the training split): \
         {:.1}% of the test",
        task.classes[1],
        100.0 * accuracy
    );
    Ok(Some(ZeroShot {
        threshold,
        accuracy,
    }))
}
// ANCHOR_END: zero_shot_main

fn settings(args: &Args, seed: u64, recipe: Recipe) -> FineTuneSettings {
    FineTuneSettings {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: 0.01,
        seed,
        recipe,
        eval_every: (args.steps / 12).max(1),
    }
}

/// Per method, the mean over the seeds of the smoothed training loss and of the test loss.
type Curves = Vec<(Method, Vec<(f64, f64)>, Vec<(f64, f64)>)>;

// ANCHOR: four_ways
/// 9.3: every method, every seed, the same split, batches and steps; then 9.4, the LoRA run
/// of the first seed merged.
fn four_ways(
    args: &Args,
    run: &Run,
    (gpt, config): (&Gpt, &GptConfig),
    tok: &Tokenizer,
    task: &Task,
    recipe: Recipe,
    lora: LoraSettings,
) -> Result<(Vec<MethodResult>, Curves, Option<f32>)> {
    section("9.3", "Four ways to fine-tune");
    let (mut results, mut curves, mut merge_diff) = (Vec::new(), Vec::new(), None);
    for &method in &args.methods {
        let (mut accuracies, mut ms, mut count) = (vec![], 0.0, None);
        let (mut train_curve, mut test_curve) = (vec![], vec![]);
        for seed in 0..args.seeds {
            // The run's own random draws (head, new tokens, LoRA's A, a fresh model) follow
            // from its seed, here, where the notebook can be read.
            run.device.seed(args.common.seed + seed);
            let model = method.prepare(gpt, config, task.classes.len(), recipe, lora);
            count = Some(count_params(&model));
            let train = encode_all(&model, tok, &task.train)?;
            let test = encode_all(&model, tok, &task.test)?;
            let s = settings(args, args.common.seed + seed, recipe);
            let (trained, report) = fine_tune(model, &train, &test, &s)?;
            let acc = accuracy(&trained, &test);
            println!(
                "{:<18} seed {seed}: test accuracy {:5.1}%  ({:.0} ms/step, final training \
                 loss {:.3}, test loss {:.3})",
                method.name(),
                100.0 * acc,
                report.ms_per_step,
                smoothed(&report.losses).last().map_or(f64::NAN, |p| p.1),
                report.test_losses.last().map_or(f64::NAN, |p| p.1)
            );
            accuracies.push(acc);
            ms += report.ms_per_step / args.seeds as f64;
            let n = args.seeds as f64;
            add_curve(&mut train_curve, &smoothed(&report.losses), n);
            let test_losses: Vec<(f64, f64)> = (report.test_losses.iter())
                .map(|&(s, l)| (s as f64, l))
                .collect();
            add_curve(&mut test_curve, &test_losses, n);
            if method == Method::Lora && seed == 0 {
                merge_diff = Some(merged_equals_unmerged(&trained, &test));
            }
        }
        let count = count.expect("at least one seed");
        let (mean, spread) = mean_and_spread(&accuracies);
        results.push(MethodResult {
            method,
            accuracies,
            mean,
            spread,
            trainable: count.trainable,
            total: count.total,
            ms_per_step: ms,
        });
        curves.push((method, train_curve, test_curve));
    }
    Ok((results, curves, merge_diff))
}
// ANCHOR_END: four_ways

// ANCHOR: merged
/// 9.4: LoRA's update folded into the weights scores every test passage as the adapters do.
fn merged_equals_unmerged(model: &Classifier, test: &[Encoded]) -> f32 {
    section("9.4", "LoRA, merged");
    let unmerged = scores(model, test).concat();
    let merged_model = merge(model.valid());
    let merged = scores(&merged_model, test).concat();
    let diff = max_diff(&unmerged, &merged);
    println!(
        "{} parameters with adapters, {} merged; largest score difference over the {} test \
         passages: {diff:.2e}",
        count_params(model).total,
        count_params(&merged_model).total,
        test.len()
    );
    diff
}
// ANCHOR_END: merged

/// A moving average over 25 steps, as (step, loss).
fn smoothed(losses: &[f64]) -> Vec<(f64, f64)> {
    let w = 25.min(losses.len()).max(1);
    (w - 1..losses.len())
        .map(|i| {
            (
                i as f64,
                losses[i + 1 - w..=i].iter().sum::<f64>() / w as f64,
            )
        })
        .collect()
}

fn add_curve(sum: &mut Vec<(f64, f64)>, curve: &[(f64, f64)], n: f64) {
    if sum.is_empty() {
        sum.extend(curve.iter().map(|&(x, _)| (x, 0.0)));
    }
    for (s, c) in sum.iter_mut().zip(curve) {
        s.1 += c.1 / n;
    }
}

/// Mean and sample standard deviation.
fn mean_and_spread(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn write_table(s: &ClassifySummary, out: &std::path::Path) -> Result<()> {
    let mut t = String::from(
        "| method | test accuracy (mean ± sd) | per seed | trainable parameters | ms/step |\n\
         |---|---:|---|---:|---:|\n",
    );
    for r in &s.results {
        let per: Vec<String> = r
            .accuracies
            .iter()
            .map(|a| format!("{:.1}", 100.0 * a))
            .collect();
        t += &format!(
            "| {} | {:.1}% ± {:.1} | {} | {} of {} | {:.0} |\n",
            r.method.name(),
            100.0 * r.mean,
            100.0 * r.spread,
            per.join(", "),
            r.trainable,
            r.total,
            r.ms_per_step
        );
    }
    if let Some(z) = &s.zero_shot {
        t += &format!(
            "| pre-trained, no training (GPT-1's zero-shot heuristic) | {:.1}% | | 0 | |\n",
            100.0 * z.accuracy
        );
    }
    t += &format!(
        "| always the most frequent class | {:.1}% | | 0 | |\n",
        100.0 * s.majority_baseline
    );
    println!("\n{t}");
    write_atomic(&out.join("classify.md"), t.as_bytes())
}

// ANCHOR: instruction_tuning
/// 9.5-9.7: GPT-2 (or a BPE checkpoint of chapter 4) taught to follow instructions.
fn instruction_tuning(args: &Args, run: &Run) -> Result<()> {
    section("9.5", "Instruction data");
    let path = instruction_file(args.instructions.as_deref())?;
    let records = load_records(&path)?;
    let (train, test, val) = instruct::split(&records);
    println!(
        "{}: {} records; {} train, {} test, {} validation",
        path.display(),
        records.len(),
        train.len(),
        test.len(),
        val.len()
    );
    let Some((model, tok, eot, label)) = instruction_model(args, run)? else {
        return Ok(());
    };
    println!("{}", instruct::prompt(&train[0]));
    let (train_t, val_t) = (
        fitting(&tok, train, model.block_size, "training")?,
        fitting(&tok, val, model.block_size, "validation")?,
    );
    section("9.6", &format!("Instruction tuning ({label})"));
    let s = InstructSettings {
        steps: args.instruct_steps,
        batch_size: args.instruct_batch_size,
        lr: args.instruct_lr,
        weight_decay: 0.1,
        mask_prompt: !args.keep_prompt_in_loss,
        seed: args.common.seed,
        eval_interval: (args.instruct_steps / 5).max(1),
    };
    let (model, report) = instruct::instruct(model, &train_t, &val_t, eot, &s, |step, t, v| {
        let t = t.map_or("-".into(), |t| format!("{t:.3}"));
        println!("step {step:>4}: train loss {t}, val loss {v:.3}")
    })?;
    println!(
        "{:.0} ms/step, {:.0} tokens/s (batch {}, padded)",
        report.ms_per_step, report.tokens_per_second, s.batch_size
    );
    let answers = answer_tests(
        &model,
        &tok,
        eot,
        &test[..args.responses.min(test.len())],
        args,
    )?;
    write_json(
        &run.out.join("instruct.json"),
        &serde_json::json!({ "model": label, "settings": s, "report": report }),
    )?;
    write_json(&run.out.join("responses.json"), &answers)?;
    println!("{}: instruct.json, responses.json", run.out.display());
    if args.interactive {
        chat(&model, &tok, eot, args)?;
    }
    Ok(())
}
// ANCHOR_END: instruction_tuning

#[derive(Serialize)]
struct Speed {
    program: String,
    model: String,
    parameters: usize,
    batch: [usize; 2],
    targets: usize,
    step_ms: Vec<f64>,
    median_ms: f64,
    tokens_per_second: f64,
}

/// The batch `--part speed` times, for PyTorch to time the same one (`book/instruct_speed.py`).
#[derive(Serialize)]
struct SpeedBatch {
    inputs: Vec<Vec<i64>>,
    /// The next token at the positions that count, -100 elsewhere (PyTorch's `ignore_index`).
    targets: Vec<Vec<i64>>,
}

// ANCHOR: speed
/// 9.8: one instruction-tuning step at GPT-2 124M's shape: the first batch of the training
/// records, GPT-2's tokenizer, random weights (they cost what GPT-2's do).
fn speed(args: &Args, run: &Run) -> Result<()> {
    section("9.8", "Speed at GPT-2's shape");
    let device = run.device.clone().autodiff();
    let (gpt, model) = match &args.weights {
        Some(w) => (load_openai(w, None, &device)?.0, w.display().to_string()),
        None => {
            let gpt2_124m = GptConfig::new(50_257, 1024, 12, 12, 768)
                .with_bias(true)
                .with_tie_weights(true)
                .with_gelu_tanh(true);
            (
                gpt2_124m.init(&device),
                "GPT-2 124M's shape, random weights".into(),
            )
        }
    };
    let mut gpt = gpt.with_kernels(FUSED);
    let bpe = gpt2()?;
    let eot = bpe
        .special_id(END_OF_TEXT)
        .context("GPT-2's <|endoftext|>")? as usize;
    let tok = Tokenizer::Bpe(bpe);
    let rows = gpt.wte.weight.dims()[0];
    if rows < tok.vocab_size() {
        bail!(
            "GPT-2's tokenizer has {} tokens but the model in {model} only {rows}",
            tok.vocab_size()
        );
    }
    let records = load_records(&instruction_file(args.instructions.as_deref())?)?;
    let (train, _, _) = instruct::split(&records);
    let first = fitting(
        &tok,
        &train[..args.instruct_batch_size.min(train.len())],
        1024,
        "",
    )?;
    let picked: Vec<&Tokens> = first.iter().collect();
    let batch = instruct::collate(&picked, eot, !args.keep_prompt_in_loss, &device);
    let [b, t] = batch.inputs.dims();
    println!(
        "{model}, {} parameters; batch {b} x {t} (the first {b} training records, padded), {} \
         targets in the loss",
        gpt.num_params(),
        batch.count
    );
    let mut optim = AdamWConfig::new().with_weight_decay(0.1).init();
    let mut step_ms = Vec::new();
    for step in 0..=args.speed_steps {
        let tick = std::time::Instant::now();
        (gpt, _) = instruct::train_step(gpt, &mut optim, &batch, args.instruct_lr)?;
        let ms = tick.elapsed().as_secs_f64() * 1e3;
        println!(
            "step {step}: {ms:.0} ms{}",
            if step == 0 { " (untimed)" } else { "" }
        );
        if step > 0 {
            step_ms.push(ms);
        }
    }
    let median_ms = median(&step_ms);
    let result = Speed {
        program: format!("{} ({})", run.backend.name(), gpt.kernels.name()),
        model,
        parameters: gpt.num_params(),
        batch: [b, t],
        targets: batch.count,
        tokens_per_second: (b * t) as f64 / (median_ms / 1e3),
        step_ms,
        median_ms,
    };
    println!(
        "median of {}: {:.0} ms/step, {:.0} tokens/s",
        args.speed_steps, result.median_ms, result.tokens_per_second
    );
    // What an epoch costs at this rate: every training record, batches in file order.
    let all = fitting(&tok, train, 1024, "training")?;
    let padded: usize = (all.chunks(args.instruct_batch_size))
        .map(|c| c.len() * c.iter().map(|r| r.ids.len()).max().unwrap_or(0))
        .sum();
    println!(
        "one epoch of the {} training records in batches of {}: {padded} padded tokens, about \
         {:.0} minutes at this rate",
        all.len(),
        args.instruct_batch_size,
        padded as f64 / result.tokens_per_second / 60.0
    );
    write_json(&run.out.join("speed_batch.json"), &batch_rows(&batch)?)?;
    write_json(&run.out.join("speed.json"), &result)?;
    println!("{}: speed.json, speed_batch.json", run.out.display());
    println!("{}", serde_json::to_string(&result)?); // last: for book/instruct_speed.py
    Ok(())
}
// ANCHOR_END: speed

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The batch as rows of ids, and its targets with -100 where the loss leaves a position out.
fn batch_rows(batch: &instruct::LmBatch) -> Result<SpeedBatch> {
    let [b, t] = batch.inputs.dims();
    let ints = |x: &Tensor<1, Int>| {
        x.to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let ids = ints(&batch.inputs.clone().reshape([b * t]))?;
    let mut targets = vec![-100i64; b * t];
    for (row, target) in ints(&batch.rows)?.into_iter().zip(ints(&batch.targets)?) {
        targets[row as usize] = target;
    }
    Ok(SpeedBatch {
        inputs: ids.chunks(t).map(<[i64]>::to_vec).collect(),
        targets: targets.chunks(t).map(<[i64]>::to_vec).collect(),
    })
}

/// GPT-2 when its weights can be had; else the `--instruct-checkpoint`; else one line on why
/// this part is skipped.
fn instruction_model(args: &Args, run: &Run) -> Result<Option<(Gpt, Tokenizer, usize, String)>> {
    let device = run.device.clone().autodiff();
    if let Some(dir) = &args.instruct_checkpoint {
        let (gpt, _, meta) = checkpoint::load::<Tokenizer>(dir, &device, None)?;
        let eot = match &meta.tokenizer {
            Tokenizer::Bpe(b) => b.special_id(END_OF_TEXT),
            _ => None,
        };
        let Some(eot) = eot else {
            bail!(
                "the checkpoint in {} reads {}; instruction tuning needs a byte-level BPE with \
                 {END_OF_TEXT} (train chapter 4 with --tokenizer FILE from chapter 7)",
                dir.display(),
                meta.tokenizer.describe()
            );
        };
        let label = format!(
            "chapter 4 checkpoint {} ({})",
            dir.display(),
            meta.tokenizer.describe()
        );
        return Ok(Some((
            gpt.with_kernels(FUSED),
            meta.tokenizer,
            eot as usize,
            label,
        )));
    }
    let weights = match pretrained_weights(args.weights.as_deref(), &published(&args.model)?) {
        Ok(w) => w,
        Err(e) => {
            println!(
                "GPT-2's weights are not here and cannot be downloaded ({}); instruction tuning \
                 skipped: pass --weights FILE, or --instruct-checkpoint DIR for a chapter 4 \
                 model with a BPE tokenizer",
                format!("{e:#}").lines().next().unwrap_or("")
            );
            return Ok(None);
        }
    };
    let (gpt, _) = load_openai(&weights, None, &device)?;
    let bpe = gpt2()?;
    let eot = bpe
        .special_id(END_OF_TEXT)
        .context("GPT-2's tokenizer has <|endoftext|>")?;
    let label = format!(
        "GPT-2, {} parameters, {}",
        gpt.num_params(),
        weights.display()
    );
    Ok(Some((
        gpt.with_kernels(FUSED),
        Tokenizer::Bpe(bpe),
        eot as usize,
        label,
    )))
}

/// The records whose prompt fits in the context, encoded; how many do not is said (GPT-2's
/// 1,024 positions hold them all, a small model's context may not).
fn fitting(tok: &Tokenizer, records: &[Record], block: usize, what: &str) -> Result<Vec<Tokens>> {
    let mut kept = Vec::new();
    for r in records {
        if tok.encode(&instruct::prompt(r))?.len() < block {
            kept.push(instruct::encode(tok, r, block)?);
        }
    }
    if kept.len() < records.len() {
        println!(
            "{} of {} {what} records left out: their prompt does not fit in {block} tokens",
            records.len() - kept.len(),
            records.len()
        );
    }
    if kept.is_empty() {
        bail!("no {what} record's prompt fits in the model's {block} tokens");
    }
    Ok(kept)
}

#[derive(Serialize)]
struct Answer {
    instruction: String,
    input: String,
    output: String,
    model_response: String,
}

/// 9.7: the test split's instructions answered greedily, as LLMs-from-scratch writes them.
fn answer_tests(
    model: &Gpt,
    tok: &Tokenizer,
    eot: usize,
    test: &[Record],
    args: &Args,
) -> Result<Vec<Answer>> {
    section("9.7", "Answers to the test instructions");
    let mut answers = Vec::new();
    for (i, r) in test.iter().enumerate() {
        let prompt = tok.encode(&instruct::prompt(r))?;
        if prompt.len() >= model.block_size {
            continue; // said above, with the other records that do not fit
        }
        let reply = tok.decode(&respond(model, &prompt, eot, args.max_new_tokens));
        if i < 3 {
            println!(
                "### Instruction:\n{}\n### Model:\n{}\n### Reference:\n{}\n",
                r.instruction,
                reply.trim(),
                r.output
            );
        }
        answers.push(Answer {
            instruction: r.instruction.clone(),
            input: r.input.clone(),
            output: r.output.clone(),
            model_response: reply.trim().to_string(),
        });
    }
    Ok(answers)
}

// ANCHOR: chat
/// Chat: each line is an instruction, put in the Alpaca template and answered.
fn chat(model: &Gpt, tok: &Tokenizer, eot: usize, args: &Args) -> Result<()> {
    eprintln!("type an instruction and press Enter; Ctrl-D ends");
    let mut stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("cannot read stdin")?;
        let r = Record {
            instruction: line,
            input: String::new(),
            output: String::new(),
        };
        match instruct::encode(tok, &r, model.block_size) {
            Ok(t) => {
                let reply = respond(model, &t.ids, eot, args.max_new_tokens);
                println!("{}", tok.decode(&reply).trim());
            }
            Err(e) => eprintln!("error: {e:#}"),
        }
        let _ = stdout.flush();
    }
    Ok(())
}
// ANCHOR_END: chat
