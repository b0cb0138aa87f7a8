//! Chapter 4: schedule, optimizer groups, checkpoints, resume and sampling.

mod support;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use course::ch04_pretrain::{DECAYED, learning_rate, optimizer, preset};
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
    assert!(val < 2.5, "tiny preset val loss {val}");
    assert!(stdout.contains("== 4.6 Sampling from the best checkpoint =="));
    assert!(stdout.contains("clipped (> 1) at"), "{stdout}");
    assert!(
        out.join("ckpt/best/model.bpk").exists() && out.join("ckpt/last/optimizer.bpk").exists()
    );
}

#[test]
fn a_resumed_run_matches_one_that_never_stopped() {
    let dir = support::tempdir();
    let common = |out: &Path| -> Vec<String> {
        [
            "--preset",
            "tiny",
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
            "--temperature must be 0 or positive",
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
        (&["--dropout", "1"][..], "dropout must be in [0, 1)"),
        (&["--lr", "0"][..], "need 0 < --lr <= 1"),
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
