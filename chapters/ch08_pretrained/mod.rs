//! Chapter 8: OpenAI's GPT-2 (and GPT-1) in the course's own decoder. Hugging Face's
//! `model.safetensors` is read by Burn's store into chapter 3's `Gpt`, with only what the
//! checkpoint needs switched on: biases, the tied head, the tanh form of GELU, and pre-LN for
//! GPT-2 or post-LN for GPT-1.

use crate::ch03_gpt::{Gpt, GptConfig, Norm};
use crate::common::data::{Remote, download_remote, sha256_of};
use crate::common::train::{LanguageModel, model_device};
use anyhow::{Context, Result, anyhow, bail};
use burn::prelude::*;
use burn::store::{ModuleSnapshot, ModuleStore, SafetensorsStore};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub mod gpt1_bpe;
pub mod tokenizer;

// ANCHOR: names
/// GPT-2's tensor names, made the course's (patterns applied in order). nanoGPT named its
/// layers after GPT-2's, and this course after nanoGPT's, so only two things differ: the
/// blocks are `h.N` there and `blocks.N` here, and a LayerNorm's `weight`/`bias` are Burn's
/// `gamma`/`beta`. GPT-1's file calls its embeddings `tokens_embed` and `positions_embed`.
/// OpenAI's `Conv1D` stores its weight as `[in, out]`, as Burn's `Linear` does: nothing is
/// transposed.
pub const RENAMES: [(&str, &str); 6] = [
    (r"^transformer\.", ""), // a file saved from the LM-head model rather than the base one
    (r"^h\.(\d+)\.", "blocks.$1."),
    (r"(ln_1|ln_2|ln_f)\.weight$", "$1.gamma"),
    (r"(ln_1|ln_2|ln_f)\.bias$", "$1.beta"),
    (r"^tokens_embed\.", "wte."),    // GPT-1
    (r"^positions_embed\.", "wpe."), // GPT-1
];

/// Burn's store for a GPT-2 file, renaming as it reads.
pub fn openai_store(path: &Path) -> SafetensorsStore {
    (RENAMES.iter()).fold(SafetensorsStore::from_file(path), |store, (from, to)| {
        store.with_key_remapping(from, *to)
    })
}

/// The course's name for one of GPT-2's tensors (what `openai_store` does to each).
pub fn course_name(gpt2_name: &str) -> String {
    RENAMES
        .iter()
        .fold(gpt2_name.to_string(), |name, (from, to)| {
            let re = fancy_regex::Regex::new(from).expect("a valid pattern");
            re.replace(&name, *to).into_owned()
        })
}
// ANCHOR_END: names

// ANCHOR: config
/// The model's shape, read from the file: vocabulary and width from `wte`, positions from
/// `wpe`, layers from the block numbers. The number of heads is not in the file: `n_head`,
/// else the `config.json` beside it, else 64 dimensions per head, as in every published size.
/// A final LayerNorm exists only in a pre-LN model: with `ln_f`, GPT-2 (pre-LN); without,
/// GPT-1 (post-LN). Both were trained with GELU's tanh form (OpenAI's code for each).
pub fn openai_config(store: &mut SafetensorsStore, n_head: Option<usize>) -> Result<GptConfig> {
    let tensors = store.get_all_tensors().map_err(|e| anyhow!("{e}"))?;
    let dims = |name: &str| match tensors.get(name).map(|t| t.shape.as_slice()) {
        Some(&[rows, cols]) => Ok((rows, cols)),
        Some(other) => bail!("tensor {name} has shape {other:?}, not [rows, width]"),
        None => bail!("the file has no tensor {name}: is it a GPT-2 or GPT-1 checkpoint?"),
    };
    let ((vocab, c), (positions, c_pos)) = (dims("wte.weight")?, dims("wpe.weight")?);
    if c != c_pos {
        bail!("wte.weight is {c} wide but wpe.weight {c_pos}");
    }
    let n_layer = (tensors.keys())
        .filter_map(|k| {
            k.strip_prefix("blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |last| last + 1);
    let gpt2 = tensors.contains_key("ln_f.gamma");
    let config = GptConfig::new(vocab, positions, n_layer, n_head.unwrap_or(c / 64), c)
        .with_bias(true)
        .with_norm(if gpt2 { Norm::Pre } else { Norm::Post })
        .with_tie_weights(true)
        .with_gelu_tanh(true);
    config.validate()?;
    Ok(config)
}
// ANCHOR_END: config

/// `n_head` from the Hugging Face `config.json` next to `weights`, if there is one.
pub fn n_head_beside(weights: &Path) -> Result<Option<usize>> {
    let path = weights.with_file_name("config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(json["n_head"].as_u64().map(|n| n as usize))
}

// ANCHOR: load
/// GPT-2 or GPT-1 from a `model.safetensors` file, on `device`. A tensor the model needs that the
/// file lacks, or one of another shape, is an error naming it; tensors the model does not
/// use (the causal masks `h.N.attn.bias` older files carry) are left alone.
pub fn load_openai(
    path: &Path,
    n_head: Option<usize>,
    device: &Device,
) -> Result<(Gpt, GptConfig)> {
    if !path.is_file() {
        bail!("no weights file at {}", path.display());
    }
    let mut store = openai_store(path);
    let n_head = match n_head {
        Some(n) => Some(n),
        None => n_head_beside(path)?,
    };
    let config = openai_config(&mut store, n_head).with_context(|| {
        format!(
            "{} does not hold GPT-2's or GPT-1's weights",
            path.display()
        )
    })?;
    let mut model = config.clone().init(device);
    // Partial: the store then reports what is missing instead of failing with advice for
    // developers; the check below turns it into advice for the user.
    let mut store = store.allow_partial(true);
    let result = (model.load_from(&mut store))
        .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
    if !result.missing.is_empty() || !result.errors.is_empty() {
        let missing = result.missing.iter().map(|(name, _)| name.as_str());
        bail!(
            "{} is not a complete GPT-2 or GPT-1 checkpoint: missing tensors [{}]; errors {:?}. \
             Download the model again (delete the file to fetch it anew), or pass --weights \
             with an intact model.safetensors",
            path.display(),
            missing.collect::<Vec<_>>().join(", "),
            result.errors
        );
    }
    runs_on_device(&model, path)?;
    Ok((model, config))
}
// ANCHOR_END: load

/// One token through the model, read back: a device that cannot hold a tensor this large
/// says so here, as an error, rather than later as a panic in the middle of generation.
fn runs_on_device(model: &Gpt, path: &Path) -> Result<()> {
    let token = Tensor::<2, Int>::zeros([1, 1], &model_device(model));
    match model.forward(token).try_into_data() {
        Ok(_) => Ok(()),
        Err(_) => bail!(
            "the device failed to run {}. A software Vulkan driver (lavapipe) binds at most \
             128 MiB per buffer, less than GPT-2's token embedding (154 MB): use a GPU, or \
             --backend flex",
            path.display()
        ),
    }
}

// ANCHOR: download
/// One of OpenAI's models as Hugging Face publishes it (`openai-community/NAME`): the file's
/// SHA-256 pinned at one revision of the repository (the Git LFS id, which HF shows).
#[derive(Clone, Copy, Debug)]
pub struct Published {
    pub name: &'static str,
    pub revision: &'static str,
    pub sha256: &'static str,
    /// Exact bytes where known; HF's page gives the others rounded (`shown`).
    pub size: Option<u64>,
    pub shown: &'static str,
}

/// The sizes this chapter downloads (`--model`). GPT-2 124M's pin is the one nanoGPT-style
/// projects check; the others' SHA-256 and revisions are those HF lists for the files.
pub const PUBLISHED: [Published; 5] = [
    Published {
        name: "gpt2",
        revision: "607a30d783dfa663caf39e06633721c8d4cfcd7e",
        sha256: "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
        size: Some(548_105_171),
        shown: "548 MB",
    },
    Published {
        name: "gpt2-medium",
        revision: "6dcaa7a952f72f9298047fd5137cd6e4f05f41da",
        sha256: "fc5a354a19255ad494f3d71549390baca1ccf61d1d822b9408971705c687c9cd",
        size: Some(1_519_984_962),
        shown: "1.52 GB",
    },
    Published {
        name: "gpt2-large",
        revision: "32b71b12589c2f8d625668d2335a01cac3249519",
        sha256: "5f47f3e12f91cd33b662ce7e433b6150ad5512b5884a2cee961b50e9c3bbebce",
        size: Some(3_247_159_078),
        shown: "3.25 GB",
    },
    Published {
        name: "gpt2-xl",
        revision: "15ea56dee5df4983c59b2538573817e1667135e2",
        sha256: "0f8b28eb05a8075f48b61b6f35332978c74fc7763fa9fb4051a1c30511736a6a",
        size: None,
        shown: "6.43 GB",
    },
    Published {
        name: "openai-gpt",
        revision: "adacbec1426c790163037629ab537b20464a8f71",
        sha256: "25c82cdf1844d2d93e9120b3b628fc6c2b4fcc7801a1297f58465ba67d45deb3",
        size: None,
        shown: "479 MB",
    },
];

/// The published model called `name`, or an error listing them.
pub fn published(name: &str) -> Result<Published> {
    match PUBLISHED.iter().find(|p| p.name == name) {
        Some(p) => Ok(*p),
        None => {
            let names: Vec<_> = PUBLISHED.iter().map(|p| p.name).collect();
            bail!(
                "unknown --model {name:?}: choose one of {}",
                names.join(", ")
            )
        }
    }
}

/// Where a model's file is downloaded from (`GPT2_WEIGHTS_URL` replaces it, e.g. a mirror).
pub fn weights_url(p: &Published) -> String {
    std::env::var("GPT2_WEIGHTS_URL").unwrap_or_else(|_| {
        format!(
            "https://huggingface.co/openai-community/{}/resolve/{}/model.safetensors",
            p.name, p.revision
        )
    })
}

/// Where downloads are kept: `$GPT_CACHE`, else `$XDG_CACHE_HOME/gpt-from-scratch`, else
/// `~/.cache/gpt-from-scratch`.
pub fn cache_dir() -> PathBuf {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("GPT_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("gpt-from-scratch")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/gpt-from-scratch")))
        .unwrap_or_else(|| PathBuf::from(".cache/gpt-from-scratch"))
}

/// Hugging Face's cache, where its `huggingface_hub` library (and so `transformers`) keeps
/// downloads: `$HF_HUB_CACHE` (or the older `$HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`,
/// else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_cache_root() -> Option<PathBuf> {
    hf_cache_root_from(|name| std::env::var_os(name))
}

/// `hf_cache_root` with the variables read through `var` (tests pass their own).
pub fn hf_cache_root_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let env = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("HF_HUB_CACHE")
        .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| env("HF_HOME").map(|d| d.join("hub")))
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("huggingface/hub")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/huggingface/hub")))
}

/// A `model.safetensors` with SHA-256 `sha256` in any snapshot of `repo` (such as
/// `openai-community/gpt2`) in the Hugging Face cache at `root`, used where it lies: a model
/// `transformers` downloaded already is not downloaded again. Every snapshot is looked at,
/// not only the one `refs/main` names, as the pinned revision need not be the newest.
pub fn find_in_hf_cache(root: &Path, repo: &str, sha256: &str) -> Option<PathBuf> {
    let repo_dir = root.join(format!("models--{}", repo.replace('/', "--")));
    let mut files: Vec<PathBuf> = (std::fs::read_dir(repo_dir.join("snapshots")).ok()?)
        .flatten()
        .map(|snapshot| snapshot.path().join("model.safetensors"))
        .filter(|file| file.is_file())
        .collect();
    files.sort(); // the same choice on every run
    files.into_iter().find(|file| has_sha256(file, sha256))
}

/// Whether `file` has SHA-256 `sha256`. HF links a snapshot's file to `blobs/<its SHA-256>`:
/// a link to another hash is refused unread; any other file is hashed (a few seconds).
fn has_sha256(file: &Path, sha256: &str) -> bool {
    let target = std::fs::canonicalize(file).ok();
    let name = (target.as_deref())
        .and_then(Path::file_name)
        .and_then(|n| n.to_str());
    let is_hash = |n: &str| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit());
    if name.is_some_and(|n| is_hash(n) && !n.eq_ignore_ascii_case(sha256)) {
        return false;
    }
    sha256_of(file).is_ok_and(|got| got.eq_ignore_ascii_case(sha256))
}

/// The published `model`'s file in Hugging Face's cache, under the repository's name today
/// (`openai-community/NAME`) or its older one (`NAME`), if it has the pinned SHA-256.
pub fn hf_cached(model: &Published) -> Option<PathBuf> {
    let root = hf_cache_root()?;
    let repos = [
        format!("openai-community/{}", model.name),
        model.name.to_string(),
    ];
    (repos.iter()).find_map(|repo| find_in_hf_cache(&root, repo, model.sha256))
}

/// `weights` (`--weights FILE`), else `$GPT2_WEIGHTS`, else the published `model`'s file in
/// the cache folder, else the same file in Hugging Face's cache, else a download into the
/// cache folder (an interrupted download resumes).
pub fn pretrained_weights(weights: Option<&Path>, model: &Published) -> Result<PathBuf> {
    let env = std::env::var_os("GPT2_WEIGHTS").filter(|p| !p.is_empty());
    if let Some(path) = weights.map(Path::to_path_buf).or(env.map(PathBuf::from)) {
        return Ok(path);
    }
    let path = cache_dir().join(format!(
        "{}-{}/model.safetensors",
        model.name, model.revision
    ));
    if path.exists() {
        return Ok(path);
    }
    if let Some(found) = hf_cached(model) {
        eprintln!(
            "{}'s weights from Hugging Face's cache: {}",
            model.name,
            found.display()
        );
        return Ok(found);
    }
    let url = weights_url(model);
    let hint = format!(
        "No network? Download model.safetensors for {} elsewhere and pass --weights FILE \
         (or set GPT2_WEIGHTS).",
        model.name
    );
    let remote = Remote {
        url: &url,
        sha256: model.sha256,
        size: model.size,
        offline_hint: &hint,
    };
    eprintln!(
        "{}'s weights ({}) into {}",
        model.name,
        model.shown,
        path.display()
    );
    download_remote(&remote, &path)?;
    Ok(path)
}

/// GPT-1's tokenizer files as OpenAI published them with its code (the same bytes as HF's
/// `vocab.json` and `merges.txt`): `(name here, file there, size, SHA-256)`.
const GPT1_TOKENIZER: [(&str, &str, u64, &str); 2] = [
    (
        "vocab.json",
        "encoder_bpe_40000.json",
        815_973,
        "fdf49b19e7de236852091da09b84a7a3cd5e7b0e79916376cf45f6b8127b8078",
    ),
    (
        "merges.txt",
        "vocab_40000.bpe",
        458_495,
        "0ea9b51ae695073cd871e0358f7016311d671a7ff3963e367d5236522f294725",
    ),
];
const GPT1_CODE: &str = "https://raw.githubusercontent.com/openai/finetune-transformer-lm/\
                         a69b5c43b0452462890bca8ff92fb75dee9290cf/model";

/// The folder holding GPT-1's `vocab.json` and `merges.txt`, downloaded on first use (1.3 MB).
pub fn gpt1_tokenizer_dir() -> Result<PathBuf> {
    let dir = cache_dir().join("openai-gpt-tokenizer");
    for (name, there, size, sha256) in GPT1_TOKENIZER {
        let path = dir.join(name);
        if !path.exists() {
            let url = format!("{GPT1_CODE}/{there}");
            let hint = "No network? Put openai-gpt's vocab.json and merges.txt in a folder and \
                        pass --tokenizer DIR.";
            let remote = Remote {
                url: &url,
                sha256,
                size: Some(size),
                offline_hint: hint,
            };
            download_remote(&remote, &path)?;
        }
    }
    Ok(dir)
}
// ANCHOR_END: download
