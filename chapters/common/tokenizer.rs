//! A character-level tokenizer: every distinct character of the corpus is one token. And
//! what the data, the checkpoints and sampling need of any tokenizer ([`Vocab`]), so that
//! chapter 7's byte-pair encoding and chapter 8's choice between tokenizers fit in where
//! characters do.

use anyhow::{Result, bail};
use std::collections::{BTreeSet, HashMap};

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

// ANCHOR: vocab
/// What the rest of the course needs of a tokenizer: text to ids and back, and its size.
/// Chapter 1's characters implement it below; chapter 7's byte-pair encoding and chapter 8's
/// choice between tokenizers implement it too, so that a dataset, a checkpoint or a sample
/// works with any of them.
pub trait Vocab: Clone + Send + Sync {
    fn vocab_size(&self) -> usize;
    /// "65 characters", "byte-level BPE, 1024 tokens".
    fn describe(&self) -> String;
    /// Text to ids; text the tokenizer cannot encode is an error, never a silent skip.
    fn encode(&self, text: &str) -> Result<Vec<usize>>;
    /// Ids to the bytes of their text (a token can end inside a character).
    fn decode_bytes(&self, ids: &[usize]) -> Vec<u8>;
    /// Ids to text; a sequence cut inside a character shows U+FFFD there.
    fn decode(&self, ids: &[usize]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }
    /// The same tokens with the same ids.
    fn same_as(&self, other: &Self) -> bool;
    /// True for a vocabulary of characters, whose mismatch means another corpus.
    fn is_characters(&self) -> bool {
        false
    }
}

impl Vocab for CharTokenizer {
    fn vocab_size(&self) -> usize {
        CharTokenizer::vocab_size(self)
    }
    fn describe(&self) -> String {
        format!("{} characters", self.vocab_size())
    }
    fn encode(&self, text: &str) -> Result<Vec<usize>> {
        CharTokenizer::encode(self, text)
    }
    fn decode_bytes(&self, ids: &[usize]) -> Vec<u8> {
        self.decode(ids).into_bytes()
    }
    fn same_as(&self, other: &Self) -> bool {
        self == other
    }
    fn is_characters(&self) -> bool {
        true
    }
}
// ANCHOR_END: vocab

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
    pub fn push<T: Vocab>(&mut self, tokenizer: &T, id: usize) -> String {
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
