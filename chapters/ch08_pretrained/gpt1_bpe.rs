//! GPT-1's tokenizer: BPE over lower-cased characters, not bytes. Chapter 7's encoder
//! merges the bytes of a whole pre-split piece, spaces included; GPT-1's marks the end of each
//! word instead (`the</w>`), and a character missing from its 477 base symbols is `<unk>`.
//!
//! OpenAI's own text pipeline (ftfy, then `text_standardize`, then spaCy's English tokenizer)
//! cannot be reproduced without spaCy's model. This follows Hugging Face `transformers`, which
//! replaced spaCy with BERT's rules (`BertNormalizer` and `BertPreTokenizer`), and matches its
//! `OpenAIGPTTokenizer` token for token (tested). Where that differs from the original:
//! - every punctuation mark is a word of its own: "don't" is `don ' t`, "..." is `. . .`
//!   (spaCy made `do n't` and `...`);
//! - line breaks are spaces: GPT-1's own `\n</w>` token (id 40477) is never produced;
//! - accents are stripped ("café" is `cafe`), where the original kept `é`, one of its symbols;
//! - no ftfy repairs, and dashes and `…` are not rewritten as `-` and `...` first.

use anyhow::{Context, Result, bail};
use fancy_regex::Regex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::LazyLock;
use unicode_normalization::UnicodeNormalization;

/// What ends a word's last symbol.
const END: &str = "</w>";

// ANCHOR: gpt1_bpe
/// GPT-1's vocabulary (`vocab.json`: symbol -> id) and merges (`merges.txt`, in rank order).
#[derive(Clone, Debug)]
pub struct Gpt1Bpe {
    ids: HashMap<String, usize>,
    symbols: Vec<String>, // id -> symbol
    ranks: HashMap<(String, String), usize>,
    unk: usize,
    /// The files as read, so that a checkpoint can store the tokenizer whole.
    pub vocab_json: String,
    pub merges_txt: String,
}

impl Gpt1Bpe {
    pub fn from_files(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        Self::new(read("vocab.json")?, read("merges.txt")?)
    }

    pub fn new(vocab_json: String, merges_txt: String) -> Result<Self> {
        let ids: HashMap<String, usize> =
            serde_json::from_str(&vocab_json).context("vocab.json is not a map of ids")?;
        let mut symbols = vec![String::new(); ids.len()];
        for (symbol, &id) in &ids {
            match symbols.get_mut(id) {
                Some(slot) => *slot = symbol.clone(),
                None => bail!(
                    "vocab.json: id {id} of {symbol:?} is past its {} ids",
                    ids.len()
                ),
            }
        }
        let mut ranks = HashMap::new();
        // The first line is a version ("#version: 0.2"); then one merge per line.
        for (rank, line) in merges_txt
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            let Some((a, b)) = line.split_once(' ') else {
                bail!("merges.txt line {}: {line:?} is not two symbols", rank + 2);
            };
            ranks.insert((a.to_string(), b.to_string()), rank);
        }
        let unk = *ids.get("<unk>").context("vocab.json has no <unk> symbol")?;
        Ok(Gpt1Bpe {
            ids,
            symbols,
            ranks,
            unk,
            vocab_json,
            merges_txt,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.symbols.len()
    }

    /// Text -> ids: normalise, split into words, merge each word's symbols.
    pub fn encode(&self, text: &str) -> Vec<usize> {
        words(&normalize(text))
            .flat_map(|word| self.merge(word))
            .map(|symbol| self.ids.get(&symbol).copied().unwrap_or(self.unk))
            .collect()
    }

    /// A word's characters, the last marked as the end, merged by rank: the lowest-ranked
    /// adjacent pair is joined everywhere it occurs, until no pair has a rank.
    fn merge(&self, word: &str) -> Vec<String> {
        let chars: Vec<char> = word.chars().collect();
        let mut parts: Vec<String> = chars.iter().map(char::to_string).collect();
        if let Some(last) = parts.last_mut() {
            last.push_str(END);
        }
        loop {
            let rank = |i: usize| self.ranks.get(&(parts[i].clone(), parts[i + 1].clone()));
            let best = (0..parts.len().saturating_sub(1))
                .filter_map(|i| rank(i).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { return parts };
            let (a, b) = (parts[i].clone(), parts[i + 1].clone());
            let mut merged = Vec::with_capacity(parts.len());
            let mut j = 0;
            while j < parts.len() {
                if j + 1 < parts.len() && parts[j] == a && parts[j + 1] == b {
                    merged.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    merged.push(parts[j].clone());
                    j += 1;
                }
            }
            parts = merged;
        }
    }

    /// The symbol of `id`, with its end-of-word mark as a space.
    pub fn decode_symbol(&self, id: usize) -> String {
        match self.symbols.get(id) {
            Some(s) => s.strip_suffix(END).map_or(s.clone(), |w| format!("{w} ")),
            None => String::new(),
        }
    }
}
// ANCHOR_END: gpt1_bpe

// ANCHOR: bert_rules
/// BERT's normaliser as `transformers` applies it to GPT-1's input: control characters
/// dropped and every kind of whitespace made a space; Chinese, Japanese and Korean ideographs
/// set apart by spaces; accents stripped (decompose, drop the combining marks); lower case.
pub fn normalize(text: &str) -> String {
    static CONTROL: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[\x00\x{FFFD}\p{C}]").unwrap());
    static MARK: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\p{Mn}").unwrap());
    let cleaned: String = text
        .chars()
        .filter(|&c| match c {
            '\t' | '\n' | '\r' => true,
            c if c.is_ascii() => !c.is_ascii_control(),
            c => !CONTROL
                .is_match(c.encode_utf8(&mut [0; 4]))
                .unwrap_or(false),
        })
        .flat_map(|c| match c {
            c if c.is_whitespace() => vec![' '],
            c if is_ideograph(c) => vec![' ', c, ' '],
            c => vec![c],
        })
        .collect();
    let decomposed: String = cleaned.nfd().collect();
    MARK.replace_all(&decomposed, "")
        .chars()
        .flat_map(char::to_lowercase) // char by char: no word-final sigma rule
        .collect()
}

/// The CJK ideograph blocks BERT sets apart.
fn is_ideograph(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B920..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// BERT's pre-split: runs of letters, digits and symbols between spaces, with every
/// punctuation mark (ASCII's, and Unicode's `P` classes) a word of its own.
pub fn words(text: &str) -> impl Iterator<Item = &str> {
    static WORD: LazyLock<Regex> = LazyLock::new(|| {
        let punct = r"\p{P}!-/:-@\[-`{-~";
        Regex::new(&format!(r"[{punct}]|[^\s{punct}]+")).unwrap()
    });
    WORD.find_iter(text)
        .filter_map(|m| m.ok())
        .map(|m| m.as_str())
}
// ANCHOR_END: bert_rules
