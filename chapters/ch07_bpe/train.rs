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

// ANCHOR: train
/// Learns `vocab_size - 256` merges on `text`, splitting it with `pattern` first. Ties between
/// equally frequent pairs go to the smaller pair of ids, so training is deterministic.
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
    let words = Words::new(&Bpe::new(vocab.clone(), vec![], pattern)?, text);
    let Words { mut ids, counts } = words;
    // Pair counts, which words hold each pair, and a max-heap of (count, pair) whose stale
    // entries (the count has changed since) are skipped when they come up.
    let mut pairs: HashMap<Pair, i64> = HashMap::new();
    let mut holders: HashMap<Pair, HashSet<usize>> = HashMap::new();
    for (w, word) in ids.iter().enumerate() {
        count_pairs(word, counts[w] as i64, &mut pairs);
        for p in word.windows(2) {
            holders.entry((p[0], p[1])).or_default().insert(w);
        }
    }
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> =
        pairs.iter().map(|(&p, &c)| (c, Reverse(p))).collect();
    let mut merges = Vec::new();
    let mut stopped_early = None;
    while vocab.len() < vocab_size {
        let Some((count, Reverse(pair))) = heap.pop() else {
            stopped_early = Some(format!(
                "the text has no adjacent pairs left to merge after {} merges: the vocabulary \
                 stops at {} tokens instead of {vocab_size}",
                merges.len(),
                vocab.len()
            ));
            break;
        };
        if pairs.get(&pair) != Some(&count) || count <= 0 {
            continue; // stale
        }
        let new = vocab.len() as u32;
        vocab.push([&vocab[pair.0 as usize][..], &vocab[pair.1 as usize]].concat());
        merges.push((pair, new, count as u64));
        let mut delta = HashMap::new();
        let mut held: Vec<usize> = holders
            .remove(&pair)
            .unwrap_or_default()
            .into_iter()
            .collect();
        held.sort_unstable();
        for w in held {
            let merged = merge_pair(&ids[w], pair, new);
            if merged.len() == ids[w].len() {
                continue;
            }
            count_pairs(&ids[w], -(counts[w] as i64), &mut delta);
            count_pairs(&merged, counts[w] as i64, &mut delta);
            for p in merged.windows(2).filter(|p| p[0] == new || p[1] == new) {
                holders.entry((p[0], p[1])).or_default().insert(w);
            }
            ids[w] = merged;
        }
        for (p, d) in delta.into_iter().filter(|&(_, d)| d != 0) {
            let c = pairs.entry(p).or_default();
            *c += d;
            heap.push((*c, Reverse(p)));
        }
        pairs.remove(&pair);
    }
    let report = TrainReport {
        merges,
        unique_pieces: ids.len(),
        stopped_early,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((Bpe::new(vocab, specials, pattern)?, report))
}
// ANCHOR_END: train
