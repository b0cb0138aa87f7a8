//! Chapter 9 as a notebook: GPT-1's fine-tuning on a task cut from the corpus, four ways to
//! fine-tune measured side by side, LoRA merged, and GPT-2 taught to follow instructions.
//!
//! Run (after chapter 4 has saved a checkpoint):
//! `cargo run --release --bin ch09_finetune`

use anyhow::{Context, Result, bail};
use burn::module::Module;
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
    fine_tune, scores,
};
use course::ch09_finetune::instruct::{
    self, InstructSettings, Record, Tokens, instruction_file, load_records, respond,
};
use course::ch09_finetune::lora::{count_params, merge};
use course::ch09_finetune::task::{Task, speaker_task};
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
    /// Speakers in the task (the most frequent ones of the held-out text).
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    All,
    Classify,
    Instruct,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        check(&args)?;
        let run = args.common.start(CHAPTER, "Chapter 9: fine-tuning", None)?;
        if args.part != Part::Instruct {
            classification(&args, &run)?;
        }
        if args.part != Part::Classify {
            instruction_tuning(&args, &run)?;
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
    if a.lora_rank == 0 || a.instruct_steps == 0 || a.instruct_batch_size == 0 {
        bail!("--lora-rank, --instruct-steps and --instruct-batch-size must be at least 1");
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
    checkpoint: String,
    classes: Vec<String>,
    train_counts: Vec<usize>,
    test_counts: Vec<usize>,
    majority_baseline: f64,
    settings: FineTuneSettings,
    lora: LoraSettings,
    results: Vec<MethodResult>,
    lora_merge_max_diff: Option<f32>,
}

fn classification(args: &Args, run: &Run) -> Result<()> {
    let task = the_task(args, run)?;
    let (gpt, config, tok) = pretrained(args, run)?;
    let recipe = Recipe {
        transform: !args.no_transform,
        aux_weight: args.aux_weight,
    };
    the_input_transformation(&gpt, &tok, &task, recipe)?;
    let lora = LoraSettings {
        rank: args.lora_rank,
        alpha: args.lora_alpha,
    };
    let (results, curves, merge_diff) =
        four_ways(args, run, (&gpt, &config), &tok, &task, recipe, lora)?;
    let summary = ClassifySummary {
        checkpoint: args.checkpoint.display().to_string(),
        classes: task.classes.clone(),
        train_counts: task.counts(&task.train),
        test_counts: task.counts(&task.test),
        majority_baseline: task.majority_baseline(),
        settings: settings(args, 0, recipe),
        lora,
        results,
        lora_merge_max_diff: merge_diff,
    };
    write_table(&summary, &run.out)?;
    let named: Vec<(&str, Vec<(f64, f64)>)> =
        curves.iter().map(|(m, c)| (m.name(), c.clone())).collect();
    plot_curves_at(
        &run.out.join("finetune_losses.svg"),
        "Fine-tuning loss (task + 0.5 LM), mean of the seeds",
        "step",
        &named,
        SeriesLabelPosition::UpperRight,
    )?;
    write_json(&run.out.join("classify.json"), &summary)?;
    println!(
        "{}: classify.json, classify.md, finetune_losses.svg",
        run.out.display()
    );
    Ok(())
}

// ANCHOR: the_task
/// 9.1: the task, its classes and split, and the accuracy that needs no model at all.
fn the_task(args: &Args, run: &Run) -> Result<Task> {
    section("9.1", "The task: who says this speech?");
    let task = speaker_task(&run.corpus.text, args.classes, 5)?;
    let (train, test) = (task.counts(&task.train), task.counts(&task.test));
    println!(
        "speeches of the last 10% of the text (which chapter 4 never trains on), {} speakers:",
        task.classes.len()
    );
    for (i, name) in task.classes.iter().enumerate() {
        println!(
            "  {i} {name:<12} train {:>3}  test {:>3}",
            train[i], test[i]
        );
    }
    println!(
        "{} train, {} test; always answering the most frequent speaker: {:.1}% of the test",
        task.train.len(),
        task.test.len(),
        100.0 * task.majority_baseline()
    );
    let e = &task.test[0];
    let shown: String = e.text.chars().take(120).collect();
    println!("test example 0 ({}):\n{shown}", task.classes[e.label]);
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

fn settings(args: &Args, seed: u64, recipe: Recipe) -> FineTuneSettings {
    FineTuneSettings {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: 0.01,
        seed,
        recipe,
    }
}

type Curves = Vec<(Method, Vec<(f64, f64)>)>;

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
        let (mut accuracies, mut ms, mut mean_curve, mut count) = (vec![], 0.0, vec![], None);
        for seed in 0..args.seeds {
            // The run's own random draws (head, new tokens, LoRA's A, a fresh model) follow
            // from its seed, here, where the notebook can be read.
            run.device.seed(args.common.seed + seed);
            let model = method.prepare(gpt, config, task.classes.len(), recipe, lora);
            count = Some(count_params(&model));
            let train = encode_all(&model, tok, &task.train)?;
            let test = encode_all(&model, tok, &task.test)?;
            let s = settings(args, args.common.seed + seed, recipe);
            let (trained, report) = fine_tune(model, &train, &s)?;
            let acc = accuracy(&trained, &test);
            println!(
                "{:<18} seed {seed}: test accuracy {:5.1}%  ({:.0} ms/step, final loss {:.3})",
                method.name(),
                100.0 * acc,
                report.ms_per_step,
                smoothed(&report.losses).last().map_or(f64::NAN, |p| p.1)
            );
            accuracies.push(acc);
            ms += report.ms_per_step / args.seeds as f64;
            add_curve(
                &mut mean_curve,
                &smoothed(&report.losses),
                args.seeds as f64,
            );
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
        curves.push((method, mean_curve));
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
    t += &format!(
        "| always the most frequent speaker | {:.1}% | | 0 | |\n",
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
