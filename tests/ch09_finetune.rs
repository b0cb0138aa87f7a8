//! Chapter 9: the task, GPT-1's head and auxiliary loss (checked against finite differences),
//! LoRA (only the adapters train, merging changes nothing, the count matches the formula), and
//! instruction tuning (the collate's mask, PyTorch's loss, gradients and AdamW steps on a
//! fixture, bad input).

mod support;

use burn::module::{Module, Param};
use burn::prelude::*;
use course::ch03_gpt::{Gpt, GptConfig, Kernels};
use course::ch05_fast::FUSED;
use course::ch08_pretrained::load_openai;
use course::ch09_finetune::classify::{
    Batch, Classifier, Encoded, FineTuneSettings, LoraSettings, Method, Recipe, fine_tune, scores,
};
use course::ch09_finetune::instruct::{
    LmBatch, Record, Tokens, batch_loss, collate, encode, load_records, prompt, split,
};
use course::ch09_finetune::lora::{count_params, lora_params, merge, param_values};
use course::ch09_finetune::task::{speaker_task, speeches};
use course::ch09_finetune::{ids_1d, lm_loss_at};
use course::common::backend::Backend;
use course::common::dataset::split_text;
use course::common::max_diff;
use course::common::train::{LanguageModel, cross_entropy};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_ch09_finetune");

fn tiny_config(vocab: usize) -> GptConfig {
    GptConfig::new(vocab, 16, 2, 2, 8)
}

fn examples() -> Vec<Encoded> {
    vec![
        Encoded {
            ids: vec![11, 1, 2, 3, 4, 12],
            label: 0,
        },
        Encoded {
            ids: vec![11, 5, 6, 12],
            label: 2,
        },
        Encoded {
            ids: vec![11, 7, 8, 9, 10, 0, 1, 12],
            label: 1,
        },
    ]
}

#[test]
fn the_task_is_cut_from_held_out_speeches_with_a_fixed_split() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let text = support::corpus();
    let task = speaker_task(&text, 4, 5).unwrap();
    assert_eq!(task.classes.len(), 4);
    let (train_part, held_out) = split_text(&text);
    let all = speeches(held_out);
    for e in task.train.iter().chain(&task.test) {
        // Every passage is a speech of the held-out part, by the speaker it is labelled with,
        // and none is in the part chapter 4 trains on.
        assert!(all.contains(&(task.classes[e.label].clone(), e.text.clone())));
        assert!(
            !train_part.contains(&e.text) || e.text.len() < 30,
            "{:?}",
            e.text
        );
    }
    for e in &task.test {
        assert!(
            !task.train.contains(e),
            "a test passage is also in training: {e:?}"
        );
    }
    // One in five of each speaker's speeches is in the test split.
    let (train, test) = (task.counts(&task.train), task.counts(&task.test));
    for (a, b) in train.iter().zip(&test) {
        assert_eq!((a + b) / 5, *b, "{train:?} {test:?}");
    }
    let baseline = task.majority_baseline();
    assert!(baseline > 0.25 && baseline < 0.6, "{baseline}");
    assert!(speaker_task(&text, 500, 5).is_err());
}

/// The loss as a function of one weight matrix, through `set`.
fn loss_with(
    model: &Classifier,
    batch: &Batch,
    set: &dyn Fn(&mut Classifier, Tensor<2>),
    w: Tensor<2>,
) -> f64 {
    let mut m = model.clone();
    set(&mut m, w);
    m.loss(batch, 0.5).into_scalar::<f32>() as f64
}

/// GPT-1's head and its auxiliary loss have the gradients finite differences give: the head,
/// the new tokens' embeddings and a weight inside a block, on a tiny model in f64-free f32.
#[test]
fn head_and_auxiliary_loss_pass_a_gradient_check() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let device = Backend::Flex.device().autodiff();
    device.seed(7);
    let gpt = tiny_config(11).init(&device);
    let model = Classifier::new(gpt, 3, true);
    let examples = examples();
    let refs: Vec<&Encoded> = examples.iter().collect();
    let batch = Batch::new(&refs, true, &device);
    let grads = model.loss(&batch, 0.5).backward();
    type Get = fn(&Classifier) -> Tensor<2>;
    type Set = fn(&mut Classifier, Tensor<2>);
    let cases: [(&str, Get, Set); 3] = [
        (
            "head",
            |m| m.head.weight.val(),
            |m, w| m.head.weight = Param::from_tensor(w),
        ),
        (
            "wte",
            |m| m.gpt.wte.weight.val(),
            |m, w| m.gpt.wte.weight = Param::from_tensor(w),
        ),
        (
            "c_fc",
            |m| m.gpt.blocks[0].mlp.c_fc.weight.val(),
            |m, w| m.gpt.blocks[0].mlp.c_fc.weight = Param::from_tensor(w),
        ),
    ];
    for (name, get, set) in cases {
        let w = get(&model);
        let g = w.grad(&grads).expect("a gradient");
        let g = g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        let values = w.clone().inner().into_data().try_to_vec::<f32>().unwrap();
        let shape = w.dims();
        // The head whole; of the others, the start and extract rows (ids 11, 12) or a sample.
        let entries: Vec<usize> = match name {
            "head" => (0..values.len()).collect(),
            "wte" => (11 * 8..13 * 8).chain(0..4).collect(),
            _ => (0..values.len()).step_by(7).collect(),
        };
        let eps = 1e-2f32;
        for i in entries {
            let at = |delta: f32| {
                let mut v = values.clone();
                v[i] += delta;
                let t = Tensor::<2>::from_data(TensorData::new(v, shape), &device);
                loss_with(&model, &batch, &set, t)
            };
            // Central differences at eps and eps / 2, extrapolated (Richardson): the error
            // falls from eps² to eps⁴, so a start with a strongly curved loss passes too.
            let central = |h: f32| (at(h) - at(-h)) / (2.0 * h as f64);
            let numeric = (4.0 * central(eps / 2.0) - central(eps)) / 3.0;
            let analytic = g[i] as f64;
            let ok = (numeric - analytic).abs() <= 2e-3 + 2e-2 * analytic.abs();
            assert!(
                ok,
                "{name}[{i}]: finite differences {numeric}, backward {analytic}"
            );
        }
    }
}

/// The auxiliary loss is the language-modelling loss of the text tokens alone: computed here
/// the plain way, from the full logits, and weighted by lambda.
#[test]
fn the_auxiliary_loss_is_lambda_times_the_text_tokens_lm_loss() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let device = Backend::Flex.device();
    device.seed(3);
    let model = Classifier::new(tiny_config(11).init(&device), 3, true);
    let examples = examples();
    for e in &examples {
        let refs = vec![e];
        let batch = Batch::new(&refs, true, &device);
        let with = model.loss(&batch, 0.5).into_scalar::<f32>();
        let without = model.loss(&batch, 0.0).into_scalar::<f32>();
        // Text tokens are ids[1..n-1]; position j predicts ids[j + 1].
        let n = e.ids.len();
        let input: Vec<i64> = e.ids[..n - 2].iter().map(|&i| i as i64).collect();
        let target: Vec<i64> = e.ids[1..n - 1].iter().map(|&i| i as i64).collect();
        let x = Tensor::<2, Int>::from_data(TensorData::new(input, [1, n - 2]), &device);
        let y = Tensor::<2, Int>::from_data(TensorData::new(target, [1, n - 2]), &device);
        let lm = cross_entropy(model.gpt.forward(x), y).into_scalar::<f32>();
        assert!(
            (with - without - 0.5 * lm).abs() < 1e-5,
            "{with} {without} {lm}"
        );
    }
}

/// A classifier with LoRA: the trainable count is the formula's, training changes the
/// adapters and the head and nothing else, and the merged model scores as the adapted one.
#[test]
fn lora_trains_only_its_adapters_and_merges_exactly() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let device = Backend::Flex.device().autodiff();
    device.seed(11);
    let config = tiny_config(11);
    let gpt = config.init(&device).with_kernels(FUSED);
    let lora = LoraSettings {
        rank: 2,
        alpha: 4.0,
    };
    let model = Method::Lora.prepare(&gpt, &config, 3, Recipe::GPT1, lora);
    let count = count_params(&model);
    let head = 8 * 3 + 3;
    assert_eq!(count.trainable, lora_params(&config, 2) + head, "{count:?}");
    assert_eq!(lora_params(&config, 2), 2 * 16 * 2 * 8);
    let before = param_values(&model);
    let settings = FineTuneSettings {
        steps: 3,
        batch_size: 3,
        lr: 1e-2,
        weight_decay: 0.01,
        seed: 1,
        recipe: Recipe::GPT1,
        eval_every: 0,
    };
    let (trained, _) = fine_tune(model, &examples(), &[], &settings).unwrap();
    let after = param_values(&trained);
    assert_eq!(before.len(), after.len());
    let mut changed = 0;
    for ((trains, a), (_, b)) in before.iter().zip(&after) {
        let moved = max_diff(a, b) > 0.0;
        assert_eq!(moved, *trains, "a parameter of {} numbers", a.len());
        changed += usize::from(moved) * a.len();
    }
    assert_eq!(changed, count.trainable);
    // Merged: the adapters folded into the weights, which now score as the adapted model.
    let unmerged = scores(&trained, &examples());
    let merged_model = merge(trained.valid());
    assert_eq!(
        count_params(&merged_model).total,
        count.total - lora_params(&config, 2)
    );
    let merged = scores(&merged_model, &examples());
    let (a, b): (Vec<f32>, Vec<f32>) = (unmerged.concat(), merged.concat());
    assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
    assert!(
        a.iter().any(|v| v.abs() > 1e-3),
        "scores so small they prove nothing"
    );
}

/// The last block and the head train; the count is the block's, the final LayerNorm's and the
/// head's, and from scratch or fully everything trains.
#[test]
fn methods_train_what_they_say() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let device = Backend::Flex.device().autodiff();
    let config = tiny_config(11);
    let gpt = config.init(&device).with_kernels(Kernels::BURN);
    let lora = LoraSettings {
        rank: 2,
        alpha: 4.0,
    };
    let c = 8;
    let block = 12 * c * c + 13 * c; // with biases
    let head = c * 3 + 3;
    let count = |m: Method| count_params(&m.prepare(&gpt, &config, 3, Recipe::GPT1, lora));
    let last = count(Method::LastBlock);
    assert_eq!(last.trainable, block + 2 * c + head, "{last:?}");
    for m in [Method::Full, Method::Scratch] {
        let all = count(m);
        assert_eq!(all.trainable, all.total);
        assert_eq!(
            all.total,
            config.param_count() + 2 * c + head,
            "{m:?} {all:?}"
        );
    }
}

#[test]
fn collate_pads_with_end_of_text_and_masks_padding_and_prompt() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let device = Backend::Flex.device();
    let a = Tokens {
        ids: vec![1, 2, 3, 4, 5],
        prompt_len: 3,
    };
    let b = Tokens {
        ids: vec![6, 7, 8],
        prompt_len: 2,
    };
    let rows_targets = |batch: &LmBatch| {
        let r = batch
            .rows
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        let t = batch
            .targets
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        (r, t)
    };
    let batch = collate(&[&a, &b], 9, false, &device);
    let inputs = batch
        .inputs
        .to_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    // Inputs: each record, then end-of-text padding to the longest (5).
    assert_eq!(inputs, [1, 2, 3, 4, 5, 6, 7, 8, 9, 9]);
    // Targets: the record shifted by one and its first end-of-text; the rest is padding.
    let (rows, targets) = rows_targets(&batch);
    assert_eq!(rows, [0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(targets, [2, 3, 4, 5, 9, 7, 8, 9]);
    // Masking the prompt drops the targets that are still prompt tokens.
    let (rows, targets) = rows_targets(&collate(&[&a, &b], 9, true, &device));
    // (target j is masked while j + 1 < the prompt's length)
    assert_eq!(rows, [2, 3, 4, 6, 7]);
    assert_eq!(targets, [4, 5, 9, 8, 9]);
}

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// A tensor of the fixture as f32 values and shape (int64 tensors converted).
fn read(file: &SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = file.tensor(name).unwrap_or_else(|_| panic!("no {name}"));
    let shape = t.shape().to_vec();
    let v = match t.dtype() {
        safetensors::Dtype::I64 => (t.data().chunks_exact(8))
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        _ => (t.data().chunks_exact(4))
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
    };
    (v, shape)
}

/// The course's names for the fixture's GPT-2 tensors, and how to read each from the model.
fn tensor_of(model: &Gpt, name: &str) -> Vec<f32> {
    let t: Tensor<2> = match name {
        "wte.weight" => model.wte.weight.val(),
        "wpe.weight" => model.wpe.weight.val(),
        "h.0.ln_1.weight" => model.blocks[0].ln_1.gamma.val().unsqueeze(),
        "h.0.attn.c_attn.weight" => model.blocks[0].attn.c_attn.weight.val(),
        "h.0.attn.c_attn.bias" => model.blocks[0]
            .attn
            .c_attn
            .bias
            .as_ref()
            .unwrap()
            .val()
            .unsqueeze(),
        "h.1.mlp.c_proj.weight" => model.blocks[1].mlp.c_proj.weight.val(),
        "ln_f.bias" => {
            let ln = model.ln_f.as_ref().unwrap();
            ln.beta.as_ref().unwrap().val().unsqueeze()
        }
        _ => panic!("unknown tensor {name}"),
    };
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

const NAMES: [&str; 7] = [
    "wte.weight",
    "wpe.weight",
    "h.0.ln_1.weight",
    "h.0.attn.c_attn.weight",
    "h.0.attn.c_attn.bias",
    "h.1.mlp.c_proj.weight",
    "ln_f.bias",
];

/// One padded, masked instruction batch through a random GPT-2 (`transformers`' own, from
/// chapter 8's fixture): the loss and the gradients PyTorch gives, and the weights after 3
/// AdamW steps, within 1e-4, with Burn's kernels and with chapter 5's.
#[test]
fn instruction_loss_gradients_and_adamw_steps_match_pytorch() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let bytes = std::fs::read(fixture("ch09/instruct-batch.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (inputs, shape) = read(&file, "inputs");
    let (targets, _) = read(&file, "targets");
    let [b, t] = [shape[0], shape[1]];
    let (rows, kept): (Vec<usize>, Vec<usize>) = (targets.iter().enumerate())
        .filter(|(_, y)| **y >= 0.0)
        .map(|(i, y)| (i, *y as usize))
        .unzip();
    for kernels in [Kernels::BURN, FUSED] {
        let device = Backend::Flex.device().autodiff();
        let weights = fixture("ch08/gpt2-tiny/model.safetensors");
        let (model, _) = load_openai(&weights, None, &device).unwrap();
        let mut model = model.with_kernels(kernels);
        let batch = LmBatch {
            inputs: Tensor::from_data(
                TensorData::new(inputs.iter().map(|&v| v as i64).collect(), [b, t]),
                &device,
            ),
            count: rows.len(),
            rows: ids_1d(&rows, &device),
            targets: ids_1d(&kept, &device),
        };
        let loss = batch_loss(&model, &batch);
        let value = loss.clone().into_scalar::<f32>();
        let want = read(&file, "loss").0[0];
        assert!(
            (value - want).abs() < 1e-4,
            "{}: loss {value} vs {want}",
            kernels.name()
        );
        let grads = loss.backward();
        for name in NAMES {
            let g = grad_of(&model, name, &grads);
            let want = read(&file, &format!("grad.{name}")).0;
            let d = max_diff(&g, &want);
            assert!(
                d < 1e-4,
                "{}: gradient of {name} differs by {d}",
                kernels.name()
            );
        }
        // Three AdamW steps as torch.optim.AdamW(lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
        // weight_decay=0.1), every parameter decayed.
        let mut optim = burn::optim::AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.999)
            .with_epsilon(1e-8)
            .with_weight_decay(0.1)
            .init();
        let losses = read(&file, "losses").0;
        for want in losses {
            let loss = batch_loss(&model, &batch);
            let got = loss.clone().into_scalar::<f32>();
            assert!(
                (got - want).abs() < 1e-4,
                "{}: loss {got} vs {want}",
                kernels.name()
            );
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-2, model, grads);
        }
        for name in NAMES {
            let (mut got, mut want) = (
                tensor_of(&model, name),
                read(&file, &format!("after.{name}")).0,
            );
            if name == "h.0.attn.c_attn.bias" {
                // The keys' bias (entries 32..64) has a gradient of exactly zero in exact
                // arithmetic (a shift of every key moves a query's scores alike, and softmax
                // ignores it): what either side computes is rounding noise, which Adam's
                // normalised step blows up to lr. Compared: the queries' and values' bias.
                got.drain(32..64);
                want.drain(32..64);
            }
            let d = max_diff(&got, &want);
            assert!(
                d < 1e-4,
                "{}: {name} after 3 steps differs by {d}",
                kernels.name()
            );
        }
    }
}

fn grad_of(model: &Gpt, name: &str, grads: &burn::tensor::Gradients) -> Vec<f32> {
    let g = |t: Tensor<2>| {
        let g = t.grad(grads).expect("a gradient");
        g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    };
    let g1 = |t: Tensor<1>| {
        let g = t.grad(grads).expect("a gradient");
        g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    };
    match name {
        "wte.weight" => g(model.wte.weight.val()),
        "wpe.weight" => g(model.wpe.weight.val()),
        "h.0.ln_1.weight" => g1(model.blocks[0].ln_1.gamma.val()),
        "h.0.attn.c_attn.weight" => g(model.blocks[0].attn.c_attn.weight.val()),
        "h.0.attn.c_attn.bias" => g1(model.blocks[0].attn.c_attn.bias.as_ref().unwrap().val()),
        "h.1.mlp.c_proj.weight" => g(model.blocks[1].mlp.c_proj.weight.val()),
        "ln_f.bias" => g1(model.ln_f.as_ref().unwrap().beta.as_ref().unwrap().val()),
        _ => panic!("unknown tensor {name}"),
    }
}

/// The loss over chosen positions is the plain cross-entropy over those positions.
#[test]
fn loss_at_positions_is_the_mean_over_them() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let device = Backend::Flex.device();
    device.seed(5);
    let model = tiny_config(11).init(&device);
    let ids: Vec<i64> = vec![1, 2, 3, 4, 5, 6, 7, 8];
    let x = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 4]), &device);
    let (rows, targets) = (vec![1, 2, 6], vec![3, 9, 0]);
    let got = lm_loss_at(
        &model,
        x.clone(),
        ids_1d(&rows, &device),
        ids_1d(&targets, &device),
    );
    let logits = model.forward(x).reshape([8, 11]);
    let logits = logits.to_data().try_to_vec::<f32>().unwrap();
    let mut want = 0.0;
    for (&r, &y) in rows.iter().zip(&targets) {
        let row = &logits[r * 11..(r + 1) * 11];
        let m = row.iter().cloned().fold(f32::MIN, f32::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
        want += lse - row[y];
    }
    want /= 3.0;
    let got = got.into_scalar::<f32>();
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn instruction_records_split_prompt_and_bad_input() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let path = support::instruction_data();
    let records = load_records(&path).unwrap();
    assert_eq!(records.len(), 1100);
    let (train, test, val) = split(&records);
    assert_eq!((train.len(), test.len(), val.len()), (935, 110, 55));
    let with_input = records.iter().find(|r| !r.input.is_empty()).unwrap();
    let p = prompt(with_input);
    assert!(p.starts_with("Below is an instruction that describes a task."));
    assert!(
        p.contains("\n\n### Input:\n") && p.ends_with("\n\n### Response:\n"),
        "{p}"
    );
    let without = records.iter().find(|r| r.input.is_empty()).unwrap();
    assert!(!prompt(without).contains("### Input"));

    let dir = support::tempdir();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let err = load_records(&write("bad.json", "[{\"instruction\": ")).unwrap_err();
    assert!(format!("{err}").contains("is not a list of"), "{err}");
    let one = "{\"instruction\": \"x\", \"input\": \"\"}";
    let many = format!("[{}]", vec![one; 30].join(","));
    let err = load_records(&write("no-output.json", &many)).unwrap_err();
    assert!(format!("{err}").contains("missing field `output`"), "{err}");
    assert!(!format!("{err}").contains('\n'), "one line: {err}");

    let tok = course::ch07_bpe::gpt2().unwrap();
    let long = Record {
        instruction: "word ".repeat(200),
        input: String::new(),
        output: "ok".into(),
    };
    let err = encode(
        &course::ch08_pretrained::tokenizer::Tokenizer::Bpe(tok),
        &long,
        64,
    );
    assert!(format!("{}", err.unwrap_err()).contains("the model reads at most 64"));
}

/// A chapter 4 `tiny` model, trained briefly on characters or on a small BPE of chapter 7's
/// (block 256, so that the Alpaca prompt fits), shared by the tests below.
fn trained_checkpoint(bpe: bool) -> &'static Path {
    static CHAR: OnceLock<PathBuf> = OnceLock::new();
    static BPE: OnceLock<PathBuf> = OnceLock::new();
    let cell = if bpe { &BPE } else { &CHAR };
    cell.get_or_init(|| {
        let name = if bpe { "ch09-bpe" } else { "ch09-char" };
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = support::corpus_path().to_string_lossy().into_owned();
        let mut args = vec!["--preset", "tiny", "--data", &corpus, "--steps", "40"];
        args.extend([
            "--eval-interval",
            "20",
            "--eval-iters",
            "2",
            "--sample-chars",
            "1",
        ]);
        let out = dir.to_str().unwrap().to_string();
        args.extend(["--out", &out]);
        let tokenizer = dir.join("bpe-300.txt").to_str().unwrap().to_string();
        if bpe {
            let text = support::corpus();
            let sample: String = text.chars().take(50_000).collect();
            let (tok, _) = course::ch07_bpe::train(
                &sample,
                300,
                course::ch07_bpe::GPT2_PATTERN,
                vec![course::ch07_bpe::END_OF_TEXT.into()],
            )
            .unwrap();
            tok.save(Path::new(&tokenizer)).unwrap();
            args.extend(["--tokenizer", &tokenizer, "--block-size", "256"]);
        }
        let (code, _, err) = support::run_bin(env!("CARGO_BIN_EXE_ch04_pretrain"), &args, &[]);
        assert_eq!(code, 0, "{err}");
        dir.join("ckpt/best")
    })
}

/// The notebook's classification part on a small budget: every method it ran is in the
/// table with a trainable count, and LoRA merged scores as unmerged.
#[test]
fn the_notebook_fine_tunes_and_writes_its_table() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let out = support::tempdir();
    let corpus = support::corpus_path().to_string_lossy().into_owned();
    let ckpt = trained_checkpoint(false).to_str().unwrap().to_string();
    let o = out.path().to_str().unwrap();
    let args = [
        "--part",
        "classify",
        "--checkpoint",
        &ckpt,
        "--data",
        &corpus,
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--seeds",
        "2",
        "--methods",
        "full,last-block,lora",
        "--out",
        o,
    ];
    let (code, stdout, err) = support::run_bin(BIN, &args, &[]);
    assert_eq!(code, 0, "{stdout}\n{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("classify.json")).unwrap())
            .unwrap();
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        let accs = r["accuracies"].as_array().unwrap();
        assert_eq!(accs.len(), 2);
        assert!(
            accs.iter()
                .all(|a| (0.0..=1.0).contains(&a.as_f64().unwrap())),
            "{r}"
        );
        let (trainable, total) = (
            r["trainable"].as_u64().unwrap(),
            r["total"].as_u64().unwrap(),
        );
        assert!(trainable > 0 && trainable <= total, "{r}");
    }
    let diff = json["lora_merge_max_diff"].as_f64().unwrap();
    assert!(diff < 1e-5, "{diff}");
    let table = std::fs::read_to_string(out.path().join("classify.md")).unwrap();
    assert!(
        table.contains("| LoRA + head |") && table.contains("most frequent"),
        "{table}"
    );
    // The default task has two classes: the zero-shot row is there, an accuracy.
    assert_eq!(json["task"], "spelling");
    let zero_shot = json["zero_shot"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&zero_shot), "{zero_shot}");
    assert!(table.contains("zero-shot heuristic"), "{table}");
    assert!(out.path().join("finetune_test_losses.svg").exists());
}

/// Instruction tuning of a BPE checkpoint of chapter 4 (the path taken without GPT-2's
/// weights): the losses are finite, and the test split's answers are written.
#[test]
fn the_notebook_instruction_tunes_a_bpe_checkpoint() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let out = support::tempdir();
    let corpus = support::corpus_path().to_string_lossy().into_owned();
    let ckpt = trained_checkpoint(true).to_str().unwrap().to_string();
    let data = support::instruction_data().to_string_lossy().into_owned();
    let o = out.path().to_str().unwrap();
    let args = [
        "--part",
        "instruct",
        "--instruct-checkpoint",
        &ckpt,
        "--instructions",
        &data,
        "--data",
        &corpus,
        "--instruct-steps",
        "3",
        "--instruct-batch-size",
        "2",
        "--responses",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        o,
    ];
    let (code, stdout, err) = support::run_bin(BIN, &args, &[]);
    assert_eq!(code, 0, "{stdout}\n{err}");
    let answers: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("responses.json")).unwrap())
            .unwrap();
    let answers = answers.as_array().unwrap();
    assert!(!answers.is_empty() && answers.len() <= 2);
    assert!(answers[0]["model_response"].is_string() && answers[0]["output"].is_string());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("instruct.json")).unwrap())
            .unwrap();
    let val = report["report"]["val"].as_array().unwrap();
    assert!(
        val.iter()
            .all(|p| p[1].as_f64().is_some_and(f64::is_finite)),
        "{report}"
    );
}

/// Bad input: one line on stderr, exit 1, and no result file written.
#[test]
fn the_notebook_refuses_bad_input_in_one_line() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    let dir = support::tempdir();
    let corpus = support::corpus_path().to_string_lossy().into_owned();
    let char_ckpt = trained_checkpoint(false).to_str().unwrap().to_string();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "[{\"instruction\": \"x\"").unwrap();
    let bad = bad.to_str().unwrap().to_string();
    let data = support::instruction_data().to_string_lossy().into_owned();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--checkpoint", "/nonexistent/ckpt"],
            "no checkpoint at",
        ),
        (vec!["--seeds", "0"], "at least 1"),
        (
            vec!["--part", "instruct", "--instructions", &bad],
            "is not a list of",
        ),
        (
            vec![
                "--part",
                "instruct",
                "--instruct-checkpoint",
                &char_ckpt,
                "--instructions",
                &data,
            ],
            "needs a byte-level BPE",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["--data", &corpus, "--out", o];
        args.extend(extra);
        let (code, stdout, err) = support::run_bin(BIN, &args, &[]);
        assert_eq!(code, 1, "{args:?}: {stdout}\n{err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        for file in ["classify.json", "responses.json", "instruct.json"] {
            assert!(!out.join(file).exists(), "{args:?} wrote {file}");
        }
    }
}

/// Fine-tuning learns: on passages whose class is their first token's parity (so the head,
/// which reads the last token, must attend back to the start), a tiny model from scratch
/// gets the held-out passages right, and its test loss falls from chance.
#[test]
fn fine_tuning_learns_a_task_that_needs_attention_to_the_start() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    use course::ch09_finetune::classify::{accuracy, task_loss};
    use rand::{RngExt, SeedableRng};
    let device = Backend::Flex.device().autodiff();
    // Other tests may reseed Burn's generator meanwhile: the bounds below hold for any start.
    device.seed(5);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut passage = |_| {
        let ids: Vec<usize> = (0..6).map(|_| rng.random_range(0..10)).collect();
        let label = ids[0] % 2;
        let mut ids = [vec![11], ids, vec![12]].concat(); // <start> ... <extract>
        ids.truncate(8);
        Encoded { ids, label }
    };
    let train: Vec<Encoded> = (0..200).map(&mut passage).collect();
    let test: Vec<Encoded> = (0..100).map(&mut passage).collect();
    let config = tiny_config(11);
    let model = Method::Scratch.prepare(
        &config.init(&device),
        &config,
        2,
        Recipe::GPT1,
        LoraSettings {
            rank: 2,
            alpha: 4.0,
        },
    );
    let settings = FineTuneSettings {
        steps: 600,
        batch_size: 16,
        lr: 1e-2,
        weight_decay: 0.01,
        seed: 1,
        recipe: Recipe {
            transform: true,
            aux_weight: 0.0,
        },
        eval_every: 200,
    };
    let (trained, report) = fine_tune(model, &train, &test, &settings).unwrap();
    let acc = accuracy(&trained, &test);
    let losses = &report.test_losses;
    assert_eq!(
        losses.iter().map(|l| l.0).collect::<Vec<_>>(),
        [0, 200, 400, 600]
    );
    assert!((losses[0].1 - 2f64.ln()).abs() < 0.2, "{losses:?}");
    assert!(losses[3].1 < 0.2, "{losses:?}");
    assert_eq!(losses[3].1, task_loss(&trained, &test));
    assert!(acc > 0.95, "test accuracy {acc}");
}

/// The two corrupted tasks: every other held-out line of 6+ words is broken, the rest are
/// verbatim; a broken line is its original with the inner words shuffled (keeping the first and
/// last), or with the inner letters of its words of 5+ letters shuffled (keeping theirs); the
/// classes are balanced in both splits.
#[test]
fn the_corrupted_tasks_break_every_other_held_out_line_and_nothing_else() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    use course::ch09_finetune::task::{Corruption, corrupted_task};
    let text = support::corpus();
    let (_, held_out) = split_text(&text);
    let originals: Vec<Vec<&str>> = (held_out.lines())
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() >= 6)
        .collect();
    let sorted = |s: &str| {
        let mut c: Vec<char> = s.chars().collect();
        c.sort();
        c
    };
    for corruption in [Corruption::WordOrder, Corruption::Spelling] {
        let task = corrupted_task(&text, corruption, 5).unwrap();
        assert_eq!(task.classes, ["broken", "as written"]);
        for split in [&task.train, &task.test] {
            let c = task.counts(split);
            assert!(c[0].abs_diff(c[1]) <= 1, "{corruption:?}: {c:?}");
        }
        assert!(task.test.len() > 300 && task.train.len() > 4 * task.test.len() - 8);
        let mut broken = 0;
        for e in task.train.iter().chain(&task.test) {
            let words: Vec<&str> = e.text.split_whitespace().collect();
            let verbatim = originals.contains(&words);
            assert_eq!(verbatim, e.label == 1, "{corruption:?}: {:?}", e.text);
            if e.label == 1 {
                continue;
            }
            // Its original: a held-out line that the corruption turns into this one.
            let from = |o: &&Vec<&str>| {
                o.len() == words.len()
                    && match corruption {
                        Corruption::WordOrder => {
                            let (first, last) = (o[0] == words[0], o.last() == words.last());
                            let (mut a, mut b) = ((*o).clone(), words.clone());
                            a.sort();
                            b.sort();
                            first && last && a == b
                        }
                        Corruption::Spelling => o.iter().zip(&words).all(|(x, y)| {
                            x == y
                                || (x.len() >= 5
                                    && x.chars().all(|c| c.is_ascii_alphabetic())
                                    && x[..1] == y[..1]
                                    && x[x.len() - 1..] == y[y.len() - 1..]
                                    && sorted(x) == sorted(y))
                        }),
                    }
            };
            assert!(
                originals.iter().any(|o| from(&o)),
                "{corruption:?}: no original for {:?}",
                e.text
            );
            broken += 1;
        }
        assert!(broken > 500, "{corruption:?}: {broken}");
    }
}

/// GPT-1's zero-shot heuristic: a passage's score is minus chapter 4's loss on it, and the
/// threshold is the training split's best cut.
#[test]
fn zero_shot_scores_are_the_language_model_loss_and_the_cut_is_the_best_on_training() {
    let _rng = support::rng_lock(); // this test seeds or draws from Burn's generator
    use course::ch09_finetune::classify::{lm_scores, threshold_accuracy};
    use course::ch09_finetune::task::Example;
    use course::common::tokenizer::CharTokenizer;
    let tok = CharTokenizer::from_text("abcdefgh ");
    let device = Backend::Flex.device();
    device.seed(2);
    let gpt = tiny_config(9).init(&device);
    let passages = ["abc defg", "hhh", "gfedcba abc"];
    let examples: Vec<Example> = (passages.iter())
        .map(|t| Example {
            text: t.to_string(),
            label: 0,
        })
        .collect();
    let scores = lm_scores(&gpt, &tok, &examples).unwrap();
    for (p, s) in passages.iter().zip(&scores) {
        let ids: Vec<i64> = tok.encode(p).unwrap().iter().map(|&i| i as i64).collect();
        let n = ids.len() - 1;
        let idx = Tensor::<2, Int>::from_data(TensorData::new(ids[..n].to_vec(), [1, n]), &device);
        let tgt = Tensor::<2, Int>::from_data(TensorData::new(ids[1..].to_vec(), [1, n]), &device);
        let loss = gpt.loss(idx, tgt).into_scalar::<f32>() as f64;
        assert!((s + loss).abs() < 1e-5, "{s} vs -{loss}");
    }
    let ex = |labels: &[usize]| -> Vec<Example> {
        (labels.iter())
            .map(|&label| Example {
                text: String::new(),
                label,
            })
            .collect()
    };
    let (train, test) = (ex(&[0, 0, 1, 1]), ex(&[0, 1, 0]));
    let (cut, acc) =
        threshold_accuracy((&[0.1, 0.2, 0.8, 0.9], &train), (&[0.15, 0.85, 0.3], &test));
    assert_eq!(cut, 0.2);
    assert!((acc - 2.0 / 3.0).abs() < 1e-12, "{acc}");
    // A NaN score is never above the cut: it counts as class 0, and cannot be the cut.
    let (cut, _) = threshold_accuracy((&[f64::NAN, 0.2, 0.8], &ex(&[1, 0, 1])), (&[], &[]));
    assert_eq!(cut, 0.2);
}
