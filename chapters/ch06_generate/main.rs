//! Chapter 6 as a notebook: generation with a cache of keys and values, from the FLOP count
//! to a checked, streaming, batched generator.
//!
//! Run (after chapter 4 has saved a checkpoint):
//! `cargo run --release --bin ch06_generate -- --backend flex`

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use clap::Parser;
use course::ch03_gpt::{Gpt, GptConfig};
use course::ch04_pretrain::{PRESETS, checkpoint, known_preset, preset};
use course::ch05_fast::FUSED;
use course::ch06_generate::{
    Generation, KvCache, Window, config_of, forward_cached, generate, macs_per_token,
};
use course::ch08_pretrained::tokenizer::Tokenizer;
use course::common::backend::Backend;
use course::common::cli::{SampleArgs, parse_backend};
use course::common::dataset::ids_tensor;
use course::common::dataset::{rng_for, stream};
use course::common::report::{plot_curves, write_atomic, write_json};
use course::common::sample::SampleOptions;
use course::common::section;
use course::common::tokenizer::StreamDecoder;
use course::common::train::{LanguageModel, human, model_device};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

const CHAPTER: &str = "ch06_generate";

/// Chapter 6: generation with a KV cache.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
struct Args {
    /// Which Burn backend runs the model.
    #[arg(long, default_value = "flex", value_parser = parse_backend)]
    backend: Backend,
    /// A chapter 4 checkpoint folder.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "runs/ch04_pretrain/ckpt/best"
    )]
    checkpoint: PathBuf,
    /// Seed for the samples.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Folder for summary.json and pictures.
    #[arg(long, value_name = "DIR", default_value = "runs/ch06_generate")]
    out: PathBuf,
    /// Text to continue (empty: start from a newline).
    #[arg(long, default_value = "ROMEO:")]
    prompt: String,
    #[command(flatten)]
    sampling: SampleArgs,
    /// Past the block size: `slide` (the last block_size tokens, exact but rebuilt at every
    /// token) or `restart` (start again from the last --keep tokens when full).
    #[arg(long, default_value = "restart")]
    window: String,
    /// Tokens a restart keeps (default: half the block).
    #[arg(long)]
    keep: Option<usize>,
    /// Recompute the whole context for every token, as chapter 4 does.
    #[arg(long)]
    no_cache: bool,
    /// Read prompts from stdin, one per line, and continue each; end with EOF (Ctrl-D).
    #[arg(long)]
    interactive: bool,
    /// Tokens per timing in section 6.5.
    #[arg(long, default_value_t = 500)]
    bench_tokens: usize,
    /// Also time a preset's shape with fresh weights (e.g. `lecture`).
    #[arg(long)]
    bench_preset: Option<String>,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        let opts = args.sampling.options()?;
        let device = args.backend.open()?;
        device.seed(args.seed);
        let (model, tok) = load(&args, &device)?;
        let how = generation(&args, &model, opts)?;
        let bench = bench_preset(&args, &model)?;
        if args.interactive {
            return interactive(&model, &tok, how, &args);
        }
        let prompt = encode_prompt(&tok, &args.prompt, model.block_size)?;
        println!(
            "Chapter 6: generation with a KV cache (backend: {})",
            args.backend
        );
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("cannot create {}", args.out.display()))?;
        let cfg = config_of(&model);
        the_cost_of_recomputing(&cfg, &args)?;
        the_cache(&cfg);
        let checks = checking_the_cache(&model, &prompt)?;
        past_the_block(&model, &prompt, how);
        let tokens_per_s = sampling(&model, &tok, &prompt, how, &args);
        let speed = speed(&model, bench, &prompt, &args);
        what_the_run_wrote(&args, &cfg, checks, tokens_per_s, speed)
    })
}

/// The checkpoint's model and tokenizer; with no checkpoint, how to make one.
fn load(args: &Args, device: &Device) -> Result<(Gpt, Tokenizer)> {
    if !args.checkpoint.exists() {
        bail!(
            "no checkpoint at {}: train one with `cargo run --release --bin ch04_pretrain` \
             (or pass --checkpoint DIR)",
            args.checkpoint.display()
        );
    }
    let (model, _, meta) = checkpoint::load(&args.checkpoint, device, None)?;
    eprintln!(
        "checkpoint {} (preset {}, step {}, val {:.4})",
        args.checkpoint.display(),
        meta.config.preset,
        meta.step,
        meta.val_loss
    );
    // Chapter 5's kernels on CPU backends (Burn's ops elsewhere), as chapter 4 samples.
    Ok((model.with_kernels(FUSED), meta.tokenizer))
}

/// The window and cache settings the flags ask for, checked against the model.
fn generation(args: &Args, model: &Gpt, opts: SampleOptions) -> Result<Generation> {
    let block = model.block_size;
    let window = match args.window.as_str() {
        "slide" => Window::Slide,
        "restart" => Window::Restart {
            keep: args.keep.unwrap_or(block / 2),
        },
        other => bail!("unknown --window '{other}': choose slide or restart"),
    };
    window.check(block)?;
    Ok(Generation {
        opts,
        window,
        cached: !args.no_cache,
        // Every token one shape on the GPU backends, which compile a kernel per shape.
        fixed_shape: !args.backend.is_cpu(),
    })
}

/// `--bench-preset`'s model with fresh weights, checked before anything runs.
fn bench_preset(args: &Args, model: &Gpt) -> Result<Option<(String, Gpt)>> {
    let Some(name) = &args.bench_preset else {
        return Ok(None);
    };
    let vocab = model.wte.weight.val().dims()[0];
    let cfg = known_preset(name, vocab)?;
    let fresh = cfg.model.init(&model_device(model)).with_kernels(FUSED);
    Ok(Some((format!("{name} (fresh weights)"), fresh)))
}

/// The prompt's tokens: an empty prompt starts from a newline; one the model cannot read is
/// an error.
fn encode_prompt(tok: &Tokenizer, prompt: &str, block: usize) -> Result<Vec<usize>> {
    let text = if prompt.is_empty() { "\n" } else { prompt };
    let ids = tok
        .encode(text)
        .map_err(|e| anyhow::anyhow!("the prompt cannot be encoded: {e}"))?;
    if ids.len() > block {
        bail!(
            "the prompt has {} tokens, more than the model's block size of {block}",
            ids.len()
        );
    }
    Ok(ids)
}

// ANCHOR: cost
fn the_cost_of_recomputing(cfg: &GptConfig, args: &Args) -> Result<()> {
    section("6.1", "The cost of recomputing the context");
    let lecture = preset("lecture", cfg.vocab_size).expect("a preset").model;
    for (name, c) in [("this checkpoint", cfg), ("lecture", &lecture)] {
        println!(
            "{name}: {} layers, {} wide, block {}",
            c.n_layer, c.n_embd, c.block_size
        );
        for ctx in [1, c.block_size / 4, c.block_size / 2, c.block_size] {
            let (full, cached) = (macs_per_token(c, ctx, false), macs_per_token(c, ctx, true));
            println!(
                "  context {ctx:>4}: {:>8} multiply-adds per new token recomputing, {:>7} cached ({:.0}x)",
                human(full),
                human(cached),
                full / cached
            );
        }
    }
    let path = args.out.join("work_per_token.svg");
    let curve = |w: Window, cached: bool| -> Vec<(f64, f64)> {
        (1..=2 * lecture.block_size + 100)
            .map(|n| {
                let ctx = w.context_len(n, lecture.block_size);
                // The window moved: the cache is rebuilt, which costs a full forward pass.
                let moved = n > 1 && ctx != w.context_len(n - 1, lecture.block_size) + 1;
                let macs = macs_per_token(&lecture, ctx, cached && !moved);
                (n as f64, macs / 1e6)
            })
            .collect()
    };
    let half = Window::Restart {
        keep: lecture.block_size / 2,
    };
    plot_curves(
        &path,
        "Lecture preset: million multiply-adds for each new token",
        "tokens so far",
        &[
            ("recomputing, sliding window", curve(Window::Slide, false)),
            (
                "cache, sliding window (rebuilt every token)",
                curve(Window::Slide, true),
            ),
            ("cache, restart from the last half", curve(half, true)),
        ],
    )?;
    println!("wrote {}", path.display());
    Ok(())
}
// ANCHOR_END: cost

fn the_cache(cfg: &GptConfig) {
    section("6.2", "The cache: keys and values of every layer");
    let hs = cfg.n_embd / cfg.n_head;
    println!(
        "per layer: keys and values [batch, {} heads, {} positions, {hs}]; {} layers",
        cfg.n_head, cfg.block_size, cfg.n_layer
    );
    println!("memory = 2 x layers x block x n_embd x 4 bytes per sequence:");
    for name in PRESETS {
        let c = preset(name, cfg.vocab_size).expect("a preset").model;
        let bytes = KvCache::bytes(&c, 1);
        println!(
            "  {name:>8}: 2 x {} x {} x {} x 4 = {} bytes ({:.2} MiB)",
            c.n_layer,
            c.block_size,
            c.n_embd,
            bytes,
            bytes as f64 / (1 << 20) as f64
        );
    }
}

/// What section 6.3 measured.
#[derive(serde::Serialize)]
struct Checks {
    max_logit_diff: f32,
    greedy_identical: bool,
}

// ANCHOR: check
fn checking_the_cache(model: &Gpt, prompt: &[usize]) -> Result<Checks> {
    section("6.3", "Checking the cache against the full forward pass");
    let model = model.valid();
    let (n, block) = (model.block_size + 20, model.block_size);
    let (tokens, same) = greedy_both_ways(&model, prompt, n, Window::Slide);
    let verdict = if same { "identical" } else { "DIFFER" };
    println!("greedy, {n} tokens (past the block of {block}): cached and recomputed {verdict}");
    // The logits of every position of a full block, one cached step at a time.
    let tokens: Vec<usize> = prompt.iter().chain(&tokens).take(block).copied().collect();
    let worst = worst_logit_diff(&model, &tokens);
    println!("{block} cached steps: logits differ from the full forward by at most {worst:.1e}");
    Ok(Checks {
        max_logit_diff: worst,
        greedy_identical: same,
    })
}

/// `n` greedy tokens with the cache, and whether recomputing gives the same ones.
fn greedy_both_ways(model: &Gpt, prompt: &[usize], n: usize, window: Window) -> (Vec<usize>, bool) {
    let run = |cached| {
        let how = Generation {
            opts: SampleOptions::GREEDY,
            window,
            cached,
            fixed_shape: false,
        };
        let mut rng = rng_for(0, stream::SAMPLE, 6); // unused: greedy draws nothing
        generate(model, prompt, 1, n, how, &mut rng, |_, _| {}).concat()
    };
    let cached = run(true);
    let same = cached == run(false);
    (cached, same)
}

/// Feeds `tokens` one at a time through a cache and compares each step's logits with the
/// full forward pass's at the same position.
fn worst_logit_diff(model: &Gpt, tokens: &[usize]) -> f32 {
    let device = model_device(model);
    let ids =
        |t: &[usize]| ids_tensor(t.iter().map(|&x| x as i64).collect(), [1, t.len()], &device);
    let full = model.forward(ids(tokens)); // [1, t, vocab]
    let mut cache = KvCache::new(&config_of(model), 1, false, &device);
    let mut worst = 0f32;
    for t in 0..tokens.len() {
        let step = forward_cached(model, ids(&tokens[t..t + 1]), &mut cache); // [1, 1, vocab]
        let want = full.clone().slice(s![.., t..t + 1, ..]);
        worst = worst.max((step - want).abs().max().into_scalar::<f32>());
    }
    worst
}
// ANCHOR_END: check

// ANCHOR: past_the_block
fn past_the_block(model: &Gpt, prompt: &[usize], how: Generation) {
    section("6.4", "Past the block size");
    let block = model.block_size;
    let Window::Restart { keep } = how.window else {
        return println!("(--window slide: rebuilt at every token past the block)");
    };
    let restart = Window::Restart { keep };
    for n in [
        block,
        block + 1,
        block + 2,
        2 * block - keep,
        2 * block - keep + 1,
        2 * block - keep + 2,
    ] {
        println!(
            "  with {n:>4} tokens the model sees the last {:>4} (slide) or {:>4} (restart, keep {keep})",
            Window::Slide.context_len(n, block),
            restart.context_len(n, block)
        );
    }
    let n = 3 * block;
    let verdict = match greedy_both_ways(model, prompt, n, restart).1 {
        true => "identical",
        false => "DIFFER",
    };
    println!("restart window, greedy, {n} tokens: cached and recomputed {verdict}");
}
// ANCHOR_END: past_the_block

// ANCHOR: sampling
/// Streams one sample (or prints a batch of them) and returns the tokens per second.
fn sampling(model: &Gpt, tok: &Tokenizer, prompt: &[usize], how: Generation, args: &Args) -> f64 {
    section("6.5", "Sampling: streaming, batched");
    let (batch, n) = (args.sampling.num_samples, args.sampling.max_new_tokens);
    let mut rng = rng_for(args.seed, stream::SAMPLE, 6);
    let (mut stdout, mut text) = (std::io::stdout(), StreamDecoder::default());
    print!("{}", tok.decode(prompt));
    let start = Instant::now();
    let rows = generate(model, prompt, batch, n, how, &mut rng, |row, t| {
        if row == 0 {
            print!("{}", text.push(tok, t)); // as soon as it exists
            let _ = stdout.flush();
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!("{}", text.finish());
    for (r, row) in rows.iter().enumerate().skip(1) {
        println!(
            "--- sample {} ---\n{}{}",
            r + 1,
            tok.decode(prompt),
            tok.decode(row)
        );
    }
    let rate = (batch * n) as f64 / secs;
    println!("{batch} x {n} tokens in {secs:.2} s: {rate:.0} tokens/s");
    rate
}
// ANCHOR_END: sampling

/// Tokens per second with and without the cache, both windows, batch 1.
#[derive(serde::Serialize)]
struct Speed {
    model: String,
    tokens: usize,
    slide_recompute: f64,
    slide_cached: f64,
    restart_recompute: f64,
    restart_cached: f64,
    /// The untimed warm-up of the cached run: the prompt and, on wgpu, compiling kernels.
    first_two_tokens_s: f64,
    cache_speedup: f64,
}

// ANCHOR: speed
fn speed(model: &Gpt, bench: Option<(String, Gpt)>, prompt: &[usize], args: &Args) -> Vec<Speed> {
    section("6.6", "Speed: tokens per second with and without the cache");
    let mut results = vec![time_all("this checkpoint", model, prompt, args)];
    if let Some((name, fresh)) = bench {
        results.push(time_all(&name, &fresh, prompt, args));
    }
    results
}

fn time_all(name: &str, model: &Gpt, prompt: &[usize], args: &Args) -> Speed {
    let n = args.bench_tokens;
    let keep = Window::Restart {
        keep: model.block_size / 2,
    };
    let rate = |window, cached| {
        let how = Generation {
            opts: SampleOptions::default(),
            window,
            cached,
            fixed_shape: !args.backend.is_cpu(),
        };
        let mut rng = rng_for(args.seed, stream::SAMPLE, 7);
        let start = Instant::now();
        generate(model, prompt, 1, 2, how, &mut rng, |_, _| {}); // warm-up (GPU kernels)
        let first = start.elapsed().as_secs_f64();
        let start = Instant::now();
        generate(model, prompt, 1, n, how, &mut rng, |_, _| {});
        (n as f64 / start.elapsed().as_secs_f64(), first)
    };
    let (restart_cached, first) = rate(keep, true);
    let slide_recompute = rate(Window::Slide, false).0;
    let s = Speed {
        model: name.to_string(),
        tokens: n,
        slide_recompute,
        slide_cached: rate(Window::Slide, true).0,
        restart_recompute: rate(keep, false).0,
        restart_cached,
        first_two_tokens_s: first,
        cache_speedup: restart_cached / slide_recompute,
    };
    println!(
        "{name}, {n} new tokens: recomputing {:.0} tokens/s (slide) / {:.0} (restart); cached {:.0} (slide) / {:.0} (restart): {:.1}x",
        s.slide_recompute, s.restart_recompute, s.slide_cached, s.restart_cached, s.cache_speedup
    );
    println!(
        "  the first 2 cached tokens (the prompt, and compiling kernels on a GPU) took {first:.2} s"
    );
    s
}
// ANCHOR_END: speed

fn what_the_run_wrote(
    args: &Args,
    cfg: &GptConfig,
    checks: Checks,
    rate: f64,
    speed: Vec<Speed>,
) -> Result<()> {
    section("6.7", "What the run wrote");
    let machine = course::common::report::Machine::detect(!args.backend.is_cpu());
    let summary = serde_json::json!({
        "chapter": CHAPTER, "backend": args.backend.to_string(), "seed": args.seed,
        "model": cfg, "checks": checks, "sample_tokens_per_s": rate, "speed": speed,
        "machine": &machine,
    });
    write_json(&args.out.join("summary.json"), &summary)?;
    let mut table = String::from(
        "| model | recomputing, slide | recomputing, restart | cached, slide | cached, restart | cache_speedup | first 2 tokens, s |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for s in &speed {
        table += &format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1}x | {:.2} |\n",
            s.model,
            s.slide_recompute,
            s.restart_recompute,
            s.slide_cached,
            s.restart_cached,
            s.cache_speedup,
            s.first_two_tokens_s
        );
    }
    table += &format!(
        "\nTokens per second, {} new tokens, batch 1, `--backend {}`, on {}.\n",
        args.bench_tokens, args.backend, machine.cpu
    );
    write_atomic(&args.out.join("speed.md"), table.as_bytes())?;
    println!(
        "{}: summary.json, speed.md, work_per_token.svg",
        args.out.display()
    );
    Ok(())
}

// ANCHOR: interactive
/// Reads a prompt per line and continues it; a line the model cannot read is reported and
/// skipped. EOF ends.
fn interactive(model: &Gpt, tok: &Tokenizer, how: Generation, args: &Args) -> Result<()> {
    let mut rng = rng_for(args.seed, stream::SAMPLE, 6);
    let mut stdout = std::io::stdout();
    eprintln!("type a prompt and press Enter; Ctrl-D ends");
    for line in std::io::stdin().lock().lines() {
        let line = line.context("cannot read stdin")?;
        let prompt = match encode_prompt(tok, &line, model.block_size) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e:#}");
                continue;
            }
        };
        print!("{}", tok.decode(&prompt));
        let mut text = StreamDecoder::default();
        generate(
            model,
            &prompt,
            1,
            args.sampling.max_new_tokens,
            how,
            &mut rng,
            |_, t| {
                print!("{}", text.push(tok, t));
                let _ = stdout.flush();
            },
        );
        println!("{}", text.finish());
    }
    Ok(())
}
// ANCHOR_END: interactive
