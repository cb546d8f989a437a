//! The filter's modules depend on each other one way: no import cycle among `src/`.
//!
//! Every `.rs` file under `src/` is a module (`src/a.rs` and `src/a/mod.rs` are `a`,
//! `src/a/b.rs` is `a::b`); inline `mod x { .. }` blocks (tests) belong to their file's
//! module. A path `crate::..`, `super::..`, `self::..` or `child::..` (a module the
//! current one declares) is an edge to the deepest module it names. Edges from a module
//! to itself or to one of its ancestors are not counted: the files of one folder are
//! one mechanism and may use what their `mod.rs` holds. Test code counts like any other.
// A test may fail loudly (the filter crate denies these outside tests).
#![allow(clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// Comments, strings and char literals blanked out (their braces and paths would mislead).
fn code_only(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_char(prev(&b, i)) {
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < b.len() && b[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            } else if b.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev(b: &[char], i: usize) -> char {
    if i == 0 {
        ' '
    } else {
        b[i - 1]
    }
}

fn ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// One token stream: identifiers, `::` and single punctuation characters.
fn tokens(code: &str) -> Vec<String> {
    let b: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if ident_char(c) {
            let start = i;
            while i < b.len() && ident_char(b[i]) {
                i += 1;
            }
            out.push(b[start..i].iter().collect());
        } else if c == ':' && b.get(i + 1) == Some(&':') {
            out.push("::".to_string());
            i += 2;
        } else if c.is_whitespace() {
            i += 1;
        } else {
            out.push(c.to_string());
            i += 1;
        }
    }
    out
}

/// The module's path segments for a file below `src/`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

fn collect(dir: &Path, root: &Path, files: &mut Vec<(Vec<String>, String)>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("read src/")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, root, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).expect("below src/");
            let text = fs::read_to_string(&path).expect("read a source file");
            files.push((module_of(rel), code_only(&text)));
        }
    }
}

/// Every path in `toks` that starts at `i` (after `use` or anywhere in code), expanded
/// over `{a, b::c}` groups, as segment lists.
fn expand(toks: &[String], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix;
    loop {
        match toks.get(i).map(String::as_str) {
            Some("{") => {
                i += 1;
                loop {
                    match toks.get(i).map(String::as_str) {
                        Some("}") => return i + 1,
                        Some(",") => i += 1,
                        None => return i,
                        _ => i = expand(toks, i, path.clone(), out),
                    }
                }
            }
            Some(t) if t.chars().next().is_some_and(ident_char) => {
                path.push(t.to_string());
                i += 1;
                if toks.get(i).map(String::as_str) == Some("::") {
                    i += 1;
                } else {
                    out.push(path);
                    // `as name` and the like end the path.
                    while let Some(t) = toks.get(i) {
                        if t == "," || t == "}" || t == ";" || t == "{" {
                            break;
                        }
                        if t == "as" {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    return i;
                }
            }
            _ => {
                out.push(path);
                return i;
            }
        }
    }
}

type Graph = BTreeMap<Vec<String>, BTreeSet<Vec<String>>>;

/// The module graph of `files` (module path, code) and the cycles in it.
fn graph_and_cycles(files: &[(Vec<String>, String)]) -> (Graph, Vec<String>) {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|(m, _)| m.clone()).collect();

    let mut edges: Graph = BTreeMap::new();
    for (module, code) in files {
        let toks = tokens(code);
        // The inline modules open at this point: (name, brace depth at which it closes).
        let mut inline: Vec<(String, usize)> = Vec::new();
        let mut depth = 0usize;
        let mut i = 0;
        while i < toks.len() {
            let t = toks[i].as_str();
            if t == "{" {
                depth += 1;
            } else if t == "}" {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            if t == "mod" && toks.get(i + 2).map(String::as_str) == Some("{") {
                inline.push((toks[i + 1].clone(), depth));
                i += 2;
                continue;
            }
            let here: Vec<String> = module
                .iter()
                .cloned()
                .chain(inline.iter().map(|(n, _)| n.clone()))
                .collect();
            let starts_path = toks.get(i + 1).map(String::as_str) == Some("::")
                && (i == 0 || toks[i - 1] != "::");
            if !starts_path {
                i += 1;
                continue;
            }
            let mut paths = Vec::new();
            let next = expand(&toks, i, Vec::new(), &mut paths);
            for path in paths {
                let mut base = here.clone();
                let mut rest = path.as_slice();
                match rest.first().map(String::as_str) {
                    Some("crate") => {
                        base.clear();
                        rest = &rest[1..];
                    }
                    Some("self") => rest = &rest[1..],
                    Some("super") => {
                        while rest.first().map(String::as_str) == Some("super") {
                            base.pop();
                            rest = &rest[1..];
                        }
                    }
                    Some(first) => {
                        let mut child = here.clone();
                        child.push(first.to_string());
                        if !modules.contains(&child) {
                            continue;
                        }
                    }
                    None => continue,
                }
                let mut full = base;
                full.extend(rest.iter().cloned());
                // The deepest file module the path names.
                let target = (0..=full.len())
                    .rev()
                    .map(|n| full[..n].to_vec())
                    .find(|p| modules.contains(p));
                let Some(target) = target else { continue };
                if target.is_empty() || module.starts_with(&target) {
                    continue; // the crate root, itself or an ancestor
                }
                edges.entry(module.clone()).or_default().insert(target);
            }
            i = next.max(i + 1);
        }
    }

    // Depth-first search for a back edge; every cycle found is reported once.
    let mut cycles: Vec<String> = Vec::new();
    let mut state: BTreeMap<Vec<String>, u8> = BTreeMap::new(); // 1 open, 2 done
    let mut stack: Vec<Vec<String>> = Vec::new();
    fn visit(
        m: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(m.clone(), 1);
        stack.push(m.clone());
        for n in edges.get(m).into_iter().flatten() {
            match state.get(n) {
                Some(1) => {
                    let from = stack.iter().position(|s| s == n).unwrap_or(0);
                    let mut names: Vec<String> =
                        stack[from..].iter().map(|s| s.join("::")).collect();
                    names.push(n.join("::"));
                    cycles.push(names.join(" -> "));
                }
                Some(_) => {}
                None => visit(n, edges, state, stack, cycles),
            }
        }
        stack.pop();
        state.insert(m.clone(), 2);
    }
    for m in &modules {
        if !state.contains_key(m) {
            visit(m, &edges, &mut state, &mut stack, &mut cycles);
        }
    }
    (edges, cycles)
}

#[test]
fn no_import_cycle_among_src_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &root, &mut files);
    let (edges, cycles) = graph_and_cycles(&files);
    let listing: Vec<String> = edges
        .iter()
        .map(|(m, to)| {
            let to: Vec<String> = to.iter().map(|t| t.join("::")).collect();
            format!("  {} -> {}", m.join("::"), to.join(", "))
        })
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles among src/ modules:\n  {}\n(module graph:\n{})",
        cycles.join("\n  "),
        listing.join("\n")
    );
    // The check sees the graph at all: the guard pipeline uses the limiter.
    assert!(edges
        .get(&vec!["guard".to_string()])
        .is_some_and(|to| to.contains(&vec!["limiter".to_string()])));
}

#[test]
fn the_check_finds_a_planted_cycle() {
    let file = |m: &str, code: &str| {
        let path = m.split("::").map(String::from).collect();
        (path, code_only(code))
    };
    let files = [
        file("a", "use crate::b::{X, c::Y};"),
        file("b", "pub struct X; mod c; // crate::a is only a comment"),
        file(
            "b::c",
            "use super::X; pub fn f() { crate::a::g(\"crate::b\") }",
        ),
    ];
    let (_, cycles) = graph_and_cycles(&files);
    assert_eq!(cycles, vec!["a -> b::c -> a".to_string()]);
}
