//! The layering the code promises (docs/architecture.md), checked on the source: no two top-level modules depend
//! on each other, directly or around a circle, and the messaging core imports no protocol crate.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Modules of the core: domain values, rules and SQL, for every transport alike.
const CORE: &[&str] = &[
    "registry",
    "auth",
    "c2d",
    "feedback",
    "d2c",
    "notify",
    "throttle",
    "postgres",
    "keys",
    "lock_token",
];

/// Crates that belong to a transport, never to the core.
const PROTOCOL_CRATES: &[&str] = &[
    "axum",
    "hyper",
    "hyper_util",
    "http",
    "http_body_util",
    "tower",
    "tower_http",
    "utoipa",
    "utoipa_axum",
    "utoipa_swagger_ui",
    "rumqttc",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules `lib.rs` declares.
fn top_level_modules() -> BTreeSet<String> {
    let lib = fs::read_to_string(src().join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').trim().to_string())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source of each top-level module (every file under it), without comments.
fn sources() -> BTreeMap<String, String> {
    let modules = top_level_modules();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut by_module: BTreeMap<String, String> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src()).unwrap();
        let first = relative.iter().next().unwrap().to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if !modules.contains(&module) {
            continue; // lib.rs and main.rs sit above every module.
        }
        let code: String = fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .map(|l| format!("{l}\n"))
            .collect();
        by_module.entry(module).or_default().push_str(&code);
    }
    by_module
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules `code` names as `crate::x`, including inside `use crate::{x, y::z}`.
fn references(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Only the first segment of each element at the group's own depth names a module.
            let mut depth = 0;
            let mut element_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => element_start = true,
                    c if element_start && depth == 0 && is_ident(c) => {
                        let name: String =
                            group[i..].chars().take_while(|c| is_ident(*c)).collect();
                        found.insert(name);
                        element_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            found.insert(name);
        }
    }
    found.retain(|m| modules.contains(m));
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = top_level_modules();
    sources()
        .into_iter()
        .map(|(module, code)| {
            let mut refs = references(&code, &modules);
            refs.remove(&module);
            (module, refs)
        })
        .collect()
}

/// A cycle in `graph`, as the modules around it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn top_level_modules_form_no_cycle() {
    let graph = graph();
    assert!(graph.contains_key("http") && graph.contains_key("c2d"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "modules depend on each other in a circle: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_core_imports_no_protocol() {
    let sources = sources();
    for module in CORE {
        let code = &sources[*module];
        let refs = references(code, &top_level_modules());
        for way_in in ["http", "mqtt"] {
            assert!(!refs.contains(way_in), "{module} uses crate::{way_in}");
        }
        for name in PROTOCOL_CRATES {
            let path = format!("{name}::");
            let used = code.match_indices(&path).any(|(at, _)| {
                // `x::http::` or `some_http::` is another path; only a crate root counts.
                let before = code[..at].chars().next_back();
                !before.is_some_and(|c| is_ident(c) || c == ':')
            });
            let imported = code.contains(&format!("use {name};"));
            assert!(
                !used && !imported,
                "{module} uses the protocol crate {name}"
            );
        }
    }
}

#[test]
fn the_checks_see_what_they_look_for() {
    let modules: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let refs = references(
        "use crate::{a::x, b::{y, c::z}};\nfn f() { crate::c::g() }",
        &modules,
    );
    assert_eq!(refs, modules);
    let mut cyclic = BTreeMap::new();
    cyclic.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    cyclic.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    cyclic.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&cyclic).unwrap(), ["a", "b", "c", "a"]);
    cyclic.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&cyclic), None);
}

#[test]
fn mqtt_does_not_import_http() {
    // http hands WebSockets to mqtt; the arrow never points back.
    let sources = sources();
    assert!(
        !references(&sources["mqtt"], &top_level_modules()).contains("http"),
        "mqtt uses crate::http"
    );
}
