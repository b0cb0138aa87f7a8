//! Chapter 7 as a notebook: byte-level BPE from scratch, trained on the corpus and checked
//! token for token against GPT-2's real tokenizer.
//!
//! Run: `cargo run --release --bin ch07_bpe`

use anyhow::{Context, Result, bail};
use clap::Parser;
use course::ch04_pretrain::{Overrides, known_preset};
use course::ch07_bpe::gpt::{Outcome, Race, compete};
use course::ch07_bpe::{Bpe, END_OF_TEXT, GPT2_PATTERN, TrainReport, gpt2, train};
use course::common::cli::CommonArgs;
use course::common::dataset::split_text;
use course::common::report::{
    Machine, plot_bars, plot_curves, plot_curves_at, write_atomic, write_json,
};
// Characters or BPE as one type: chapter 8's `Tokenizer` (this binary reaches ahead for it).
use course::ch08_pretrained::tokenizer::Tokenizer;
use course::common::{Run, section};
use plotters::prelude::SeriesLabelPosition;
use serde::Serialize;
use std::time::Instant;

const CHAPTER: &str = "ch07_bpe";

/// Chapter 7: byte-level BPE, checked against GPT-2's tokenizer.
#[derive(Parser, Debug)]
#[command(name = CHAPTER, version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Vocabulary sizes to train on the corpus (each at least 256).
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096")]
    vocab_sizes: Vec<usize>,
    /// Timed encodings per tokenizer in 7.5 (median).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    reps: u64,
    /// 7.7 trains chapter 4's GPT on these BPE vocabularies (each one of --vocab-sizes),
    /// and on characters.
    #[arg(long, value_delimiter = ',', default_value = "512,1024")]
    gpt_vocab_sizes: Vec<usize>,
    /// Chapter 4's preset for 7.7.
    #[arg(long, default_value = "baby")]
    gpt_preset: String,
    /// Steps for 7.7 (default: the preset's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    gpt_steps: Option<u64>,
}

/// One trained vocabulary: its size, training time and what it does to the validation text.
#[derive(Serialize)]
struct Trained {
    vocab_size: usize,
    merges: usize,
    train_seconds: f64,
    val_chars_per_token: f64,
}

#[derive(Serialize)]
struct Gpt2Check {
    corpus_tokens: usize,
    identical_on_corpus: bool,
    identical_on_torture_text: bool,
    course_mb_per_s: f64,
    tiktoken_mb_per_s: f64,
}

#[derive(Serialize)]
struct Summary {
    machine: Machine,
    trained: Vec<Trained>,
    gpt2: Gpt2Check,
    gpt_preset: String,
    gpt_on_tokens: Vec<Outcome>,
}

fn main() -> std::process::ExitCode {
    course::common::exit_on_error(|| {
        let args = Args::parse();
        if let Some(n) = args.vocab_sizes.iter().find(|&&n| n < 256) {
            bail!("--vocab-sizes: {n} is below 256, the byte vocabulary every size starts from");
        }
        if let Some(n) = (args.gpt_vocab_sizes.iter()).find(|n| !args.vocab_sizes.contains(n)) {
            bail!(
                "--gpt-vocab-sizes: {n} is not one of --vocab-sizes, the vocabularies 7.4 trains"
            );
        }
        // Checked now, not after 7.1 to 7.6 have run (the vocabulary does not matter here).
        known_preset(&args.gpt_preset, 256).context("--gpt-preset")?;
        let run = args
            .common
            .start(CHAPTER, "Chapter 7: tokens from bytes", None)?;
        bytes_not_characters();
        the_pre_split()?;
        a_worked_example()?;
        let (train_text, val_text) = split_text(&run.corpus.text);
        let tokenizers = train_on_the_corpus(&run, train_text, &args.vocab_sizes)?;
        let gpt2 = checked_against_gpt2(&run.corpus.text, args.reps as usize)?;
        let trained = compression(&run, val_text, &tokenizers)?;
        let outcomes = a_gpt_on_tokens(&args, &run, &tokenizers)?;
        side_by_side(&run, &outcomes)?;
        write_json(
            &run.out.join("summary.json"),
            &Summary {
                machine: Machine::detect(false),
                trained,
                gpt2,
                gpt_preset: args.gpt_preset.clone(),
                gpt_on_tokens: outcomes,
            },
        )?;
        Ok(())
    })
}

fn shown(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

// ANCHOR: bytes
/// 7.1: text as UTF-8 bytes, the 256 symbols every byte-level vocabulary starts from.
fn bytes_not_characters() {
    section("7.1", "Bytes, not characters");
    for text in ["ROMEO:", "naïve", "fiancé 🙂"] {
        let bytes = text.as_bytes();
        println!(
            "{:<12} {} characters, {} bytes: {bytes:?}",
            format!("{text:?}"),
            text.chars().count(),
            bytes.len()
        );
    }
    println!(
        "Every text is a sequence of bytes 0-255: a vocabulary of 256 has no unknown characters."
    );
}
// ANCHOR_END: bytes

// ANCHOR: pre_split
/// 7.2: GPT-2's pattern cuts text into pieces that merges never cross.
fn the_pre_split() -> Result<()> {
    section("7.2", "The pre-split: merges stay inside a piece");
    let bytes_only = Bpe::new((0..=255u8).map(|b| vec![b]).collect(), vec![], GPT2_PATTERN)?;
    let line = "I'll see thee, Romeo,  at 10 o'clock!\n\nJULIET:";
    let pieces = bytes_only.split(line);
    println!("{line:?}\n-> {pieces:?}");
    Ok(())
}
// ANCHOR_END: pre_split

// ANCHOR: worked_example
/// 7.3: the textbook example: "aaabdaaabac" with three merges.
fn a_worked_example() -> Result<()> {
    section("7.3", "Training, by hand: aaabdaaabac");
    let (bpe, report) = train("aaabdaaabac", 259, GPT2_PATTERN, vec![])?;
    print_merges(&bpe, &report, 3);
    let ids = bpe.encode_ordinary("aaabdaaabac");
    println!("encoded: {ids:?} = {}", tokens(&bpe, &ids));
    let (_, short) = train("aaabdaaabac", 300, GPT2_PATTERN, vec![])?;
    if let Some(why) = short.stopped_early {
        println!("asked for 300 tokens: {why}");
    }
    Ok(())
}

fn print_merges(bpe: &Bpe, report: &TrainReport, n: usize) {
    for &((a, b), new, count) in report.merges.iter().take(n) {
        let bytes = |id| shown(bpe.token_bytes(id).unwrap_or_default());
        println!(
            "merge {new}: {} + {} -> {} ({count} times)",
            bytes(a),
            bytes(b),
            bytes(new)
        );
    }
}

fn tokens(bpe: &Bpe, ids: &[u32]) -> String {
    let parts: Vec<String> = ids
        .iter()
        .map(|&id| shown(bpe.token_bytes(id).unwrap_or_default()))
        .collect();
    parts.join(" ")
}
// ANCHOR_END: worked_example

// ANCHOR: train_corpus
/// 7.4: vocabularies of each size trained on the training text, saved and loaded back.
fn train_on_the_corpus(run: &Run, text: &str, sizes: &[usize]) -> Result<Vec<(Bpe, TrainReport)>> {
    section("7.4", "Training on the corpus");
    let mut out = Vec::new();
    for &size in sizes {
        let (bpe, report) = train(text, size, GPT2_PATTERN, vec![END_OF_TEXT.into()])?;
        println!(
            "vocabulary {size}: {} merges over {} distinct pieces in {:.2} s",
            report.merges.len(),
            report.unique_pieces,
            report.seconds
        );
        if let Some(why) = &report.stopped_early {
            println!("  {why}");
        }
        let path = run.out.join(format!("bpe-{size}.txt"));
        bpe.save(&path)?;
        let line = "ROMEO:\nBut, soft! what light through yonder window breaks?";
        let ids = bpe.encode(line);
        if Bpe::load(&path)?.encode(line) != ids {
            bail!("{} encodes differently after loading", path.display());
        }
        println!(
            "  saved to {}; {:?} -> {} tokens",
            path.display(),
            line,
            ids.len()
        );
        out.push((bpe, report));
    }
    if let Some((bpe, report)) = out.first() {
        println!("the first merges of vocabulary {}:", bpe.vocab_size() - 1);
        print_merges(bpe, report, 8);
    }
    Ok(out)
}
// ANCHOR_END: train_corpus

// ANCHOR: gpt2_check
/// 7.5: the course's encoder with GPT-2's ranks against tiktoken-rs, on the whole corpus and
/// on a text made to break tokenizers.
fn checked_against_gpt2(corpus: &str, reps: usize) -> Result<Gpt2Check> {
    section(
        "7.5",
        "Checked against GPT-2's tokenizer (tiktoken-rs, r50k_base)",
    );
    let ours = gpt2()?;
    let theirs = tiktoken_rs::r50k_base()?;
    let torture = "Hello  world!\n\n\t  x  \r\n 123 4567 -- naïve café 東京 🙂👍🏽 \u{200b}'s 'LL \
                   I'm you've <|endoftext|> \u{feff}end   ";
    let same_torture = ours.encode_ordinary(torture) == theirs.encode_ordinary(torture)
        && ours.decode_bytes(&ours.encode_ordinary(torture))? == torture.as_bytes();
    let ((a, ours_s), (b, theirs_s)) = in_turns(
        reps,
        || ours.encode_ordinary(corpus),
        || theirs.encode_ordinary(corpus),
    );
    let first_difference = a.iter().zip(&b).position(|(x, y)| x != y);
    let same_corpus = a.len() == b.len() && first_difference.is_none();
    let mb = corpus.len() as f64 / 1e6;
    println!(
        "corpus: {} tokens from {} bytes; identical to tiktoken-rs: {same_corpus}",
        a.len(),
        corpus.len()
    );
    println!(
        "torture text ({} bytes): identical, and decodes back byte for byte: {same_torture}",
        torture.len()
    );
    println!(
        "{:?}\n-> {}",
        &torture[..28],
        tokens(&ours, &ours.encode_ordinary(&torture[..28]))
    );
    println!(
        "encoding speed: this course {:.1} MB/s, tiktoken-rs {:.1} MB/s (median of {reps}, in turns)",
        mb / ours_s,
        mb / theirs_s
    );
    if !same_corpus || !same_torture {
        bail!(
            "the course's encoder disagrees with tiktoken-rs (first difference at token {first_difference:?})"
        );
    }
    Ok(Gpt2Check {
        corpus_tokens: a.len(),
        identical_on_corpus: same_corpus,
        identical_on_torture_text: same_torture,
        course_mb_per_s: mb / ours_s,
        tiktoken_mb_per_s: mb / theirs_s,
    })
}

/// `f`'s and `g`'s results and median times in seconds over `reps` runs each, taken in turns
/// so that a busy moment of the machine hits both alike.
fn in_turns<A, B>(reps: usize, f: impl Fn() -> A, g: impl Fn() -> B) -> ((A, f64), (B, f64)) {
    let (mut tf, mut tg, mut out) = (Vec::new(), Vec::new(), None);
    for _ in 0..reps {
        let t = Instant::now();
        let a = f();
        tf.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        out = Some((a, g()));
        tg.push(t.elapsed().as_secs_f64());
    }
    let median = |mut t: Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let (a, b) = out.expect("reps >= 1");
    ((a, median(tf)), (b, median(tg)))
}
// ANCHOR_END: gpt2_check

// ANCHOR: compression
/// 7.6: characters per token on the validation text against the vocabulary size, and how
/// long the tokens are.
fn compression(run: &Run, val: &str, trained: &[(Bpe, TrainReport)]) -> Result<Vec<Trained>> {
    section("7.6", "Compression: characters per token");
    let chars = val.chars().count() as f64;
    println!(
        "{:>10} {:>8} {:>16}",
        "vocabulary", "tokens", "chars per token"
    );
    println!(
        "{:>10} {:>8} {:>16.3}",
        "bytes 256",
        val.len(),
        chars / val.len() as f64
    );
    let mut rows = Vec::new();
    let mut ratio_curve = vec![(256.0, chars / val.len() as f64)];
    let mut lengths = Vec::new();
    for (bpe, report) in trained {
        let ids = bpe.encode_ordinary(val);
        let n = bpe.vocab_size() - 1; // without <|endoftext|>
        println!(
            "{n:>10} {:>8} {:>16.3}",
            ids.len(),
            chars / ids.len() as f64
        );
        ratio_curve.push((n as f64, chars / ids.len() as f64));
        lengths.push((format!("{n} tokens"), length_histogram(bpe, &ids)));
        rows.push(Trained {
            vocab_size: n,
            merges: report.merges.len(),
            train_seconds: report.seconds,
            val_chars_per_token: chars / ids.len() as f64,
        });
    }
    let path = run.out.join("compression.svg");
    plot_curves(
        &path,
        "characters per token (validation text)",
        "vocabulary size",
        &[("BPE trained here", ratio_curve)],
    )?;
    println!("wrote {}", path.display());
    let bars: Vec<(&str, Vec<(f64, f64)>)> = lengths
        .iter()
        .skip(lengths.len().saturating_sub(3)) // the three largest vocabularies
        .map(|(name, h)| (name.as_str(), h.clone()))
        .collect();
    let path = run.out.join("token_lengths.svg");
    plot_bars(
        &path,
        "share of validation tokens by length in bytes",
        "bytes (12: 12 or more)",
        &bars,
    )?;
    println!("wrote {}", path.display());
    Ok(rows)
}

/// The share of `ids` whose token is 1, 2, ..., 12 or more bytes long.
fn length_histogram(bpe: &Bpe, ids: &[u32]) -> Vec<(f64, f64)> {
    let mut counts = [0usize; 13];
    for &id in ids {
        let len = bpe.token_bytes(id).map_or(0, <[u8]>::len).min(12);
        counts[len] += 1;
    }
    (1..counts.len())
        .map(|l| (l as f64, counts[l] as f64 / ids.len() as f64))
        .collect()
}
// ANCHOR_END: compression

// ANCHOR: gpt_on_tokens
/// 7.7: chapter 4's GPT, one preset, trained on characters and on BPE tokens.
fn a_gpt_on_tokens(
    args: &Args,
    run: &Run,
    tokenizers: &[(Bpe, TrainReport)],
) -> Result<Vec<Outcome>> {
    section("7.7", "A GPT on tokens");
    let race = Race {
        text: &run.corpus.text,
        preset: &args.gpt_preset,
        overrides: Overrides {
            steps: args.gpt_steps.map(|n| n as usize),
            ..Overrides::default()
        },
        seed: run.seed,
        device: run.device.clone(),
        sample_chars: 300,
    };
    let mut contenders = vec![(
        "characters".to_string(),
        Tokenizer::choose("char", race.text)?,
    )];
    for (bpe, _) in tokenizers {
        let n = bpe.vocab_size() - 1; // without <|endoftext|>
        if args.gpt_vocab_sizes.contains(&n) {
            contenders.push((format!("BPE {n}"), Tokenizer::Bpe(bpe.clone())));
        }
    }
    let mut outcomes = Vec::new();
    for (name, tokenizer) in contenders {
        println!(
            "-- preset {} on {name} ({}) --",
            race.preset,
            tokenizer.describe()
        );
        let outcome = compete(&race, &name, tokenizer)?;
        println!(
            "val {:.4} nats per token x {:.3} tokens per character / ln 2 = {:.4} bits per character",
            outcome.val_loss,
            1.0 / outcome.chars_per_token,
            outcome.val_bits_per_char
        );
        outcomes.push(outcome);
    }
    Ok(outcomes)
}
// ANCHOR_END: gpt_on_tokens

/// The comparison as a table, the samples one after the other, and the validation curves.
fn side_by_side(run: &Run, outcomes: &[Outcome]) -> Result<()> {
    println!();
    let header = [
        "tokenizer",
        "vocab",
        "params",
        "chars/tok",
        "GFLOP/st",
        "chars/st",
        "val nats/t",
        "val bits/c",
        "whole b/c",
        "train s",
    ];
    let widths = [12, 6, 9, 11, 10, 10, 11, 10, 10, 8];
    let line = |cells: &[String]| {
        let padded = cells
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| match i {
                0 => format!("{c:<w$}"),
                _ => format!("{c:>w$}"),
            });
        println!("{}", padded.collect::<Vec<_>>().join(" "));
    };
    line(&header.map(String::from));
    for o in outcomes {
        line(&cells(o));
    }
    for o in outcomes {
        println!("\n--- sample: {} ---\n{}", o.name, o.sample.trim_end());
    }
    let table = run.out.join("gpt_on_tokens.md");
    write_atomic(&table, markdown_table(outcomes).as_bytes())?;
    let curves: Vec<(&str, Vec<(f64, f64)>)> = (outcomes.iter())
        .map(|o| {
            (
                o.name.as_str(),
                o.curve.iter().map(|&(s, b)| (s as f64, b)).collect(),
            )
        })
        .collect();
    let path = run.out.join("bits_per_char.svg");
    let title = "validation loss, bits per character";
    plot_curves_at(
        &path,
        title,
        "step",
        &curves,
        SeriesLabelPosition::UpperRight,
    )?;
    println!("\nwrote {} and {}", table.display(), path.display());
    Ok(())
}

/// One row of the comparison, each number to the precision the tables show.
fn cells(o: &Outcome) -> Vec<String> {
    vec![
        o.name.clone(),
        o.vocab_size.to_string(),
        o.parameters.to_string(),
        format!("{:.3}", o.chars_per_token),
        format!("{:.3}", o.gflop_per_step),
        format!("{:.0}", o.chars_per_step),
        format!("{:.4}", o.val_loss),
        format!("{:.4}", o.val_bits_per_char),
        format!("{:.4}", o.whole_val_bits_per_char),
        format!("{:.1}", o.train_seconds),
    ]
}

/// The comparison as the book shows it (the whole-text figure in bold).
fn markdown_table(outcomes: &[Outcome]) -> String {
    let mut md = String::from(
        "| tokenizer | vocabulary | parameters | characters per token | GFLOP per step \
         | characters per step | val loss (nats per token) | val bits per character \
         | whole val text, bits per character | training time (s) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let mut row = cells(o);
        row[8] = format!("**{}**", row[8]);
        md += &format!("| {} |\n", row.join(" | "));
    }
    md
}
