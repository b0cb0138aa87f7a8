//! Chapter 4: schedule, optimizer groups, checkpoints, resume and sampling.

mod support;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use course::ch01_bigram::BigramConfig;
use course::ch04_pretrain::{DECAYED, learning_rate, optimizer, preset};
use course::common::train::{TrainHooks, train};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_ch04_pretrain");

fn run(args: &[&str]) -> (i32, String, String) {
    support::run_bin(BIN, args, &[])
}

fn corpus() -> String {
    support::corpus_path().to_string_lossy().into_owned()
}

/// A short `tiny` run shared by the tests below (trained once per test binary).
fn trained() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Under cargo's per-target temp dir, replaced on every run.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ch04-trained");
        let _ = std::fs::remove_dir_all(&dir);
        let (code, _, err) = run(&[
            "--preset",
            "tiny",
            "--data",
            &corpus(),
            "--steps",
            "60",
            "--eval-interval",
            "30",
            "--eval-iters",
            "5",
            "--sample-chars",
            "20",
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        dir
    })
}

/// The rows of a CSV file the run wrote, as numbers (the header skipped).
fn csv(path: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect()
}

/// (step, train, val) of every evaluation.
fn losses(dir: &Path) -> Vec<(usize, f64, f64)> {
    let rows = csv(&dir.join("losses.csv"));
    rows.iter().map(|r| (r[0] as usize, r[1], r[2])).collect()
}

#[test]
fn the_tiny_preset_learns_on_the_real_corpus() {
    let dir = support::tempdir();
    let out = dir.path().join("tiny");
    let (code, stdout, err) = run(&[
        "--preset",
        "tiny",
        "--data",
        &corpus(),
        "--sample-chars",
        "100",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let val = summary["final_val_loss"].as_f64().unwrap();
    assert_eq!(summary["steps"], 500);
    // Below the best bigram table: the model reads more than the last character.
    let data = course::common::dataset::Dataset::new(&support::corpus()).unwrap();
    let floor = support::bigram_floor(&data);
    assert!(
        val < floor - 0.03,
        "tiny preset val loss {val}, bigram floor {floor:.4}"
    );
    assert!(stdout.contains("== 4.6 Sampling from the best checkpoint =="));
    assert!(stdout.contains("clipped (> 1) at"), "{stdout}");
    assert!(
        out.join("ckpt/best/model.bpk").exists() && out.join("ckpt/last/optimizer.bpk").exists()
    );
}

#[test]
fn a_resumed_run_matches_one_that_never_stopped() {
    let dir = support::tempdir();
    // With dropout: its masks must follow the run, not the process, for the two to agree.
    let common = |out: &Path| -> Vec<String> {
        [
            "--preset",
            "tiny",
            "--dropout",
            "0.1",
            "--data",
            &corpus(),
            "--steps",
            "60",
            "--eval-interval",
            "20",
            "--eval-iters",
            "5",
            "--sample-chars",
            "10",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let straight = dir.path().join("straight");
    let args = common(&straight);
    let (code, _, err) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");

    let resumed = dir.path().join("resumed");
    let mut first = common(&resumed);
    first.extend(["--stop-after".to_string(), "40".to_string()]);
    let (code, _, err) = run(&first.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let mut second = common(&resumed);
    second.push("--resume".to_string());
    let (code, stdout, err) = run(&second.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("resuming from step 40"), "{stdout}");

    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(
        a.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![0, 20, 40, 60]
    );
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        assert!(
            (x.1 - y.1).abs() < 1e-4 && (x.2 - y.2).abs() < 1e-4,
            "{x:?} vs {y:?}"
        );
    }
    // The per-step log continues too: 60 steps, the same batch losses and learning rates.
    // (step, batch loss, learning rate) of every step.
    let steps = |dir: &Path| -> Vec<(usize, f64, f64)> {
        let rows = csv(&dir.join("steps.csv"));
        rows.iter().map(|r| (r[0] as usize, r[1], r[2])).collect()
    };
    let (a, b) = (steps(&straight), steps(&resumed));
    assert_eq!(
        a.iter().map(|r| r.0).collect::<Vec<_>>(),
        (0..60).collect::<Vec<_>>()
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(
            x.0 == y.0 && (x.1 - y.1).abs() < 1e-4 && x.2 == y.2,
            "{x:?} vs {y:?}"
        );
    }
}

#[test]
fn out_of_range_sampling_flags_are_clear_errors() {
    for (flags, message) in [
        (&["--top-k", "0"][..], "--top-k must be at least 1"),
        (
            &["--num-samples", "0"][..],
            "--num-samples and --max-new-tokens",
        ),
        (
            &["--temperature=-1"][..],
            "'--temperature <TEMPERATURE>': must be a finite number, 0 or above",
        ),
        (
            &["--temperature", "NaN"][..],
            "must be a finite number, 0 or above",
        ),
        (
            &["--top-p", "NaN"][..],
            "'--top-p <TOP_P>': must be in (0, 1]",
        ),
        (
            &["--top-p", "1.5"][..],
            "'--top-p <TOP_P>': must be in (0, 1]",
        ),
    ] {
        let (code, out, err) = sample(flags);
        assert_ne!(code, 0, "{flags:?} was accepted: {out}");
        assert!(err.contains(message), "{flags:?}: {err}");
    }
}

#[test]
fn an_unusable_output_folder_is_refused_before_training() {
    let dir = support::tempdir();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let (code, stdout, err) = run(&[
        "--preset",
        "tiny",
        "--data",
        &corpus(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot write into the output folder"), "{err}");
    assert!(!stdout.contains("== 4.5"), "it started training: {stdout}");
}

#[test]
fn the_schedule_warms_up_peaks_and_decays() {
    let cfg = preset("baby", 65).unwrap();
    assert_eq!(
        (cfg.warmup_steps, cfg.steps, cfg.lr, cfg.min_lr),
        (100, 2000, 1e-3, 1e-4)
    );
    assert!(
        (learning_rate(&cfg, 0) - 1e-5).abs() < 1e-12,
        "warmup starts at lr / warmup"
    );
    assert!((learning_rate(&cfg, 49) - 5e-4).abs() < 1e-12);
    assert!(
        (learning_rate(&cfg, 100) - 1e-3).abs() < 1e-12,
        "peak after warmup"
    );
    let mid = learning_rate(&cfg, 1050);
    assert!(
        (mid - 5.5e-4).abs() < 1e-9,
        "half way through the decay: {mid}"
    );
    assert!(
        (learning_rate(&cfg, 2000) - 1e-4).abs() < 1e-12,
        "ends at min_lr"
    );
    let mut prev = f64::INFINITY;
    for step in 100..2000 {
        let lr = learning_rate(&cfg, step);
        assert!(lr <= prev && lr >= cfg.min_lr);
        prev = lr;
    }
}

/// Records every parameter's path and value.
struct Snapshot(Vec<(String, Vec<f32>)>, Vec<String>);

impl ModuleVisitor for Snapshot {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.1.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.1.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        self.0.push((
            self.1.join("."),
            p.val().to_data().try_to_vec::<f32>().unwrap(),
        ));
    }
}

/// Zero gradients for every parameter, so an AdamW step is weight decay alone.
struct ZeroGrads(GradientsParams);

impl ModuleVisitor for ZeroGrads {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        self.0
            .register(p.id, p.val().without_autodiff().zeros_like());
    }
}

#[test]
fn weight_decay_touches_only_linear_weights() {
    let device = support::ndarray_device().autodiff();
    let mut cfg = preset("tiny", 65).unwrap();
    cfg.model = cfg.model.with_bias(true).with_tie_weights(false);
    let model = cfg.model.init(&device);
    let snap = |m: &course::ch03_gpt::Gpt| {
        let mut s = Snapshot(vec![], vec![]);
        m.visit(&mut s);
        s.0
    };
    let before = snap(&model);
    let mut zero = ZeroGrads(GradientsParams::new());
    model.visit(&mut zero);
    let lr = 0.5;
    let after = snap(&optimizer(&cfg).step(lr, model, zero.0));
    let re_matches = |p: &str| {
        let weight = p.ends_with(".weight");
        let linear = p.starts_with("blocks.")
            && (p.contains(".c_attn.") || p.contains(".c_proj.") || p.contains(".c_fc."))
            || p == "lm_head.weight";
        weight && linear
    };
    let mut decayed = 0;
    for ((path, a), (path2, b)) in before.iter().zip(&after) {
        assert_eq!(path, path2);
        let expect = if re_matches(path) {
            1.0 - lr as f32 * cfg.weight_decay as f32
        } else {
            1.0
        };
        decayed += usize::from(re_matches(path));
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x * expect - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{path}: {x} -> {y}, expected x{expect}"
            );
        }
    }
    // 4 matrices per block (c_attn, attn c_proj, c_fc, mlp c_proj) + the untied head.
    assert_eq!(decayed, 4 * cfg.model.n_layer + 1, "pattern {DECAYED}");
}

fn sample(extra: &[&str]) -> (i32, String, String) {
    let ckpt = trained().join("ckpt/best");
    let mut args = vec![
        "sample",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--max-new-tokens",
        "40",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn greedy_sampling_is_deterministic_and_seeded_sampling_reproducible() {
    let (c1, greedy1, e1) = sample(&["--temperature", "0", "--seed", "1", "--prompt", "ROMEO:"]);
    let (c2, greedy2, _) = sample(&["--temperature", "0", "--seed", "2", "--prompt", "ROMEO:"]);
    assert_eq!((c1, c2), (0, 0), "{e1}");
    assert_eq!(greedy1, greedy2, "greedy ignores the seed");
    assert!(
        greedy1.starts_with("ROMEO:") && greedy1.chars().count() >= 6 + 40,
        "{greedy1:?}"
    );
    let (_, s1, _) = sample(&["--seed", "7", "--num-samples", "2"]);
    let (_, s2, _) = sample(&["--seed", "7", "--num-samples", "2"]);
    let (_, s3, _) = sample(&["--seed", "8", "--num-samples", "2"]);
    assert_eq!(s1, s2);
    assert_ne!(s1, s3);
}

#[test]
fn a_prompt_with_unknown_characters_is_refused() {
    let (code, _, err) = sample(&["--prompt", "hello 🙂"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("not in the vocabulary") && err.contains("🙂"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_missing_checkpoint_is_a_clear_error() {
    let dir = support::tempdir();
    let (code, _, err) = run(&[
        "sample",
        "--checkpoint",
        dir.path().join("nothing").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("no checkpoint in"), "{err}");
}

#[test]
fn a_truncated_or_corrupt_checkpoint_is_a_clear_error() {
    let dir = support::tempdir();
    let copy = dir.path().join("best");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["model.bpk", "meta.json"] {
        std::fs::copy(trained().join("ckpt/best").join(f), copy.join(f)).unwrap();
    }
    let bytes = std::fs::read(copy.join("model.bpk")).unwrap();
    std::fs::write(copy.join("model.bpk"), &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, err) = run(&["sample", "--checkpoint", copy.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("corrupt or truncated") || err.contains("do not fit"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    std::fs::write(copy.join("meta.json"), b"{ not json").unwrap();
    let (code, _, err) = run(&["sample", "--checkpoint", copy.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("corrupt"), "{err}");

    // An older build's checkpoint (format 2 had no tokenizer and fewer config fields): the
    // format is named, not "corrupt".
    let old = r#"{"format": 2, "step": 10, "config": {"preset": "tiny"}}"#;
    std::fs::write(copy.join("meta.json"), old).unwrap();
    let (code, _, err) = run(&["sample", "--checkpoint", copy.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("checkpoint format 2") && !err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn resuming_with_another_config_or_vocabulary_is_refused() {
    let dir = support::tempdir();
    let out = dir.path().join("run");
    copy_dir(trained(), &out);
    let base = [
        "--preset",
        "tiny",
        "--steps",
        "60",
        "--eval-interval",
        "30",
        "--eval-iters",
        "5",
        "--resume",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut other_config = base.to_vec();
    let corpus = corpus();
    other_config.extend(["--data", &corpus, "--n-embd", "32"]);
    let (code, _, err) = run(&other_config);
    assert_ne!(code, 0);
    assert!(
        err.contains("another config") && err.contains("n_embd is 64 there, 32 here"),
        "{err}"
    );

    let small = dir.path().join("other.txt");
    std::fs::write(&small, "abcdefghij ".repeat(2000)).unwrap();
    let mut other_vocab = base.to_vec();
    other_vocab.extend(["--data", small.to_str().unwrap()]);
    let (code, _, err) = run(&other_vocab);
    assert_ne!(code, 0);
    assert!(err.contains("vocabulary"), "{err}");
}

#[test]
fn a_block_larger_than_the_validation_split_is_refused() {
    let dir = support::tempdir();
    let small = dir.path().join("small.txt");
    std::fs::write(
        &small,
        "To be, or not to be, that is the question.\n".repeat(10),
    )
    .unwrap();
    let (code, _, err) = run(&[
        "--preset",
        "tiny",
        "--data",
        small.to_str().unwrap(),
        "--block-size",
        "64",
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("too short for block size 64"), "{err}");
    assert!(!dir.path().join("o/ckpt").exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn bench_times_fresh_or_trained_weights_and_writes_bench_json() {
    let dir = support::tempdir();
    let corpus = corpus();
    let bench = |out: &Path, resume: bool| {
        let out = out.to_str().unwrap();
        let mut args = vec![
            "--preset",
            "tiny",
            "--backend",
            "flex",
            "--bench",
            "2",
            "--bench-warmup",
            "1",
            "--data",
            &corpus,
            "--out",
            out,
        ];
        if resume {
            args.push("--resume");
        }
        run(&args)
    };
    let read = |out: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap()
    };

    let fresh = dir.path().join("fresh");
    let (code, stdout, err) = bench(&fresh, false);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("from fresh weights"), "{stdout}");
    let json = read(&fresh);
    assert_eq!(json["preset"], "tiny");
    assert_eq!(json["backend"], "flex");
    assert_eq!(json["trained_steps"], 0);
    assert_eq!(
        (json["warmup_steps"].as_u64(), json["timed_steps"].as_u64()),
        (Some(1), Some(2))
    );
    for key in ["median_ms_per_step", "tokens_per_s", "gflops"] {
        let x = json[key].as_f64().unwrap();
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }

    // --resume times the checkpoint's weights (the shared run trained 60 steps).
    let trained_dir = dir.path().join("trained");
    copy_dir(trained(), &trained_dir);
    let (code, stdout, err) = bench(&trained_dir, true);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("from the weights of step 60"), "{stdout}");
    assert_eq!(read(&trained_dir)["trained_steps"], 60);

    // Nothing to time is a clear error.
    let (code, _, err) = run(&["--bench", "0", "--out", dir.path().to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("--bench"), "{err}");

    // Without a checkpoint, --resume is a clear error.
    let (code, _, err) = bench(&dir.path().join("empty"), true);
    assert_ne!(code, 0);
    assert!(err.contains("no checkpoint in"), "{err}");
}

#[test]
fn impossible_overrides_are_clear_errors_before_training() {
    let dir = support::tempdir();
    let out = dir.path().join("o");
    for (flags, message) in [
        (
            &["--n-head", "3"][..],
            "n_embd (64) must be a multiple of n_head (3)",
        ),
        (
            &["--dropout", "1"][..],
            "'--dropout <DROPOUT>': must be in [0, 1)",
        ),
        (
            &["--dropout", "NaN"][..],
            "'--dropout <DROPOUT>': must be in [0, 1)",
        ),
        (
            &["--lr", "0"][..],
            "'--lr <LR>': must be a finite number above 0",
        ),
        (
            &["--lr", "NaN"][..],
            "'--lr <LR>': must be a finite number above 0",
        ),
        (&["--lr", "2"][..], "need 0 < --lr <= 1"),
        (
            &["--min-lr", "inf"][..],
            "must be a finite number, 0 or above",
        ),
        (
            &["--beta1=-0.1"][..],
            "'--beta1 <BETA1>': must be in [0, 1)",
        ),
        (
            &["--beta2", "1"][..],
            "'--beta2 <BETA2>': must be in [0, 1)",
        ),
        (
            &["--weight-decay=-1"][..],
            "must be a finite number, 0 or above",
        ),
        (
            &["--grad-clip", "nan"][..],
            "must be a finite number, 0 or above",
        ),
        (
            &["--peak-gflops", "0"][..],
            "must be a finite number above 0",
        ),
        (&["--lr", "fast"][..], "'--lr <LR>': not a number"),
        (&["--n-layer", "0"][..], "must all be at least 1"),
    ] {
        let corpus = corpus();
        let mut args = vec![
            "--preset",
            "tiny",
            "--data",
            &corpus,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        let (code, stdout, err) = run(&args);
        assert_ne!(code, 0, "{flags:?} was accepted");
        assert!(err.contains(message), "{flags:?}: {err}");
        assert!(
            !stdout.contains("== 4.2"),
            "{flags:?} got past the config: {stdout}"
        );
    }
    let corpus = corpus();
    let out = out.to_str().unwrap();
    let (code, _, err) = run(&["--preset", "huge", "--data", &corpus, "--out", out]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown preset 'huge'; choose one of tiny, baby"),
        "{err}"
    );
}

/// The flags of a longer run with dropout, shared by the tests of interrupted runs below.
fn long_run(out: &Path) -> Vec<String> {
    [
        "--preset",
        "tiny",
        "--dropout",
        "0.1",
        "--data",
        &corpus(),
        "--steps",
        "200",
        "--eval-interval",
        "50",
        "--eval-iters",
        "5",
        "--sample-chars",
        "10",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_owned(args: &[String]) -> (i32, String, String) {
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// `long_run` without a stop (trained once per test binary): what the interrupted runs must
/// match once resumed.
fn straight() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ch04-straight");
        let _ = std::fs::remove_dir_all(&dir);
        let (code, _, err) = run_owned(&long_run(&dir));
        assert_eq!(code, 0, "{err}");
        dir
    })
}

/// (step, batch loss, learning rate) of every step in steps.csv.
fn step_log(dir: &Path) -> Vec<(usize, f64, f64)> {
    let rows = csv(&dir.join("steps.csv"));
    rows.iter().map(|r| (r[0] as usize, r[1], r[2])).collect()
}

/// `dir` holds the same evaluations and the same per-step log as the straight run.
fn assert_continues_exactly(dir: &Path) {
    let (a, b) = (losses(straight()), losses(dir));
    assert_eq!(
        a.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![0, 50, 100, 150, 200]
    );
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!(
            x.0 == y.0 && (x.1 - y.1).abs() < 1e-4 && (x.2 - y.2).abs() < 1e-4,
            "{x:?} vs {y:?}"
        );
    }
    let (a, b) = (step_log(straight()), step_log(dir));
    assert_eq!(
        b.iter().map(|r| r.0).collect::<Vec<_>>(),
        (0..200).collect::<Vec<_>>()
    );
    for (x, y) in a.iter().zip(&b) {
        assert!(
            x.0 == y.0 && (x.1 - y.1).abs() < 1e-4 && x.2 == y.2,
            "{x:?} vs {y:?}"
        );
    }
}

/// The binary running in the background; its stdout arrives line by line, its stderr goes to
/// a file. Killed if a test fails before it ends.
struct Background {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: PathBuf,
}

/// How long a test waits for a run before it fails.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(300);

impl Background {
    fn start(args: &[String], stderr: PathBuf) -> Self {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(args)
            .env_remove("GPT_DATA")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            // A test run from a script without job control inherits SIGINT ignored, and the
            // binary (as shells expect) would keep ignoring it: the child gets the default.
            // SAFETY: `signal` is async-signal-safe, as code between fork and exec must be.
            unsafe {
                cmd.pre_exec(|| {
                    libc::signal(libc::SIGINT, libc::SIG_DFL);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("the binary runs");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Background {
            child,
            lines,
            stdout: Vec::new(),
            stderr,
        }
    }

    /// What the run printed so far, for failure messages.
    fn printed(&self) -> String {
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("stdout:\n{}\nstderr:\n{err}", self.stdout.join("\n"))
    }

    /// Waits until the run prints a line that contains `text`.
    fn wait_for(&mut self, text: &str) {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.stdout.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!("the run never printed {text:?}; {}", self.printed()),
            }
        }
    }

    /// Waits for the run to end: its exit code (`None` if a signal ended it) and stdout.
    fn finish(&mut self) -> (Option<i32>, String) {
        let deadline = std::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the run did not end; {}",
                self.printed()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        // The reader stops at the end of the output, which closes the channel.
        while let Ok(line) = self.lines.recv_timeout(PATIENCE) {
            self.stdout.push(line);
        }
        (status.code(), self.stdout.join("\n"))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The meta.json of `dir`'s last checkpoint, or `None` while it is being replaced.
fn last_meta(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("ckpt/last/meta.json")).ok()?;
    serde_json::from_str(&text).ok()
}

#[test]
fn a_run_killed_between_evaluations_resumes_from_its_periodic_checkpoint() {
    let dir = support::tempdir();
    let out = dir.path().join("killed");
    let mut args = long_run(&out);
    args.extend(["--ckpt-interval".to_string(), "7".to_string()]);
    let mut bg = Background::start(&args, dir.path().join("stderr.txt"));
    // Wait for a checkpoint between two evaluations, then kill the run as a crash would.
    let between_evals = |m: &serde_json::Value| !m["step"].as_u64().unwrap().is_multiple_of(50);
    let deadline = std::time::Instant::now() + PATIENCE;
    let meta = loop {
        if let Some(meta) = last_meta(&out).filter(between_evals) {
            break meta;
        }
        assert!(
            bg.child.try_wait().unwrap().is_none(),
            "the run ended before a checkpoint between evaluations; {}",
            bg.printed()
        );
        assert!(std::time::Instant::now() < deadline, "{}", bg.printed());
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    bg.child.kill().unwrap();
    let _ = bg.finish();
    let step = meta["step"].as_u64().unwrap() as usize;
    assert!(step.is_multiple_of(7) && step < 200, "{meta}");
    // Between evaluations, a checkpoint has every step so far and the last evaluation's loss.
    assert_eq!(meta["steps"].as_array().unwrap().len(), step);
    let evals = meta["losses"].as_array().unwrap();
    assert_eq!(meta["val_loss"], evals.last().unwrap()["val"], "{meta}");

    // Wherever the kill landed (possibly on a later checkpoint), --resume continues exactly.
    let mut resume = long_run(&out);
    resume.push("--resume".to_string());
    let (code, stdout, err) = run_owned(&resume);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("resuming from step "), "{stdout}");
    assert!(
        !stdout.contains("resuming with"),
        "nothing changed: {stdout}"
    );
    assert_continues_exactly(&out);
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_the_last_checkpoint_and_resume_continues_exactly() {
    let dir = support::tempdir();
    let out = dir.path().join("interrupted");
    let mut bg = Background::start(&long_run(&out), dir.path().join("stderr.txt"));
    // Half-way between the evaluations at 50 and 100 (the handler is in place before the
    // first evaluation prints).
    bg.wait_for("step    50: train loss");
    std::thread::sleep(std::time::Duration::from_millis(30));
    // SAFETY: sends a signal to the child this test started (and has not waited for yet).
    let sent = unsafe { libc::kill(bg.child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0);
    let (code, stdout) = bg.finish();
    assert_eq!(code, Some(130), "{}", bg.printed());
    let step: usize = stdout
        .split("interrupted at step ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'interrupted at step': {stdout}"));
    assert!((50..200).contains(&step), "{stdout}");
    assert!(stdout.contains("--resume continues"), "{stdout}");
    // The checkpoint is of that step, taken without an evaluation.
    let meta = last_meta(&out).expect("ckpt/last");
    assert_eq!(meta["step"], step, "{meta}");
    assert_eq!(meta["steps"].as_array().unwrap().len(), step);
    assert!(
        !out.join("summary.json").exists(),
        "an unfinished run wrote its summary"
    );

    let mut resume = long_run(&out);
    resume.push("--resume".to_string());
    let (code, stdout, err) = run_owned(&resume);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains(&format!("resuming from step {step} ")),
        "{stdout}"
    );
    assert_continues_exactly(&out);
}

#[test]
fn a_resumed_run_may_run_longer_but_not_change_its_settings() {
    let dir = support::tempdir();
    let out = dir.path().join("run");
    copy_dir(trained(), &out);
    let corpus = corpus();
    let out_arg = out.to_str().unwrap();
    // The shared run's settings, with `steps`, `eval_iters` and more flags as given.
    let resume = |steps: &str, eval_iters: &str, more: &[&str]| {
        let mut args = vec![
            "--preset",
            "tiny",
            "--data",
            &corpus,
            "--steps",
            steps,
            "--eval-interval",
            "30",
            "--eval-iters",
            eval_iters,
            "--sample-chars",
            "10",
            "--resume",
            "--out",
            out_arg,
        ];
        args.extend_from_slice(more);
        run(&args)
    };
    // The shared run ended at its 60 steps: resuming it as it was has nothing left to do.
    let (code, _, err) = resume("60", "5", &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("at step 60 and this run ends at step 60") && err.contains("--steps"),
        "{err}"
    );
    // Any other change is still refused, and the allowed one is not listed with it.
    let (code, _, err) = resume("90", "5", &["--lr", "0.002"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("another config") && err.contains("lr is 0.001 there, 0.002 here"),
        "{err}"
    );
    assert!(!err.contains("steps is"), "{err}");

    // Longer, and with other evaluations: it says so, and carries on from step 60.
    let (code, stdout, err) = resume("90", "4", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("resuming from step 60"), "{stdout}");
    assert!(
        stdout.contains("resuming with steps 60 -> 90: the cosine schedule now decays over 90"),
        "{stdout}"
    );
    assert!(
        stdout.contains("resuming with eval iters 5 -> 4"),
        "{stdout}"
    );
    assert!(!stdout.contains("eval interval"), "{stdout}");
    assert_eq!(
        losses(&out).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![0, 30, 60, 90]
    );
    let log = step_log(&out);
    assert_eq!(
        log.iter().map(|r| r.0).collect::<Vec<_>>(),
        (0..90).collect::<Vec<_>>()
    );
    // The steps after 60 follow the schedule of a 90-step run (the 60-step one was at its
    // floor there).
    let mut longer = preset("tiny", 65).unwrap();
    longer.steps = 90;
    for &(step, _, lr) in &log[60..] {
        let want = learning_rate(&longer, step);
        assert!(
            (lr - want).abs() <= 1e-6 * want,
            "step {step}: lr {lr}, want {want}"
        );
    }
    assert!(log[70].2 > longer.min_lr * 1.5, "{:?}", log[70]);
}

/// Records the points `between_steps` is called at and ends the run at `stop_at`.
struct StopAt {
    stop_at: usize,
    seen: Vec<usize>,
}

impl<M> TrainHooks<M> for StopAt {
    fn learning_rate(&self, _step: usize) -> f64 {
        1e-2
    }

    fn between_steps(
        &mut self,
        steps_done: usize,
        _model: &M,
        _optim: &ModuleOptimizer,
    ) -> anyhow::Result<ControlFlow<()>> {
        self.seen.push(steps_done);
        Ok(if steps_done == self.stop_at {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    }
}

#[test]
fn a_hook_can_end_training_between_two_steps() {
    let data = course::common::dataset::Dataset::new(&support::corpus()).unwrap();
    let device = support::ndarray_device().autodiff();
    let model = BigramConfig::new(data.tokenizer.vocab_size()).init(&device);
    let settings = support::settings(20, 4, 2, 1);
    let mut optim = AdamWConfig::new().init();
    let mut hooks = StopAt {
        stop_at: 6,
        seen: Vec::new(),
    };
    let (_, report) = train(model, &mut optim, &data, &settings, 0, &mut hooks).unwrap();
    // Called before every step, with the number of steps done, and not after the last.
    assert_eq!(hooks.seen, (0..=6).collect::<Vec<_>>());
    assert_eq!(
        report.steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
    // The evaluation at 4 came before its call; the stop adds none.
    assert_eq!(
        report.losses.iter().map(|l| l.step).collect::<Vec<_>>(),
        vec![0, 4]
    );
}
