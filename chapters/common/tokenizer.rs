//! A character-level tokenizer: every distinct character of the corpus is one token. And
//! the choice between it and chapter 7's byte-pair encoding, for chapter 4's trainer.

use crate::ch07_bpe::Bpe;
use crate::ch08_pretrained::gpt1_bpe::Gpt1Bpe;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

// ANCHOR: tokenizer
#[derive(Clone, Debug, PartialEq)]
pub struct CharTokenizer {
    itos: Vec<char>,
    stoi: HashMap<char, usize>,
}

impl CharTokenizer {
    /// The vocabulary is the sorted set of characters in `text`.
    pub fn from_text(text: &str) -> Self {
        let chars: BTreeSet<char> = text.chars().collect();
        Self::from_chars(chars.into_iter().collect())
    }

    /// Rebuilds a tokenizer from its vocabulary (as saved in a checkpoint).
    pub fn from_chars(itos: Vec<char>) -> Self {
        let stoi = itos.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        Self { itos, stoi }
    }

    pub fn vocab_size(&self) -> usize {
        self.itos.len()
    }

    pub fn chars(&self) -> &[char] {
        &self.itos
    }

    /// The vocabulary as one string (how checkpoints store it).
    pub fn vocab_string(&self) -> String {
        self.itos.iter().collect()
    }

    /// Text to token ids. A character outside the vocabulary is an error, never a silent skip.
    pub fn encode(&self, text: &str) -> Result<Vec<usize>> {
        let mut ids = Vec::with_capacity(text.len());
        let mut unknown = BTreeSet::new();
        for c in text.chars() {
            match self.stoi.get(&c) {
                Some(&i) => ids.push(i),
                None => {
                    unknown.insert(c);
                }
            }
        }
        if !unknown.is_empty() {
            let list: Vec<String> = unknown.iter().map(|c| format!("{c:?}")).collect();
            bail!(
                "characters not in the vocabulary: {} (the vocabulary has {} characters)",
                list.join(", "),
                self.vocab_size()
            );
        }
        Ok(ids)
    }

    /// Token ids to text.
    pub fn decode(&self, ids: &[usize]) -> String {
        ids.iter().map(|&i| self.itos[i]).collect()
    }
}
// ANCHOR_END: tokenizer

// ANCHOR: tokenizers
/// The tokenizers a GPT of this course can read: chapter 1's characters, chapter 7's
/// byte-level BPE, or GPT-1's BPE over lower-cased characters (chapter 8). A checkpoint stores its tokenizer whole (see `Saved`), so sampling from it
/// never has to guess which one it was trained with.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(into = "Saved", try_from = "Saved")]
pub enum Tokenizer {
    Char(CharTokenizer),
    Bpe(Bpe),
    Gpt1(Gpt1Bpe),
}

impl Tokenizer {
    /// `--tokenizer char` (the characters of `text`), `--tokenizer FILE` (a tokenizer file
    /// written by chapter 7) or `--tokenizer DIR` (GPT-1's `vocab.json` and `merges.txt`).
    pub fn choose(choice: &str, text: &str) -> Result<Self> {
        match choice {
            "char" => Ok(Self::Char(CharTokenizer::from_text(text))),
            path => Self::load(Path::new(path)).with_context(|| {
                format!(
                    "--tokenizer takes `char`, a tokenizer file made by ch07_bpe or a folder \
                     with GPT-1's files; {path}"
                )
            }),
        }
    }

    /// A tokenizer on disk: a chapter 7 tokenizer file, or a folder holding GPT-1's
    /// `vocab.json` and `merges.txt`.
    pub fn load(path: &Path) -> Result<Self> {
        Ok(match path.is_dir() {
            true => Self::Gpt1(Gpt1Bpe::from_files(path)?),
            false => Self::Bpe(Bpe::load(path)?),
        })
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Char(t) => t.vocab_size(),
            Self::Bpe(t) => t.vocab_size(),
            Self::Gpt1(t) => t.vocab_size(),
        }
    }

    /// "65 characters" or "byte-level BPE, 1024 tokens".
    pub fn describe(&self) -> String {
        match self {
            Self::Char(t) => format!("{} characters", t.vocab_size()),
            Self::Bpe(t) => format!("byte-level BPE, {} tokens", t.vocab_size()),
            Self::Gpt1(t) => format!("GPT-1's lower-case BPE, {} tokens", t.vocab_size()),
        }
    }

    /// Text to ids. Only the character tokenizer refuses text it cannot encode; BPE's
    /// 256 byte tokens cover everything, and GPT-1's has `<unk>`.
    pub fn encode(&self, text: &str) -> Result<Vec<usize>> {
        match self {
            Self::Char(t) => t.encode(text),
            Self::Bpe(t) => Ok(t.encode(text).into_iter().map(|id| id as usize).collect()),
            Self::Gpt1(t) => Ok(t.encode(text)),
        }
    }

    /// Ids to the bytes of their text (an id the tokenizer lacks becomes U+FFFD's bytes).
    pub fn decode_bytes(&self, ids: &[usize]) -> Vec<u8> {
        match self {
            Self::Char(t) => t.decode(ids).into_bytes(),
            Self::Bpe(t) => ids
                .iter()
                .flat_map(|&id| {
                    t.decode_bytes(&[id as u32])
                        .unwrap_or_else(|_| "\u{FFFD}".into())
                })
                .collect(),
            Self::Gpt1(t) => ids
                .iter()
                .flat_map(|&id| t.decode_symbol(id).into_bytes())
                .collect(),
        }
    }

    /// Ids to text; a sequence cut inside a character shows U+FFFD there.
    pub fn decode(&self, ids: &[usize]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// The same tokens with the same ids (compared through the saved form).
    pub fn same_as(&self, other: &Self) -> bool {
        Saved::from(self.clone()) == Saved::from(other.clone())
    }
}
// ANCHOR_END: tokenizers

// ANCHOR: stream_decoder
/// Decodes ids one at a time for printing as they are generated. A BPE token can end
/// inside a character (the first two of an emoji's four bytes), so bytes that do not yet
/// make a whole character wait for the next token.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// The text that `id` completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: usize) -> String {
        self.pending.extend(tokenizer.decode_bytes(&[id]));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out += s;
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out += std::str::from_utf8(&self.pending[..valid]).expect("valid");
                    match e.error_len() {
                        // Bytes that can never be a character: show U+FFFD, go on.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                        // The start of a character: wait for the rest.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// What is left at the end (an unfinished character, as U+FFFD).
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}
// ANCHOR_END: stream_decoder

/// How a checkpoint's `meta.json` stores a tokenizer: the characters in id order, the
/// whole chapter 7 tokenizer file, or GPT-1's two files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Saved {
    Char {
        chars: String,
    },
    Bpe {
        file: String,
    },
    Gpt1 {
        vocab_json: String,
        merges_txt: String,
    },
}

impl From<Tokenizer> for Saved {
    fn from(t: Tokenizer) -> Self {
        match t {
            Tokenizer::Char(t) => Saved::Char {
                chars: t.vocab_string(),
            },
            Tokenizer::Bpe(t) => Saved::Bpe {
                file: t.to_file_string(),
            },
            Tokenizer::Gpt1(t) => Saved::Gpt1 {
                vocab_json: t.vocab_json,
                merges_txt: t.merges_txt,
            },
        }
    }
}

impl TryFrom<Saved> for Tokenizer {
    type Error = anyhow::Error;
    fn try_from(s: Saved) -> Result<Self> {
        Ok(match s {
            Saved::Char { chars } => Self::Char(CharTokenizer::from_chars(chars.chars().collect())),
            Saved::Bpe { file } => Self::Bpe(Bpe::from_file_string(&file)?),
            Saved::Gpt1 {
                vocab_json,
                merges_txt,
            } => Self::Gpt1(Gpt1Bpe::new(vocab_json, merges_txt)?),
        })
    }
}
