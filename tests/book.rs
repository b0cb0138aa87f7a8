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
