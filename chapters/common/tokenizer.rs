//! A character-level tokenizer: every distinct character of the corpus is one token.

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
