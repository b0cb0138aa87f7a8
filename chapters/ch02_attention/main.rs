//! Chapter 2 as a notebook: from averaging the past to multi-head self-attention.
//!
//! Run: `cargo run --release --bin ch02_attention -- --backend ndarray`

use anyhow::Result;
use burn::optim::AdamWConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use clap::Parser;
use course::ch02_attention::{
    AttentionLm, AttentionLmConfig, Head, average_loops, average_matmul, average_softmax,
};
use course::common::cli::{CommonArgs, TrainArgs};
use course::common::data::load_corpus;
use course::common::dataset::{Dataset, ids_tensor, rng_for, stream};
use course::common::heatmap::{Panel, heatmap_grid, show_char};
use course::common::report::{Summary, Variant, plot_losses, write_json, write_losses_csv};
use course::common::sample::{SampleOptions, print_sample};
use course::common::train::{ConstantLr, TrainReport, train};
use course::common::{fmt_matrix, max_abs_diff, section};

const CHAPTER: &str = "ch02_attention";

/// Chapter 2: self-attention, from averaging to multi-head.
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
    /// Embedding width.
    #[arg(long, default_value_t = 32)]
    n_embd: usize,
    /// Heads of model B (each of size n_embd / n_head).
    #[arg(long, default_value_t = 4)]
    n_head: usize,
    /// Characters to generate with model B after training.
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
    let out = args.common.out_dir(CHAPTER);
    std::fs::create_dir_all(&out)?;
    let device = args.common.backend.device();
    device.seed(args.common.seed);
    println!(
        "Chapter 2: self-attention (backend: {})",
        args.common.backend
    );
    let corpus = load_corpus(args.common.data.as_deref())?;
    let data = Dataset::new(&corpus.text)?;
    data.check_block_size(args.train.block_size)?;
    let tok = &data.tokenizer;

    // ANCHOR: averaging_demo
    section("2.1", "The averaging trick");
    let x = Tensor::<3>::random([4, 8, 2], Distribution::Normal(0.0, 1.0), &device); // [B, T, C]
    let a = average_loops(&x);
    let (b, wei_b) = average_matmul(&x);
    let (c, wei_c) = average_softmax(&x);
    println!(
        "x[0]: [T=8, C=2]\n{}",
        fmt_matrix(&x.clone().slice(s![0..1, .., ..]).squeeze_dim(0), 3)
    );
    println!(
        "(a) loops, mean of x[0, ..=t]:\n{}",
        fmt_matrix(&a.clone().slice(s![0..1, .., ..]).squeeze_dim(0), 3)
    );
    println!(
        "(b) weights: lower-triangular ones, rows normalised:\n{}",
        fmt_matrix(&wei_b, 3)
    );
    println!(
        "(c) weights: softmax of 0 / -inf:\n{}",
        fmt_matrix(&wei_c, 3)
    );
    println!(
        "max |a - b| = {:.2e}, max |a - c| = {:.2e}: the three are the same",
        max_abs_diff(&a, &b),
        max_abs_diff(&a, &c)
    );
    // ANCHOR_END: averaging_demo

    // ANCHOR: one_head_demo
    section("2.2", "Self-attention, one head");
    let head_size = 16;
    let x = Tensor::<3>::random([4, 8, 32], Distribution::Normal(0.0, 1.0), &device); // [B, T, C]
    let head = Head::new(32, head_size, &device);
    let (y, wei) = head.forward_with_weights(x);
    println!(
        "x: [4, 8, 32] -> keys, queries, values: [4, 8, {head_size}] -> out {:?}",
        y.dims()
    );
    println!(
        "attention weights of the first sequence (row t = query at t; zeros above the diagonal):"
    );
    println!(
        "{}",
        fmt_matrix(&wei.slice(s![0..1, .., ..]).squeeze_dim(0), 3)
    );

    println!("\nwhy divide by sqrt(head_size): with unit-variance q and k,");
    let q = Tensor::<3>::random([4, 8, head_size], Distribution::Normal(0.0, 1.0), &device);
    let k = Tensor::<3>::random([4, 8, head_size], Distribution::Normal(0.0, 1.0), &device);
    let raw = q.matmul(k.swap_dims(1, 2)); // [4, 8, 8]
    let var = |t: Tensor<3>| t.flatten::<1>(0, 2).var(0).into_scalar::<f32>();
    println!(
        "  var(q . k)                = {:.2} (about head_size = {head_size})",
        var(raw.clone())
    );
    println!(
        "  var(q . k / sqrt({head_size}))     = {:.2} (about 1)",
        var(raw / (head_size as f64).sqrt())
    );
    let scores = Tensor::<1>::from_floats([0.1, -0.2, 0.3, -0.2, 0.5], &device);
    let show = |t: Tensor<1>| fmt_matrix(&t.unsqueeze::<2>(), 3);
    println!(
        "  softmax([0.1, -0.2, 0.3, -0.2, 0.5])     = {}",
        show(softmax(scores.clone(), 0))
    );
    println!(
        "  softmax([0.1, -0.2, 0.3, -0.2, 0.5] * 8) = {}  <- nearly one-hot",
        show(softmax(scores * 8.0, 0))
    );
    // ANCHOR_END: one_head_demo

    // ANCHOR: positions_demo
    section("2.3", "Positional embeddings");
    // Attention alone sees a set, not a sequence: swap two earlier tokens and the last
    // token's output does not change. A learned embedding per position breaks the tie.
    let emb = burn::nn::EmbeddingConfig::new(tok.vocab_size(), 32).init(&device);
    let pos = burn::nn::EmbeddingConfig::new(8, 32).init(&device);
    let ids = tok.encode("to be or")?;
    let mut swapped = ids.clone();
    swapped.swap(0, 3);
    let as_tensor =
        |v: &[usize]| ids_tensor(v.iter().map(|&i| i as i64).collect(), [1, 8], &device);
    let last = |t: Tensor<3>| t.slice(s![0..1, 7..8, ..]);
    let p = course::ch02_attention::positions(8, 8, &device);
    let (orig, swap) = (as_tensor(&ids), as_tensor(&swapped));
    let without = max_abs_diff(
        &last(head.forward(emb.forward(orig.clone()))),
        &last(head.forward(emb.forward(swap.clone()))),
    );
    let with = max_abs_diff(
        &last(head.forward(emb.forward(orig) + pos.forward(p.clone()))),
        &last(head.forward(emb.forward(swap) + pos.forward(p))),
    );
    println!("{:?} vs {:?}", tok.decode(&ids), tok.decode(&swapped));
    println!("  last output differs by {without:.2e} without positions, {with:.2e} with them");
    // ANCHOR_END: positions_demo

    // ANCHOR: train_models
    let settings = args.train.settings(args.common.seed);
    let ad = device.clone().autodiff();
    let fit = |name: &str, cfg: AttentionLmConfig| -> Result<(AttentionLm, TrainReport)> {
        let model = cfg.init(&ad);
        println!(
            "{name}: {} head(s) of size {}, {} parameters",
            cfg.n_head,
            cfg.n_embd / cfg.n_head,
            model.num_params()
        );
        let mut optim = AdamWConfig::new().init();
        let mut hooks = ConstantLr(args.train.lr);
        let (model, report) = train(model, &mut optim, &data, &settings, 0, &mut hooks)?;
        let last = report.losses.last().expect("evaluated");
        println!(
            "{name}: final train {:.4}, val {:.4}; {:.1} s, {:.0} tokens/s",
            last.train, last.val, report.wall_seconds, report.tokens_per_second
        );
        Ok((model, report))
    };
    let (v, c, t) = (tok.vocab_size(), args.n_embd, args.train.block_size);
    section("2.4", "Model A: one attention head");
    let (model_a, report_a) = fit("model A", AttentionLmConfig::new(v, t, c, 1))?;
    section("2.5", "Model B: multi-head attention");
    let (model_b, report_b) = fit("model B", AttentionLmConfig::new(v, t, c, args.n_head))?;
    // ANCHOR_END: train_models

    // ANCHOR: attention_map
    section("2.6", "Pictures: what each head of model B looks at");
    // The first word start in the validation text (a space, then a letter) makes a readable prompt.
    let space = tok.encode(" ")?[0];
    let start = (1..data.val.len() - t)
        .find(|&i| data.val[i - 1] == space && tok.chars()[data.val[i]].is_alphabetic())
        .unwrap_or(0);
    let prompt: Vec<usize> = data.val[start..start + t].to_vec();
    let (_, wei) = model_b
        .valid()
        .forward_with_weights(as_tensor_any(&prompt, &device)); // [1, nh, t, t]
    let labels: Vec<String> = tok.decode(&prompt).chars().map(show_char).collect();
    let nh = args.n_head;
    let values = wei.into_data().try_to_vec::<f32>().expect("f32");
    let panels: Vec<Panel> = (0..nh)
        .map(|h| Panel {
            title: format!("head {}", h + 1),
            values: values[h * t * t..(h + 1) * t * t].to_vec(),
        })
        .collect();
    let map = out.join("attention_heads.svg");
    heatmap_grid(
        &map,
        &format!(
            "Model B attention on {:?} (rows: query, columns: key)",
            tok.decode(&prompt)
        ),
        &panels,
        &labels,
        &labels,
        nh.min(4),
    )?;
    println!("prompt from the validation text: {:?}", tok.decode(&prompt));
    println!("wrote {}", map.display());
    // ANCHOR_END: attention_map

    section("2.7", "A sample from model B");
    let mut rng = rng_for(args.common.seed, stream::SAMPLE, 2);
    print_sample(
        &model_b,
        tok,
        &[0],
        args.sample_chars,
        t,
        SampleOptions::default(),
        &mut rng,
    );

    section("2.8", "What the run wrote");
    plot_losses(
        &out.join("loss_curve.svg"),
        "Chapter 2: one head (A) vs four heads (B)",
        &[("A", &report_a.losses), ("B", &report_b.losses)],
    )?;
    write_losses_csv(&out.join("losses.csv"), &report_b.losses)?;
    write_losses_csv(&out.join("losses_model_a.csv"), &report_a.losses)?;
    let last = *report_b.losses.last().expect("evaluated");
    let summary = Summary {
        chapter: CHAPTER,
        backend: args.common.backend.to_string(),
        seed: args.common.seed,
        hyperparameters: serde_json::json!({
            "training": settings, "n_embd": args.n_embd, "n_head_model_b": args.n_head,
        }),
        learning_rate: args.train.lr,
        parameters: model_b.num_params(),
        steps: settings.steps,
        final_train_loss: last.train,
        final_val_loss: last.val,
        wall_seconds: report_a.wall_seconds + report_b.wall_seconds,
        train_seconds: report_b.train_seconds,
        tokens_per_second: report_b.tokens_per_second,
        data: corpus.path.display().to_string(),
        variants: vec![
            Variant::new(
                &format!("A: 1 head of {c}"),
                model_a.num_params(),
                &report_a,
            ),
            Variant::new(
                &format!("B: {nh} heads of {}", c / nh),
                model_b.num_params(),
                &report_b,
            ),
        ],
    };
    write_json(&out.join("summary.json"), &summary)?;
    println!(
        "{}/summary.json, losses.csv, losses_model_a.csv, loss_curve.svg, attention_heads.svg",
        out.display()
    );
    Ok(())
}

fn as_tensor_any(ids: &[usize], device: &Device) -> Tensor<2, Int> {
    ids_tensor(
        ids.iter().map(|&i| i as i64).collect(),
        [1, ids.len()],
        device,
    )
}
