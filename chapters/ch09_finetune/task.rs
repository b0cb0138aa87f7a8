//! Two tasks cut from the part of the corpus that pre-training held out: who says this speech,
//! and is this line in Shakespeare's word order.

use crate::common::dataset::{rng_for, split_text};
use anyhow::{Result, bail};
use rand::seq::SliceRandom;
use serde::Serialize;
use std::collections::HashMap;

/// One labelled passage.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text: String,
    /// Index into [`Task::classes`].
    pub label: usize,
}

/// A classification task with a fixed split.
#[derive(Clone, Debug)]
pub struct Task {
    /// The class names (the speakers, most frequent first; or the two orders).
    pub classes: Vec<String>,
    pub train: Vec<Example>,
    pub test: Vec<Example>,
}

// ANCHOR: speeches
/// The speeches of a play text: a line naming the speaker and ending in a colon ("PETRUCHIO:"),
/// then the lines spoken, up to a blank line. Returns (speaker, speech) in text order.
pub fn speeches(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter_map(|block| {
            let (name, speech) = block.trim_matches('\n').split_once('\n')?;
            let is_name = name.ends_with(':') && name.len() < 40 && name.matches(':').count() == 1;
            (is_name && !speech.trim().is_empty())
                .then(|| (name.trim_end_matches(':').to_string(), speech.to_string()))
        })
        .collect()
}
// ANCHOR_END: speeches

// ANCHOR: speaker_task
/// The speeches of the `classes` most frequent speakers in the validation part of `text` (its
/// last 10%, which chapter 4 never trains on), labelled by speaker. Every `test_every`-th
/// speech of each speaker, in text order, is held out for the test: the split is fixed, and
/// each speaker is in it in proportion.
pub fn speaker_task(text: &str, classes: usize, test_every: usize) -> Result<Task> {
    if classes < 2 || test_every < 2 {
        bail!("a task needs at least 2 classes and a test split (test_every >= 2)");
    }
    let (_, held_out) = split_text(text);
    let all = speeches(held_out);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (name, _) in &all {
        *counts.entry(name).or_default() += 1;
    }
    let mut ranked: Vec<(&str, usize)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0))); // most frequent, then by name
    ranked.truncate(classes);
    if ranked.len() < classes || ranked.iter().any(|&(_, n)| n < test_every) {
        bail!(
            "the held-out text has too few speeches for a {classes}-speaker task (found {:?}); \
             use fewer classes or another corpus in the play format (NAME:, lines, blank line)",
            ranked
        );
    }
    let classes: Vec<String> = ranked.iter().map(|(n, _)| n.to_string()).collect();
    let (mut train, mut test, mut seen) = (Vec::new(), Vec::new(), vec![0; classes.len()]);
    for (name, text) in all {
        if let Some(label) = classes.iter().position(|c| *c == name) {
            seen[label] += 1;
            let example = Example { text, label };
            match seen[label] % test_every == 0 {
                true => test.push(example),
                false => train.push(example),
            }
        }
    }
    Ok(Task {
        classes,
        train,
        test,
    })
}
// ANCHOR_END: speaker_task

// ANCHOR: corrupted_task
/// How the second class of a [`corrupted_task`] breaks a line of verse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Corruption {
    /// Shuffle the words between the first and the last (so a capital letter or a closing
    /// stop tells nothing).
    WordOrder,
    /// Shuffle the inner letters of every word of 5+ letters ("gentleman" -> "gnetlaemn"),
    /// the first and last letters staying.
    Spelling,
}

/// Is this line as Shakespeare wrote it? The spoken lines of the held-out part with at least 6
/// words; every other one, in text order, is broken by `corruption`. Label 1: as written,
/// 0: broken. Each line appears once, in one version only, and every `test_every`-th one is
/// held out for the test. Like CoLA, GPT-1's test of grammar, it asks for what a language
/// model learns from raw text alone: which words, and which orders of words, occur.
pub fn corrupted_task(text: &str, corruption: Corruption, test_every: usize) -> Result<Task> {
    if test_every < 2 {
        bail!("a task needs a test split (test_every >= 2)");
    }
    let (_, held_out) = split_text(text);
    let spoken = speeches(held_out);
    let lines = spoken.iter().flat_map(|(_, speech)| speech.lines());
    let (mut train, mut test, mut kept) = (Vec::new(), Vec::new(), 0);
    for line in lines {
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        let Some(breakable) = breakable(&words, corruption) else {
            continue; // too short, or nothing to break
        };
        let label = (kept + 1) % 2; // as written, broken, as written, ...
        // A generator of the task's own, from the line's number: no global state.
        let mut rng = rng_for(0, CORRUPT_STREAM, kept);
        let mut broken = words.clone();
        while label == 0 && broken == words {
            match corruption {
                Corruption::WordOrder => broken[1..words.len() - 1].shuffle(&mut rng),
                Corruption::Spelling => {
                    for &i in &breakable {
                        let mut letters: Vec<char> = words[i].chars().collect();
                        let n = letters.len();
                        letters[1..n - 1].shuffle(&mut rng);
                        broken[i] = letters.into_iter().collect();
                    }
                }
            }
        }
        kept += 1;
        let example = Example {
            text: broken.join(" "),
            label,
        };
        match kept % test_every == 0 {
            true => test.push(example),
            false => train.push(example),
        }
    }
    if test.len() < 2 {
        bail!("the held-out text has too few lines of 6+ words for this task");
    }
    Ok(Task {
        classes: vec!["broken".into(), "as written".into()],
        train,
        test,
    })
}

/// The words a corruption may change, or `None` when the line is left out (fewer than 6
/// words, or nothing that a shuffle would change).
fn breakable(words: &[String], corruption: Corruption) -> Option<Vec<usize>> {
    let n = words.len();
    if n < 6 {
        return None;
    }
    let found: Vec<usize> = match corruption {
        Corruption::WordOrder => match words[1..n - 1].iter().all(|w| *w == words[1]) {
            true => vec![],
            false => (1..n - 1).collect(),
        },
        Corruption::Spelling => (0..n)
            .filter(|&i| {
                let w: Vec<char> = words[i].chars().collect();
                let inner = &w[1..w.len().max(2) - 1];
                w.len() >= 5
                    && w.iter().all(|c| c.is_ascii_alphabetic())
                    && inner.iter().any(|c| *c != inner[0])
            })
            .collect(),
    };
    (!found.is_empty()).then_some(found)
}

/// `rng_for`'s purpose for the corrupted task's shuffles (apart from chapter 4's streams).
const CORRUPT_STREAM: u64 = 9;
// ANCHOR_END: corrupted_task

impl Task {
    /// How many examples of each class a split holds.
    pub fn counts(&self, examples: &[Example]) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for e in examples {
            counts[e.label] += 1;
        }
        counts
    }

    /// The test accuracy of always answering the most frequent training class.
    pub fn majority_baseline(&self) -> f64 {
        let train = self.counts(&self.train);
        let majority = (0..train.len()).max_by_key(|&i| train[i]).unwrap_or(0);
        self.counts(&self.test)[majority] as f64 / self.test.len().max(1) as f64
    }
}
