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

/// A file to download and what it must be.
pub struct Remote<'a> {
    pub url: &'a str,
    pub sha256: &'a str,
    /// Its size in bytes, when known in advance.
    pub size: Option<u64>,
    /// What to do without a network (said when the download cannot start).
    pub offline_hint: &'a str,
}

/// Downloads the corpus from `url` to `dest`, verifying its SHA-256 (see `download_remote`).
pub fn download(url: &str, dest: &Path, sha256_hex: &str) -> Result<()> {
    let hint = format!(
        "No network? Pass --data FILE (or set {ENV_DATA}) to use a local copy of any UTF-8 text."
    );
    let remote = Remote {
        url,
        sha256: sha256_hex,
        size: None,
        offline_hint: &hint,
    };
    download_remote(&remote, dest)
}

// ANCHOR: download
/// Downloads `remote` to `dest`. The bytes go to `dest.part`, renamed to `dest` only when
/// whole and verified, so a file at `dest` is always a good one. A transfer that breaks off
/// keeps `dest.part`, and the next call asks the server for the rest only (an HTTP range);
/// a checksum mismatch deletes it. A `.part` with nothing left to fetch (the process died
/// before the rename) is checked as it is; when corrupt, it is deleted and fetched anew, once.
pub fn download_remote(remote: &Remote, dest: &Path) -> Result<()> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let part = dest.with_extension("part");
    let fetched = fetch(remote, &part)?;
    let mut got = sha256_of(&part)?;
    if fetched == Fetched::Nothing && got != remote.sha256 {
        eprintln!(
            "{} was whole but corrupt: removed, downloading again",
            part.display()
        );
        fs::remove_file(&part).with_context(|| format!("cannot remove {}", part.display()))?;
        fetch(remote, &part)?; // from byte 0: no range, so no second 416
        got = sha256_of(&part)?;
    }
    if got != remote.sha256 {
        let _ = fs::remove_file(&part);
        bail!(
            "checksum mismatch for {}: expected sha256 {}, got {got}; nothing was saved",
            remote.url,
            remote.sha256
        );
    }
    fs::rename(&part, dest)
        .with_context(|| format!("cannot move the download into {}", dest.display()))?;
    eprintln!("saved {}", dest.display());
    Ok(())
}
// ANCHOR_END: download

/// What `fetch` did to the `.part` file.
#[derive(Debug, PartialEq)]
enum Fetched {
    /// Bytes from the server went into it.
    Bytes,
    /// Nothing was left to fetch: its bytes are all there will be, right or wrong.
    Nothing,
}

/// Appends the missing bytes of `remote` to `part` (all of them when it does not exist).
fn fetch(remote: &Remote, part: &Path) -> Result<Fetched> {
    let have = fs::metadata(part).map_or(0, |m| m.len());
    if remote.size == Some(have) {
        return Ok(Fetched::Nothing); // complete already; only the checksum is left
    }
    eprintln!("downloading {}", remote.url);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        // A stalled transfer ends (and can resume) instead of hanging; no limit on the whole.
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut request = agent.get(remote.url);
    if have > 0 {
        eprintln!("resuming after {have} bytes");
        request = request.header("Range", format!("bytes={have}-"));
    }
    let mut response = match request.call() {
        Ok(response) => response,
        // 416 Range Not Satisfiable: the server has no byte past those kept, so they are the
        // whole file (or not this file at all: the checksum tells).
        Err(ureq::Error::StatusCode(416)) if have > 0 => {
            eprintln!("nothing left to download after {have} bytes");
            return Ok(Fetched::Nothing);
        }
        Err(e) => bail!(
            "could not download {}: {e}.\n{}",
            remote.url,
            remote.offline_hint
        ),
    };
    // 206: the rest, as asked; 200: the server sent the whole file again.
    let resumed = have > 0 && response.status().as_u16() == 206;
    let start = if resumed { have } else { 0 };
    let expected = response.body().content_length().map(|n| n + start);
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(resumed)
        .write(true)
        .truncate(!resumed)
        .open(part)
        .with_context(|| format!("cannot write {}", part.display()))?;
    let bar = match expected.or(remote.size) {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .expect("valid template"),
    );
    bar.set_position(start);
    let copied = copy_with_progress(&mut response.body_mut().as_reader(), &mut file, &bar);
    file.sync_all()?;
    bar.finish_and_clear();
    let got = start + copied?;
    match expected {
        Some(n) if got < n => bail!(
            "the download of {} broke off after {got} of {n} bytes; run again to resume",
            remote.url
        ),
        _ => Ok(Fetched::Bytes),
    }
}

/// Copies until the end of `reader`; returns the bytes copied. A broken connection is an
/// error that says the download can resume.
fn copy_with_progress(
    reader: &mut impl Read,
    file: &mut fs::File,
    bar: &ProgressBar,
) -> Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut copied = 0;
    loop {
        let n = reader
            .read(&mut buf)
            .context("the download broke off; run again to resume")?;
        if n == 0 {
            return Ok(copied);
        }
        file.write_all(&buf[..n])?;
        copied += n as u64;
        bar.inc(n as u64);
    }
}

/// The SHA-256 of a file, in hex.
pub fn sha256_of(path: &Path) -> Result<String> {
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}
