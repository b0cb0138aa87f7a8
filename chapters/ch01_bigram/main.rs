//! Chapter 1 as a notebook: read the text, turn characters into numbers, cut batches,
//! and train the simplest language model there is, a bigram table.
//!
//! Run: `cargo run --release --bin ch01_bigram -- --backend ndarray`

use anyhow::Result;
use burn::prelude::*;
use clap::Parser;
use course::ch01_bigram::{Bigram, BigramConfig, bigram_nll, counted_bigram};
use course::common::cli::{CommonArgs, TrainArgs};
use course::common::dataset::{Dataset, Split, rng_for, stream};
use course::common::report::{Curve, Summary, write_run};
use course::common::sample::{SampleOptions, generate, print_sample};
use course::common::tokenizer::CharTokenizer;
use course::common::train::{LanguageModel, TrainReport, cross_entropy, fit};
use course::common::{Run, fmt_ids, section};

const CHAPTER: &str = "ch01_bigram";

/// Chapter 1: a bigram language model on Tiny Shakespeare.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
#[command(mut_arg("steps", |a| a.default_value("3000")))]
#[command(mut_arg("lr", |a| a.default_value("1e-2")))]
#[command(mut_arg("eval_interval", |a| a.default_value("300")))]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    train: TrainArgs,
    /// Characters to generate after training.
    #[arg(long, default_value_t = 500)]
    sample_chars: usize,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        args.train.check()?;
        let title = "Chapter 1: a bigram language model";
        let run = args
            .common
            .start(CHAPTER, title, Some(args.train.block_size))?;
        the_data(&run);
        tokenizer(&run.data, &run.corpus.text)?;
        split(&run.data);
        let (x, y) = batches(&run, args.train.block_size);
        let model = the_model(&run);
        loss_before_training(&model, x, y, run.data.tokenizer.vocab_size());
        sample_before_training(&model, &run);
        let (model, report) = training(model, &run, &args.train)?;
        counting(&run.data, &report);
        sample_after_training(&model, &run, args.sample_chars);
        what_the_run_wrote(&run, &args.train, &model, &report)
    })
}

// ANCHOR: data
fn the_data(run: &Run) {
    section("1.1", "The data");
    let text = &run.corpus.text;
    println!("file: {}", run.corpus.path.display());
    println!("length in characters: {}", text.chars().count());
    let preview: String = text.chars().take(200).collect();
    println!("the first 200 characters:\n{preview}");
}
// ANCHOR_END: data

// ANCHOR: tokenizer_demo
fn tokenizer(data: &Dataset, text: &str) -> Result<()> {
    section("1.2", "A character tokenizer");
    let tok = &data.tokenizer;
    println!(
        "vocabulary ({} characters): {:?}",
        tok.vocab_size(),
        tok.vocab_string()
    );
    let probe: String = text.chars().filter(|c| c.is_alphabetic()).take(9).collect();
    let ids = tok.encode(&probe)?;
    println!("encode({probe:?}) = {ids:?}");
    println!("decode(...) = {:?}", tok.decode(&ids));
    Ok(())
}
// ANCHOR_END: tokenizer_demo

fn split(data: &Dataset) {
    section("1.3", "Train and validation split");
    let (train, val) = (data.train.len(), data.val.len());
    println!("train: {train} tokens (90%), val: {val} tokens (10%)");
}

// ANCHOR: batches
fn batches(run: &Run, block_size: usize) -> (Tensor<2, Int>, Tensor<2, Int>) {
    section("1.4", "Batches");
    let mut rng = rng_for(run.seed, stream::DEMO, 0);
    let (x, y) = run
        .data
        .batch(Split::Train, 4, block_size, &mut rng, &run.device);
    println!("x: {:?} (inputs)\n{}", x.dims(), fmt_ids(&x));
    println!(
        "y: {:?} (targets: x shifted left by one)\n{}",
        y.dims(),
        fmt_ids(&y)
    );
    let first_row = |t: &Tensor<2, Int>| -> Vec<usize> {
        let ids = t.clone().slice(s![0..1, ..]).into_data().convert::<i64>();
        ids.iter::<i64>().map(|i| i as usize).collect()
    };
    let (x0, y0) = (first_row(&x), first_row(&y));
    let tok = &run.data.tokenizer;
    for t in 0..block_size {
        let (context, target) = (tok.decode(&x0[..=t]), tok.decode(&y0[t..=t]));
        println!("when input is {context:?} the target is {target:?}");
    }
    (x, y)
}
// ANCHOR_END: batches

// ANCHOR: the_model
fn the_model(run: &Run) -> Bigram {
    section("1.5", "The bigram model");
    let v = run.data.tokenizer.vocab_size();
    // Parameters that will be trained live on an autodiff device (Burn in five minutes).
    let model = BigramConfig::new(v).init(&run.device.clone().autodiff());
    println!("parameters: {} (a {v} x {v} table)", model.num_params());
    model
}
// ANCHOR_END: the_model

// ANCHOR: init_loss
fn loss_before_training(model: &Bigram, x: Tensor<2, Int>, y: Tensor<2, Int>, vocab: usize) {
    section("1.6", "The loss before training");
    let logits = model.forward(x.autodiff()); // [batch, time, vocab]
    println!("logits: {:?} = [batch, time, vocab]", logits.dims());
    let loss = cross_entropy(logits, y.autodiff()).into_scalar::<f32>();
    let v = vocab as f64;
    println!("uniform guess: -ln(1/{v}) = {:.4} (perplexity {v})", v.ln());
    println!(
        "expected for N(0, 1) logits: about ln({v}) + 1/2 = {:.4}",
        v.ln() + 0.5
    );
    println!(
        "measured on the batch above: {loss:.4} (perplexity {:.1})",
        (loss as f64).exp()
    );
}
// ANCHOR_END: init_loss

// ANCHOR: sample_before
fn sample_before_training(model: &Bigram, run: &Run) {
    section("1.7", "Generating text, before training");
    let mut rng = rng_for(run.seed, stream::SAMPLE, 0);
    let opts = SampleOptions::default();
    let tokens = generate(model, &[0], 100, opts, &mut rng, |_| {});
    println!("{}", run.data.tokenizer.decode(&tokens));
}
// ANCHOR_END: sample_before

// ANCHOR: train
fn training(model: Bigram, run: &Run, args: &TrainArgs) -> Result<(Bigram, TrainReport)> {
    section("1.8", "Training");
    fit("bigram", model, run, args)
}
// ANCHOR_END: train

// ANCHOR: counting
fn counting(data: &Dataset, report: &TrainReport) {
    section("1.9", "The best a bigram can do: counting");
    let v = data.tokenizer.vocab_size();
    let exact = counted_bigram(&data.train, v, 0.0);
    let smoothed = counted_bigram(&data.train, v, 1.0);
    let floor = bigram_nll(&exact, &data.train, v);
    let val = bigram_nll(&smoothed, &data.val, v);
    println!("counted table, training split: {floor:.4} (no bigram table can do better there)");
    println!("counted table (add-one smoothing), validation split: {val:.4}");
    let last = report.losses.last().expect("evaluated");
    println!(
        "trained table: train {:.4}, val {:.4}",
        last.train, last.val
    );
}
// ANCHOR_END: counting

// ANCHOR: sample_after
fn sample_after_training(model: &Bigram, run: &Run, chars: usize) {
    section("1.10", "Generating text, after training");
    let mut rng = rng_for(run.seed, stream::SAMPLE, 1);
    let tok: &CharTokenizer = &run.data.tokenizer;
    print_sample(model, tok, &[0], chars, SampleOptions::default(), &mut rng);
}
// ANCHOR_END: sample_after

fn what_the_run_wrote(
    run: &Run,
    args: &TrainArgs,
    model: &Bigram,
    report: &TrainReport,
) -> Result<()> {
    section("1.11", "What the run wrote");
    let settings = args.settings(run.seed);
    let hyper = serde_json::json!({ "training": settings, "lr": args.lr });
    let summary = Summary::new(CHAPTER, run, hyper, model.num_params(), report);
    let curves = [Curve::of("", report)];
    let files = write_run(&run.out, &summary, "Chapter 1: bigram model", &curves)?;
    println!("{}: {}", run.out.display(), files.join(", "));
    Ok(())
}
