//! Chapter 7, part 2: chapter 4's GPT on BPE tokens. The tokenizer choice, the per-character
//! measure, streaming decode, and checkpoints that know their tokenizer.

mod support;

use burn::tensor::activation::log_softmax;
use course::ch03_gpt::GptConfig;
use course::ch07_bpe::gpt::whole_split_bits;
use course::ch07_bpe::{Bpe, END_OF_TEXT, GPT2_PATTERN, train};
use course::ch08_pretrained::tokenizer::Tokenizer;
use course::common::dataset::{Dataset, Split, ids_tensor};
use course::common::tokenizer::StreamDecoder;
use course::common::train::LanguageModel;
use std::path::Path;

const TEXT: &str = "Héllo wörld, 東京 🙂👍🏽 — it's 42!\n  tabs\tand\r\nlines ";

/// A small BPE trained on the start of the corpus (emoji and CJK stay split into bytes).
fn small_bpe(vocab: usize) -> Bpe {
    let text: String = support::corpus().chars().take(50_000).collect();
    train(&text, vocab, GPT2_PATTERN, vec![END_OF_TEXT.into()])
        .unwrap()
        .0
}

#[test]
fn streaming_decode_waits_for_whole_characters() {
    let tok = Tokenizer::Bpe(small_bpe(300));
    let ids = tok.encode(TEXT).unwrap();
    let mut stream = StreamDecoder::default();
    let pieces: Vec<String> = ids.iter().map(|&id| stream.push(&tok, id)).collect();
    assert_eq!(pieces.concat() + &stream.finish(), TEXT);
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    // 🙂 is four byte tokens: three of them complete nothing.
    assert!(
        pieces.iter().filter(|p| p.is_empty()).count() >= 3,
        "{pieces:?}"
    );

    // A lead byte followed by a letter can never be a character: U+FFFD, then the letter.
    let Tokenizer::Bpe(bpe) = &tok else {
        unreachable!()
    };
    let byte =
        |b: u8| (0..bpe.vocab_size() as u32).find(|&id| bpe.token_bytes(id) == Some(&[b][..]));
    let (lead, a) = (byte(0xF0).unwrap() as usize, byte(b'A').unwrap() as usize);
    let mut stream = StreamDecoder::default();
    assert_eq!(stream.push(&tok, lead), "");
    assert_eq!(stream.push(&tok, a), "\u{FFFD}A");
    assert_eq!(stream.push(&tok, lead), "");
    assert_eq!(
        stream.finish(),
        "\u{FFFD}",
        "an unfinished character at the end"
    );

    let chars = Tokenizer::choose("char", TEXT).unwrap();
    let mut stream = StreamDecoder::default();
    let text: String = (chars.encode(TEXT).unwrap().iter())
        .map(|&id| stream.push(&chars, id))
        .collect();
    assert_eq!(text, TEXT);
}

#[test]
fn the_split_is_made_on_characters_whatever_the_tokenizer() {
    let text = TEXT.repeat(50);
    let chapter1 = Dataset::new(&text).unwrap();
    let chars = Dataset::tokenized(&text, Tokenizer::choose("char", &text).unwrap()).unwrap();
    assert_eq!((&chars.train, &chars.val), (&chapter1.train, &chapter1.val));
    assert_eq!(
        (chars.train_chars, chars.val_chars),
        (chapter1.train_chars, chapter1.val_chars)
    );
    assert_eq!(chars.val_chars, chapter1.val.len());

    let bpe = Dataset::tokenized(&text, Tokenizer::Bpe(small_bpe(300))).unwrap();
    assert_eq!(
        (bpe.train_chars, bpe.val_chars),
        (chars.train_chars, chars.val_chars)
    );
    let val_text = bpe.tokenizer.decode(&bpe.val);
    assert_eq!(
        val_text,
        chars.tokenizer.decode(&chars.val),
        "the same validation text"
    );
    assert_eq!(bpe.tokenizer.decode(&bpe.train) + &val_text, text);

    // Per character: a token loss scaled by tokens per character.
    let loss = 3.0;
    let expected = loss * bpe.val.len() as f64 / bpe.val_chars as f64 / std::f64::consts::LN_2;
    assert!((bpe.bits_per_char(Split::Val, loss) - expected).abs() < 1e-12);
    let per_char = chars.bits_per_char(Split::Val, loss);
    assert!((per_char - loss / std::f64::consts::LN_2).abs() < 1e-12);
}

/// `whole_split_bits` against the same sum written out: every block's log-softmax read at
/// the targets, on the host.
#[test]
fn whole_split_bits_is_the_summed_loss_per_character() {
    let device = support::ndarray_device();
    let text = TEXT.repeat(30);
    let data = Dataset::tokenized(&text, Tokenizer::Bpe(small_bpe(280))).unwrap();
    let t = 8;
    let model = GptConfig::new(data.tokenizer.vocab_size(), t, 1, 2, 16).init(&device);
    let bits = whole_split_bits(&model, &data, Split::Val, 3);

    let ids = &data.val;
    let blocks = (ids.len() - 1) / t;
    assert!(
        blocks > 3 && !blocks.is_multiple_of(3),
        "{blocks} blocks: batches of 3, the last partial"
    );
    let mut nats = 0.0;
    for k in 0..blocks {
        let x: Vec<i64> = ids[k * t..(k + 1) * t].iter().map(|&i| i as i64).collect();
        let logp = log_softmax(model.forward(ids_tensor(x, [1, t], &device)), 2);
        let logp = logp.into_data().try_to_vec::<f32>().unwrap();
        let v = data.tokenizer.vocab_size();
        for i in 0..t {
            nats -= logp[i * v + ids[k * t + i + 1]] as f64;
        }
    }
    let chars = data
        .tokenizer
        .decode(&ids[1..blocks * t + 1])
        .chars()
        .count();
    let expected = nats / chars as f64 / std::f64::consts::LN_2;
    assert!(
        (bits - expected).abs() < 1e-4 * expected,
        "{bits} vs {expected}"
    );
}

#[test]
fn a_checkpoint_stores_its_tokenizer_whole() {
    let bpe = Tokenizer::Bpe(small_bpe(300));
    let json = serde_json::to_string(&bpe).unwrap();
    let back: Tokenizer = serde_json::from_str(&json).unwrap();
    assert!(back.same_as(&bpe));
    assert_eq!(back.encode(TEXT).unwrap(), bpe.encode(TEXT).unwrap());
    assert!(!back.same_as(&Tokenizer::Bpe(small_bpe(301))));
    assert!(!back.same_as(&Tokenizer::choose("char", TEXT).unwrap()));

    let chars = Tokenizer::choose("char", TEXT).unwrap();
    let back: Tokenizer = serde_json::from_str(&serde_json::to_string(&chars).unwrap()).unwrap();
    assert!(back.same_as(&chars));

    let broken = json.replace("tokens 300", "tokens 301");
    let err = serde_json::from_str::<Tokenizer>(&broken)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ends before"), "{err}");
}

fn run(args: &[&str]) -> (i32, String, String) {
    support::run_bin(env!("CARGO_BIN_EXE_ch04_pretrain"), args, &[])
}

fn save(bpe: &Bpe, dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    bpe.save(&path).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn chapter_4_trains_on_bpe_tokens_and_refuses_a_mismatch() {
    let dir = support::tempdir();
    let (bpe, other) = (
        save(&small_bpe(300), dir.path(), "a.txt"),
        save(&small_bpe(320), dir.path(), "b.txt"),
    );
    let out = dir.path().join("run");
    let corpus = support::corpus_path().to_string_lossy().into_owned();
    let train = |extra: &[&str]| {
        let mut args = vec![
            "--preset",
            "tiny",
            "--data",
            &corpus,
            "--steps",
            "20",
            "--eval-interval",
            "10",
            "--eval-iters",
            "2",
            "--sample-chars",
            "30",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        run(&args)
    };
    // Stopped half-way, so that resuming below has steps left to run.
    let (code, stdout, err) = train(&["--tokenizer", &bpe, "--stop-after", "10"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("byte-level BPE, 301 tokens"), "{stdout}");
    assert!(stdout.contains("bits per character"), "{stdout}");

    let ckpt = out.join("ckpt/best");
    let ckpt = ckpt.to_str().unwrap();
    let sample = [
        "sample",
        "--checkpoint",
        ckpt,
        "--max-new-tokens",
        "10",
        "--prompt",
        "ROMEO 🙂:",
    ];
    let (code, stdout, err) = run(&sample);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.starts_with("ROMEO 🙂:"),
        "any prompt encodes in bytes: {stdout}"
    );
    let (code, _, err) = run(&[&sample[..], &["--tokenizer", &bpe]].concat());
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&[&sample[..], &["--tokenizer", &other]].concat());
    assert_ne!(code, 0);
    assert!(
        err.contains("another tokenizer") && !err.contains("panicked"),
        "{err}"
    );

    for wrong in [vec!["--resume"], vec!["--resume", "--tokenizer", &other]] {
        let (code, _, err) = train(&wrong);
        assert_ne!(code, 0, "resuming with {wrong:?}");
        assert!(err.contains("another tokenizer"), "{err}");
    }
    let (code, _, err) = train(&["--resume", "--tokenizer", &bpe]);
    assert_eq!(code, 0, "the same tokenizer resumes: {err}");

    let (code, _, err) = train(&["--tokenizer", "no/such/file.txt"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--tokenizer") && !err.contains("panicked"),
        "{err}"
    );
}
