//! Chapter 6: the KV cache gives the tokens and logits of the full forward pass, on either
//! window, on every backend; bad input is a clear error.

mod support;

use burn::prelude::*;
use course::ch03_gpt::Gpt;
use course::ch04_pretrain::checkpoint;
use course::ch06_generate::{Generation, KvCache, Window, config_of, forward_cached, generate};
use course::ch08_pretrained::tokenizer::Tokenizer;
use course::common::dataset::{ids_tensor, rng_for, stream};
use course::common::max_abs_diff;
use course::common::sample::{SampleOptions, generate as generate_ch04};
use course::common::train::LanguageModel;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_ch06_generate");

/// A `tiny` model trained for 100 steps (block 32), shared by the tests: trained weights give
/// clear winners, so greedy tokens do not hinge on the last bit of a logit.
fn checkpoint_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ch06-trained");
        let _ = std::fs::remove_dir_all(&dir);
        let corpus = support::corpus_path().to_string_lossy().into_owned();
        let (code, _, err) = support::run_bin(
            env!("CARGO_BIN_EXE_ch04_pretrain"),
            &[
                "--preset",
                "tiny",
                "--backend",
                "flex",
                "--data",
                &corpus,
                "--steps",
                "100",
                "--eval-interval",
                "50",
                "--eval-iters",
                "2",
                "--sample-chars",
                "1",
                "--out",
                dir.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        dir.join("ckpt/best")
    })
}

fn trained(device: &Device) -> Gpt {
    checkpoint::load::<Tokenizer>(checkpoint_dir(), device, None)
        .unwrap()
        .0
}

fn how(opts: SampleOptions, window: Window, cached: bool, fixed_shape: bool) -> Generation {
    Generation {
        opts,
        window,
        cached,
        fixed_shape,
    }
}

const PROMPT: [usize; 3] = [20, 43, 50];

/// Greedy tokens with and without the cache, `n` of them.
fn both(model: &Gpt, window: Window, fixed: bool, n: usize) -> (Vec<usize>, Vec<usize>) {
    let run = |cached| {
        let mut rng = rng_for(0, stream::SAMPLE, 0);
        let settings = how(SampleOptions::GREEDY, window, cached, fixed);
        generate(model, &PROMPT, 1, n, settings, &mut rng, |_, _| {}).concat()
    };
    (run(true), run(false))
}

#[test]
fn cached_greedy_tokens_equal_recomputed_ones_past_the_block() {
    let model = trained(&support::flex_device());
    assert_eq!(model.block_size, 32);
    for window in [Window::Slide, Window::Restart { keep: 16 }] {
        let (cached, full) = both(&model, window, false, 300);
        assert_eq!(cached.len(), 300);
        assert_eq!(cached, full, "{window:?}");
    }
    // And the cache's fixed-shape form (the GPU path), on a CPU backend.
    let (cached, full) = both(&model, Window::Restart { keep: 16 }, true, 100);
    assert_eq!(cached, full);
}

#[test]
fn the_uncached_sliding_window_is_chapter_4s_generate() {
    let model = trained(&support::ndarray_device());
    let opts = SampleOptions {
        temperature: 1.0,
        top_k: Some(10),
        top_p: None,
    };
    let mut rng = rng_for(3, stream::SAMPLE, 0);
    let ours = generate(
        &model,
        &PROMPT,
        1,
        80,
        how(opts, Window::Slide, false, false),
        &mut rng,
        |_, _| {},
    );
    let mut rng = rng_for(3, stream::SAMPLE, 0);
    let ch04 = generate_ch04(&model, &PROMPT, 80, opts, &mut rng, |_| {});
    assert_eq!(ours[0], ch04);
}

#[test]
fn seeded_sampling_gives_the_same_text_with_and_without_the_cache() {
    let model = trained(&support::flex_device());
    let opts = SampleOptions {
        temperature: 1.0,
        top_k: None,
        top_p: Some(0.9),
    };
    let run = |cached| {
        let mut rng = rng_for(11, stream::SAMPLE, 0);
        let w = Window::Restart { keep: 16 };
        generate(
            &model,
            &PROMPT,
            3,
            120,
            how(opts, w, cached, false),
            &mut rng,
            |_, _| {},
        )
    };
    let (a, b) = (run(true), run(false));
    assert_eq!(a, b);
    assert_ne!(a[0], a[1], "the rows of a batch are different samples");
}

#[test]
fn cached_logits_equal_the_full_forward_at_every_position() {
    let device = support::flex_device();
    let model = trained(&device).valid();
    let tokens: Vec<usize> = (0..32).map(|i| (i * 7 + 3) % 65).collect();
    let ids =
        |t: &[usize]| ids_tensor(t.iter().map(|&x| x as i64).collect(), [1, t.len()], &device);
    let full = model.forward(ids(&tokens)); // [1, 32, vocab]
    for fixed in [false, true] {
        let mut cache = KvCache::new(&config_of(&model), 1, fixed, &device);
        // A prefill of 5 tokens, then one at a time.
        let first = forward_cached(&model, ids(&tokens[..5]), &mut cache);
        assert!(max_abs_diff(&first, &full.clone().slice(s![.., 0..5, ..])) < 1e-5);
        for t in 5..32 {
            let step = forward_cached(&model, ids(&tokens[t..t + 1]), &mut cache);
            let want = full.clone().slice(s![.., t..t + 1, ..]);
            let diff = max_abs_diff(&step, &want);
            assert!(diff < 1e-5, "position {t} (fixed shape {fixed}): {diff}");
        }
        assert_eq!(cache.len, 32);
    }
}

#[test]
fn the_windows_see_what_they_promise() {
    let (b, keep) = (8, 3);
    let slide: Vec<usize> = (1..=12).map(|n| Window::Slide.context_len(n, b)).collect();
    assert_eq!(slide, [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8]);
    let restart: Vec<usize> = (1..=21)
        .map(|n| Window::Restart { keep }.context_len(n, b))
        .collect();
    // Fills to 8, restarts from the last 3, grows to 8 again, restarts.
    assert_eq!(
        restart,
        [
            1, 2, 3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 3
        ]
    );
    assert!(Window::Restart { keep: 8 }.check(8).is_err());
    assert!(Window::Restart { keep: 0 }.check(8).is_err());
    assert!(Window::Restart { keep: 7 }.check(8).is_ok());
}

#[test]
fn cached_generation_matches_on_wgpu() {
    let Some(device) = support::wgpu_device() else {
        return;
    };
    let model = trained(&device);
    // Fixed shapes, as the binary uses on wgpu; past the block of 32.
    let (cached, full) = both(&model, Window::Restart { keep: 16 }, true, 300);
    assert_eq!(cached, full);
    let cpu = both(
        &trained(&support::flex_device()),
        Window::Restart { keep: 16 },
        true,
        300,
    )
    .0;
    // Across backends the logits differ in the last bits, so compare a shorter stretch.
    assert_eq!(
        cached[..60],
        cpu[..60],
        "wgpu and flex pick the same greedy tokens"
    );
}

fn run(args: &[&str]) -> (i32, String, String) {
    let ckpt = checkpoint_dir().to_str().unwrap().to_string();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ch06-out");
    let mut all = vec!["--checkpoint", &ckpt, "--out", out.to_str().unwrap()];
    all.extend_from_slice(args);
    support::run_bin(BIN, &all, &[])
}

#[test]
fn the_notebook_runs_and_checks_itself() {
    let (code, stdout, err) = run(&[
        "--max-new-tokens",
        "40",
        "--num-samples",
        "2",
        "--bench-tokens",
        "40",
    ]);
    assert_eq!(code, 0, "{err}");
    for s in [
        "== 6.1",
        "== 6.3",
        "cached and recomputed identical",
        "--- sample 2 ---",
        "tokens/s",
        "== 6.7",
    ] {
        assert!(stdout.contains(s), "{s} missing:\n{stdout}");
    }
    assert!(!stdout.contains("DIFFER"), "{stdout}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let long = "a".repeat(40);
    for (args, message) in [
        (vec!["--prompt", "ROMEO€"], "the prompt cannot be encoded"),
        (
            vec!["--prompt", &long],
            "more than the model's block size of 32",
        ),
        (vec!["--top-p", "0"], "'--top-p <TOP_P>': must be in (0, 1]"),
        (
            vec!["--top-p", "1.5"],
            "'--top-p <TOP_P>': must be in (0, 1]",
        ),
        (vec!["--window", "jump"], "unknown --window 'jump'"),
        (
            vec!["--keep", "32"],
            "the restart window must keep 1 to 31 tokens",
        ),
        (
            vec!["--keep", "0"],
            "the restart window must keep 1 to 31 tokens",
        ),
        (vec!["--bench-preset", "huge"], "unknown preset 'huge'"),
    ] {
        let (code, stdout, err) = run(&args);
        assert_ne!(code, 0, "{args:?} was accepted");
        assert!(
            !stdout.contains("== 6.1"),
            "{args:?} got past the checks: {stdout}"
        );
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // An empty prompt is not an error: the model starts from a newline.
    let (code, stdout, err) = run(&[
        "--prompt",
        "",
        "--max-new-tokens",
        "5",
        "--bench-tokens",
        "5",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("== 6.5"), "{stdout}");
    let missing = support::run_bin(BIN, &["--checkpoint", "/nonexistent/ckpt"], &[]);
    assert_ne!(missing.0, 0);
    assert!(missing.2.contains("train one with"), "{}", missing.2);
}

#[test]
fn a_checkpoint_whose_config_does_not_fit_its_weights_is_refused() {
    let dir = support::tempdir();
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    for f in ["model.bpk", "meta.json"] {
        std::fs::copy(checkpoint_dir().join(f), ckpt.join(f)).unwrap();
    }
    let meta = std::fs::read_to_string(ckpt.join("meta.json")).unwrap();
    let wider = meta.replacen("\"n_embd\": 64", "\"n_embd\": 128", 1);
    assert_ne!(meta, wider, "meta.json names n_embd");
    std::fs::write(ckpt.join("meta.json"), wider).unwrap();
    let (code, _, err) = support::run_bin(BIN, &["--checkpoint", ckpt.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("do not fit the model"), "{err}");
}

#[test]
fn interactive_mode_continues_each_line_and_survives_a_bad_one() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let ckpt = checkpoint_dir().to_str().unwrap().to_string();
    let mut child = Command::new(BIN)
        .args([
            "--checkpoint",
            &ckpt,
            "--interactive",
            "--max-new-tokens",
            "10",
            "--temperature",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("KING:\nbad€line\nROMEO:\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("the prompt cannot be encoded"), "{stderr}");
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("KING:") || l.starts_with("ROMEO:"))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
}
