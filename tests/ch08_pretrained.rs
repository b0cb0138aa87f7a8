//! Chapter 8: GPT-2's weights in the course's decoder give the logits Hugging Face's
//! `transformers` gives (fixtures made by `tests/fixtures/ch08/make_fixtures.py`).

mod support;

use course::ch03_gpt::Kernels;
use course::ch03_gpt::Norm;
use course::ch05_fast::FUSED;
use course::ch08_pretrained::gpt1_bpe::Gpt1Bpe;
use course::ch08_pretrained::tokenizer::Tokenizer;
use course::ch08_pretrained::{find_in_hf_cache, hf_cache_root_from, load_openai};
use course::common::backend::Backend;
use course::common::dataset::ids_tensor;
use course::common::max_diff;
use course::common::train::LanguageModel;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ch08")
        .join(name)
}

/// The reference input ids `[2, 16]` of fixture `model` and transformers' logits for them,
/// flattened.
fn reference(model: &str) -> (Vec<i64>, [usize; 2], Vec<f32>) {
    let bytes = std::fs::read(fixture(&format!("{model}/reference.safetensors"))).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let ids = file.tensor("ids").unwrap();
    let shape = [ids.shape()[0], ids.shape()[1]];
    let ids = (ids.data().chunks_exact(8))
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let logits = file.tensor("logits").unwrap();
    let logits = (logits.data().chunks_exact(4))
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (ids, shape, logits)
}

/// GPT-2 (pre-LN) and GPT-1 (post-LN, other embedding names), each against the logits
/// `transformers` computed, on every backend.
#[test]
fn openai_weights_give_transformers_logits_on_every_backend() {
    let mut devices = vec![
        ("ndarray", support::ndarray_device(), Kernels::BURN),
        ("flex", Backend::Flex.device(), Kernels::BURN),
        ("flex fused", Backend::Flex.device(), FUSED),
    ];
    if let Some(wgpu) = support::wgpu_device() {
        devices.push(("wgpu", wgpu, Kernels::BURN));
    }
    for (fixture_name, norm) in [("gpt2-tiny", Norm::Pre), ("gpt1-tiny", Norm::Post)] {
        let (ids, shape, expected) = reference(fixture_name);
        let weights = fixture(&format!("{fixture_name}/model.safetensors"));
        for (name, device, kernels) in &devices {
            let (model, config) = load_openai(&weights, None, device).unwrap();
            assert_eq!(config.norm, norm, "{fixture_name}");
            let model = model.with_kernels(*kernels);
            let logits = model.forward(ids_tensor(ids.clone(), shape, device)); // [2, 16, 1000]
            assert_eq!(logits.dims(), [2, 16, 1000]);
            let logits = logits.into_data().try_to_vec::<f32>().unwrap();
            let diff = max_diff(&logits, &expected);
            assert!(
                diff < 1e-4,
                "{fixture_name} on {name}: logits differ by {diff}"
            );
        }
    }
}

/// The fixture's tensors with `edit` applied, written to a new file.
fn edited(dir: &Path, edit: impl Fn(&str, &[usize]) -> Option<Vec<usize>>) -> PathBuf {
    let bytes = std::fs::read(fixture("gpt2-tiny/model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in file.tensors() {
        if let Some(shape) = edit(&name, view.shape()) {
            let n: usize = shape.iter().product();
            kept.push((name, shape, view.data()[..n * 4].to_vec()));
        }
    }
    let views: Vec<(String, TensorView)> = (kept.iter())
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), data).unwrap();
            (name.clone(), view)
        })
        .collect();
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

#[test]
fn a_missing_or_misshapen_tensor_is_an_error_naming_it() {
    let dir = support::tempdir();
    let device = support::ndarray_device();
    let load = |path: &Path| load_openai(path, Some(4), &device).map(|_| ()).unwrap_err();

    let missing = edited(dir.path(), |name, shape| {
        (name != "h.1.mlp.c_fc.bias").then(|| shape.to_vec())
    });
    let err = format!("{:#}", load(&missing));
    assert!(err.contains("blocks.1.mlp.c_fc.bias"), "{err}");
    // Advice for the user, not Burn's for developers (`.allow_partial(true)`).
    assert!(err.contains("Download the model again"), "{err}");
    assert!(
        !err.contains("allow_partial") && !err.contains('\n'),
        "{err}"
    );

    let misshapen = edited(dir.path(), |name, shape| match name {
        "h.0.attn.c_proj.weight" => Some(vec![shape[0], shape[1] - 1]),
        _ => Some(shape.to_vec()),
    });
    let err = format!("{:#}", load(&misshapen));
    assert!(err.contains("blocks.0.attn.c_proj.weight"), "{err}");

    let no_wte = edited(dir.path(), |name, shape| {
        (name != "wte.weight").then(|| shape.to_vec())
    });
    let err = format!("{:#}", load(&no_wte));
    assert!(err.contains("no tensor wte.weight"), "{err}");

    let err = format!("{:#}", load(&dir.path().join("absent.safetensors")));
    assert!(err.contains("no weights file"), "{err}");
}

#[test]
fn cached_generation_of_gpt2_matches_recomputing() {
    use course::ch06_generate::{Generation, Window, generate};
    use course::common::sample::SampleOptions;
    let device = Backend::Flex.device();
    let (model, _) = load_openai(&fixture("gpt2-tiny/model.safetensors"), None, &device).unwrap();
    let greedy = |cached| Generation {
        opts: SampleOptions {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        },
        window: Window::Slide,
        cached,
        fixed_shape: false,
    };
    let mut rng = course::common::dataset::rng_for(1, 2, 3);
    let prompt = [5, 17, 923];
    let with = generate(&model, &prompt, 1, 80, greedy(true), &mut rng, |_, _| {});
    let without = generate(&model, &prompt, 1, 80, greedy(false), &mut rng, |_, _| {});
    assert_eq!(with, without, "past the 64 positions too");
}

/// GPT-1's tokenizer (cut to its first 500 merges) gives the ids transformers'
/// `OpenAIGPTTokenizer` gives, on texts that exercise every normalising and splitting rule.
#[test]
fn gpt1_tokenizer_matches_transformers() {
    let dir = fixture("gpt1-tiny/tokenizer");
    let bpe = Gpt1Bpe::from_files(&dir).unwrap();
    assert_eq!(bpe.vocab_size(), 977);
    let cases = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&cases).unwrap();
    let tokenizer = Tokenizer::Gpt1(bpe.clone());
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<usize> = (case["ids"].as_array().unwrap().iter())
            .map(|id| id.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(bpe.encode(text), ids, "{text:?}");
        let decoded = tokenizer.decode(&ids);
        assert_eq!(
            decoded.trim_end(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
    // A checkpoint stores it whole and reads it back.
    let saved = serde_json::to_string(&tokenizer).unwrap();
    let back: Tokenizer = serde_json::from_str(&saved).unwrap();
    assert!(back.same_as(&tokenizer));
    let err = Gpt1Bpe::new("{}".into(), "#version\n".into()).unwrap_err();
    assert!(err.to_string().contains("<unk>"), "{err}");
}

fn notebook(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let corpus = support::corpus_path();
    let mut all = vec!["--data", corpus.to_str().unwrap()];
    all.extend(args);
    support::run_bin(env!("CARGO_BIN_EXE_ch08_pretrained"), &all, envs)
}

#[test]
fn the_notebook_runs_on_the_fixture_and_refuses_bad_input() {
    let dir = support::tempdir();
    let out = dir.path().to_str().unwrap();
    let weights = fixture("gpt2-tiny/model.safetensors");
    let weights = weights.to_str().unwrap();
    let tokenizer = fixture("gpt2-tiny/tokenizer.txt");
    let tokenizer = tokenizer.to_str().unwrap();
    let (code, stdout, err) = notebook(
        &[
            "--tokenizer",
            tokenizer,
            "--max-new-tokens",
            "10",
            "--eval-chars",
            "5000",
            "--out",
            out,
        ],
        &[("GPT2_WEIGHTS", weights)],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("h.0.ln_1.weight") && stdout.contains("blocks.0.ln_1.gamma"),
        "{stdout}"
    );
    let summary = std::fs::read_to_string(dir.path().join("summary.json")).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    let bits = summary["val_bits_per_char"].as_f64().unwrap();
    assert!(bits > 2.0 && bits < 12.0, "random weights: {bits}");

    // --bench: generation timed alone, with and without the cache, into bench.json; a
    // context longer than the model's 64 positions is refused.
    for (flags, cached) in [(vec![], true), (vec!["--no-cache"], false)] {
        let mut args = vec![
            "--tokenizer",
            tokenizer,
            "--bench",
            "--max-new-tokens",
            "20",
        ];
        args.extend(flags);
        args.extend(["--out", out]);
        let (code, _, err) = notebook(&args, &[("GPT2_WEIGHTS", weights)]);
        assert_eq!(code, 0, "{err}");
        let bench = std::fs::read_to_string(dir.path().join("bench.json")).unwrap();
        let bench: serde_json::Value = serde_json::from_str(&bench).unwrap();
        assert_eq!(bench["cached"], cached);
        assert_eq!(bench["new_tokens"], 20);
        assert!(
            bench["tokens_per_second"].as_f64().unwrap() > 0.0,
            "{bench}"
        );
    }
    let args = [
        "--tokenizer",
        tokenizer,
        "--bench",
        "--max-new-tokens",
        "100",
        "--out",
        out,
    ];
    let (code, _, err) = notebook(&args, &[("GPT2_WEIGHTS", weights)]);
    assert_ne!(code, 0);
    assert!(err.contains("within the model's 64 positions"), "{err}");

    // GPT-1: post-LN, with its own tokenizer (a folder), and without the cache.
    let gpt1 = fixture("gpt1-tiny/model.safetensors");
    let gpt1_tokenizer = fixture("gpt1-tiny/tokenizer");
    let (code, stdout, err) = notebook(
        &[
            "--weights",
            gpt1.to_str().unwrap(),
            "--tokenizer",
            gpt1_tokenizer.to_str().unwrap(),
            "--prompt",
            "ROMEO: Hello, world",
            "--max-new-tokens",
            "70",
            "--no-cache",
            "--eval-chars",
            "2000",
            "--out",
            out,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("Post-LN") && stdout.contains("without the cache"),
        "{stdout}"
    );
    let n = Gpt1Bpe::from_files(&gpt1_tokenizer)
        .unwrap()
        .encode("ROMEO: Hello, world");
    assert!(
        stdout.contains(&format!("-> {} tokens", n.len())),
        "{stdout}"
    );
    let (code, _, err) = notebook(
        &["--weights", weights, "--model", "gpt3", "--out", out],
        &[],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown --model") && err.contains("gpt2-xl"),
        "{err}"
    );

    // No --weights: the download, here from a port where nothing answers.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{dead}/model.safetensors");
    let cache = dir.path().join("cache");
    // An empty Hugging Face cache, so that a real one on this machine is not used instead.
    let hf_cache = dir.path().join("hf-cache");
    let offline = [
        ("GPT2_WEIGHTS_URL", url.as_str()),
        ("GPT_CACHE", cache.to_str().unwrap()),
        ("HF_HUB_CACHE", hf_cache.to_str().unwrap()),
    ];
    let (code, _, err) = notebook(&["--out", out], &offline);
    assert_ne!(code, 0);
    assert!(
        err.contains("could not download") && err.contains("--weights"),
        "{err}"
    );
    let files = walk(&cache);
    assert!(files.is_empty(), "nothing left in the cache: {files:?}");

    // A server that sends the wrong file: the checksum refuses it, and nothing is kept.
    let junk = support::serve_once(b"not GPT-2".to_vec());
    let (code, _, err) = notebook(
        &["--out", out],
        &[("GPT2_WEIGHTS_URL", junk.as_str()), offline[1], offline[2]],
    );
    assert_ne!(code, 0);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(walk(&cache).is_empty(), "{:?}", walk(&cache));
    let (code, _, err) = notebook(&["--weights", weights, "--out", out], &[]);
    assert_ne!(
        code, 0,
        "GPT-2's 50,257 tokens do not fit a 1,000-token model"
    );
    assert!(
        err.contains("50257 tokens but the model only 1000"),
        "{err}"
    );
    let (code, _, err) = notebook(&["--weights", "nothing.safetensors", "--out", out], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no weights file") && !err.contains("panicked"),
        "{err}"
    );
}

/// Every file under `dir` (none when it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    (entries.flatten())
        .flat_map(|e| match e.path().is_dir() {
            true => walk(&e.path()),
            false => vec![e.path()],
        })
        .collect()
}

/// Puts `bytes` in a fake Hugging Face cache at `root` as its library does: in
/// `blobs/<SHA-256>`, with `snapshots/<revision>/model.safetensors` a link to it (a copy where
/// links are not available) and `refs/main` naming `revision`. Returns the snapshot's file.
fn put_in_hf_cache(root: &Path, repo: &str, revision: &str, bytes: &[u8]) -> PathBuf {
    use sha2::{Digest, Sha256};
    let repo_dir = root.join(format!("models--{}", repo.replace('/', "--")));
    let sha256 = format!("{:x}", Sha256::digest(bytes));
    let snapshot = repo_dir.join("snapshots").join(revision);
    for dir in [
        repo_dir.join("blobs"),
        repo_dir.join("refs"),
        snapshot.clone(),
    ] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(repo_dir.join("blobs").join(&sha256), bytes).unwrap();
    std::fs::write(repo_dir.join("refs/main"), revision).unwrap();
    let file = snapshot.join("model.safetensors");
    #[cfg(unix)]
    std::os::unix::fs::symlink(format!("../../blobs/{sha256}"), &file).unwrap();
    #[cfg(not(unix))]
    std::fs::write(&file, bytes).unwrap();
    file
}

#[test]
fn a_model_in_hugging_faces_cache_is_used_only_with_the_pinned_checksum() {
    use sha2::{Digest, Sha256};
    let dir = support::tempdir();
    let root = dir.path().join("hub");
    let repo = "openai-community/gpt2";
    let weights = b"stands in for GPT-2's model.safetensors".to_vec();
    let sha256 = format!("{:x}", Sha256::digest(&weights));
    // The pinned file in an older snapshot; refs/main then names a newer one without it.
    let pinned = put_in_hf_cache(&root, repo, "1111aaaa", &weights);
    put_in_hf_cache(&root, repo, "2222bbbb", b"a later revision's file");
    assert_eq!(find_in_hf_cache(&root, repo, &sha256), Some(pinned.clone()));
    // Another checksum, another repository, or no cache at all: nothing found.
    assert_eq!(find_in_hf_cache(&root, repo, &"0".repeat(64)), None);
    assert_eq!(find_in_hf_cache(&root, "gpt2", &sha256), None);
    assert_eq!(
        find_in_hf_cache(&dir.path().join("none"), repo, &sha256),
        None
    );
    // The legacy repository name (no organisation) is a folder of its own.
    let legacy = put_in_hf_cache(&root, "gpt2", "3333cccc", &weights);
    assert_eq!(find_in_hf_cache(&root, "gpt2", &sha256), Some(legacy));
    // A blob named after the right hash but with other bytes: hashed, and refused.
    std::fs::write(&pinned, b"corrupt").unwrap(); // through the link, into the blob
    assert_eq!(find_in_hf_cache(&root, repo, &sha256), None);
}

#[test]
fn hugging_faces_cache_is_looked_for_where_its_library_puts_it() {
    let root = |vars: &[(&str, &str)]| {
        hf_cache_root_from(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).into())
        })
    };
    let hub = |p: &str| Some(PathBuf::from(p));
    assert_eq!(root(&[("HOME", "/u")]), hub("/u/.cache/huggingface/hub"));
    assert_eq!(
        root(&[("HOME", "/u"), ("XDG_CACHE_HOME", "/x")]),
        hub("/x/huggingface/hub")
    );
    assert_eq!(
        root(&[("XDG_CACHE_HOME", "/x"), ("HF_HOME", "/hf")]),
        hub("/hf/hub")
    );
    assert_eq!(
        root(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/old")]),
        hub("/old")
    );
    assert_eq!(
        root(&[("HUGGINGFACE_HUB_CACHE", "/old"), ("HF_HUB_CACHE", "/c")]),
        hub("/c")
    );
    assert_eq!(
        root(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/hf")]),
        hub("/hf/hub")
    );
    assert_eq!(root(&[]), None);
}
