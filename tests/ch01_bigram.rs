//! Chapter 1: the bigram model and its binary.

mod support;

use burn::prelude::*;
use course::ch01_bigram::{BigramConfig, bigram_nll, counted_bigram};
use course::common::dataset::{Dataset, Split, rng_for, stream};
use course::common::train::{EvalSettings, LossRecord, cross_entropy, estimate_loss};

fn data() -> Dataset {
    Dataset::new(&support::corpus()).unwrap()
}

fn init_loss(std: f64) -> f64 {
    let data = data();
    let device = support::ndarray_device();
    device.seed(3);
    let model = BigramConfig::new(65).with_init_std(std).init(&device);
    let eval = EvalSettings {
        batch_size: 32,
        block_size: 8,
        iters: 20,
        seed: 3,
    };
    estimate_loss(&model, &data, &eval, 0).val
}

#[test]
fn loss_at_initialisation_matches_theory() {
    let ln65 = 65f64.ln();
    // Tiny weights: every prediction is nearly uniform, so the loss is -ln(1/65).
    let small = init_loss(0.02);
    assert!(
        (small - ln65).abs() < 0.02,
        "init loss {small} vs ln 65 = {ln65}"
    );
    // N(0, 1) logits (PyTorch's and the lecture's init): about ln V + 1/2.
    let unit = init_loss(1.0);
    assert!(
        (unit - (ln65 + 0.5)).abs() < 0.3,
        "init loss {unit} vs {}",
        ln65 + 0.5
    );
}

fn short_run(seed: u64, steps: usize) -> Vec<LossRecord> {
    let data = data();
    let device = support::ndarray_device().autodiff();
    device.seed(seed);
    let model = BigramConfig::new(65).init(&device);
    let settings = support::settings(steps, 100, 20, seed);
    support::train_constant(model, &data, &settings, 1e-2)
        .1
        .losses
}

#[test]
fn a_short_run_on_the_corpus_learns() {
    let losses = short_run(1337, 1000);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert_eq!(last.step, 1000);
    assert!(first.val > 4.0, "starts near ln 65 + 1/2: {first:?}");
    assert!(last.val < 2.7, "val loss after 1000 steps: {last:?}");
}

#[test]
fn the_same_seed_gives_the_same_losses() {
    let a = short_run(42, 200);
    let b = short_run(42, 200);
    assert_eq!(a, b);
    let c = short_run(43, 200);
    assert_ne!(a, c);
}

#[test]
fn logits_on_wgpu_and_flex_equal_ndarray_for_the_same_weights() {
    let data = data();
    let nd = support::ndarray_device();
    nd.seed(5);
    let (x, _) = data.batch(Split::Val, 4, 8, &mut rng_for(5, stream::DEMO, 0), &nd);
    support::assert_same_logits(BigramConfig::new(65).init(&nd), x);
}

#[test]
fn counting_gives_the_lowest_training_loss_a_bigram_can_have() {
    let data = data();
    let v = data.tokenizer.vocab_size();
    let exact = counted_bigram(&data.train, v, 0.0);
    let floor = bigram_nll(&exact, &data.train, v);
    // Rows are distributions.
    for row in exact.chunks(v) {
        let sum: f64 = row.iter().sum();
        assert!(sum == 0.0 || (sum - 1.0).abs() < 1e-9, "{sum}");
    }
    // Any other table does worse on the training split: smoothing moves it away from the
    // counts, and a table nudged towards uniform does too.
    for alpha in [0.01, 1.0] {
        let other = bigram_nll(&counted_bigram(&data.train, v, alpha), &data.train, v);
        assert!(other > floor, "alpha {alpha}: {other} vs {floor}");
    }
    assert!(floor > 2.3 && floor < 2.5, "{floor}");
    // On the validation split unseen pairs need smoothing; add-one gives a finite loss near it.
    let val = bigram_nll(&counted_bigram(&data.train, v, 1.0), &data.val, v);
    assert!(
        val.is_finite() && (val - floor).abs() < 0.1,
        "{val} vs {floor}"
    );
}

#[test]
fn the_loss_is_the_mean_negative_log_likelihood() {
    // Two positions, three classes: check cross_entropy against the formula by hand.
    let device = support::ndarray_device();
    let logits = Tensor::<3>::from_data([[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]]], &device);
    let targets = Tensor::<2, Int>::from_data([[2i64, 0]], &device);
    let lse = |v: [f64; 3]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
    let expected = ((lse([1.0, 2.0, 3.0]) - 3.0) + (lse([0.0; 3]) - 0.0)) / 2.0;
    let got = cross_entropy(logits, targets).into_scalar::<f32>() as f64;
    assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
}

const BIN: &str = env!("CARGO_BIN_EXE_ch01_bigram");

#[test]
fn cli_rejects_an_unknown_backend_with_the_list() {
    let (code, _, err) = support::run_bin(BIN, &["--backend", "tpu"], &[("RUST_BACKTRACE", "1")]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown backend 'tpu'") && err.contains("ndarray"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cli_reports_a_missing_data_file() {
    let (code, _, err) = support::run_bin(
        BIN,
        &["--data", "/no/such/file.txt", "--steps", "1"],
        &[("RUST_BACKTRACE", "1")],
    );
    assert_ne!(code, 0);
    assert!(
        err.starts_with("error: cannot read the data file") && err.contains("/no/such/file.txt"),
        "{err}"
    );
    // One message, not a panic or a backtrace, even with RUST_BACKTRACE set.
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn cli_runs_end_to_end_and_writes_its_outputs() {
    let dir = support::tempdir();
    let out = dir.path().join("run");
    let corpus = support::corpus_path();
    let (code, stdout, err) = support::run_bin(
        BIN,
        &[
            "--data",
            corpus.to_str().unwrap(),
            "--steps",
            "200",
            "--eval-interval",
            "100",
            "--eval-iters",
            "10",
            "--sample-chars",
            "50",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    for heading in [
        "== 1.1 The data ==",
        "== 1.4 Batches ==",
        "when input is",
        "== 1.9 The best a bigram can do: counting ==",
        "== 1.11",
    ] {
        assert!(stdout.contains(heading), "missing {heading:?} in\n{stdout}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["chapter"], "ch01_bigram");
    assert_eq!(summary["parameters"], 65 * 65);
    assert_eq!(summary["steps"], 200);
    assert!(summary["final_val_loss"].as_f64().unwrap() < 4.0);
    let csv = std::fs::read_to_string(out.join("losses.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + 3,
        "header + steps 0, 100, 200:\n{csv}"
    );
    // The per-step log: one row per optimizer step, with a finite loss and gradient norm.
    let steps = std::fs::read_to_string(out.join("steps.csv")).unwrap();
    let rows: Vec<&str> = steps.lines().collect();
    assert_eq!(rows[0], "step,loss,lr,grad_norm,ms");
    assert_eq!(rows.len(), 1 + 200, "{steps}");
    for row in &rows[1..] {
        let v: Vec<f64> = row.split(',').map(|x| x.parse().unwrap()).collect();
        assert!(
            v[1].is_finite() && v[3] > 0.0 && (v[2] - 1e-2).abs() < 1e-12,
            "{row}"
        );
    }
    let svg = std::fs::read_to_string(out.join("loss_curve.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
}
