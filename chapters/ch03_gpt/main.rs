//! Chapter 3 as a notebook: the pieces of a transformer block, then a GPT-1-style decoder.
//!
//! Run: `cargo run --release --bin ch03_gpt -- --backend ndarray`

use anyhow::Result;
use burn::nn::{Gelu, LayerNormConfig, Linear, LinearConfig};
use burn::optim::AdamWConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use clap::Parser;
use course::ch03_gpt::{Gpt, GptConfig, Norm, layer_norm};
use course::common::cli::{CommonArgs, TrainArgs};
use course::common::data::load_corpus;
use course::common::dataset::{Dataset, Split, rng_for, stream};
use course::common::report::{Summary, Variant, plot_losses, write_json, write_losses_csv};
use course::common::sample::{SampleOptions, print_sample};
use course::common::train::{ConstantLr, LanguageModel, TrainReport, train};
use course::common::{max_abs_diff, section};

const CHAPTER: &str = "ch03_gpt";

/// Chapter 3: a GPT-1-style decoder.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
#[command(mut_arg("steps", |a| a.default_value("5000").required(false)))]
#[command(mut_arg("batch_size", |a| a.default_value("32").required(false)))]
#[command(mut_arg("block_size", |a| a.default_value("8").required(false)))]
#[command(mut_arg("lr", |a| a.default_value("1e-3").required(false)))]
#[command(mut_arg("eval_interval", |a| a.default_value("500").required(false)))]
#[command(mut_arg("eval_iters", |a| a.default_value("200").required(false)))]
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
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Where LayerNorm sits: `pre` (GPT-2) or `post` (GPT-1). The chapter trains this one
    /// first, then the other for comparison.
    #[arg(long, value_enum, default_value = "pre")]
    norm: Norm,
    /// A separate output head instead of reusing the token embedding.
    #[arg(long)]
    untie: bool,
    /// Skip training the other norm placement.
    #[arg(long)]
    no_compare: bool,
    #[arg(long, default_value_t = 300)]
    sample_chars: usize,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(run)
}

fn run() -> Result<()> {
    let args = Args::parse();
    args.train.check()?;
    if args.n_head == 0 || !args.n_embd.is_multiple_of(args.n_head) {
        anyhow::bail!(
            "--n-embd ({}) must be a multiple of --n-head ({})",
            args.n_embd,
            args.n_head
        );
    }
    if !(0.0..1.0).contains(&args.dropout) {
        anyhow::bail!("--dropout must be in [0, 1), got {}", args.dropout);
    }
    let out = args.common.out_dir(CHAPTER);
    std::fs::create_dir_all(&out)?;
    let device = args.common.backend.device();
    device.seed(args.common.seed);
    println!(
        "Chapter 3: a GPT-1-style decoder (backend: {})",
        args.common.backend
    );
    let corpus = load_corpus(args.common.data.as_deref())?;
    let data = Dataset::new(&corpus.text)?;
    data.check_block_size(args.train.block_size)?;
    let tok = &data.tokenizer;
    let (v, t) = (tok.vocab_size(), args.train.block_size);

    section("3.1", "The feed-forward network and the block");
    let cfg = GptConfig::new(v, t, args.n_layer, args.n_head, args.n_embd)
        .with_dropout(args.dropout)
        .with_norm(args.norm)
        .with_tie_weights(!args.untie);
    let model = cfg.init(&device);
    let block = &model.blocks[0];
    println!(
        "block: LN -> {}-head attention -> + ; LN -> MLP {} -> {} -> GELU -> {} -> +",
        args.n_head,
        args.n_embd,
        4 * args.n_embd,
        args.n_embd
    );
    let x = Tensor::<3>::random([2, t, args.n_embd], Distribution::Normal(0.0, 1.0), &device);
    println!(
        "x {:?} -> mlp {:?} -> block {:?}",
        x.dims(),
        block.mlp.forward(x.clone()).dims(),
        block.forward(x.clone()).dims()
    );

    // ANCHOR: residual_demo
    section("3.2", "Residual connections");
    // A deep stack of small MLPs, with and without `x + f(x)`: how much gradient reaches
    // the first layer?
    let ad = device.clone().autodiff();
    for depth in [4, 16, 32] {
        let plain = first_layer_grad_norm(depth, false, &ad);
        let resid = first_layer_grad_norm(depth, true, &ad);
        println!(
            "depth {depth:>2}: |grad| at layer 1 = {plain:.2e} without residuals, {resid:.2e} with"
        );
    }
    // ANCHOR_END: residual_demo

    // ANCHOR: layer_norm_demo
    section("3.3", "LayerNorm from its definition");
    let x = Tensor::<3>::random([2, t, args.n_embd], Distribution::Normal(3.0, 2.0), &device);
    let burn_ln = LayerNormConfig::new(args.n_embd).init(&device);
    let ours = layer_norm(
        x.clone(),
        burn_ln.gamma.val(),
        burn_ln.beta.as_ref().map(|b| b.val()),
        1e-5,
    );
    let theirs = burn_ln.forward(x.clone());
    let stats = |t: &Tensor<3>| {
        let row = t.clone().slice(s![0..1, 0..1, ..]).flatten::<1>(0, 2);
        (
            row.clone().mean().into_scalar::<f32>(),
            row.var_bias(0).sqrt().into_scalar::<f32>(),
        )
    };
    println!(
        "one token before: mean {:.3}, std {:.3}",
        stats(&x).0,
        stats(&x).1
    );
    println!(
        "one token after:  mean {:.3}, std {:.3}",
        stats(&ours).0,
        stats(&ours).1
    );
    println!(
        "max |ours - burn::nn::LayerNorm| = {:.2e}",
        max_abs_diff(&ours, &theirs)
    );
    // ANCHOR_END: layer_norm_demo

    // ANCHOR: dropout_demo
    section("3.4", "Dropout");
    let dropped = GptConfig::new(v, t, 1, args.n_head, args.n_embd)
        .with_dropout(0.2)
        .init(&ad);
    let mut rng = rng_for(args.common.seed, stream::DEMO, 3);
    let (xb, _) = data.batch(Split::Val, 2, t, &mut rng, &ad);
    let a = dropped.forward(xb.clone());
    let b = dropped.forward(xb.clone());
    let eval = dropped.valid();
    let xe = xb.without_autodiff();
    println!(
        "training mode, two passes differ by {:.3} (a new random mask each time)",
        max_abs_diff(&a, &b)
    );
    println!(
        "eval mode (model.valid()), two passes differ by {:.3}",
        max_abs_diff(&eval.forward(xe.clone()), &eval.forward(xe))
    );
    // ANCHOR_END: dropout_demo

    // ANCHOR: gpt_demo
    section("3.5", "The GPT-1 decoder");
    println!(
        "{} blocks, {} heads, {} wide, block size {t}, norm: {:?}, head tied to wte: {}",
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.norm, cfg.tie_weights
    );
    println!("post-LN (GPT-1): x = LN(x + attn(x)); x = LN(x + mlp(x))");
    println!("pre-LN  (GPT-2): x = x + attn(LN(x)); x = x + mlp(LN(x)); final LN before the head");
    let logits = model.forward(data.batch(Split::Val, 2, t, &mut rng, &device).0);
    println!("logits: {:?} = [batch, time, vocab]", logits.dims());
    // ANCHOR_END: gpt_demo

    // ANCHOR: params_demo
    section("3.6", "Counting parameters");
    for c in [
        cfg.clone(),
        cfg.clone().with_tie_weights(!cfg.tie_weights),
        cfg.clone().with_norm(Norm::Post),
    ] {
        println!(
            "{:?}, tied {}: num_params() = {}, formula = {}",
            c.norm,
            c.tie_weights,
            c.init(&device).num_params(),
            c.param_count()
        );
    }
    let gpt1 = GptConfig::gpt1();
    println!(
        "GPT-1 (12 layers, 12 heads, 768 wide, 512 positions, 40,478 tokens): {} parameters (~{:.0}M)",
        gpt1.param_count(),
        gpt1.param_count() as f64 / 1e6
    );
    // ANCHOR_END: params_demo

    // ANCHOR: train_gpt
    let settings = args.train.settings(args.common.seed);
    let fit = |cfg: &GptConfig| -> Result<(Gpt, TrainReport)> {
        let mut optim = AdamWConfig::new().init();
        let (model, report) = train(
            cfg.init(&ad),
            &mut optim,
            &data,
            &settings,
            0,
            &mut ConstantLr(args.train.lr),
        )?;
        let last = report.losses.last().expect("evaluated");
        println!(
            "{:?}-LN: final train {:.4}, val {:.4}; {:.1} s, {:.0} tokens/s",
            cfg.norm, last.train, last.val, report.wall_seconds, report.tokens_per_second
        );
        Ok((model, report))
    };
    section("3.7", &format!("Training ({:?}-LN)", cfg.norm));
    let (model, report) = fit(&cfg)?;
    let other = if cfg.norm == Norm::Pre {
        Norm::Post
    } else {
        Norm::Pre
    };
    let compare = if args.no_compare {
        None
    } else {
        section("3.8", &format!("The same with {other:?}-LN"));
        Some(fit(&cfg.clone().with_norm(other))?)
    };
    // ANCHOR_END: train_gpt

    section("3.9", "A sample");
    let mut rng = rng_for(args.common.seed, stream::SAMPLE, 3);
    print_sample(
        &model,
        tok,
        &[0],
        args.sample_chars,
        t,
        SampleOptions::default(),
        &mut rng,
    );

    section("3.10", "What the run wrote");
    let name = |n: Norm| format!("{n:?}-LN");
    let mut runs = vec![(name(cfg.norm), &report.losses)];
    if let Some((_, r)) = &compare {
        runs.push((name(other), &r.losses));
    }
    let runs_ref: Vec<(&str, &[_])> = runs
        .iter()
        .map(|(n, l)| (n.as_str(), l.as_slice()))
        .collect();
    plot_losses(
        &out.join("loss_curve.svg"),
        "Chapter 3: GPT decoder, pre-LN vs post-LN",
        &runs_ref,
    )?;
    write_losses_csv(&out.join("losses.csv"), &report.losses)?;
    let mut variants = vec![Variant::new(&name(cfg.norm), model.num_params(), &report)];
    if let Some((m, r)) = &compare {
        write_losses_csv(
            &out.join(format!("losses_{}.csv", name(other).to_lowercase())),
            &r.losses,
        )?;
        variants.push(Variant::new(&name(other), m.num_params(), r));
    }
    let last = *report.losses.last().expect("evaluated");
    let summary = Summary {
        chapter: CHAPTER,
        backend: args.common.backend.to_string(),
        seed: args.common.seed,
        hyperparameters: serde_json::json!({ "training": settings, "model": cfg }),
        learning_rate: args.train.lr,
        parameters: model.num_params(),
        steps: settings.steps,
        final_train_loss: last.train,
        final_val_loss: last.val,
        wall_seconds: report.wall_seconds + compare.as_ref().map_or(0.0, |(_, r)| r.wall_seconds),
        train_seconds: report.train_seconds,
        tokens_per_second: report.tokens_per_second,
        data: corpus.path.display().to_string(),
        variants,
    };
    write_json(&out.join("summary.json"), &summary)?;
    println!(
        "{}/summary.json, losses*.csv, loss_curve.svg",
        out.display()
    );
    Ok(())
}

/// Gradient norm of the first layer's weight in a stack of `depth` MLPs (`c -> 4c -> c`,
/// N(0, 0.02) weights), with or without residual connections.
fn first_layer_grad_norm(depth: usize, residual: bool, device: &Device) -> f32 {
    device.seed(0);
    let c = 32;
    let layer = |i, o| -> Linear {
        LinearConfig::new(i, o)
            .with_initializer(burn::nn::Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            })
            .init(device)
    };
    let stack: Vec<(Linear, Linear)> = (0..depth)
        .map(|_| (layer(c, 4 * c), layer(4 * c, c)))
        .collect();
    let gelu = Gelu::new();
    let mut x = Tensor::<2>::random([16, c], Distribution::Normal(0.0, 1.0), device);
    for (up, down) in &stack {
        let fx = down.forward(gelu.forward(up.forward(x.clone())));
        x = if residual { x + fx } else { fx };
    }
    let grads = x.square().mean().backward();
    let g = stack[0]
        .0
        .weight
        .val()
        .grad(&grads)
        .expect("a gradient for layer 1");
    g.square().sum().sqrt().into_scalar::<f32>()
}
