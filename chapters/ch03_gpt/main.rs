//! Chapter 3 as a notebook: the pieces of a transformer block, then a GPT-1-style decoder.
//!
//! Run: `cargo run --release --bin ch03_gpt -- --backend ndarray`

use anyhow::Result;
use burn::nn::{Initializer, LayerNormConfig, LinearConfig};
use burn::prelude::*;
use burn::tensor::{Distribution, activation};
use clap::Parser;
use course::ch03_gpt::{Block, Gpt, GptConfig, Norm, first_layer_grad_norms, layer_norm};
use course::common::cli::{CommonArgs, TrainArgs};
use course::common::dataset::{Split, rng_for, stream};
use course::common::diagram::{Column, Node, flow, shape};
use course::common::report::{Curve, Summary, Variant, plot_curves, write_run};
use course::common::sample::{SampleOptions, print_sample};
use course::common::train::{LanguageModel, TrainReport, fit};
use course::common::{Run, max_abs_diff, section};

const CHAPTER: &str = "ch03_gpt";

/// Chapter 3: a GPT-1-style decoder.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    train: TrainArgs,
    #[arg(long, default_value_t = 32)]
    n_embd: usize,
    #[arg(long, default_value_t = 4)]
    n_head: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 3)]
    n_layer: usize,
    #[arg(long, default_value_t = 0.0, value_parser = course::common::cli::below_one)]
    dropout: f64,
    /// Where LayerNorm sits: `pre` (GPT-2) or `post` (GPT-1). The chapter trains this one
    /// first, then the other for comparison.
    #[arg(long, value_enum, default_value = "pre")]
    norm: Norm,
    /// GPT-2's initialisation: residual projections start 1/sqrt(2 * n_layer) smaller.
    #[arg(long)]
    gpt2_init: bool,
    /// A separate output head instead of reusing the token embedding.
    #[arg(long)]
    untie: bool,
    /// Skip training the other norm placement.
    #[arg(long)]
    no_compare: bool,
    #[arg(long, default_value_t = 300)]
    sample_chars: usize,
}

/// A trained model, its name and its log.
type Trained = (String, Gpt, TrainReport);

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        args.train.check()?;
        let t = args.train.block_size;
        let config = |vocab_size| {
            GptConfig::new(vocab_size, t, args.n_layer, args.n_head, args.n_embd)
                .with_dropout(args.dropout)
                .with_norm(args.norm)
                .with_gpt2_init(args.gpt2_init)
                .with_tie_weights(!args.untie)
        };
        config(1).validate()?; // before anything runs (the vocabulary is not known yet)
        let title = "Chapter 3: a GPT-1-style decoder";
        let run = args.common.start(CHAPTER, title, Some(t))?;
        let cfg = config(run.data.tokenizer.vocab_size());
        the_block(&cfg, &run.device);
        gelu_picture(&run)?;
        residual_connections(&run.device);
        layer_norm_demo(&cfg, &run.device);
        dropout_demo(&cfg, &run);
        the_decoder(&cfg, &run)?;
        counting_parameters(&cfg, &run.device);
        section("3.7", &format!("Training ({:?}-LN)", cfg.norm));
        let mut trained = vec![train_model(&cfg, &run, &args.train)?];
        if !args.no_compare {
            let other = cfg.clone().with_norm(other_norm(cfg.norm)); // only the norm changes
            section("3.8", &format!("The same with {:?}-LN", other.norm));
            trained.push(train_model(&other, &run, &args.train)?);
        }
        sample(&trained[0].1, &run, args.sample_chars);
        what_the_run_wrote(&run, &args, &cfg, &trained)
    })
}

// ANCHOR: block_demo
fn the_block(cfg: &GptConfig, device: &Device) {
    section("3.1", "The feed-forward network and the block");
    let model = cfg.init(device);
    let block = &model.blocks[0];
    let (nh, c) = (cfg.n_head, cfg.n_embd);
    println!(
        "block: LN -> {nh}-head attention -> + ; LN -> MLP {c} -> {} -> GELU -> {c} -> +",
        4 * c
    );
    let x = Tensor::<3>::random(
        [2, cfg.block_size, c],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let mlp = block.mlp.forward(x.clone()).dims();
    println!(
        "x {:?} -> mlp {mlp:?} -> block {:?}",
        x.dims(),
        block.forward(x).dims()
    );
}
// ANCHOR_END: block_demo

// ANCHOR: gelu_demo
/// GELU against ReLU, computed by Burn's own activations on 161 points from -4 to 4.
fn gelu_picture(run: &Run) -> Result<()> {
    let x = Tensor::<1>::from_floats(
        (0..161)
            .map(|i| -4.0 + i as f32 / 20.0)
            .collect::<Vec<_>>()
            .as_slice(),
        &run.device,
    );
    let curve = |y: Tensor<1>| -> Vec<(f64, f64)> {
        let xs = x.to_data().iter::<f32>().collect::<Vec<_>>();
        xs.into_iter()
            .zip(y.to_data().iter::<f32>())
            .map(|(a, b)| (a as f64, b as f64))
            .collect()
    };
    let (gelu, relu) = (
        curve(activation::gelu(x.clone())),
        curve(activation::relu(x.clone())),
    );
    let at = |c: &[(f64, f64)], i: usize| c[i].1;
    println!(
        "GELU(-1) = {:.4}, GELU(0) = {:.4}, GELU(1) = {:.4}; ReLU(-1) = {:.1}",
        at(&gelu, 60),
        at(&gelu, 80),
        at(&gelu, 100),
        at(&relu, 60)
    );
    let path = run.out.join("gelu.svg");
    plot_curves(
        &path,
        "GELU and ReLU",
        "x",
        &[("GELU(x) = x Φ(x)", gelu), ("ReLU(x) = max(0, x)", relu)],
    )?;
    println!("wrote {}", path.display());
    Ok(())
}
// ANCHOR_END: gelu_demo

// ANCHOR: residual_demo
fn residual_connections(device: &Device) {
    section("3.2", "Residual connections");
    // A deep stack of small MLPs, with and without `x + f(x)`: how much gradient reaches the
    // first layer? Once with PyTorch's (and Burn's) default init, once with GPT's N(0, 0.02).
    let ad = device.clone().autodiff();
    let inits = [
        ("default init", LinearConfig::new(1, 1).initializer),
        (
            "N(0, 0.02)",
            Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            },
        ),
    ];
    for (name, init) in &inits {
        for depth in [4, 16, 32] {
            let (plain, resid) = first_layer_grad_norms(depth, init, &ad);
            println!(
                "{name:>12}, depth {depth:>2}: |grad| at layer 1 = {plain:.2e} without residuals, {resid:.2e} with"
            );
        }
    }
}
// ANCHOR_END: residual_demo

// ANCHOR: layer_norm_demo
fn layer_norm_demo(cfg: &GptConfig, device: &Device) {
    section("3.3", "LayerNorm from its definition");
    let c = cfg.n_embd;
    let x = Tensor::<3>::random(
        [2, cfg.block_size, c],
        Distribution::Normal(3.0, 2.0),
        device,
    );
    let burn_ln = LayerNormConfig::new(c).init(device);
    let beta = burn_ln.beta.as_ref().map(|b| b.val());
    let ours = layer_norm(x.clone(), burn_ln.gamma.val(), beta, 1e-5);
    let stats = |t: &Tensor<3>| {
        let row = t.clone().slice(s![0..1, 0..1, ..]).flatten::<1>(0, 2); // one token
        let mean = row.clone().mean().into_scalar::<f32>();
        (mean, row.var_bias(0).sqrt().into_scalar::<f32>())
    };
    let ((m0, s0), (m1, s1)) = (stats(&x), stats(&ours));
    println!("one token before: mean {m0:.3}, std {s0:.3}");
    println!("one token after:  mean {m1:.3}, std {s1:.3}");
    let diff = max_abs_diff(&ours, &burn_ln.forward(x));
    println!("max |ours - burn::nn::LayerNorm| = {diff:.2e}");
}
// ANCHOR_END: layer_norm_demo

// ANCHOR: dropout_demo
fn dropout_demo(cfg: &GptConfig, run: &Run) {
    section("3.4", "Dropout");
    let ad = run.device.clone().autodiff();
    let one_block = GptConfig {
        n_layer: 1,
        ..cfg.clone()
    };
    let model = one_block.with_dropout(0.2).init(&ad);
    let mut rng = rng_for(run.seed, stream::DEMO, 3);
    let (x, _) = run.data.batch(Split::Val, 2, cfg.block_size, &mut rng, &ad);
    let differ = max_abs_diff(&model.forward(x.clone()), &model.forward(x.clone()));
    println!("training mode, two passes differ by {differ:.3} (a new random mask each time)");
    let (eval, x) = (model.valid(), x.without_autodiff());
    let differ = max_abs_diff(&eval.forward(x.clone()), &eval.forward(x));
    println!("eval mode (model.valid()), two passes differ by {differ:.3}");
}
// ANCHOR_END: dropout_demo

// ANCHOR: gpt_demo
fn the_decoder(cfg: &GptConfig, run: &Run) -> Result<()> {
    section("3.5", "The GPT-1 decoder");
    let (l, nh, c, t) = (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size);
    println!(
        "{l} blocks, {nh} heads, {c} wide, block size {t}, norm: {:?}, head tied to wte: {}, GPT-2 init: {}",
        cfg.norm, cfg.tie_weights, cfg.gpt2_init
    );
    println!("post-LN (GPT-1): x = LN(x + attn(x)); x = LN(x + mlp(x))");
    println!("pre-LN  (GPT-2): x = x + attn(LN(x)); x = x + mlp(LN(x)); final LN before the head");
    let mut rng = rng_for(run.seed, stream::DEMO, 5);
    let (x, _) = run.data.batch(Split::Val, 2, t, &mut rng, &run.device);
    let model = cfg.init(&run.device);
    let logits = model.forward(x);
    println!("logits: {:?} = [batch, time, vocab]", logits.dims());
    block_diagram(cfg, &model.blocks[0], run)
}
// ANCHOR_END: gpt_demo

// ANCHOR: block_diagram
/// Both placements of LayerNorm side by side, with the shapes one block really produces
/// (the MLP's hidden layer read from `c_fc`). Yellow boxes add the residual stream back.
fn block_diagram(cfg: &GptConfig, block: &Block, run: &Run) -> Result<()> {
    let x = Tensor::<3>::zeros([2, cfg.block_size, cfg.n_embd], &run.device); // [b, t, c]
    let (btc, hidden) = (
        shape(&["b", "t", "c"], &block.attn.forward(x.clone()).dims()),
        shape(&["b", "t", "4c"], &block.mlp.c_fc.forward(x).dims()),
    );
    let (ln, plus) = (
        || Node::new("LayerNorm", btc.clone()),
        || Node::new("+", btc.clone()),
    );
    let attn = || Node::new("attention (dropout on weights, output)", btc.clone());
    let mlp = || Node::new("MLP (its 4x hidden layer shown)", hidden.clone());
    let post = vec![
        Node::new("x: the residual stream", btc.clone()),
        attn(),
        plus().adding(0),
        ln(),
        mlp(),
        plus().adding(3),
        ln(),
    ];
    let pre = vec![
        Node::new("x: the residual stream", btc.clone()),
        ln(),
        attn(),
        plus().adding(0),
        ln(),
        mlp(),
        plus().adding(3),
    ];
    let columns = [
        Column {
            title: "post-LN (GPT-1): x = LN(x + f(x))".into(),
            nodes: post,
        },
        Column {
            title: "pre-LN (GPT-2): x = x + f(LN(x))".into(),
            nodes: pre,
        },
    ];
    let path = run.out.join("block.svg");
    flow(
        &path,
        "One transformer block, two places for LayerNorm",
        &columns,
    )?;
    println!(
        "one block: x {btc} -> MLP hidden {hidden} -> out {btc}; wrote {}",
        path.display()
    );
    Ok(())
}
// ANCHOR_END: block_diagram

// ANCHOR: params_demo
fn counting_parameters(cfg: &GptConfig, device: &Device) {
    section("3.6", "Counting parameters");
    let untied = cfg.clone().with_tie_weights(!cfg.tie_weights);
    for c in [
        cfg.clone(),
        untied,
        cfg.clone().with_norm(other_norm(cfg.norm)),
    ] {
        let measured = c.init(device).num_params();
        println!(
            "{:?}-LN, tied {}: num_params() = {measured}, formula = {}",
            c.norm,
            c.tie_weights,
            c.param_count()
        );
    }
    let gpt1 = GptConfig::gpt1();
    let n = gpt1.param_count();
    println!(
        "GPT-1's shape (12 layers, 12 heads, 768 wide, 512 positions, 40,478 tokens): {n} parameters (~{:.0}M)",
        n as f64 / 1e6
    );
}
// ANCHOR_END: params_demo

fn other_norm(norm: Norm) -> Norm {
    match norm {
        Norm::Pre => Norm::Post,
        Norm::Post => Norm::Pre,
    }
}

// ANCHOR: train_gpt
/// Builds a model of `cfg` and trains it with the chapter's settings.
fn train_model(cfg: &GptConfig, run: &Run, args: &TrainArgs) -> Result<Trained> {
    let name = format!("{:?}-LN", cfg.norm);
    let (model, report) = fit(&name, cfg.init(&run.device.clone().autodiff()), run, args)?;
    Ok((name, model, report))
}
// ANCHOR_END: train_gpt

fn sample(model: &Gpt, run: &Run, chars: usize) {
    section("3.9", "A sample");
    let mut rng = rng_for(run.seed, stream::SAMPLE, 3);
    print_sample(
        model,
        &run.data.tokenizer,
        &[0],
        chars,
        SampleOptions::default(),
        &mut rng,
    );
}

fn what_the_run_wrote(run: &Run, args: &Args, cfg: &GptConfig, trained: &[Trained]) -> Result<()> {
    section("3.10", "What the run wrote");
    let settings = args.train.settings(run.seed);
    let hyper = serde_json::json!({ "training": settings, "lr": args.train.lr, "model": cfg });
    let (_, model, report) = &trained[0];
    let mut summary = Summary::new(CHAPTER, run, hyper, model.num_params(), report);
    summary.wall_seconds = trained.iter().map(|(_, _, r)| r.wall_seconds).sum();
    summary.variants = trained
        .iter()
        .map(|(name, m, r)| Variant::new(name, m.num_params(), r))
        .collect();
    let curves: Vec<Curve> = trained
        .iter()
        .map(|(name, _, r)| Curve::of(name, r))
        .collect();
    let title = "Chapter 3: GPT decoder, pre-LN vs post-LN";
    let files = write_run(&run.out, &summary, title, &curves)?;
    println!("{}: {}", run.out.display(), files.join(", "));
    Ok(())
}
