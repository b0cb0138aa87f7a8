//! The book: every `{{#include}}` resolves to an existing file and anchor, and every
//! relative link or picture points at a file that exists.

use std::fs;
use std::path::{Path, PathBuf};

fn pages() -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src");
    let mut pages: Vec<PathBuf> = fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    assert!(pages.len() >= 5, "book pages found: {pages:?}");
    pages
}

/// The `{{#include ...}}` targets of a page: (path, optional anchor).
fn includes(text: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("{{#include ") {
        let rest = &text[i + "{{#include ".len()..];
        let end = rest.find("}}").expect("closed include");
        let target = rest[..end].trim();
        let (path, anchor) = match target.split_once(':') {
            Some((p, a)) if !a.chars().next().is_some_and(|c| c.is_ascii_digit()) => {
                (p, Some(a.to_string()))
            }
            Some((p, _)) => (p, None),
            None => (target, None),
        };
        out.push((path.to_string(), anchor));
    }
    out
}

#[test]
fn every_include_resolves_to_a_file_and_anchor() {
    let mut count = 0;
    for page in pages() {
        let text = fs::read_to_string(&page).unwrap();
        for (path, anchor) in includes(&text) {
            let file = page.parent().unwrap().join(&path);
            let body = fs::read_to_string(&file)
                .unwrap_or_else(|_| panic!("{}: include of missing file {path}", page.display()));
            if let Some(anchor) = anchor {
                let start = format!("ANCHOR: {anchor}\n");
                let end = format!("ANCHOR_END: {anchor}\n");
                assert!(
                    body.contains(&start) && body.contains(&end),
                    "{}: no anchor `{anchor}` in {path}",
                    page.display()
                );
            }
            count += 1;
        }
    }
    assert!(count > 20, "only {count} includes found");
}

#[test]
fn every_relative_link_and_picture_exists() {
    for page in pages() {
        let text = fs::read_to_string(&page).unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let target = &rest[..rest.find(')').expect("closed link")];
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let file = target.split('#').next().unwrap();
            assert!(
                page.parent().unwrap().join(file).exists(),
                "{}: broken link {target}",
                page.display()
            );
        }
    }
}

#[test]
fn summary_lists_every_page() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src");
    let summary = fs::read_to_string(src.join("SUMMARY.md")).unwrap();
    for page in pages() {
        let name = page.file_name().unwrap().to_str().unwrap();
        if name != "SUMMARY.md" {
            assert!(
                summary.contains(&format!("({name})")),
                "SUMMARY.md does not list {name}"
            );
        }
    }
}

/// Every `ANCHOR:` in the code is included by some page (no listing the book forgot).
#[test]
fn every_anchor_in_the_code_is_included_by_the_book() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut included = std::collections::HashSet::new();
    for page in pages() {
        let text = fs::read_to_string(&page).unwrap();
        for (path, anchor) in includes(&text) {
            if let Some(anchor) = anchor {
                let file = page.parent().unwrap().join(&path);
                included.insert((fs::canonicalize(file).unwrap(), anchor));
            }
        }
    }
    let mut missing = Vec::new();
    let mut stack = vec![root.join("chapters")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                if let Some(anchor) = line.trim().strip_prefix("// ANCHOR: ") {
                    let key = (fs::canonicalize(&path).unwrap(), anchor.to_string());
                    if !included.contains(&key) {
                        missing.push(format!("{}:{anchor}", path.display()));
                    }
                }
            }
        }
    }
    assert!(missing.is_empty(), "anchors no page includes: {missing:#?}");
}

/// "N.M Title" of every numbered section: `## N.M Title` in a page, `== N.M Title ==` in what a
/// binary printed.
fn numbered(text: &str, prefix: &str, suffix: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| l.strip_suffix(suffix).unwrap_or(l).trim().to_string())
        .filter(|l| {
            l.split(' ').next().is_some_and(|n| {
                n.contains('.') && n.chars().all(|c| c.is_ascii_digit() || c == '.')
            })
        })
        .collect()
}

/// A chapter's page has exactly the numbered sections its binary prints, with the same titles.
#[test]
fn each_chapter_page_numbers_its_sections_as_the_binary_prints_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src");
    let mut checked = 0;
    for page in pages() {
        let name = page.file_stem().unwrap().to_str().unwrap().to_string();
        if !name.starts_with("ch0") {
            continue;
        }
        let in_book = numbered(&fs::read_to_string(&page).unwrap(), "## ", "");
        // Every recording of this chapter (other backends, presets, --bench) together.
        let mut printed = Vec::new();
        for entry in fs::read_dir(src.join("recorded")).unwrap() {
            let dir = entry.unwrap().path();
            let folder = dir.file_name().unwrap().to_str().unwrap().to_string();
            // Folders of the chapter's runs (the samples folder holds no run's output).
            let run = dir.join("output.txt");
            if (folder == name || folder.starts_with(&format!("{name}-"))) && run.exists() {
                let out = fs::read_to_string(run).unwrap();
                printed.extend(numbered(&out, "== ", " =="));
            }
        }
        // A title may carry the run's details after a colon or parenthesis ("Training (Pre-LN)").
        let stem = |s: &str| s.split(['(', ':']).next().unwrap().trim().to_string();
        let printed: std::collections::BTreeSet<String> = printed.iter().map(|s| stem(s)).collect();
        let in_book: std::collections::BTreeSet<String> = in_book.iter().map(|s| stem(s)).collect();
        assert_eq!(
            in_book, printed,
            "{name}: book sections vs printed sections"
        );
        checked += 1;
    }
    assert!(checked >= 4, "{checked} chapter pages checked");
}

/// The numbers the prose takes from runs, marked `NUMBER<!-- in: recorded/FILE -->`: (page,
/// number, file).
fn marked_numbers() -> Vec<(PathBuf, String, String)> {
    let mut out = Vec::new();
    for page in pages() {
        let text = fs::read_to_string(&page).unwrap();
        for (i, _) in text.match_indices("<!-- in: ") {
            let rest = &text[i + "<!-- in: ".len()..];
            let file = rest[..rest.find("-->").expect("closed marker")].trim();
            // A unit right after the number ("59.5%", "1.6x") is not part of it.
            let before = text[..i].trim_end().trim_end_matches(['%', 'x', '×']);
            let start = before
                .rfind(|c: char| !(c.is_ascii_digit() || ".,-+eE".contains(c)))
                .map_or(0, |j| j + 1);
            let number = before[start..].trim_matches(|c| c == '.' || c == ',');
            out.push((page.clone(), number.to_string(), file.to_string()));
        }
    }
    out
}

/// Whether `text` holds `number` as a whole number (not inside a longer one), with or without
/// its thousands separators.
fn holds_number(text: &str, number: &str) -> bool {
    [number.to_string(), number.replace(',', "")]
        .iter()
        .any(|n| {
            text.match_indices(n.as_str()).any(|(i, _)| {
                let before = text[..i].chars().next_back();
                let after = text[i + n.len()..].chars().next();
                let digit = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
                // A digit right before or after, or a decimal part after, means a longer number.
                let decimals = after == Some('.') && digit(text[i + n.len() + 1..].chars().next());
                !(digit(before) || digit(after) || decimals)
            })
        })
}

/// A number the prose takes from a recorded run is in that recording: re-recording a run that
/// changes it fails here until the prose follows.
#[test]
fn every_marked_number_in_the_prose_is_in_its_recording() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("book/src");
    let marked = marked_numbers();
    for (page, number, file) in &marked {
        assert!(
            number.chars().any(|c| c.is_ascii_digit()),
            "{}: a marker for {file} follows no number",
            page.display()
        );
        let text = fs::read_to_string(src.join(file))
            .unwrap_or_else(|_| panic!("{}: marker names missing file {file}", page.display()));
        assert!(
            holds_number(&text, number),
            "{}: {number} is not in {file} (re-recorded? update the prose)",
            page.display()
        );
    }
    assert!(holds_number("x 3151 y", "3,151") && !holds_number("0.123", "0.12"));
    assert!(!holds_number("13.5", "3.5") && !holds_number("3.51", "3.5"));
}
