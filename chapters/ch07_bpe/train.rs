//! Training a byte-level BPE: count adjacent pairs, merge the most frequent into a new token,
//! repeat. The counts are updated where a merge changed something, never recounted.

use super::Bpe;
use anyhow::{Result, bail};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::Instant;

type Pair = (u32, u32);

/// What training did: each merge (the pair, the new id, how often the pair occurred), and
/// whether it stopped before the vocabulary size asked for.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub merges: Vec<(Pair, u32, u64)>,
    pub unique_pieces: usize,
    pub stopped_early: Option<String>,
    pub seconds: f64,
}

// ANCHOR: words
/// The training text as distinct pieces ("words"), each a sequence of token ids with the
/// number of times it occurs: " the" is stored once, with its count, not 27,000 times.
struct Words {
    ids: Vec<Vec<u32>>,
    counts: Vec<u64>,
}

impl Words {
    fn new(bpe: &Bpe, text: &str) -> Self {
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for piece in bpe.split(text) {
            *counts.entry(piece).or_default() += 1;
        }
        let mut pieces: Vec<(&str, u64)> = counts.into_iter().collect();
        pieces.sort_unstable(); // a fixed order, so training is deterministic
        Words {
            ids: pieces
                .iter()
                .map(|(p, _)| p.bytes().map(u32::from).collect())
                .collect(),
            counts: pieces.iter().map(|p| p.1).collect(),
        }
    }
}

/// Adds `sign * count` to every adjacent pair of `ids` in `delta`.
fn count_pairs(ids: &[u32], count: i64, delta: &mut HashMap<Pair, i64>) {
    for w in ids.windows(2) {
        *delta.entry((w[0], w[1])).or_default() += count;
    }
}

/// `ids` with every occurrence of `pair`, left to right, replaced by `new`.
fn merge_pair(ids: &[u32], pair: Pair, new: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len());
    let mut i = 0;
    while i < ids.len() {
        if i + 1 < ids.len() && (ids[i], ids[i + 1]) == pair {
            out.push(new);
            i += 2;
        } else {
            out.push(ids[i]);
            i += 1;
        }
    }
    out
}
// ANCHOR_END: words

// ANCHOR: pairs
/// The count of every adjacent pair over all words, which words hold each pair, and a max-heap
/// of `(count, pair)`. A changed count is pushed again; entries whose count is out of date
/// ("stale") are skipped when they come to the top.
struct PairCounts {
    counts: HashMap<Pair, i64>,
    holders: HashMap<Pair, HashSet<usize>>,
    heap: BinaryHeap<(i64, Reverse<Pair>)>,
}

impl PairCounts {
    fn new(words: &Words) -> Self {
        let (mut counts, mut holders) = (HashMap::new(), HashMap::<Pair, HashSet<usize>>::new());
        for (w, ids) in words.ids.iter().enumerate() {
            count_pairs(ids, words.counts[w] as i64, &mut counts);
            for p in ids.windows(2) {
                holders.entry((p[0], p[1])).or_default().insert(w);
            }
        }
        let heap = counts.iter().map(|(&p, &c)| (c, Reverse(p))).collect();
        PairCounts {
            counts,
            holders,
            heap,
        }
    }

    /// The most frequent pair and its count; ties go to the smaller pair of ids.
    fn most_frequent(&mut self) -> Option<(Pair, i64)> {
        while let Some((count, Reverse(pair))) = self.heap.pop() {
            if count > 0 && self.counts.get(&pair) == Some(&count) {
                return Some((pair, count));
            }
        }
        None
    }

    /// Replaces `pair` by `new` in every word that holds it, and updates the counts of the pairs
    /// that this changed (the pairs around each merged occurrence), and only those.
    fn merge(&mut self, words: &mut Words, pair: Pair, new: u32) {
        let mut delta = HashMap::new();
        let mut held: Vec<usize> = self
            .holders
            .remove(&pair)
            .unwrap_or_default()
            .into_iter()
            .collect();
        held.sort_unstable(); // the same order every run
        for w in held {
            let merged = merge_pair(&words.ids[w], pair, new);
            let count = words.counts[w] as i64;
            count_pairs(&words.ids[w], -count, &mut delta);
            count_pairs(&merged, count, &mut delta);
            for p in merged.windows(2).filter(|p| p[0] == new || p[1] == new) {
                self.holders.entry((p[0], p[1])).or_default().insert(w);
            }
            words.ids[w] = merged;
        }
        for (p, d) in delta.into_iter().filter(|&(_, d)| d != 0) {
            let c = self.counts.entry(p).or_default();
            *c += d;
            self.heap.push((*c, Reverse(p)));
        }
        self.counts.remove(&pair);
    }
}
// ANCHOR_END: pairs

// ANCHOR: train
/// Learns `vocab_size - 256` merges on `text`, splitting it with `pattern` first.
pub fn train(
    text: &str,
    vocab_size: usize,
    pattern: &str,
    specials: Vec<String>,
) -> Result<(Bpe, TrainReport)> {
    if vocab_size < 256 {
        bail!("a byte-level vocabulary needs at least 256 tokens, got {vocab_size}");
    }
    let start = Instant::now();
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut words = Words::new(&Bpe::new(vocab.clone(), vec![], pattern)?, text);
    let mut pairs = PairCounts::new(&words);
    let (mut merges, mut stopped_early) = (Vec::new(), None);
    while vocab.len() < vocab_size {
        let Some((pair, count)) = pairs.most_frequent() else {
            stopped_early = Some(format!(
                "the text has no adjacent pairs left to merge after {} merges: the vocabulary \
                 stops at {} tokens instead of {vocab_size}",
                merges.len(),
                vocab.len()
            ));
            break;
        };
        let new = vocab.len() as u32;
        vocab.push([&vocab[pair.0 as usize][..], &vocab[pair.1 as usize]].concat());
        merges.push((pair, new, count as u64));
        pairs.merge(&mut words, pair, new);
    }
    let report = TrainReport {
        merges,
        unique_pieces: words.ids.len(),
        stopped_early,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((Bpe::new(vocab, specials, pattern)?, report))
}
// ANCHOR_END: train
