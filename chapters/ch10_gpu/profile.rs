//! Counting the kernels a training step launches, from CubeCL's own profile log: run with
//! `CUBECL_DEBUG_OPTION=profile CUBECL_DEBUG_LOG=FILE`, CubeCL writes a line per launch.

use std::collections::BTreeMap;

// ANCHOR: launches
/// The kernel launches in a CubeCL profile log, counted per kernel: the log has one line per
/// launch, its duration first (`| 104.0µs | ElemwiseFuse_1056600c`), among the sources of
/// newly compiled kernels and summary tables. A kernel's name loses its hash suffix
/// (`_1056600c`: one per compiled variant), so that the variants of one kernel count together.
pub fn launches(log: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in log.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", duration, name...; a duration is a number with a unit.
        let [first, duration, name, ..] = cells.as_slice() else {
            continue;
        };
        let is_duration = duration.starts_with(|c: char| c.is_ascii_digit())
            && ["ns", "µs", "ms", "s"]
                .iter()
                .any(|u| duration.ends_with(u));
        if !first.is_empty() || !is_duration || name.is_empty() {
            continue;
        }
        *counts.entry(family(name).to_string()).or_insert(0) += 1;
    }
    counts
}

/// `ElemwiseFuse_1056600c` -> `ElemwiseFuse`: a name without its 8-digit hex suffix.
fn family(name: &str) -> &str {
    match name.rsplit_once('_') {
        Some((stem, hash)) if hash.len() == 8 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            stem
        }
        _ => name,
    }
}
// ANCHOR_END: launches

/// The launches of the last whole step of a log whose steps end in `StepMarker` launches
/// (from [`crate::ch10_gpu::mark_step`]): the lines between the last two markers, counted
/// per kernel, most first. The first step compiles and tunes kernels; a later one is what
/// every step costs. `None` without two markers.
pub fn last_step(log: &str) -> Option<Vec<(String, usize)>> {
    let is_marker = |l: &&str| l.starts_with('|') && l.contains("| StepMarker");
    let marks: Vec<usize> = (log.lines().enumerate())
        .filter(|(_, l)| is_marker(l))
        .map(|(i, _)| i)
        .collect();
    let [.., a, b] = marks.as_slice() else {
        return None;
    };
    let between: Vec<&str> = log.lines().skip(a + 1).take(b - a - 1).collect();
    let mut rows: Vec<(String, usize)> = launches(&between.join("\n")).into_iter().collect();
    rows.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    Some(rows)
}
