//! The module layering of noded: a module may use modules of its own layer or of a layer below,
//! never one above. Reads every `noded/src/**/*.rs`, takes each `crate::<module>` path outside
//! comments, and lists every import of a higher layer as `file:line`.
//!
//! The order (lowest first) is the one the code satisfies; a new top-level module must be put in a
//! layer here, so the rule covers it from its first commit.
//!
//! A second rule of the source: no span guard (`span.enter()`) inside an `async` fn or block, where it
//! would stay entered across `.await`s on whatever the worker polls next; such code uses
//! `#[tracing::instrument]` or `.instrument(span)`.

use std::path::{Path, PathBuf};

/// Lowest first. Within a layer modules may use each other.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "leaf helpers",
        &["exit", "names", "fsutil", "hypervisor", "proctable"],
    ),
    // Every component records into the registry; it depends on none of them.
    ("metrics registry", &["metrics"]),
    // config still parses its handler, restart and cgroup settings with the parsers of containerd
    // and vm, so it shares their layer.
    (
        "engine",
        &["config", "containerd", "cri", "runtime", "kata", "vm"],
    ),
    ("observation", &["observe"]),
    ("interfaces", &["k8s", "api", "http"]),
    ("wiring", &["daemon"]),
];

/// The crate roots: they declare and may use every module.
const ROOTS: &[&str] = &["lib", "main"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// The top-level module a source file belongs to (`observe/mod.rs` -> `observe`).
fn module_of(relative: &Path) -> String {
    let first = relative
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_owned()
}

/// The text with comments blanked (line and block comments, doc comments included), newlines kept
/// so line numbers stay right. String literals are kept: a `crate::` inside one is rare enough.
fn strip_comments(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut block_depth = 0usize;
    let mut in_line_comment = false;
    while i < bytes.len() {
        let rest = &text[i..];
        let c = rest.chars().next().unwrap_or(' ');
        if in_line_comment {
            if c == '\n' {
                in_line_comment = false;
                out.push('\n');
            }
        } else if block_depth > 0 {
            if rest.starts_with("*/") {
                block_depth -= 1;
                i += 2;
                continue;
            }
            if rest.starts_with("/*") {
                block_depth += 1;
                i += 2;
                continue;
            }
            if c == '\n' {
                out.push('\n');
            }
        } else if rest.starts_with("//") {
            in_line_comment = true;
        } else if rest.starts_with("/*") {
            block_depth = 1;
            i += 2;
            continue;
        } else {
            out.push(c);
        }
        i += c.len_utf8();
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules named by `crate::` paths on one line, `crate::{a, b::c}` included.
fn crate_modules(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(pos) = line[from..].find("crate::") {
        let at = from + pos;
        from = at + "crate::".len();
        let before = line[..at].chars().next_back();
        if before.is_some_and(|b| is_ident(b) || b == '$') {
            continue; // `$crate::` in a macro, or a longer identifier ending in `crate`
        }
        let rest = &line[from..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: the first segment of each comma-separated path.
            let mut depth = 0usize;
            let mut item_start = true;
            for (i, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && depth == 0 && is_ident(c) => {
                        let name: String =
                            group[i..].chars().take_while(|&c| is_ident(c)).collect();
                        found.push(name);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest.chars().take_while(|&c| is_ident(c)).collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

/// Every import of a higher layer in one file, as `file:line: a -> b (layer x above layer y)`.
fn violations(relative: &Path, text: &str) -> Vec<String> {
    let from = module_of(relative);
    if ROOTS.contains(&from.as_str()) {
        return Vec::new();
    }
    let Some(from_layer) = layer_of(&from) else {
        return vec![format!(
            "{}: module `{from}` is in no layer of tests/layering.rs",
            relative.display()
        )];
    };
    let mut out = Vec::new();
    for (n, line) in strip_comments(text).lines().enumerate() {
        for to in crate_modules(line) {
            if to == from {
                continue;
            }
            match layer_of(&to) {
                Some(to_layer) if to_layer <= from_layer => {}
                Some(to_layer) => out.push(format!(
                    "{}:{}: {from} ({}) uses {to} ({})",
                    relative.display(),
                    n + 1,
                    LAYERS[from_layer].0,
                    LAYERS[to_layer].0
                )),
                // Items of the crate root (`crate::SOMETHING` declared in lib.rs) or a module in
                // no layer: the latter is reported for its own files.
                None => {}
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_uses_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 20,
        "found only {} files under {}",
        files.len(),
        src.display()
    );
    let mut all = Vec::new();
    for file in &files {
        let text =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let relative = file.strip_prefix(&src).unwrap_or(file);
        all.extend(violations(relative, &text));
    }
    assert!(
        all.is_empty(),
        "{} import(s) against the layering:\n{}",
        all.len(),
        all.join("\n")
    );
}

#[test]
fn the_rule_flags_an_upward_import() {
    // The cycle this test was written against: the observer building the API's protobuf types.
    let found = violations(
        Path::new("observe/mod.rs"),
        "//! Uses [`crate::api`] in a comment only.\n\
         use crate::metrics::Metrics;\n\
         impl crate::api::StatusProvider for Observer {}\n",
    );
    assert_eq!(
        found,
        ["observe/mod.rs:3: observe (observation) uses api (interfaces)"]
    );
    // Grouped imports and block comments.
    let found = violations(
        Path::new("vm/pool.rs"),
        "/* crate::daemon */ use crate::{config::X, http::{Y, Z}};\n",
    );
    assert_eq!(found, ["vm/pool.rs:1: vm (engine) uses http (interfaces)"]);
    // A module nobody placed.
    assert_eq!(
        violations(Path::new("brand_new.rs"), "fn f() {}\n"),
        ["brand_new.rs: module `brand_new` is in no layer of tests/layering.rs"]
    );
    // The crate roots and same-layer use are fine.
    assert!(violations(Path::new("lib.rs"), "use crate::daemon::run;\n").is_empty());
    assert!(violations(Path::new("k8s/feed.rs"), "use crate::api::pb;\n").is_empty());
}

/// `file:line` of every `.enter()` inside the body of an `async fn` or an `async` block. Bodies are
/// found by brace matching on the comment-free text (a heuristic: a brace inside a string literal
/// must be balanced, as format strings are).
fn guards_in_async(relative: &Path, text: &str) -> Vec<String> {
    let code = strip_comments(text);
    let bytes = code.as_bytes();
    let mut bodies: Vec<(usize, usize)> = Vec::new();
    let mut from = 0;
    while let Some(pos) = code[from..].find("async") {
        let at = from + pos;
        from = at + "async".len();
        let before = code[..at].chars().next_back();
        let after = code[from..].chars().next();
        if before.is_some_and(is_ident) || after.is_some_and(is_ident) {
            continue;
        }
        // The body: the first `{` after `async` that is not inside the signature's parentheses
        // (`;` first means a declaration without a body, as in a trait).
        let mut depth = 0usize;
        let mut open = None;
        for (i, &b) in bytes.iter().enumerate().skip(from) {
            match b {
                b'(' | b'<' | b'[' => depth += 1,
                b')' | b'>' | b']' => depth = depth.saturating_sub(1),
                b';' if depth == 0 => break,
                b'{' if depth == 0 => {
                    open = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(open) = open else { continue };
        let mut level = 0usize;
        for (i, &b) in bytes.iter().enumerate().skip(open) {
            match b {
                b'{' => level += 1,
                b'}' => {
                    level -= 1;
                    if level == 0 {
                        bodies.push((open, i));
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = code[from..].find(".enter()") {
        let at = from + pos;
        from = at + 1;
        if bodies.iter().any(|&(a, b)| a < at && at < b) {
            let line = code[..at].matches('\n').count() + 1;
            out.push(format!("{}:{line}", relative.display()));
        }
    }
    out
}

#[test]
fn no_span_guard_inside_async_code() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut all = Vec::new();
    for file in &files {
        let text =
            std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let relative = file.strip_prefix(&src).unwrap_or(file);
        all.extend(guards_in_async(relative, &text));
    }
    assert!(
        all.is_empty(),
        "span guards in async code (use #[tracing::instrument] or .instrument(span)):\n{}",
        all.join("\n")
    );
}

#[test]
fn the_guard_rule_flags_async_fns_and_blocks_only() {
    let text = "\
pub async fn apply(req: &Request) -> Result<(), E> {
    let span = info_span!(\"x\", c = %format!(\"{}\", 1));
    let _g = span.enter();
    wait().await
}
fn sync_one() {
    let _g = span.enter();
}
fn spawner() {
    tokio::spawn(async move {
        let _g = span.enter();
        tick().await;
    });
}
trait T { async fn declared(&self); }
// async fn in_a_comment() { span.enter(); }
";
    assert_eq!(
        guards_in_async(Path::new("containerd/apply.rs"), text),
        ["containerd/apply.rs:3", "containerd/apply.rs:11"]
    );
}
