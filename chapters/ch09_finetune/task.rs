//! The task: who says this speech? Cut from the part of the corpus that pre-training held out.

use crate::common::dataset::split_text;
use anyhow::{Result, bail};
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
    /// The speakers, most frequent first.
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
