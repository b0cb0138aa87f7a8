//! Chapter 1 as a notebook: read the text, turn characters into numbers, cut batches,
//! and train the simplest language model there is, a bigram table.
//!
//! Run: `cargo run --release --bin ch01_bigram -- --backend ndarray`

use anyhow::Result;
use burn::optim::AdamWConfig;
use burn::prelude::*;
use clap::Parser;
use course::ch01_bigram::BigramConfig;
use course::common::cli::{CommonArgs, TrainArgs};
use course::common::data::load_corpus;
use course::common::dataset::{Dataset, Split, rng_for, stream};
use course::common::report::{Summary, write_run};
use course::common::sample::{SampleOptions, generate, print_sample};
use course::common::train::{ConstantLr, LanguageModel, cross_entropy, train};
use course::common::{fmt_ids, section};

const CHAPTER: &str = "ch01_bigram";

/// Chapter 1: a bigram language model on Tiny Shakespeare.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
#[command(mut_arg("steps", |a| a.default_value("3000").required(false)))]
#[command(mut_arg("batch_size", |a| a.default_value("32").required(false)))]
#[command(mut_arg("block_size", |a| a.default_value("8").required(false)))]
#[command(mut_arg("lr", |a| a.default_value("1e-2").required(false)))]
#[command(mut_arg("eval_interval", |a| a.default_value("300").required(false)))]
#[command(mut_arg("eval_iters", |a| a.default_value("200").required(false)))]
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
    course::common::exit_on_error(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    args.train.check()?;
    let out = args.common.out_dir(CHAPTER);
    let device = args.common.backend.device();
    device.seed(args.common.seed);
    println!(
        "Chapter 1: a bigram language model (backend: {})",
        args.common.backend
    );

    // ANCHOR: data
    section("1.1", "The data");
    let corpus = load_corpus(args.common.data.as_deref())?;
    let text = &corpus.text;
    println!("file: {}", corpus.path.display());
    println!("length in characters: {}", text.chars().count());
    let preview: String = text.chars().take(200).collect();
    println!("the first 200 characters:\n{preview}");
    // ANCHOR_END: data

    // ANCHOR: tokenizer
    section("1.2", "A character tokenizer");
    let data = Dataset::new(text)?;
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
    // ANCHOR_END: tokenizer

    // ANCHOR: split
    section("1.3", "Train and validation split");
    println!(
        "train: {} tokens (90%), val: {} tokens (10%)",
        data.train.len(),
        data.val.len()
    );
    data.check_block_size(args.train.block_size)?;
    // ANCHOR_END: split

    // ANCHOR: batches
    section("1.4", "Batches");
    let (b, t) = (4, args.train.block_size);
    let mut rng = rng_for(args.common.seed, stream::DEMO, 0);
    let (x, y) = data.batch(Split::Train, b, t, &mut rng, &device);
    println!("x: {:?} (inputs)\n{}", x.dims(), fmt_ids(&x));
    println!(
        "y: {:?} (targets: x shifted left by one)\n{}",
        y.dims(),
        fmt_ids(&y)
    );
    let row = |t: &Tensor<2, Int>| -> Vec<usize> {
        let v = t.clone().slice(s![0..1, ..]).into_data().convert::<i64>();
        v.try_to_vec::<i64>()
            .expect("ids")
            .into_iter()
            .map(|i| i as usize)
            .collect()
    };
    let (x0, y0) = (row(&x), row(&y));
    for i in 0..t {
        println!(
            "when input is {:?} the target is {:?}",
            tok.decode(&x0[..=i]),
            tok.decode(&y0[i..=i])
        );
    }
    // ANCHOR_END: batches

    // ANCHOR: init_loss
    section("1.5", "The bigram model");
    let model = BigramConfig::new(tok.vocab_size()).init(&device.clone().autodiff());
    println!(
        "parameters: {} (a {} x {} table)",
        model.num_params(),
        tok.vocab_size(),
        tok.vocab_size()
    );
    let logits = model.forward(x.clone().autodiff());
    println!("logits: {:?} = [batch, time, vocab]", logits.dims());

    section("1.6", "The loss before training");
    let loss = cross_entropy(logits, y.autodiff()).into_scalar::<f32>();
    let v = tok.vocab_size() as f64;
    println!("uniform guess: -ln(1/{v}) = {:.4}", v.ln());
    println!(
        "expected for N(0, 1) logits: about ln({v}) + 1/2 = {:.4}",
        v.ln() + 0.5
    );
    println!("measured on the batch above: {loss:.4}");
    // ANCHOR_END: init_loss

    // ANCHOR: sample_before
    section("1.7", "A sample before training");
    let window = args.train.block_size;
    let mut sample_rng = rng_for(args.common.seed, stream::SAMPLE, 0);
    let before = generate(
        &model,
        &[0],
        100,
        window,
        SampleOptions::default(),
        &mut sample_rng,
        |_| {},
    );
    println!("{}", tok.decode(&before));
    // ANCHOR_END: sample_before

    // ANCHOR: train
    section("1.8", "Training");
    let settings = args.train.settings(args.common.seed);
    let mut optim = AdamWConfig::new().init();
    let (model, report) = train(
        model,
        &mut optim,
        &data,
        &settings,
        0,
        &mut ConstantLr(args.train.lr),
    )?;
    let last = *report.losses.last().expect("at least one evaluation");
    println!(
        "final: train {:.4}, val {:.4} after {} steps; {:.1} s, {:.0} tokens/s",
        last.train, last.val, settings.steps, report.wall_seconds, report.tokens_per_second
    );
    // ANCHOR_END: train

    // ANCHOR: sample_after
    section("1.9", "A sample after training");
    let mut sample_rng = rng_for(args.common.seed, stream::SAMPLE, 1);
    print_sample(
        &model,
        tok,
        &[0],
        args.sample_chars,
        window,
        SampleOptions::default(),
        &mut sample_rng,
    );
    // ANCHOR_END: sample_after

    section("1.10", "What the run wrote");
    let summary = Summary {
        chapter: CHAPTER,
        backend: args.common.backend.to_string(),
        seed: args.common.seed,
        hyperparameters: &settings,
        learning_rate: args.train.lr,
        parameters: model.num_params(),
        steps: settings.steps,
        final_train_loss: last.train,
        final_val_loss: last.val,
        wall_seconds: report.wall_seconds,
        train_seconds: report.train_seconds,
        tokens_per_second: report.tokens_per_second,
        data: corpus.path.display().to_string(),
        variants: vec![],
    };
    write_run(&out, &summary, &report, "Chapter 1: bigram model")?;
    println!("{}/summary.json, losses.csv, loss_curve.svg", out.display());
    Ok(())
}
