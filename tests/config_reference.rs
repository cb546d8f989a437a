//! The README's configuration reference names every configuration field, and only
//! real ones: a field added without docs (or docs for a removed field) fails here.
// A test may fail loudly (the filter crate denies these outside tests).
#![allow(clippy::expect_used)]

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};
use sessionguard::config::Config;

/// Every field path the parser accepts, found by asking the parser itself: an unknown
/// field makes serde list the expected ones, and a probe object tells sections
/// (which reject the probe as unknown) from leaves.
fn accepted_fields(prefix: &[String], out: &mut BTreeSet<String>) {
    for name in expected_fields(prefix) {
        let mut path = prefix.to_vec();
        path.push(name);
        let dotted = path.join(".");
        if !expected_fields(&path).is_empty() {
            accepted_fields(&path, out);
        } else {
            out.insert(dotted);
        }
    }
}

fn expected_fields(path: &[String]) -> Vec<String> {
    let probe = json!({ "__probe__": 1 });
    // Sections that are lists of objects (memory.endpoints) are probed as [object].
    for inner in [probe.clone(), Value::Array(vec![probe])] {
        let doc = path.iter().rev().fold(inner, |v, name| {
            let mut m = Map::new();
            m.insert(name.clone(), v);
            Value::Object(m)
        });
        let Err(err) = Config::parse(doc.to_string().as_bytes()) else {
            continue;
        };
        let msg = err.message;
        if let Some(rest) = msg.split("expected one of ").nth(1) {
            return rest
                .split(", ")
                .map(|f| f.trim_matches(|c| c == '`' || c == ' ').to_string())
                .collect();
        }
    }
    Vec::new()
}

fn documented_fields() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("## Configuration reference")
        .nth(1)
        .expect("a configuration reference section")
        .split("\n## ")
        .next()
        .unwrap_or("");
    section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .map(|field| field.replace("[]", ""))
        .collect()
}

#[test]
fn every_field_is_documented_and_every_documented_field_exists() {
    let mut accepted = BTreeSet::new();
    accepted_fields(&[], &mut accepted);
    assert!(accepted.len() > 30, "walker found too little: {accepted:?}");
    let documented = documented_fields();
    let undocumented: Vec<_> = accepted.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&accepted).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "README configuration reference is out of date.\n  missing from README: {undocumented:?}\n  \
         in README but not accepted: {unknown:?}"
    );
}
