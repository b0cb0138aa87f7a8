//! `--seed` reaches everything a chapter binary does: the same seed gives the same run, another
//! seed another run (weights, batches and samples all follow it).

mod support;

use std::path::Path;

/// Runs `bin` briefly with `seed` and returns its evaluation losses and per-step batch losses.
fn run(bin: &str, seed: &str, extra: &[&str], out: &Path) -> (Vec<String>, Vec<String>) {
    let corpus = support::corpus_path();
    let mut args = vec![
        "--data",
        corpus.to_str().unwrap(),
        "--seed",
        seed,
        "--steps",
        "6",
        "--eval-interval",
        "3",
        "--eval-iters",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = support::run_bin(bin, &args, &[]);
    assert_eq!(code, 0, "{bin}: {err}");
    // Every log the run wrote (chapters 2 and 3 write one per model), step times left out:
    // they differ from run to run.
    let mut logs: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    logs.sort();
    assert!(logs.len() >= 2, "{bin}: {logs:?}");
    let text = |p: &Path| std::fs::read_to_string(p).unwrap();
    let losses = logs
        .iter()
        .filter(|p| p.to_str().unwrap().contains("losses"))
        .map(|p| text(p))
        .collect();
    let steps = logs
        .iter()
        .filter(|p| p.to_str().unwrap().contains("steps"))
        .flat_map(|p| {
            text(p)
                .lines()
                .map(|l| l.split(',').take(2).collect::<Vec<_>>().join(","))
                .collect::<Vec<_>>()
        })
        .collect();
    (losses, steps)
}

fn check(bin: &str, extra: &[&str]) {
    let dir = support::tempdir();
    let at = |name: &str| dir.path().join(name);
    let a = run(bin, "1", extra, &at("a"));
    let again = run(bin, "1", extra, &at("b"));
    let other = run(bin, "2", extra, &at("c"));
    assert_eq!(a, again, "{bin}: the same seed gave another run");
    assert_ne!(a.0, other.0, "{bin}: another seed gave the same losses");
    assert_ne!(
        a.1, other.1,
        "{bin}: another seed gave the same batch losses"
    );
}

#[test]
fn ch01_follows_its_seed() {
    check(env!("CARGO_BIN_EXE_ch01_bigram"), &["--sample-chars", "5"]);
}

#[test]
fn ch02_follows_its_seed() {
    check(
        env!("CARGO_BIN_EXE_ch02_attention"),
        &["--sample-chars", "5"],
    );
}

#[test]
fn ch03_follows_its_seed() {
    check(
        env!("CARGO_BIN_EXE_ch03_gpt"),
        &["--sample-chars", "5", "--no-compare"],
    );
}

#[test]
fn ch04_follows_its_seed() {
    check(
        env!("CARGO_BIN_EXE_ch04_pretrain"),
        &[
            "--preset",
            "tiny",
            "--backend",
            "flex",
            "--sample-chars",
            "5",
        ],
    );
}
