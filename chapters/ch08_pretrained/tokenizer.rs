//! The tokenizers a GPT of this course can read, as one type: chapter 1's characters,
//! chapter 7's byte-level BPE, or GPT-1's BPE over lower-cased characters (this chapter).
//! Chapter 4's trainer and chapter 6's generator take it from here (their binaries reach
//! ahead for it), and its checkpoints store it whole.

use crate::ch07_bpe::Bpe;
use crate::ch08_pretrained::gpt1_bpe::Gpt1Bpe;
use crate::common::tokenizer::{CharTokenizer, Vocab};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

// ANCHOR: tokenizers
/// The tokenizers a GPT of this course can read: chapter 1's characters, chapter 7's
/// byte-level BPE, or GPT-1's BPE over lower-cased characters (chapter 8). A checkpoint
/// stores its tokenizer whole (see `Saved`), so sampling from it never has to guess which
/// one it was trained with.
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
            Self::Bpe(t) => Vocab::encode(t, text),
            Self::Gpt1(t) => Ok(t.encode(text)),
        }
    }

    /// Ids to the bytes of their text (an id the tokenizer lacks becomes U+FFFD's bytes).
    pub fn decode_bytes(&self, ids: &[usize]) -> Vec<u8> {
        match self {
            Self::Char(t) => t.decode(ids).into_bytes(),
            Self::Bpe(t) => Vocab::decode_bytes(t, ids),
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

impl Vocab for Tokenizer {
    fn vocab_size(&self) -> usize {
        Tokenizer::vocab_size(self)
    }
    fn describe(&self) -> String {
        Tokenizer::describe(self)
    }
    fn encode(&self, text: &str) -> Result<Vec<usize>> {
        Tokenizer::encode(self, text)
    }
    fn decode_bytes(&self, ids: &[usize]) -> Vec<u8> {
        Tokenizer::decode_bytes(self, ids)
    }
    fn same_as(&self, other: &Self) -> bool {
        Tokenizer::same_as(self, other)
    }
    fn is_characters(&self) -> bool {
        matches!(self, Tokenizer::Char(_))
    }
}

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
