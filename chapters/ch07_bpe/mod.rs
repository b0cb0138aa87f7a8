//! Chapter 7: byte-level byte-pair encoding (BPE), the tokenizer of GPT-2 and its successors.
//! Text becomes UTF-8 bytes; training merges the most frequent adjacent pair into a new token,
//! again and again; encoding replays those merges, lowest rank first.

pub mod gpt;
pub mod train;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fancy_regex::Regex;
use std::collections::HashMap;
use std::path::Path;

pub use train::{TrainReport, train};

// ANCHOR: pattern
/// GPT-2's pre-split pattern (OpenAI's `encoder.py`): common English contractions, runs of
/// letters, of digits, of other symbols (each with at most one leading space), and runs of
/// whitespace. BPE merges never cross the boundaries between these pieces, so " the" is one
/// token but "e." never is. `(?!\S)` keeps the last space of a run for the word after it.
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// The special token GPT-2 puts between documents.
pub const END_OF_TEXT: &str = "<|endoftext|>";
// ANCHOR_END: pattern

// ANCHOR: bpe
/// A byte-level BPE tokenizer. Token `id` stands for the bytes `vocab[id]`; its id is also
/// its rank, the order in which training made it, and encoding merges lowest ranks first.
#[derive(Clone, Debug)]
pub struct Bpe {
    vocab: Vec<Vec<u8>>,
    ranks: HashMap<Vec<u8>, u32>,
    /// Special tokens (`<|endoftext|>`) and their ids, after the ordinary ones.
    specials: Vec<(String, u32)>,
    pattern: Regex,
}

impl Bpe {
    /// A tokenizer from its tokens' bytes, in rank order. Every single byte must be a token,
    /// so that any text can be encoded.
    pub fn new(vocab: Vec<Vec<u8>>, specials: Vec<String>, pattern: &str) -> Result<Self> {
        let mut ranks = HashMap::with_capacity(vocab.len());
        for (id, bytes) in vocab.iter().enumerate() {
            if bytes.is_empty() {
                bail!("token {id} is empty");
            }
            if ranks.insert(bytes.clone(), id as u32).is_some() {
                bail!("token {id} repeats the bytes of an earlier token");
            }
        }
        if let Some(b) = (0..=255u8).find(|b| !ranks.contains_key(&[*b][..])) {
            bail!("byte {b:#04x} is not a token: some texts could not be encoded");
        }
        let n = vocab.len() as u32;
        let specials = specials
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, n + i as u32))
            .collect();
        if pattern.contains('\n') {
            bail!("the pattern must fit on one line (write a newline as \\n)");
        }
        let pattern = Regex::new(pattern).with_context(|| format!("pattern {pattern:?}"))?;
        Ok(Self {
            vocab,
            ranks,
            specials,
            pattern,
        })
    }

    /// Ordinary tokens plus special ones.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len() + self.specials.len()
    }

    /// The bytes of ordinary token `id`.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.vocab.get(id as usize).map(Vec::as_slice)
    }

    pub fn special_id(&self, name: &str) -> Option<u32> {
        self.specials.iter().find(|(s, _)| s == name).map(|s| s.1)
    }

    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    /// The pieces the pattern cuts `text` into (merges stay inside a piece). Text that the
    /// pattern skips becomes a piece too, so that `decode(encode(s)) == s` for any pattern.
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let (mut pieces, mut end) = (Vec::new(), 0);
        // fancy-regex gives up (an error) only when a pattern backtracks more than a million
        // times at one position; GPT-2's look-ahead backtracks at most one character.
        for m in self.pattern.find_iter(text) {
            let m = m.expect("the pre-split pattern backtracks too much");
            if m.start() > end {
                pieces.push(&text[end..m.start()]);
            }
            if !m.as_str().is_empty() {
                pieces.push(m.as_str());
            }
            end = m.end();
        }
        if end < text.len() {
            pieces.push(&text[end..]);
        }
        pieces
    }
}
// ANCHOR_END: bpe

// ANCHOR: encode
impl Bpe {
    /// Text to ids, special-token names treated as ordinary text.
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        for piece in self.split(text) {
            match self.ranks.get(piece.as_bytes()) {
                Some(&id) => ids.push(id), // a whole piece that is one token: the common case
                None => ids.extend(self.merge(piece.as_bytes())),
            }
        }
        ids
    }

    /// One piece's bytes to ids: start from single bytes and repeatedly join the adjacent pair
    /// whose joined bytes have the lowest rank, until no adjacent pair is a token.
    fn merge(&self, piece: &[u8]) -> Vec<u32> {
        // parts[i] is where the i-th current token starts; the last entry marks the end.
        let mut parts: Vec<usize> = (0..=piece.len()).collect();
        let rank = |parts: &[usize], i: usize| -> u32 {
            match parts.get(i + 2) {
                Some(&end) => *self.ranks.get(&piece[parts[i]..end]).unwrap_or(&u32::MAX),
                None => u32::MAX,
            }
        };
        loop {
            let best = (0..parts.len() - 2)
                .map(|i| (rank(&parts, i), i))
                .min()
                .filter(|&(r, _)| r != u32::MAX);
            match best {
                Some((_, i)) => {
                    parts.remove(i + 1);
                }
                None => break,
            }
        }
        parts
            .windows(2)
            .map(|w| self.ranks[&piece[w[0]..w[1]]])
            .collect()
    }

    /// Text to ids, with each special token's name in the text becoming its id.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        while let Some((at, name, id)) = self
            .specials
            .iter()
            .filter_map(|(name, id)| rest.find(name.as_str()).map(|at| (at, name, *id)))
            .min()
        {
            ids.extend(self.encode_ordinary(&rest[..at]));
            ids.push(id);
            rest = &rest[at + name.len()..];
        }
        ids.extend(self.encode_ordinary(rest));
        ids
    }

    /// Ids to bytes. An id outside the vocabulary is an error.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let id = id as usize;
            if let Some(bytes) = self.vocab.get(id) {
                out.extend_from_slice(bytes);
            } else if let Some((name, _)) = self.specials.get(id - self.vocab.len()) {
                out.extend_from_slice(name.as_bytes());
            } else {
                bail!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab_size()
                );
            }
        }
        Ok(out)
    }

    /// Ids to text. A token may end in the middle of a character (a byte-level vocabulary
    /// splits rare characters), so a cut sequence of ids can be invalid UTF-8: shown as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }
}
// ANCHOR_END: encode

// ANCHOR: file
/// The first line of a tokenizer file.
const MAGIC: &str = "gpt-from-scratch bpe v1";

impl Bpe {
    /// The file format, plain text:
    ///
    /// ```text
    /// gpt-from-scratch bpe v1
    /// pattern <the pre-split pattern, to the end of the line>
    /// tokens <n>
    /// special <name>            (zero or more; ids n, n+1, ... in this order)
    /// <base64 of token 0's bytes> 0
    /// ...                       (n lines, ranks 0 to n-1 in order: tiktoken's format)
    /// ```
    pub fn to_file_string(&self) -> String {
        let mut s = format!(
            "{MAGIC}\npattern {}\ntokens {}\n",
            self.pattern(),
            self.vocab.len()
        );
        for (name, _) in &self.specials {
            s += &format!("special {name}\n");
        }
        for (id, bytes) in self.vocab.iter().enumerate() {
            s += &format!("{} {id}\n", BASE64.encode(bytes));
        }
        s
    }

    /// Writes the file atomically: a crash leaves the old file or the new one, never half.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::common::report::write_atomic(path, self.to_file_string().as_bytes())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading tokenizer file {}", path.display()))?;
        Self::from_file_string(&text)
            .with_context(|| format!("{} is not a valid tokenizer file", path.display()))
    }

    pub fn from_file_string(text: &str) -> Result<Self> {
        let mut lines = text.lines().enumerate();
        let mut next = |what: &str| {
            lines
                .next()
                .with_context(|| format!("the file ends before {what}"))
        };
        let (_, magic) = next("its first line")?;
        if magic != MAGIC {
            bail!("the first line is {magic:?}, not {MAGIC:?}");
        }
        let (_, pattern) = next("the pattern")?;
        let pattern = pattern
            .strip_prefix("pattern ")
            .context("line 2 is not `pattern ...`")?;
        let (_, count) = next("the token count")?;
        let n: usize = count
            .strip_prefix("tokens ")
            .and_then(|n| n.parse().ok())
            .context("line 3 is not `tokens <n>`")?;
        let (mut specials, mut vocab) = (Vec::new(), Vec::with_capacity(n));
        while vocab.len() < n {
            let (i, line) = next(&format!("token {} of {n}", vocab.len()))?;
            if let Some(name) = line.strip_prefix("special ").filter(|_| vocab.is_empty()) {
                specials.push(name.to_string());
                continue;
            }
            let (b64, rank) = line
                .split_once(' ')
                .with_context(|| format!("line {}", i + 1))?;
            if rank.parse::<usize>().ok() != Some(vocab.len()) {
                bail!(
                    "line {}: rank {rank:?} where {} was due",
                    i + 1,
                    vocab.len()
                );
            }
            vocab.push(
                BASE64
                    .decode(b64)
                    .with_context(|| format!("line {}", i + 1))?,
            );
        }
        if let Some((i, _)) = next("").ok().filter(|(_, l)| !l.is_empty()) {
            bail!(
                "line {}: more than the {n} tokens the header announced",
                i + 1
            );
        }
        Self::new(vocab, specials, pattern)
    }
}
// ANCHOR_END: file

// ANCHOR: gpt2
/// GPT-2's own tokenizer (tiktoken's `r50k_base`), read out of the `tiktoken-rs` crate one
/// token at a time, into the course's `Bpe`: 50,256 ordinary tokens and `<|endoftext|>`.
pub fn gpt2() -> Result<Bpe> {
    let reference = tiktoken_rs::r50k_base()?;
    let vocab = (0..50_256u32)
        .map(|id| {
            reference
                .decode_bytes(&[id])
                .map_err(|e| anyhow::anyhow!("tiktoken-rs has no token {id}: {e:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Bpe::new(vocab, vec![END_OF_TEXT.to_string()], GPT2_PATTERN)
}
// ANCHOR_END: gpt2

/// Chapter 1's [`Vocab`] for byte-pair tokens, so that chapter 4's data, checkpoints and
/// sampling take them as they take characters.
impl crate::common::tokenizer::Vocab for Bpe {
    fn vocab_size(&self) -> usize {
        Bpe::vocab_size(self)
    }
    fn describe(&self) -> String {
        format!("byte-level BPE, {} tokens", Bpe::vocab_size(self))
    }
    /// Never an error: the 256 byte tokens spell any text.
    fn encode(&self, text: &str) -> Result<Vec<usize>> {
        Ok(Bpe::encode(self, text)
            .into_iter()
            .map(|id| id as usize)
            .collect())
    }
    /// An id the tokenizer lacks becomes U+FFFD's bytes.
    fn decode_bytes(&self, ids: &[usize]) -> Vec<u8> {
        ids.iter()
            .flat_map(|&id| {
                Bpe::decode_bytes(self, &[id as u32]).unwrap_or_else(|_| "\u{FFFD}".into())
            })
            .collect()
    }
    fn same_as(&self, other: &Self) -> bool {
        self.to_file_string() == other.to_file_string()
    }
}
