//! Chapter 2 as a notebook: from averaging the past to multi-head self-attention.
//!
//! Run: `cargo run --release --bin ch02_attention -- --backend ndarray`

use anyhow::Result;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use clap::Parser;
use course::ch02_attention::{
    AttentionLm, AttentionLmConfig, Head, LinearRows, SelfAttention, average_loops, average_matmul,
    average_softmax, causal_attention, merge_heads, positions, split_heads,
};
use course::common::cli::{CommonArgs, TrainArgs};
use course::common::dataset::{Dataset, ids_tensor, rng_for, stream};
use course::common::diagram::{Column, Node, flow, shape};
use course::common::heatmap::{Panel, heatmap_grid, show_char};
use course::common::report::{Curve, Summary, Variant, write_run};
use course::common::sample::{SampleOptions, print_sample};
use course::common::train::{TrainReport, fit};
use course::common::{Run, fmt_matrix, max_abs_diff, section};

const CHAPTER: &str = "ch02_attention";

/// Chapter 2: self-attention, from averaging to multi-head.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    train: TrainArgs,
    /// Embedding width (model A's one head is this wide).
    #[arg(long, default_value_t = 32)]
    n_embd: usize,
    /// Heads of model B (each of size n_embd / n_head).
    #[arg(long, default_value_t = 4)]
    n_head: usize,
    /// Characters to generate with model B after training.
    #[arg(long, default_value_t = 300)]
    sample_chars: usize,
}

/// A trained model and its log.
type Trained = (AttentionLm, TrainReport);

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        args.train.check()?;
        let (t, c) = (args.train.block_size, args.n_embd);
        // Checked before anything runs (1 stands in for the vocabulary, known later).
        AttentionLmConfig::new(1, t, c, args.n_head).validate()?;
        let title = "Chapter 2: self-attention";
        let run = args.common.start(CHAPTER, title, Some(t))?;
        averaging_trick(&run.device);
        let head = one_head(&run)?;
        positional_embeddings(&head, &run)?;
        let v = run.data.tokenizer.vocab_size();
        section("2.4", "Model A: one head of self-attention");
        let a = train_model(
            "model A",
            AttentionLmConfig::new(v, t, c, 1),
            &run,
            &args.train,
        )?;
        section("2.5", "Model B: multi-head attention");
        let b = train_model(
            "model B",
            AttentionLmConfig::new(v, t, c, args.n_head),
            &run,
            &args.train,
        )?;
        heads_diagram(&b.0, &run, args.train.batch_size)?;
        attention_maps(&b.0, &run)?;
        sample(&b.0, &run, args.sample_chars);
        what_the_run_wrote(&run, &args, &a, &b)
    })
}

// ANCHOR: averaging_demo
fn averaging_trick(device: &Device) {
    section("2.1", "The averaging trick");
    let x = Tensor::<3>::random([4, 8, 2], Distribution::Normal(0.0, 1.0), device); // [B, T, C]
    let a = average_loops(&x);
    let (b, wei_b) = average_matmul(&x);
    let (c, wei_c) = average_softmax(&x);
    let first = |t: &Tensor<3>| fmt_matrix(&t.clone().slice(s![0..1, .., ..]).squeeze_dim(0), 3);
    println!("x[0]: [T=8, C=2]\n{}", first(&x));
    println!("(a) loops, mean of x[0, ..=t]:\n{}", first(&a));
    println!(
        "(b) weights: lower-triangular ones, rows normalised:\n{}",
        fmt_matrix(&wei_b, 3)
    );
    println!(
        "(c) weights: softmax of 0 / -inf:\n{}",
        fmt_matrix(&wei_c, 3)
    );
    let (ab, ac) = (max_abs_diff(&a, &b), max_abs_diff(&a, &c));
    println!("max |a - b| = {ab:.2e}, max |a - c| = {ac:.2e}: the three are the same");
}
// ANCHOR_END: averaging_demo

// ANCHOR: one_head_demo
fn one_head(run: &Run) -> Result<Head> {
    section("2.2", "Self-attention, one head");
    let (c, head_size, device) = (32, 16, &run.device);
    let x = Tensor::<3>::random([4, 8, c], Distribution::Normal(0.0, 1.0), device); // [B, T, C]
    let head = Head::new(c, head_size, device);
    let (y, wei) = head.forward_with_weights(x.clone());
    attention_diagram(run, &x.dims(), &wei.dims(), &y.dims())?;
    println!(
        "x: [4, 8, {c}] -> keys, queries, values: [4, 8, {head_size}] -> out {:?}",
        y.dims()
    );
    println!(
        "attention weights of the first sequence (row t = query at t; zeros above the diagonal):"
    );
    println!(
        "{}",
        fmt_matrix(&wei.slice(s![0..1, .., ..]).squeeze_dim(0), 3)
    );
    why_scale(head_size, device);
    Ok(head)
}

/// Draws the steps of one head with the shapes of the tensors above (queries, keys and
/// values have the output's shape, `[b, t, hs]`).
fn attention_diagram(run: &Run, x: &[usize], wei: &[usize], y: &[usize]) -> Result<()> {
    let [xs, ws, ys] = [
        shape(&["b", "t", "c"], x),
        shape(&["b", "t", "t"], wei),
        shape(&["b", "t", "hs"], y),
    ];
    let qs = ys.clone();
    let nodes = vec![
        Node::new("x (token + position embeddings)", xs),
        Node::new("queries q = x Wq", qs.clone()),
        Node::new("scores q kᵀ", ws.clone()).with_side("k = x Wk"),
        Node::new(&format!("scale: ÷ √{}", y[2]), ws.clone()),
        Node::new("mask: −∞ where key > query", ws.clone()),
        Node::new("softmax over the keys", ws),
        Node::new("weights · v", ys).with_side("v = x Wv"),
    ];
    let col = Column {
        title: "one head of self-attention".into(),
        nodes,
    };
    let path = run.out.join("attention_flow.svg");
    flow(
        &path,
        "Scaled dot-product attention, with this run's shapes",
        &[col],
    )?;
    println!(
        "keys and values have the shape of the queries, {qs}; wrote {}",
        path.display()
    );
    Ok(())
}

/// The variance of `q . k` with and without the 1/sqrt(head_size), and what softmax makes of
/// large scores.
fn why_scale(head_size: usize, device: &Device) {
    println!("\nwhy divide by sqrt(head_size): with unit-variance q and k,");
    let q = Tensor::<3>::random([4, 8, head_size], Distribution::Normal(0.0, 1.0), device);
    let k = Tensor::<3>::random([4, 8, head_size], Distribution::Normal(0.0, 1.0), device);
    let raw = q.matmul(k.swap_dims(1, 2)); // [4, 8, 8]
    let var = |t: Tensor<3>| t.flatten::<1>(0, 2).var(0).into_scalar::<f32>();
    println!(
        "  var(q . k)             = {:.2} (about head_size = {head_size})",
        var(raw.clone())
    );
    let scaled = var(raw / (head_size as f64).sqrt());
    println!("  var(q . k / sqrt({head_size})) = {scaled:.2} (about 1)");
    let scores = Tensor::<1>::from_floats([0.1, -0.2, 0.3, -0.2, 0.5], device);
    let show = |t: Tensor<1>| fmt_matrix(&t.unsqueeze::<2>(), 3);
    println!(
        "  softmax([0.1, -0.2, 0.3, -0.2, 0.5])     = {}",
        show(softmax(scores.clone(), 0))
    );
    let peaky = show(softmax(scores * 8.0, 0));
    println!("  softmax([0.1, -0.2, 0.3, -0.2, 0.5] * 8) = {peaky}  <- nearly one-hot");
}
// ANCHOR_END: one_head_demo

// ANCHOR: positions_demo
fn positional_embeddings(head: &Head, run: &Run) -> Result<()> {
    section("2.3", "Positional embeddings");
    // Attention alone sees a set, not a sequence: swap two earlier tokens and the last
    // token's output does not change. A learned embedding per position breaks the tie.
    let (t, device) = (8, &run.device);
    let ids = window_with_distinct(&run.data.val, t, 0, 3);
    let mut swapped = ids.clone();
    swapped.swap(0, 3);
    let v = run.data.tokenizer.vocab_size();
    let (emb, pos) = (embedding(v, device), embedding(t, device));
    let p = pos.forward(positions(t, t, device)); // [1, t, 32]
    let last = |ids: &[usize], with_positions: bool| {
        let tokens = emb.forward(as_tensor(ids, device)); // [1, t, 32]
        let x = if with_positions {
            tokens + p.clone()
        } else {
            tokens
        };
        head.forward(x).slice(s![0..1, t - 1..t, ..]) // the last token's output
    };
    let without = max_abs_diff(&last(&ids, false), &last(&swapped, false));
    let with = max_abs_diff(&last(&ids, true), &last(&swapped, true));
    let tok = &run.data.tokenizer;
    println!("{:?} vs {:?}", tok.decode(&ids), tok.decode(&swapped));
    println!("  last output differs by {without:.2e} without positions, {with:.2e} with them");
    Ok(())
}

/// The first `t` tokens of `tokens` whose positions `i` and `j` hold different tokens (so that
/// swapping them changes the text).
fn window_with_distinct(tokens: &[usize], t: usize, i: usize, j: usize) -> Vec<usize> {
    let start = (0..tokens.len() - t)
        .find(|&s| tokens[s + i] != tokens[s + j])
        .unwrap_or(0);
    tokens[start..start + t].to_vec()
}

fn embedding(n: usize, device: &Device) -> Embedding {
    EmbeddingConfig::new(n, 32).init(device)
}

/// Token ids as a batch of one sequence, `[1, t]`.
fn as_tensor(ids: &[usize], device: &Device) -> Tensor<2, Int> {
    let n = ids.len();
    ids_tensor(ids.iter().map(|&i| i as i64).collect(), [1, n], device)
}
// ANCHOR_END: positions_demo

// ANCHOR: heads_diagram
/// Runs model B's attention on a batch of the training shape and draws how `[b, t, 3c]`
/// becomes `n_head` heads and back, with the shapes it met.
fn heads_diagram(model: &AttentionLm, run: &Run, b: usize) -> Result<()> {
    let SelfAttention::Multi(mha) = &model.sa else {
        anyhow::bail!("model B has several heads");
    };
    let (t, c, nh) = (
        model.block_size,
        mha.c_proj.weight.val().dims()[0],
        mha.n_head,
    );
    let x = Tensor::<3>::zeros([b, t, c], &run.device); // [b, t, c]: only the shapes matter here
    let qkv = mha.c_attn.forward_rows(x.clone()); // [b, t, 3c]
    let (q, k, v) = split_heads(qkv.clone(), nh); // [b, nh, t, hs] each
    let [_, _, _, hs] = q.dims();
    let (y, _) = causal_attention(q.clone(), k, v); // [b, nh, t, hs]
    let merged = merge_heads(y.clone()); // [b, t, c]
    let out = mha.c_proj.forward_rows(merged.clone()); // [b, t, c]
    let btc = |d: [usize; 3]| shape(&["b", "t", "c"], &d);
    let heads = |d: [usize; 4]| shape(&["b", "nh", "t", "hs"], &d);
    let nodes = vec![
        Node::new("x", btc(x.dims())),
        Node::new(
            "c_attn: q, k, v of every head",
            shape(&["b", "t", "3c"], &qkv.dims()),
        ),
        Node::new("slice q (k, v: the next c)", btc([b, t, c])),
        Node::new(
            "reshape: c = nh × hs",
            shape(&["b", "t", "nh", "hs"], &[b, t, nh, hs]),
        ),
        Node::new("swap_dims(1, 2)", heads(q.dims())),
        Node::new("attention in every head", heads(y.dims())).with_side("k, v alike"),
        Node::new("merge_heads: swap, reshape", btc(merged.dims())),
        Node::new("c_proj: mix the heads", btc(out.dims())),
    ];
    let col = Column {
        title: format!("{nh} heads of {hs}"),
        nodes,
    };
    let path = run.out.join("heads_flow.svg");
    flow(
        &path,
        "Multi-head attention: one Linear, then a reshape",
        &[col],
    )?;
    println!(
        "[b, t, 3c] = {:?} -> q, k, v {:?} each -> merged {:?}; wrote {}",
        qkv.dims(),
        q.dims(),
        merged.dims(),
        path.display()
    );
    Ok(())
}
// ANCHOR_END: heads_diagram

// ANCHOR: train_models
/// Builds one model of the chapter and trains it with the run's settings.
fn train_model(name: &str, cfg: AttentionLmConfig, run: &Run, args: &TrainArgs) -> Result<Trained> {
    let model = cfg.init(&run.device.clone().autodiff());
    let hs = cfg.n_embd / cfg.n_head;
    println!(
        "{name}: {} head(s) of size {hs}, {} parameters",
        cfg.n_head,
        model.num_params()
    );
    fit(name, model, run, args)
}
// ANCHOR_END: train_models

// ANCHOR: attention_map
fn attention_maps(model: &AttentionLm, run: &Run) -> Result<()> {
    section("2.6", "Pictures: what each head of model B looks at");
    let (tok, t) = (&run.data.tokenizer, model.block_size);
    let prompt = word_start_window(&run.data, t);
    let (_, wei) = model
        .valid()
        .forward_with_weights(as_tensor(&prompt, &run.device)); // [1, nh, t, t]
    let nh = wei.dims()[1];
    let values = wei.into_data().try_to_vec::<f32>().expect("f32 weights");
    let panels: Vec<Panel> = (0..nh)
        .map(|h| Panel {
            title: format!("head {}", h + 1),
            values: values[h * t * t..(h + 1) * t * t].to_vec(),
        })
        .collect();
    let text = tok.decode(&prompt);
    let labels: Vec<String> = text.chars().map(show_char).collect();
    let title = format!("Model B attention on {text:?} (rows: query, columns: key)");
    let map = run.out.join("attention_heads.svg");
    heatmap_grid(&map, &title, &panels, &labels, &labels, nh.min(4))?;
    println!("prompt from the validation text: {text:?}");
    println!("wrote {}", map.display());
    Ok(())
}

/// `t` tokens of the validation text starting at the first word (a letter after whitespace),
/// or at its beginning if it has no such place.
fn word_start_window(data: &Dataset, t: usize) -> Vec<usize> {
    let chars = data.tokenizer.chars();
    let start = (1..data.val.len() - t)
        .find(|&i| chars[data.val[i - 1]].is_whitespace() && chars[data.val[i]].is_alphabetic())
        .unwrap_or(0);
    data.val[start..start + t].to_vec()
}
// ANCHOR_END: attention_map

fn sample(model: &AttentionLm, run: &Run, chars: usize) {
    section("2.7", "A sample from model B");
    let mut rng = rng_for(run.seed, stream::SAMPLE, 2);
    print_sample(
        model,
        &run.data.tokenizer,
        &[0],
        chars,
        SampleOptions::default(),
        &mut rng,
    );
}

fn what_the_run_wrote(run: &Run, args: &Args, a: &Trained, b: &Trained) -> Result<()> {
    section("2.8", "What the run wrote");
    let settings = args.train.settings(run.seed);
    let hyper = serde_json::json!({
        "training": settings, "lr": args.train.lr, "n_embd": args.n_embd, "n_head_model_b": args.n_head,
    });
    let (c, nh) = (args.n_embd, args.n_head);
    let mut summary = Summary::new(CHAPTER, run, hyper, b.0.num_params(), &b.1);
    summary.wall_seconds += a.1.wall_seconds;
    summary.variants = vec![
        Variant::new(&format!("A: 1 head of {c}"), a.0.num_params(), &a.1),
        Variant::new(
            &format!("B: {nh} heads of {}", c / nh),
            b.0.num_params(),
            &b.1,
        ),
    ];
    let curves = [Curve::of("A", &a.1), Curve::of("B", &b.1)];
    let title = "Chapter 2: one head (A) vs four heads (B)";
    let files = write_run(&run.out, &summary, title, &curves)?;
    println!(
        "{}: {}, attention_flow.svg, heads_flow.svg, attention_heads.svg",
        run.out.display(),
        files.join(", ")
    );
    Ok(())
}
