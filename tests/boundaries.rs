//! The crate's layers, as docs/architecture.md writes them, hold in the code: every
//! `crate::…` path (and `super::…` from a top-level module's own file) in `src/` names a module
//! of a lower layer, and no two modules reach each other through any path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer order written in docs/architecture.md: the lines of the ```text block that
/// follows the `<!-- layers -->` marker, top first.
fn documented_layers(root: &Path) -> Vec<String> {
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).expect("architecture.md");
    let after = doc
        .split_once("<!-- layers -->")
        .expect("docs/architecture.md has a <!-- layers --> marker")
        .1;
    let block = after
        .split_once("```text\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("a ```text block after the marker")
        .0;
    block
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The identifiers at the top level of the `{…}` group that starts at `text[0]`.
fn group_heads(text: &str) -> Vec<String> {
    let mut depth = 0usize;
    let mut items = vec![String::new()];
    for c in text.chars() {
        match c {
            '{' => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => {
                items.push(String::new());
                continue;
            }
            _ => {}
        }
        if depth >= 1
            && let Some(last) = items.last_mut()
        {
            last.push(c);
        }
    }
    items.iter().filter_map(|i| ident_at(i.trim())).collect()
}

/// The identifier `text` starts with.
fn ident_at(text: &str) -> Option<String> {
    let id: String = text
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!id.is_empty() && !id.starts_with(|c: char| c.is_ascii_digit())).then_some(id)
}

/// The top-level modules a source text names after `prefix` (`crate::` or `super::`).
fn named_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices(prefix) {
        // `ollama_batch::crate::` does not occur; a prefix inside an identifier would.
        if text[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &text[i + prefix.len()..];
        if rest.starts_with('{') {
            out.extend(group_heads(rest));
        } else if let Some(id) = ident_at(rest) {
            out.insert(id);
        }
    }
    out
}

/// Source without `//` comments (doc comments name modules in prose).
fn code_of(src: &str) -> String {
    src.lines()
        .map(|l| match l.find("//") {
            // `http://` in a string is not a comment; the rest of such a line is kept.
            Some(i) if !l[..i].ends_with(':') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which top-level module imports which, read from the source tree.
pub fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        let top = parts[0].clone();
        if top == "lib" || top == "main" {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&file).expect("read"));
        let mut named = named_after(&code, "crate::");
        // In src/x.rs and src/x/mod.rs, `super::` is the crate root.
        if parts.len() == 1 || (parts.len() == 2 && parts[1] == "mod") {
            named.extend(named_after(&code, "super::"));
        }
        let entry = graph.entry(top.clone()).or_default();
        entry.extend(named.into_iter().filter(|m| *m != top));
    }
    graph
}

/// The modules `lib.rs` declares.
fn declared_modules(src: &Path) -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))
                .map(|m| m.trim_end_matches(';').to_string())
        })
        .collect()
}

/// What is wrong with `graph` under `layers` (top first): imports that point up or sideways
/// into a higher layer, modules the order does not place, and circles.
pub fn violations(
    graph: &BTreeMap<String, BTreeSet<String>>,
    layers: &[String],
    modules: &BTreeSet<String>,
) -> Vec<String> {
    let rank = |m: &str| layers.iter().position(|l| l == m);
    let mut out = Vec::new();
    for m in modules {
        if rank(m).is_none() {
            out.push(format!(
                "module `{m}` is not in the layer order of docs/architecture.md"
            ));
        }
    }
    for (from, tos) in graph {
        for to in tos {
            if !modules.contains(to) {
                continue; // an item of lib.rs, not a module
            }
            match (rank(from), rank(to)) {
                (Some(a), Some(b)) if b <= a => out.push(format!(
                    "`{from}` imports `{to}`, which is not below it in docs/architecture.md"
                )),
                _ => {}
            }
        }
    }
    // Circles, whatever the order says: a depth-first search for a back edge.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut circle = path[i..].to_vec();
            circle.push(m.to_string());
            out.push(format!("import circle: {}", circle.join(" -> ")));
            return;
        }
        if !done.insert(m.to_string()) {
            return;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, path, done, out);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, graph, &mut Vec::new(), &mut done, &mut out);
    }
    out
}

#[test]
fn no_module_imports_one_of_a_higher_layer_and_none_form_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let layers = documented_layers(root);
    assert!(layers.len() > 10, "layer order read: {layers:?}");
    let src = root.join("src");
    let modules = declared_modules(&src);
    let graph = imports(&src);
    let wrong = violations(&graph, &layers, &modules);
    assert!(
        wrong.is_empty(),
        "the layers of docs/architecture.md do not hold:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn the_check_finds_an_upward_import_and_a_circle() {
    let layers: Vec<String> = ["client", "supervisor", "store", "domain"]
        .map(String::from)
        .to_vec();
    let modules: BTreeSet<String> = layers.iter().cloned().collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph
        .entry("client".into())
        .or_default()
        .insert("store".into());
    graph
        .entry("supervisor".into())
        .or_default()
        .insert("store".into());
    assert!(violations(&graph, &layers, &modules).is_empty());
    // store -> supervisor points up, and closes a circle.
    graph
        .entry("store".into())
        .or_default()
        .insert("supervisor".into());
    let wrong = violations(&graph, &layers, &modules);
    assert!(
        wrong
            .iter()
            .any(|w| w.contains("`store` imports `supervisor`")),
        "{wrong:?}"
    );
    assert!(
        wrong.iter().any(|w| w.contains("import circle")),
        "{wrong:?}"
    );
    // A module the order does not place.
    let mut more = modules.clone();
    more.insert("newcomer".into());
    assert!(
        violations(&BTreeMap::new(), &layers, &more)
            .iter()
            .any(|w| w.contains("`newcomer`"))
    );
    // The reader sees grouped and nested imports, and skips comments.
    let code = code_of(
        "use crate::{store::Store, domain::{A, B}};\n// crate::client in prose\nlet x = crate::wire::f();\nlet u = \"http://x\"; crate::gpu::g();",
    );
    assert_eq!(
        named_after(&code, "crate::"),
        ["domain", "gpu", "store", "wire"].map(String::from).into()
    );
}

#[test]
fn only_the_supervisors_transitions_move_a_request() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let owner = src.join("supervisor").join("transitions.rs");
    let store = src.join("store");
    let mut callers = Vec::new();
    for file in files {
        let code = code_of(&std::fs::read_to_string(&file).expect("read"));
        // The store defines it (and its own tests call it); everything else goes through
        // supervisor/transitions.rs.
        if file != owner && !file.starts_with(&store) && code.contains(".transition_request") {
            callers.push(file.display().to_string());
        }
    }
    assert!(
        callers.is_empty(),
        "only src/supervisor/transitions.rs may ask the store to move a request: {callers:?}"
    );
}
