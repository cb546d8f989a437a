//! A panic in the filter aborts the Envoy worker's VM (`panic = "abort"`), and with
//! `failure_policy: FAIL_OPEN` the guard is then simply gone. The pure core is fuzzed
//! (tests/fuzz.rs); this test audits the host glue, `src/host/*.rs`, the only code that
//! receives data from Envoy, for the ways it could still panic on host data:
//!
//! - the crate's lints (Cargo.toml `[lints]`) deny `unwrap`, `expect`, `panic!`,
//!   `unreachable!`, `todo!`, `unimplemented!`, indexing and slicing outside tests, and
//!   `unsafe` outside `abi.rs`; what no lint says is checked here:
//! - no `assert!`/`assert_eq!`/`assert_ne!` (only `debug_assert*`, compiled out in release);
//! - no SDK calls that panic on unexpected host statuses: no `hostcalls::`, no SDK
//!   trait methods that wrap hostcalls (`self.get_shared_data(..)`, ...): every
//!   hostcall goes through `src/host/abi.rs`, which returns statuses as values (one
//!   documented exception there: `hostcalls::dispatch_http_call`, whose token
//!   registration the SDK's dispatcher needs to route the response);
//! - `extern` and `from_raw_parts` only in `abi.rs`;
//! - the release profile aborts on panic (a panic must not unwind across the ABI).
// A test may fail loudly (the filter crate denies these outside tests).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]
#![cfg(not(target_arch = "wasm32"))]

use std::fs;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The source with comments, string and char literals blanked (same length and lines),
/// so that what remains is code.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |c: u8| if c == b'\n' { b'\n' } else { b' ' };
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            while i < b.len() && !b[i..].starts_with(b"*/") {
                out.push(blank(b[i]));
                i += 1;
            }
            out.extend_from_slice(b"  ");
            i += 2;
        } else if b[i] == b'"' || (b[i] == b'b' && b.get(i + 1) == Some(&b'"')) {
            if b[i] == b'b' {
                out.push(b' ');
                i += 1;
            }
            out.push(b'"');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(b'"');
            i += 1;
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            out.extend_from_slice(b"' '");
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            // '\n', '\'', '\u{..}'
            let end = b[i + 2..]
                .iter()
                .position(|&c| c == b'\'')
                .map_or(b.len(), |p| i + 3 + p);
            out.extend(std::iter::repeat_n(b' ', end - i));
            i = end;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("blanking keeps ASCII structure")
}

fn host_files() -> Vec<(String, String)> {
    let dir = root().join("src/host");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .expect("src/host exists")
        .map(|e| e.expect("readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "expected the host modules in {dir:?}");
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, code_only(&fs::read_to_string(&p).expect("readable")))
        })
        .collect()
}

fn line_of(code: &str, at: usize) -> usize {
    code[..at].matches('\n').count() + 1
}

/// Where `needle` occurs as code (not inside a longer identifier).
fn find_all<'a>(code: &'a str, needle: &'a str) -> impl Iterator<Item = usize> + 'a {
    code.match_indices(needle)
        .map(|(i, _)| i)
        .filter(move |&i| {
            let before = code[..i].chars().next_back();
            let starts_ident = needle.starts_with(|c: char| c.is_alphanumeric() || c == '_');
            !(starts_ident && before.is_some_and(|c| c.is_alphanumeric() || c == '_'))
        })
}

/// SDK methods (on `Context`, `HttpContext`, `RootContext`) that wrap hostcalls and
/// panic on statuses they do not expect.
const SDK_WRAPPERS: &[&str] = &[
    "get_current_time",
    "get_property",
    "set_property",
    "get_shared_data",
    "set_shared_data",
    "register_shared_queue",
    "resolve_shared_queue",
    "dequeue_shared_queue",
    "enqueue_shared_queue",
    "dispatch_http_call",
    "get_http_call_response_header",
    "get_http_call_response_body",
    "get_http_call_response_trailer",
    "dispatch_grpc_call",
    "get_grpc_",
    "cancel_grpc_call",
    "open_grpc_stream",
    "send_grpc_stream_message",
    "close_grpc_stream",
    "call_foreign_function",
    "get_plugin_configuration",
    "get_vm_configuration",
    "set_tick_period",
    "get_http_request_header",
    "get_http_request_body",
    "get_http_request_trailer",
    "set_http_request_header",
    "add_http_request_header",
    "set_http_request_body",
    "set_http_request_trailer",
    "add_http_request_trailer",
    "resume_http_request",
    "reset_http_request",
    "get_http_response_header",
    "get_http_response_body",
    "get_http_response_trailer",
    "set_http_response_header",
    "add_http_response_header",
    "set_http_response_body",
    "set_http_response_trailer",
    "add_http_response_trailer",
    "resume_http_response",
    "reset_http_response",
    "send_http_response",
    "send_grpc_response",
    "get_http_request_headers",
    "get_http_response_headers",
];

#[test]
fn host_code_has_no_release_asserts() {
    // `assert*!` panics in release builds too (only `debug_assert*` is compiled out);
    // no clippy lint denies it. Unwrap, expect, panic, unreachable, todo, unimplemented
    // and indexing are denied by the crate's lints (Cargo.toml).
    let mut found = Vec::new();
    for (name, code) in host_files() {
        for needle in ["assert!", "assert_eq!", "assert_ne!"] {
            for at in find_all(&code, needle) {
                found.push(format!("{name}:{}: {needle}", line_of(&code, at)));
            }
        }
    }
    assert!(
        found.is_empty(),
        "release asserts in src/host:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_hostcall_goes_through_abi_rs() {
    let mut found = Vec::new();
    for (name, code) in host_files() {
        for at in find_all(&code, "hostcalls") {
            // The one exception, in abi.rs: the SDK's dispatcher routes call responses
            // by a token map that only its own `dispatch_http_call` fills (abi.rs says
            // why it cannot panic on Envoy's statuses).
            let exempt = name == "abi.rs"
                && code[at..].starts_with("hostcalls::dispatch_http_call(")
                && code[..at].ends_with("proxy_wasm::");
            if !exempt {
                found.push(format!("{name}:{}: hostcalls", line_of(&code, at)));
            }
        }
        for method in SDK_WRAPPERS {
            for at in find_all(&code, method) {
                // A call through `self.` (or any receiver) of an SDK wrapper.
                let before = code[..at].trim_end();
                if before.ends_with('.') && !before.ends_with("abi.") {
                    found.push(format!("{name}:{}: .{method}(", line_of(&code, at)));
                }
            }
        }
        if name != "abi.rs" {
            // `unsafe` itself is denied outside abi.rs by the crate's lints.
            for needle in ["extern", "from_raw_parts"] {
                for at in find_all(&code, needle) {
                    found.push(format!(
                        "{name}:{}: {needle} outside abi.rs",
                        line_of(&code, at)
                    ));
                }
            }
        }
        // `proxy_wasm::` only for traits, types and the entry point.
        for at in find_all(&code, "proxy_wasm::") {
            let rest = &code[at + "proxy_wasm::".len()..];
            let ok = ["traits::", "types::", "main!", "set_root_context"]
                .iter()
                .any(|p| rest.starts_with(p))
                || (name == "abi.rs" && rest.starts_with("hostcalls::dispatch_http_call("));
            if !ok {
                let what: String = rest.chars().take(30).collect();
                found.push(format!("{name}:{}: proxy_wasm::{what}", line_of(&code, at)));
            }
        }
    }
    assert!(
        found.is_empty(),
        "host code that bypasses src/host/abi.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn abi_functions_return_statuses_not_panics() {
    let code = code_only(&fs::read_to_string(root().join("src/host/abi.rs")).expect("abi.rs"));
    // Every `pub fn` returns a value the caller must look at (or nothing, for logging).
    let mut unchecked = Vec::new();
    for (at, _) in code.match_indices("pub fn ") {
        let sig_end = code[at..].find('{').map_or(code.len(), |p| at + p);
        let sig = &code[at..sig_end];
        let name: String = sig["pub fn ".len()..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let returns_status = sig.contains("Result<");
        if !returns_status && !["log", "now_ns"].contains(&name.as_str()) {
            unchecked.push(name);
        }
    }
    assert!(
        unchecked.is_empty(),
        "abi.rs functions that hide the host status: {unchecked:?}"
    );
}

#[test]
fn release_profile_aborts_on_panic() {
    let toml = fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let section = toml
        .split("\n[")
        .find(|s| s.starts_with("profile.release]"))
        .expect("a [profile.release] section");
    let panic_line = section
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("panic"))
        .expect("panic = ... in [profile.release]");
    assert_eq!(panic_line.replace(' ', ""), "panic=\"abort\"");
}

#[test]
fn the_audit_catches_what_it_forbids() {
    // The scanner itself: literals and comments are not code, the rest is.
    let code = code_only(
        "assert!(a); // assert_eq!(\n let s = \"assert_ne!\"; let c = '['; extern \"C\" {}",
    );
    assert!(code.contains("assert!"));
    assert!(!code.contains("assert_eq!"));
    assert!(!code.contains("assert_ne!"));
    assert!(!code.contains('['), "{code}");
    assert!(code.contains("extern"));
}
