//! The corpus: Tiny Shakespeare by default (downloaded once, checksum verified), or any
//! UTF-8 text given with `--data FILE` or the `GPT_DATA` environment variable.

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const TINY_SHAKESPEARE_URL: &str =
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt";
pub const TINY_SHAKESPEARE_SHA256: &str =
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed";
/// Where the download goes: `data/` beside `Cargo.toml` (git-ignored).
pub const DEFAULT_FILE: &str = "data/tinyshakespeare.txt";
/// The environment variable that points at a local corpus.
pub const ENV_DATA: &str = "GPT_DATA";

/// A text loaded into memory, with where it came from.
pub struct Corpus {
    pub text: String,
    pub path: PathBuf,
}

/// `--data FILE` wins, then `$GPT_DATA`, then the downloaded Tiny Shakespeare.
pub fn load_corpus(data: Option<&Path>) -> Result<Corpus> {
    let path = match data {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os(ENV_DATA) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => {
                let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_FILE);
                if !path.exists() {
                    download(TINY_SHAKESPEARE_URL, &path, TINY_SHAKESPEARE_SHA256)?;
                }
                path
            }
        },
    };
    let text = read_text(&path)?;
    Ok(Corpus { text, path })
}

/// Reads a whole file as UTF-8, with errors that say what is wrong and how to fix it.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| {
        format!(
            "cannot read the data file {} (pass --data FILE or set {ENV_DATA} to a UTF-8 text file)",
            path.display()
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "the data file {} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.is_empty() {
        bail!("the data file {} is empty", path.display());
    }
    Ok(text)
}

/// Downloads `url` to `dest`, verifying its SHA-256. The bytes go to a temporary file
/// beside `dest` that is renamed only when complete and verified, so an interrupted or
/// corrupt download never leaves a file that looks valid.
pub fn download(url: &str, dest: &Path, sha256_hex: &str) -> Result<()> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = dest.with_extension("part");
    let result = fetch_verified(url, &tmp, sha256_hex);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fs::rename(&tmp, dest)
        .with_context(|| format!("cannot move the download into {}", dest.display()))?;
    eprintln!("saved {}", dest.display());
    Ok(())
}

fn fetch_verified(url: &str, tmp: &Path, sha256_hex: &str) -> Result<()> {
    eprintln!("downloading {url}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| {
        anyhow::anyhow!(
            "could not download the corpus from {url}: {e}.\n\
             No network? Pass --data FILE (or set {ENV_DATA}) to use a local copy of any UTF-8 text."
        )
    })?;
    let total = response.body().content_length();
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("valid template"),
    );
    let mut reader = response.body_mut().as_reader();
    let mut file =
        fs::File::create(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("the download from {url} broke off"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    file.sync_all()?;
    bar.finish_and_clear();
    let got = format!("{:x}", hasher.finalize());
    if got != sha256_hex {
        bail!(
            "checksum mismatch for {url}: expected sha256 {sha256_hex}, got {got}; nothing was saved"
        );
    }
    Ok(())
}
