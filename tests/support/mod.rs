//! Helpers shared by the integration tests.
#![allow(dead_code)]

use burn::prelude::*;
use course::common::backend::Backend;
use course::common::dataset::Dataset;
use course::common::max_abs_diff;
use course::common::train::{ConstantLr, LanguageModel, TrainReport, TrainSettings, train};
use std::path::PathBuf;

/// The real corpus: `$GPT_DATA`, else the copy in `../shared/data/` beside the checkout,
/// else the downloaded one in `data/`.
pub fn corpus_path() -> PathBuf {
    if let Some(p) = std::env::var_os("GPT_DATA").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for p in [
        root.join("../shared/data/tinyshakespeare.txt"),
        root.join("data/tinyshakespeare.txt"),
    ] {
        if p.exists() {
            return p;
        }
    }
    panic!("set GPT_DATA to a copy of tinyshakespeare.txt (these tests need the real corpus)");
}

pub fn corpus() -> String {
    std::fs::read_to_string(corpus_path()).expect("readable corpus")
}

/// The wgpu device, unless `GPT_SKIP_WGPU=1` (for machines without any Vulkan driver).
/// CI installs Mesa's lavapipe so these tests really run there.
pub fn wgpu_device() -> Option<Device> {
    if std::env::var("GPT_SKIP_WGPU").is_ok_and(|v| v == "1") {
        eprintln!("GPT_SKIP_WGPU=1: skipping the wgpu half of this test");
        return None;
    }
    let backend: Backend = "wgpu".parse().expect("this build has the wgpu feature");
    Some(backend.device())
}

pub fn ndarray_device() -> Device {
    Backend::Ndarray.device()
}

/// A short run of the chapters' small setup (batch 32, block 8, no clipping).
pub fn settings(steps: usize, eval_interval: usize, eval_iters: usize, seed: u64) -> TrainSettings {
    TrainSettings {
        steps,
        batch_size: 32,
        block_size: 8,
        eval_interval,
        eval_iters,
        seed,
        grad_clip: None,
        stop_after: None,
    }
}

/// Trains `model` with AdamW at a constant learning rate.
pub fn train_constant<M: LanguageModel>(
    model: M,
    data: &Dataset,
    settings: &TrainSettings,
    lr: f64,
) -> (M, TrainReport) {
    let mut optim = burn::optim::AdamWConfig::new().init();
    train(model, &mut optim, data, settings, 0, &mut ConstantLr(lr)).expect("training runs")
}

/// The fastest CPU backend, for tests that only need a trained model.
pub fn flex_device() -> Device {
    Backend::Flex.device()
}

/// `model` (on ndarray) copied with the same weights to flex and to wgpu gives the same
/// logits on `x` within 1e-4.
pub fn assert_same_logits<M: LanguageModel>(model: M, x: Tensor<2, Int>) {
    let reference = model.forward(x.clone());
    let mut others = vec![Backend::Flex.device()];
    others.extend(wgpu_device());
    for device in others {
        let moved = model.clone().to_device(&device);
        let logits = moved.forward(x.clone().to_device(&device));
        let diff = max_abs_diff(&reference, &logits);
        assert!(diff <= 1e-4, "max abs diff {diff} on {device:?}");
    }
}

/// Runs one of the crate's binaries and returns (exit code, stdout, stderr).
pub fn run_bin(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args).env_remove("GPT_DATA");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh, empty directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir() -> TempDir {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "gpt-course-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir");
    TempDir(dir)
}

/// Serves `body` once to the first HTTP request on a loopback port; returns its URL.
pub fn serve_once(body: Vec<u8>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.read(&mut [0u8; 4096]);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}/file")
}

/// The validation loss of the best bigram table the training split can give (counts with
/// add-one smoothing, chapter 1): what a model that reads only the previous character
/// reaches. A model that uses its context must end below it.
pub fn bigram_floor(data: &Dataset) -> f64 {
    use course::ch01_bigram::{bigram_nll, counted_bigram};
    let v = data.tokenizer.vocab_size();
    bigram_nll(&counted_bigram(&data.train, v, 1.0), &data.val, v)
}

/// LLMs-from-scratch's instruction records: `$GPT_INSTRUCTIONS`, else the copy in
/// `../shared/data/` beside the checkout, else the downloaded one in `data/`.
pub fn instruction_data() -> PathBuf {
    if let Some(p) = std::env::var_os("GPT_INSTRUCTIONS").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for p in [
        root.join("../shared/data/instruction-data.json"),
        root.join("data/instruction-data.json"),
    ] {
        if p.exists() {
            return p;
        }
    }
    panic!("set GPT_INSTRUCTIONS to a copy of instruction-data.json");
}

/// Burn's random generator is one per process, and tests run in parallel: a test that seeds it
/// and draws from it holds this lock, so that no other test's draws come in between.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
