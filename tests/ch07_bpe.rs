//! Chapter 7: the byte-level BPE round-trips any text, learns the textbook merges, gives
//! exactly GPT-2's ids (tiktoken-rs) on the whole corpus, and refuses broken files.

mod support;

use course::ch07_bpe::{Bpe, END_OF_TEXT, GPT2_PATTERN, gpt2, train};
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// Random text from a pool of awkward characters: ASCII, accents, CJK, emoji with modifiers,
/// zero-width and combining marks, every kind of whitespace, and GPT-2's special token name.
fn random_text(rng: &mut StdRng, len: usize) -> String {
    const POOL: &[&str] = &[
        "a",
        "Z",
        "e",
        " ",
        "  ",
        "\n",
        "\r\n",
        "\t",
        "'s",
        "'",
        "1",
        "42",
        ".",
        "—",
        "é",
        "ï",
        "ß",
        "東",
        "京",
        "🙂",
        "👍🏽",
        "\u{200b}",
        "e\u{301}",
        "\u{feff}",
        "<|endoftext|>",
        "Ω",
    ];
    (0..len)
        .map(|_| POOL[rng.random_range(0..POOL.len())])
        .collect()
}

fn corpus_bpe(size: usize) -> Bpe {
    let text = support::corpus();
    train(
        &text[..200_000],
        size,
        GPT2_PATTERN,
        vec![END_OF_TEXT.into()],
    )
    .unwrap()
    .0
}

#[test]
fn decode_inverts_encode_on_arbitrary_utf8() {
    let mut rng = StdRng::seed_from_u64(7);
    for bpe in [corpus_bpe(512), gpt2().unwrap()] {
        for len in [0, 1, 2, 5, 40, 300] {
            let text = random_text(&mut rng, len);
            let ids = bpe.encode_ordinary(&text);
            assert_eq!(bpe.decode_bytes(&ids).unwrap(), text.as_bytes(), "{text:?}");
            assert_eq!(bpe.decode(&bpe.encode(&text)).unwrap(), text);
        }
    }
    // A pattern that skips text, or matches nothing, loses nothing.
    let bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for pattern in ["a+", "x*", r"\d"] {
        let bpe = Bpe::new(bytes.clone(), vec![], pattern).unwrap();
        let text = "xaay 12 aa\n";
        assert_eq!(
            bpe.decode(&bpe.encode(text)).unwrap(),
            text,
            "pattern {pattern:?}"
        );
    }
    // A token may hold part of a character: GPT-2 splits this emoji's 4 bytes into tokens
    // that are not UTF-8 on their own, and only their concatenation is.
    let g = gpt2().unwrap();
    let ids = g.encode_ordinary("🙂");
    assert!(ids.len() > 1);
    assert!(std::str::from_utf8(g.token_bytes(ids[0]).unwrap()).is_err());
    assert_eq!(
        g.decode(&ids[..1]).unwrap(),
        "\u{fffd}",
        "a cut character shows as U+FFFD"
    );
}

#[test]
fn the_textbook_example_gives_the_known_merges() {
    // Wikipedia's "aaabdaaabac": aa -> Z, ab -> Y, ZY -> X, leaving "XdXac".
    let (bpe, report) = train("aaabdaaabac", 259, GPT2_PATTERN, vec![]).unwrap();
    let merges: Vec<_> = report.merges.iter().map(|m| (m.0, m.1, m.2)).collect();
    assert_eq!(
        merges,
        [((97, 97), 256, 4), ((97, 98), 257, 2), ((256, 257), 258, 2)]
    );
    assert_eq!(bpe.encode_ordinary("aaabdaaabac"), [258, 100, 258, 97, 99]);
    assert_eq!(bpe.token_bytes(258), Some(&b"aaab"[..]));
    assert!(report.stopped_early.is_none());
}

#[test]
fn merges_never_cross_the_pre_split() {
    let (bpe, _) = train("ab ab ab ab. ab.", 300, GPT2_PATTERN, vec![]).unwrap();
    for id in 256..bpe.vocab_size() as u32 {
        let bytes = bpe.token_bytes(id).unwrap();
        assert!(
            !bytes.ends_with(b" "),
            "{:?} ends in a space",
            String::from_utf8_lossy(bytes)
        );
        assert!(
            !bytes.ends_with(b"b."),
            "{:?} spans a word and a dot",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[test]
fn training_is_deterministic_and_stops_early_on_a_short_text() {
    let text = &support::corpus()[..50_000];
    let a = train(text, 400, GPT2_PATTERN, vec![]).unwrap().0;
    let b = train(text, 400, GPT2_PATTERN, vec![]).unwrap().0;
    assert_eq!(a.to_file_string(), b.to_file_string());
    let (short, report) = train("abab", 1000, GPT2_PATTERN, vec![]).unwrap();
    assert_eq!(
        short.vocab_size(),
        258,
        "ab, abab, then nothing left to merge"
    );
    assert!(
        report
            .stopped_early
            .unwrap()
            .contains("stops at 258 tokens")
    );
    assert!(
        train("abc", 100, GPT2_PATTERN, vec![]).is_err(),
        "below 256"
    );
}

#[test]
fn gpt2_ranks_give_tiktokens_ids_on_the_whole_corpus() {
    let text = support::corpus();
    let ours = gpt2().unwrap();
    let theirs = tiktoken_rs::r50k_base().unwrap();
    let a = ours.encode_ordinary(&text);
    let b = theirs.encode_ordinary(&text);
    assert_eq!(a.len(), b.len());
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("token {i} differs: {} against tiktoken-rs's {}", a[i], b[i]);
    }
    assert_eq!(ours.decode_bytes(&a).unwrap(), text.as_bytes());
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..200 {
        let t = random_text(&mut rng, 60);
        assert_eq!(
            ours.encode_ordinary(&t),
            theirs.encode_ordinary(&t),
            "{t:?}"
        );
        assert_eq!(
            ours.encode(&t),
            theirs.encode_with_special_tokens(&t),
            "{t:?}"
        );
    }
    assert_eq!(ours.special_id(END_OF_TEXT), Some(50_256));
}

#[test]
fn a_saved_tokenizer_loads_back_and_broken_files_are_refused() {
    let bpe = corpus_bpe(600);
    let dir = support::tempdir();
    let path = dir.path().join("bpe.txt");
    bpe.save(&path).unwrap();
    let line = "KING RICHARD III:\nNow is the winter of our discontent 🙂 <|endoftext|>";
    let loaded = Bpe::load(&path).unwrap();
    assert_eq!(loaded.encode(line), bpe.encode(line));
    assert_eq!(loaded.to_file_string(), bpe.to_file_string());

    let good = bpe.to_file_string();
    let lines: Vec<&str> = good.lines().collect();
    let with = |i: usize, new: &str| {
        let mut l = lines.clone();
        l[i] = new;
        l.join("\n")
    };
    let broken = [
        ("not a tokenizer file\n".to_string(), "first line"),
        (lines[..300].join("\n"), "ends before token 296"),
        (good[..good.len() / 2].to_string(), "was due"), // cut inside a line
        (with(20, "!!!not base64 16"), "line 21"),
        (with(20, "QQ== 3"), "rank"),
        (with(20, "QQ== 16"), "repeats"),
        (format!("{good}QQ== 600\n"), "more than"),
        (with(2, "tokens lots"), "tokens <n>"),
    ];
    for (text, expected) in broken {
        let err = format!("{:#}", Bpe::from_file_string(&text).unwrap_err());
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
    }
    // Without every single byte, some texts could not be encoded.
    let no_z = (0..=255u8)
        .filter(|&b| b != b'z')
        .map(|b| vec![b])
        .collect();
    assert!(Bpe::new(no_z, vec![], GPT2_PATTERN).is_err());
    assert!(Bpe::load(&dir.path().join("missing.txt")).is_err());
    assert!(
        bpe.decode(&[bpe.vocab_size() as u32]).is_err(),
        "an id past the vocabulary"
    );
}

#[test]
fn the_notebook_runs_and_refuses_bad_input() {
    let out = support::tempdir();
    let bin = env!("CARGO_BIN_EXE_ch07_bpe");
    let data = support::corpus_path();
    let run = |extra: &[&str]| {
        std::process::Command::new(bin)
            .args([
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.path().to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&[
        "--vocab-sizes",
        "300,400",
        "--reps",
        "1",
        "--gpt-vocab-sizes",
        "300",
        "--gpt-preset",
        "tiny",
        "--gpt-steps",
        "20",
    ]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        stdout.contains("identical to tiktoken-rs: true"),
        "{stdout}"
    );
    assert!(out.path().join("bpe-400.txt").exists());
    assert!(out.path().join("token_lengths.svg").exists());
    assert!(out.path().join("bits_per_char.svg").exists());
    let summary = std::fs::read_to_string(out.path().join("summary.json")).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    let gpts = summary["gpt_on_tokens"].as_array().unwrap();
    assert_eq!(gpts.len(), 2, "characters and BPE 300");
    for g in gpts {
        let bits = g["whole_val_bits_per_char"].as_f64().unwrap();
        assert!(bits > 1.0 && bits < 8.0, "{g}");
    }
    let bad = run(&["--vocab-sizes", "300", "--gpt-vocab-sizes", "512"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("not one of --vocab-sizes"), "{err}");
    let bad = run(&[
        "--vocab-sizes",
        "300",
        "--gpt-vocab-sizes",
        "300",
        "--gpt-preset",
        "huge",
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--gpt-preset") && err.contains("unknown preset 'huge'"),
        "{err}"
    );
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(
        !out.contains("== 7.1"),
        "refused before the notebook runs: {out}"
    );
    let bad = run(&["--vocab-sizes", "100"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("below 256") && !err.contains("panicked"),
        "{err}"
    );
}
