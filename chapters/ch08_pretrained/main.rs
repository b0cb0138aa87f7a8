//! Chapter 8 as a notebook: OpenAI's GPT-2 in chapter 3's decoder, tokenized by chapter 7's
//! encoder with GPT-2's ranks, generating with chapter 6's cache.
//!
//! Run: `cargo run --release --bin ch08_pretrained -- --prompt "..."` (downloads GPT-2 124M,
//! 548 MB, on first use; `--weights FILE` for a local copy or another size).

use anyhow::{Result, bail};
use burn::module::Module;
use burn::store::{ModuleStore, SafetensorsStore};
use clap::Parser;
use course::ch03_gpt::{Gpt, GptConfig, Norm};
use course::ch05_fast::FUSED;
use course::ch06_generate::{Generation, Window, generate};
use course::ch07_bpe::gpt::whole_split_bits;
use course::ch07_bpe::gpt2;
use course::ch08_pretrained::tokenizer::Tokenizer;
use course::ch08_pretrained::{
    course_name, gpt1_tokenizer_dir, load_openai, pretrained_weights, published,
};
use course::common::cli::{CommonArgs, SampleArgs};
use course::common::dataset::{Dataset, Split, rng_for, stream};
use course::common::report::write_json;
use course::common::tokenizer::StreamDecoder;
use course::common::{Run, section};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

const CHAPTER: &str = "ch08_pretrained";

/// Chapter 8: OpenAI's GPT-2 in the course's own decoder.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Which published model to download on first use: gpt2 (124M, 548 MB), gpt2-medium
    /// (1.52 GB), gpt2-large (3.25 GB), gpt2-xl (6.43 GB) or openai-gpt (GPT-1, 479 MB).
    #[arg(long, default_value = "gpt2")]
    model: String,
    /// A `model.safetensors` of GPT-2's or GPT-1's layout instead of the download (or set
    /// GPT2_WEIGHTS).
    #[arg(long, value_name = "FILE")]
    weights: Option<PathBuf>,
    /// Attention heads (default: n_head of the config.json beside the weights, else width/64).
    #[arg(long)]
    n_head: Option<usize>,
    /// A chapter 7 tokenizer file, or a folder with GPT-1's vocab.json and merges.txt, instead
    /// of the model's own (GPT-2's; GPT-1's for a post-LN model, downloaded on first use).
    #[arg(long, value_name = "FILE|DIR")]
    tokenizer: Option<PathBuf>,
    /// Text to continue.
    #[arg(long, default_value = "ROMEO:")]
    prompt: String,
    #[command(flatten)]
    sampling: SampleArgs,
    /// Characters of the validation text to measure in 8.4 (0: all of it).
    #[arg(long, default_value_t = 0)]
    eval_chars: usize,
    /// Recompute the whole context for every new token instead of using chapter 6's cache.
    #[arg(long)]
    no_cache: bool,
    /// Only time generation (book/gpt2_speed.py runs this): load, generate 2 untimed tokens,
    /// then --max-new-tokens timed ones, write bench.json into --out; skips 8.2 and 8.4.
    #[arg(long)]
    bench: bool,
}

#[derive(Serialize)]
struct Summary {
    weights: String,
    parameters: usize,
    config: GptConfig,
    load_seconds: f64,
    tokens_per_second: f64,
    val_chars: usize,
    val_bits_per_char: f64,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        let options = args.sampling.options()?;
        let run = args
            .common
            .start(CHAPTER, "Chapter 8: GPT-2's weights", None)?;
        let weights = pretrained_weights(args.weights.as_deref(), &published(&args.model)?)?;
        let (model, config, load_seconds) = the_weights(&weights, args.n_head, &run)?;
        let tokenizer = the_tokenizer(&args, &config)?;
        let how = Generation {
            opts: options,
            window: Window::Slide,
            cached: !args.no_cache,
            fixed_shape: !run.backend.is_cpu(),
        };
        if args.bench {
            return bench(&model, &tokenizer, &args, how, load_seconds, &run);
        }
        the_names(&weights)?;
        let tokens_per_second = text_in_text_out(&model, &tokenizer, &args, how)?;
        let (val_chars, bits) = bits_per_character(&model, tokenizer, &run, args.eval_chars)?;
        let summary = Summary {
            weights: weights.display().to_string(),
            parameters: model.num_params(),
            config,
            load_seconds,
            tokens_per_second,
            val_chars,
            val_bits_per_char: bits,
        };
        write_json(&run.out.join("summary.json"), &summary)
    })
}

// ANCHOR: the_weights
/// 8.1: the file's tensors into chapter 3's decoder, configured by their shapes.
fn the_weights(path: &Path, n_head: Option<usize>, run: &Run) -> Result<(Gpt, GptConfig, f64)> {
    section("8.1", "The weights");
    let start = Instant::now();
    let (model, cfg) = load_openai(path, n_head, &run.device)?;
    let model = model.with_kernels(FUSED);
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}: {} parameters in {seconds:.2} s",
        path.display(),
        model.num_params()
    );
    let gelu = if cfg.gelu_tanh { "tanh" } else { "exact" };
    println!(
        "{} layers, {} heads, {} wide, {} positions, {} tokens; {:?}-LN, biases, tied head, {gelu} GELU",
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size, cfg.norm
    );
    Ok((model, cfg, seconds))
}
// ANCHOR_END: the_weights

// ANCHOR: the_names
/// 8.2: what each of the first block's tensors is called here, and its shape.
fn the_names(path: &Path) -> Result<()> {
    section("8.2", "GPT-2's names, the course's names");
    let mut store = SafetensorsStore::from_file(path);
    let tensors = store
        .get_all_tensors()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (name, tensor) in tensors {
        if name.starts_with("h.0.") || !name.starts_with("h.") {
            let shape = format!("{:?}", tensor.shape.as_slice());
            let ours = match name.ends_with(".attn.bias") || name.ends_with(".masked_bias") {
                true => "(unused: the causal mask, which the decoder makes itself)".into(),
                false => course_name(name),
            };
            println!("{name:<26} {shape:<14} -> {ours}");
        }
    }
    println!("(blocks 1 and up: the same names with their own number)");
    Ok(())
}
// ANCHOR_END: the_names

/// GPT-2's tokenizer (chapter 7, with tiktoken-rs's ranks), GPT-1's for a post-LN model, or
/// `--tokenizer FILE|DIR`; it must fit the model's vocabulary.
fn the_tokenizer(args: &Args, config: &GptConfig) -> Result<Tokenizer> {
    let tokenizer = match &args.tokenizer {
        Some(path) => Tokenizer::load(path)?,
        None if config.norm == Norm::Post => Tokenizer::load(&gpt1_tokenizer_dir()?)?,
        None => Tokenizer::Bpe(gpt2()?),
    };
    let vocab = config.vocab_size;
    if tokenizer.vocab_size() > vocab {
        bail!(
            "the tokenizer has {} tokens but the model only {vocab}: pass the tokenizer it \
             was trained with (--tokenizer FILE|DIR)",
            tokenizer.vocab_size()
        );
    }
    Ok(tokenizer)
}

// ANCHOR: text_in_text_out
/// 8.3: prompt -> ids -> generation with the cache -> text, printed as it comes.
fn text_in_text_out(model: &Gpt, tok: &Tokenizer, args: &Args, how: Generation) -> Result<f64> {
    section("8.3", "Text in, text out");
    let prompt = tok.encode(&args.prompt)?;
    if prompt.is_empty() || prompt.len() >= model.block_size {
        bail!(
            "the prompt is {} tokens; it must have 1 to {}",
            prompt.len(),
            model.block_size - 1
        );
    }
    println!("{:?} -> {} tokens {prompt:?}", args.prompt, prompt.len());
    let n = args.sampling.max_new_tokens;
    let (mut rng, mut text) = (
        rng_for(args.common.seed, stream::SAMPLE, 8),
        StreamDecoder::default(),
    );
    let mut stdout = std::io::stdout();
    print!("{}", args.prompt);
    let start = Instant::now();
    generate(model, &prompt, 1, n, how, &mut rng, |_, t| {
        print!("{}", text.push(tok, t));
        let _ = stdout.flush();
    });
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let cache = if how.cached { "with" } else { "without" };
    println!(
        "{}\n({n} tokens, {rate:.1} tokens/s {cache} the cache)",
        text.finish()
    );
    Ok(rate)
}
// ANCHOR_END: text_in_text_out

#[derive(Serialize)]
struct Bench {
    backend: String,
    cached: bool,
    prompt_tokens: usize,
    new_tokens: usize,
    load_seconds: f64,
    warmup_seconds: f64,
    tokens_per_second: f64,
}

/// `--bench`: generation timed alone, after 2 untimed tokens (a GPU compiles its kernels then).
fn bench(
    model: &Gpt,
    tok: &Tokenizer,
    args: &Args,
    how: Generation,
    load: f64,
    run: &Run,
) -> Result<()> {
    let prompt = tok.encode(&args.prompt)?;
    let n = args.sampling.max_new_tokens;
    // Past the block, the sliding window would rebuild the cache at every token.
    if prompt.is_empty() || prompt.len() + n > model.block_size {
        bail!(
            "--bench times a context within the model's {} positions: the prompt ({} tokens) \
             and --max-new-tokens ({n}) must fit in it",
            model.block_size,
            prompt.len()
        );
    }
    let mut rng = rng_for(args.common.seed, stream::SAMPLE, 8);
    let timed = |n, rng: &mut _| {
        let start = Instant::now();
        generate(model, &prompt, 1, n, how, rng, |_, _| {});
        start.elapsed().as_secs_f64()
    };
    let warmup_seconds = timed(2, &mut rng);
    let bench = Bench {
        backend: run.backend.to_string(),
        cached: how.cached,
        prompt_tokens: prompt.len(),
        new_tokens: n,
        load_seconds: load,
        warmup_seconds,
        tokens_per_second: n as f64 / timed(n, &mut rng),
    };
    println!("{}", serde_json::to_string(&bench)?);
    write_json(&run.out.join("bench.json"), &bench)
}

// ANCHOR: bits_per_character
/// 8.4: the model's code length for Tiny Shakespeare's validation text (chapter 7's
/// measure), to set beside the course's own models.
fn bits_per_character(
    model: &Gpt,
    tokenizer: Tokenizer,
    run: &Run,
    eval_chars: usize,
) -> Result<(usize, f64)> {
    section("8.4", "Bits per character on the validation text");
    let mut data = Dataset::tokenized(&run.corpus.text, tokenizer)?;
    if eval_chars > 0 {
        // The first `eval_chars` characters' worth of validation tokens (at least one block).
        let keep = (eval_chars as f64 * data.val.len() as f64 / data.val_chars as f64) as usize;
        data.val.truncate(keep.max(model.block_size + 1));
        data.val_chars = data.tokenizer.decode(&data.val).chars().count();
    }
    data.check_block_size(model.block_size)?;
    let start = Instant::now();
    let bits = whole_split_bits(model, &data, Split::Val, 4);
    println!(
        "{} characters, {} tokens: {bits:.4} bits per character ({:.1} s)",
        data.val_chars,
        data.val.len(),
        start.elapsed().as_secs_f64()
    );
    Ok((data.val_chars, bits))
}
// ANCHOR_END: bits_per_character
