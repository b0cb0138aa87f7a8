//! Chapter 11: data-parallel training. Without MPI, the ranks are threads of this test
//! process talking through shared memory (the same `Collective` trait MPI implements), so
//! the training code is checked in every build; with `--features mpi`, the binary runs under
//! `mpirun`: two ranks against one, over shared memory and over TCP, checkpoints moved
//! between 2 and 1 ranks, and a rank killed mid-run.

mod support;

use burn::prelude::*;
use course::ch03_gpt::{Gpt, Kernels};
use course::ch04_pretrain::{PretrainConfig, optimizer, preset};
use course::ch08_pretrained::tokenizer::Tokenizer;
use course::ch11_distributed::comm::{Collective, Solo, ring_all_reduce_seconds};
use course::ch11_distributed::dropout::SampleDropout;
use course::ch11_distributed::{
    Job, all_reduce_mean, broadcast_model, check_batch, data_parallel_step, shard, weights_hash,
};
use course::common::dataset::Dataset;
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};

const BIN: &str = env!("CARGO_BIN_EXE_ch11_distributed");

/// Ranks as threads: each collective puts every rank's bytes on one table, waits for all,
/// and reduces them in rank order (so every rank gets the same bits, as MPI's do).
struct ThreadRank {
    rank: usize,
    size: usize,
    table: Arc<(Barrier, Mutex<Vec<Vec<u8>>>)>,
}

impl ThreadRank {
    fn world(size: usize) -> Vec<ThreadRank> {
        let table = Arc::new((Barrier::new(size), Mutex::new(vec![Vec::new(); size])));
        (0..size)
            .map(|rank| ThreadRank {
                rank,
                size,
                table: table.clone(),
            })
            .collect()
    }

    fn exchange(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
        let (barrier, slots) = &*self.table;
        slots.lock().unwrap()[self.rank] = mine;
        barrier.wait();
        let all = slots.lock().unwrap().clone();
        barrier.wait(); // nobody writes the next collective's bytes before all have read
        all
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let all = self.exchange(buf.iter().flat_map(|v| v.to_le_bytes()).collect());
        for (i, v) in buf.iter_mut().enumerate() {
            *v = all
                .iter()
                .map(|b| f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()))
                .fold(0.0, |s, x| s + x);
        }
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
        let all = self.exchange(buf.iter().flat_map(|v| v.to_le_bytes()).collect());
        for (i, v) in buf.iter_mut().enumerate() {
            *v = all
                .iter()
                .map(|b| f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap()))
                .fold(0.0, |s, x| s + x);
        }
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) {
        let all = self.exchange(buf.to_vec());
        buf.copy_from_slice(&all[root]);
    }
    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        let all = self.exchange(value.to_le_bytes().to_vec());
        all.iter()
            .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()))
            .collect()
    }
    fn barrier(&self) {
        self.exchange(Vec::new());
    }
    fn describe(&self) -> String {
        format!("thread {} of {}", self.rank, self.size)
    }
}

fn data() -> Dataset<Tokenizer> {
    let text = support::corpus();
    let tok = Tokenizer::choose("char", &text).unwrap();
    Dataset::tokenized(&text, tok).unwrap()
}

fn tiny(vocab: usize, batch: usize, dropout: f64) -> PretrainConfig {
    let mut cfg = preset("tiny", vocab).unwrap();
    cfg.model = cfg.model.with_dropout(dropout);
    cfg.batch_size = batch;
    cfg
}

/// `steps` data-parallel steps on `comm`, from `model`; the losses and the final weights.
fn train_on(
    comm: &dyn Collective,
    kernels: Kernels,
    model: Gpt,
    cfg: &PretrainConfig,
    data: &Dataset<Tokenizer>,
    steps: usize,
) -> (Vec<f64>, u64) {
    let (kernels, dropout) = SampleDropout::install(kernels, cfg.seed);
    let mut model = broadcast_model(model.with_kernels(kernels), comm).unwrap();
    let mut optim = optimizer(cfg);
    let job = Job {
        comm,
        cfg,
        data,
        dropout,
        bucket: 5000, // several buckets, so that their seams are crossed
    };
    let mut losses = Vec::new();
    for step in 0..steps {
        let (next, out) = data_parallel_step(model, &mut optim, &job, step);
        model = next;
        losses.push(out.loss);
    }
    (losses, weights_hash(&model))
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        // NaN fails: the comparison below is false for it.
        assert!((x - y).abs() <= tol, "{what}: step {i}: {x} vs {y}");
    }
}

#[test]
fn shards_cover_the_global_batch_once() {
    for (batch, p) in [(16, 1), (16, 2), (12, 3), (64, 8)] {
        check_batch(batch, p).unwrap();
        let mut seen: Vec<usize> = (0..p).flat_map(|r| shard(batch, r, p)).collect();
        seen.sort();
        assert_eq!(seen, (0..batch).collect::<Vec<_>>(), "{batch} over {p}");
    }
    let err = check_batch(10, 3).unwrap_err().to_string();
    assert!(err.contains("multiple of the number of ranks"), "{err}");
}

#[test]
fn ring_cost_follows_the_formula() {
    // 2 (p - 1) / p of the buffer crosses each link, plus 2 (p - 1) latencies.
    let (bytes, bw) = (400e6, 10e9 / 8.0);
    assert_eq!(ring_all_reduce_seconds(bytes, 1, bw, 1e-5), 0.0);
    let two = ring_all_reduce_seconds(bytes, 2, bw, 0.0);
    assert!((two - bytes / bw).abs() < 1e-9, "{two}");
    let many = ring_all_reduce_seconds(bytes, 64, bw, 0.0);
    assert!(
        (many - 2.0 * 63.0 / 64.0 * bytes / bw).abs() < 1e-9,
        "{many}"
    );
    let with_latency = ring_all_reduce_seconds(bytes, 8, bw, 1e-3);
    let without = ring_all_reduce_seconds(bytes, 8, bw, 0.0);
    assert!((with_latency - without - 14e-3).abs() < 1e-9);
}

/// The ring written out leaves the element-wise sum in every buffer, sending 2 (p - 1) / p of
/// a buffer per rank, for any p and lengths that do not divide evenly.
#[test]
fn the_ring_all_reduce_sums_and_sends_two_buffers_at_most() {
    use course::ch11_distributed::ring::{ring_all_reduce, ring_states};
    for p in 1..=6 {
        for n in [1, 7, 60, 1001] {
            let mut bufs: Vec<Vec<f32>> = (0..p)
                .map(|r| {
                    (0..n)
                        .map(|i| ((i * 31 + r * 7) % 11) as f32 - 5.0)
                        .collect()
                })
                .collect();
            let sum: Vec<f32> = (0..n).map(|i| bufs.iter().map(|b| b[i]).sum()).collect();
            let sent = ring_all_reduce(&mut bufs);
            for (r, b) in bufs.iter().enumerate() {
                assert_eq!(*b, sum, "p {p}, n {n}: rank {r}");
            }
            if n % p == 0 {
                assert_eq!(sent, 2 * (p - 1) * n / p, "p {p}, n {n}");
            }
        }
        let states = ring_states(p);
        assert_eq!(states.len(), 2 * p - 1);
        let all = (1u64 << p) - 1;
        assert!(
            states.last().unwrap().1.iter().flatten().all(|&s| s == all),
            "p {p}"
        );
        // Half-way, after the reduce-scatter, each rank holds exactly one finished chunk.
        let middle = &states[p - 1].1;
        assert!(
            middle
                .iter()
                .all(|row| row.iter().filter(|&&s| s == all).count() == 1)
        );
    }
}

/// A sample's dropout masks do not depend on where it sits in a rank's batch: the logits of
/// samples 2..4 computed as a shard equal those rows of the whole batch's, and another step
/// draws other masks.
#[test]
fn dropout_masks_belong_to_the_sample() {
    let _lock = support::rng_lock();
    let data = data();
    let cfg = tiny(data.tokenizer.vocab_size(), 4, 0.3);
    let device = support::flex_device().autodiff();
    device.seed(7);
    let (kernels, dropout) = SampleDropout::install(Kernels::BURN, 11);
    let model = cfg.model.init(&device).with_kernels(kernels);
    let t = cfg.model.block_size;
    let mut rng = course::common::dataset::rng_for(1, 1, 0);
    let (ids, _) = data.sample_ids(course::common::dataset::Split::Train, 4, t, &mut rng);
    let x = course::common::dataset::ids_tensor(ids.clone(), [4, t], &device);
    use course::common::max_abs_diff;
    use course::common::train::LanguageModel;
    dropout.begin(5, 0);
    let whole = model.forward(x.clone()); // [4, t, v]
    dropout.begin(5, 2);
    let part = model.forward(x.clone().slice([2..4, 0..t])); // [2, t, v]
    let diff = max_abs_diff(&whole.clone().slice([2..4, 0..t]), &part);
    assert!(diff <= 1e-5, "shard differs from the whole batch by {diff}");
    dropout.begin(6, 0);
    let other = model.forward(x.clone());
    let moved = max_abs_diff(&whole, &other);
    assert!(moved > 1e-3, "step 6 drew step 5's masks ({moved})");
    // Chapter 5's fused kernels, told where the shard starts, draw the very same masks.
    let (fused, fused_dropout) = SampleDropout::install(course::ch05_fast::FUSED, 11);
    let model_fused = model.clone().with_kernels(fused);
    for (step, first, rows) in [(5, 0, 0..4), (5, 2, 2..4)] {
        fused_dropout.begin(step, first);
        let y = model_fused.forward(x.clone().slice([rows.clone(), 0..t]));
        let diff = max_abs_diff(&whole.clone().slice([rows, 0..t]), &y);
        assert!(diff <= 1e-4, "fused kernels from sample {first}: {diff}");
    }
    // Without autodiff (evaluation) there is no dropout at all.
    let valid = model.valid();
    let x = course::common::dataset::ids_tensor(ids, [4, t], &support::flex_device());
    dropout.begin(5, 0);
    let a = valid.forward(x.clone());
    let b = valid.clone().with_kernels(Kernels::BURN).forward(x);
    assert!(max_abs_diff(&a, &b) == 0.0);
}

/// Two ranks with the same gradients average to those gradients, every one back in its place:
/// the flat layout, the buckets and the way back agree.
#[test]
fn two_equal_ranks_average_to_the_same_gradients() {
    let _lock = support::rng_lock();
    let data = data();
    let cfg = tiny(data.tokenizer.vocab_size(), 2, 0.0);
    let device = support::flex_device().autodiff();
    device.seed(3);
    let model = cfg.model.init(&device);
    let mut rng = course::common::dataset::rng_for(1, 1, 0);
    let t = cfg.model.block_size;
    let (x, y) = data.sample_ids(course::common::dataset::Split::Train, 2, t, &mut rng);
    use course::common::dataset::ids_tensor;
    use course::common::train::LanguageModel;
    let grads = |model: &Gpt| {
        let (x, y) = (
            ids_tensor(x.clone(), [2, t], &device),
            ids_tensor(y.clone(), [2, t], &device),
        );
        burn::optim::GradientsParams::from_grads(model.loss(x, y).backward(), model)
    };
    let before = grads_of(&grads(&model), &model);
    assert!(before.iter().all(|v| v.is_finite()) && before.iter().any(|&v| v != 0.0));
    let after: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadRank::world(2)
            .into_iter()
            .map(|rank| {
                let (model, grads) = (model.clone(), &grads);
                s.spawn(move || {
                    let (g, _) = all_reduce_mean(grads(&model), &model, &rank, 777);
                    grads_of(&g, &model)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for g in after {
        assert_eq!(g, before);
    }
}

fn grads_of(grads: &burn::optim::GradientsParams, model: &Gpt) -> Vec<f32> {
    use burn::module::{Module, ModuleVisitor, Param};
    struct Collect<'a>(&'a burn::optim::GradientsParams, Vec<f32>);
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let g = self.0.get::<D>(p.id).expect("a gradient");
            self.1.extend(g.into_data().try_to_vec::<f32>().unwrap());
        }
    }
    let mut c = Collect(grads, Vec::new());
    model.visit(&mut c);
    c.1
}

/// The chapter's claim: p ranks with a global batch B train the model one rank trains with
/// batch B, step for step, dropout included; and the replicas stay equal bit for bit.
#[test]
fn two_and_four_ranks_equal_one_rank_with_dropout() {
    let _lock = support::rng_lock();
    let data = data();
    let cfg = tiny(data.tokenizer.vocab_size(), 8, 0.1);
    let device = support::flex_device().autodiff();
    device.seed(cfg.seed);
    let model = cfg.model.init(&device);
    let steps = 20;
    for kernels in [Kernels::BURN, course::ch05_fast::FUSED] {
        let (solo, _) = train_on(&Solo, kernels, model.clone(), &cfg, &data, steps);
        for size in [2, 4] {
            let results: Vec<(Vec<f64>, u64)> = std::thread::scope(|s| {
                let handles: Vec<_> = ThreadRank::world(size)
                    .into_iter()
                    .map(|rank| {
                        let (model, cfg, data) = (model.clone(), &cfg, &data);
                        s.spawn(move || train_on(&rank, kernels, model, cfg, data, steps))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let name = kernels.name();
            for (rank, (losses, hash)) in results.iter().enumerate() {
                assert_eq!(
                    *hash, results[0].1,
                    "{name}, {size} ranks: rank {rank}'s weights"
                );
                assert_close(
                    losses,
                    &solo,
                    1e-5,
                    &format!("{name}, {size} ranks, rank {rank}"),
                );
            }
        }
        assert!(solo[steps - 1] < solo[0] - 0.3, "no learning: {solo:?}");
    }
}

/// Without MPI in the build, a launch by mpirun is refused in one line.
#[cfg(not(feature = "mpi"))]
#[test]
fn without_mpi_an_mpirun_launch_says_how_to_get_it() {
    let dir = support::tempdir();
    let out = dir.path().to_string_lossy().into_owned();
    let corpus = support::corpus_path().to_string_lossy().into_owned();
    let (code, _, err) = support::run_bin(
        BIN,
        &["--preset", "tiny", "--data", &corpus, "--out", &out],
        &[("OMPI_COMM_WORLD_SIZE", "2")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--features mpi") && err.lines().count() == 1,
        "{err}"
    );
}

/// The binary on one process: trains, evaluates, writes chapter 4's checkpoints, and a run
/// stopped half-way and resumed logs the losses of the uninterrupted one.
#[test]
fn one_process_run_resumes_exactly() {
    let dir = support::tempdir();
    let corpus = support::corpus_path().to_string_lossy().into_owned();
    let run = |out: &Path, extra: &[&str]| {
        let out = out.to_string_lossy().into_owned();
        let mut args = vec![
            "--preset",
            "tiny",
            "--steps",
            "16",
            "--dropout",
            "0.1",
            "--batch-size",
            "8",
            "--eval-interval",
            "8",
            "--eval-iters",
            "2",
            "--data",
            &corpus,
            "--out",
            &out,
        ];
        args.extend_from_slice(extra);
        let (code, stdout, err) = support::run_bin(BIN, &args, &[]);
        assert_eq!(code, 0, "{stdout}\n{err}");
        stdout
    };
    let whole = dir.path().join("whole");
    let stdout = run(&whole, &[]);
    assert!(
        stdout.contains("== 11.5 Training on every rank =="),
        "{stdout}"
    );
    assert!(whole.join("ckpt/last/meta.json").exists() && whole.join("summary.json").exists());
    let parts = dir.path().join("parts");
    run(&parts, &["--stop-after", "8"]);
    run(&parts, &["--resume"]);
    assert_close(&step_losses(&whole), &step_losses(&parts), 0.0, "resumed");
}

/// The per-step losses rank 0 wrote (steps.csv).
fn step_losses(dir: &Path) -> Vec<f64> {
    let csv = std::fs::read_to_string(dir.join("steps.csv")).unwrap();
    csv.lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

#[cfg(feature = "mpi")]
mod mpi {
    //! The binary under `mpirun` (Open MPI): ranks in separate processes.

    use super::*;
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    fn mpirun(np: usize, extra_mca: &[&str], args: &[String]) -> std::process::Output {
        Command::new("mpirun")
            .args(launch(np, extra_mca))
            .arg(BIN)
            .args(args)
            .output()
            .expect("mpirun runs (install Open MPI: apt install openmpi-bin)")
    }

    fn launch(np: usize, extra_mca: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
            "-x",
            "RAYON_NUM_THREADS=1",
            "-np",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(np.to_string());
        v.extend(extra_mca.iter().map(|s| s.to_string()));
        v
    }

    /// The flags of a short `tiny` run; a flag in `extra` replaces the same one here.
    fn args(out: &Path, extra: &[&str]) -> Vec<String> {
        let base = [
            ("--preset", "tiny"),
            ("--steps", "20"),
            ("--dropout", "0.1"),
            ("--batch-size", "8"),
            ("--eval-interval", "10"),
            ("--eval-iters", "2"),
        ];
        let mut v: Vec<String> = base
            .iter()
            .filter(|(flag, _)| !extra.contains(flag))
            .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
            .collect();
        v.push("--data".into());
        v.push(support::corpus_path().to_string_lossy().into_owned());
        v.push("--out".into());
        v.push(out.to_string_lossy().into_owned());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn ok(out: std::process::Output) -> String {
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stdout}\n{stderr}");
        stdout
    }

    /// Shared memory (Open MPI's `vader`) and TCP on loopback: 2 ranks = 1 rank, 20 steps.
    #[test]
    fn two_ranks_equal_one_rank_over_shared_memory_and_tcp() {
        let dir = support::tempdir();
        let one = dir.path().join("one");
        ok(mpirun(1, &[], &args(&one, &[])));
        let tcp = [
            "--mca",
            "pml",
            "ob1",
            "--mca",
            "btl",
            "tcp,self",
            "--mca",
            "btl_tcp_if_include",
            "lo",
        ];
        for (name, mca) in [("shm", &[][..]), ("tcp", &tcp[..])] {
            let two = dir.path().join(name);
            let stdout = ok(mpirun(2, mca, &args(&two, &[])));
            assert!(stdout.contains("2 rank(s)"), "{stdout}");
            assert!(stdout.contains("every rank holds weights"), "{stdout}");
            assert_close(&step_losses(&two), &step_losses(&one), 1e-5, name);
        }
    }

    /// A checkpoint written by 2 ranks resumes on 1, and one written by 1 on 2, each giving
    /// the losses of the uninterrupted run.
    #[test]
    fn checkpoints_move_between_two_ranks_and_one() {
        let dir = support::tempdir();
        let whole = dir.path().join("whole");
        ok(mpirun(2, &[], &args(&whole, &[])));
        for (first, then) in [(2, 1), (1, 2)] {
            let d = dir.path().join(format!("{first}to{then}"));
            ok(mpirun(first, &[], &args(&d, &["--stop-after", "10"])));
            let stdout = ok(mpirun(then, &[], &args(&d, &["--resume"])));
            assert!(stdout.contains("resuming from step 10"), "{stdout}");
            assert_close(
                &step_losses(&d),
                &step_losses(&whole),
                1e-5,
                &format!("{first}->{then}"),
            );
        }
    }

    /// A rank killed mid-run ends the job with an error naming it; the last checkpoint is
    /// whole, and `--resume` goes on from it.
    #[test]
    fn a_killed_rank_ends_the_job_and_resume_continues() {
        let dir = support::tempdir();
        let out = dir.path().join("run");
        let mut child = Command::new("mpirun")
            .args(launch(2, &[]))
            .arg(BIN)
            .args(args(
                &out,
                &[
                    "--steps",
                    "100000",
                    "--eval-interval",
                    "100000",
                    "--ckpt-interval",
                    "5",
                ],
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mpirun runs");
        // Read on a thread to the end, so that the job never writes into a closed pipe.
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(p) = line.trim().strip_prefix("rank 1: pid ") {
                    let _ = tx.send(p.trim().to_string());
                }
            }
        });
        let pid = rx.recv_timeout(std::time::Duration::from_secs(120)).ok();
        let pid = pid.expect("rank 0 lists rank 1's pid");
        let meta = out.join("ckpt/last/meta.json");
        let started = std::time::Instant::now();
        while saved_step(&meta).is_none_or(|s| s < 10) {
            assert!(
                started.elapsed().as_secs() < 120,
                "no checkpoint at step 10"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(
            Command::new("kill")
                .args(["-9", &pid])
                .status()
                .unwrap()
                .success()
        );
        let result = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "the job went on without rank 1");
        assert!(
            stderr.contains("rank 1"),
            "the error does not name rank 1: {stderr}"
        );
        // Killed between its two renames, chapter 4's save leaves the previous checkpoint
        // as last.old, which a resume reads.
        let old = out.join("ckpt/last.old/meta.json");
        let step = saved_step(&meta)
            .or_else(|| saved_step(&old))
            .expect("a whole checkpoint");
        let steps = (step + 5).to_string();
        let stdout = ok(mpirun(
            2,
            &[],
            &args(&out, &["--resume", "--steps", &steps]),
        ));
        assert!(
            stdout.contains(&format!("resuming from step {step}")),
            "{stdout}"
        );
    }

    fn saved_step(meta: &Path) -> Option<usize> {
        let text = std::fs::read_to_string(meta).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["step"].as_u64().map(|s| s as usize)
    }
}
