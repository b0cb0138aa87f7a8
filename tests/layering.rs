//! The library's dependency order is the reading order: a chapter's library code uses only
//! chapters before it, and `common` uses no chapter. (A binary, `main.rs`, may reach ahead,
//! as chapter 4's does for chapter 5's faster kernels, and says so where it does.)

use std::path::Path;

/// Where a module of `chapters/` stands in the reading order.
fn rank(module: &str) -> usize {
    match module {
        "common" => 0,
        // Appendices after every chapter: they may use any of them.
        "compare_backends" | "exercises" => 100,
        m => m[2..4]
            .parse()
            .unwrap_or_else(|_| panic!("unknown module {m}")),
    }
}

/// Edges waiting for their fix, each named here so that it cannot spread unseen (none).
const PENDING: &[(&str, &str)] = &[];

/// Every `crate::<module>` a file names.
fn uses(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let is_module = name.starts_with("ch")
            && name[2..].starts_with(|c: char| c.is_ascii_digit())
            || name == "compare_backends"
            || name == "exercises";
        if is_module {
            found.push(name);
        }
    }
    found
}

#[test]
fn library_code_uses_only_earlier_chapters() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("chapters");
    let mut wrong = Vec::new();
    let mut pending_seen = Vec::new();
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let module = dir.file_name().unwrap().to_str().unwrap().to_string();
        for file in std::fs::read_dir(&dir).unwrap() {
            let file = file.unwrap().path();
            let name = file.file_name().unwrap().to_str().unwrap().to_string();
            if name == "main.rs" || !name.ends_with(".rs") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            let here = format!("{module}/{name}");
            for used in uses(&text) {
                if used == module || rank(&used) < rank(&module) {
                    continue;
                }
                match PENDING.contains(&(here.as_str(), used.as_str())) {
                    true => pending_seen.push((here.clone(), used)),
                    false => wrong.push(format!("{here} uses crate::{used}")),
                }
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(wrong.is_empty(), "library code reaching ahead: {wrong:#?}");
    // A fixed edge leaves the list too.
    for (file, module) in PENDING {
        assert!(
            pending_seen.iter().any(|(f, m)| f == file && m == module),
            "{file} no longer uses {module}: remove it from PENDING"
        );
    }
}

#[test]
fn the_check_sees_a_use_of_a_later_chapter() {
    assert_eq!(
        uses("use crate::ch05_fast::{Kernels, fused_attention};\nuse crate::common::x;"),
        vec!["ch05_fast"]
    );
    assert!(rank("ch03_gpt") < rank("ch05_fast") && rank("common") < rank("ch01_bigram"));
}
