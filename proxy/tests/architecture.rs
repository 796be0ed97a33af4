//! The module graph of `proxy/src`, read from its `crate::…` paths (in `use` items, grouped
//! `use crate::{a, b::c}` and paths written inline): the modules form the layers
//! ARCHITECTURE.md draws, every import points to the same layer or one below, there is no
//! import cycle at all, `state` (the ground floor) imports no other module of the daemon,
//! and the management API and the upgrader know each other's parts only through the
//! interfaces the composition root wires.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// The node for items defined in `lib.rs` itself (the composition root).
const ROOT: &str = "lib";

/// One module-to-module dependency and where it is written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: String,
    to: String,
    at: String,
}

/// Removes comments, string and character literals, keeping line breaks so that
/// positions still name the right line.
fn strip(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                match chars.get(j) {
                    None => break,
                    Some('"') if (0..hashes).all(|k| chars.get(j + 1 + k) == Some(&'#')) => {
                        j += 1 + hashes;
                        break;
                    }
                    Some(&other) => {
                        out.push(blank(other));
                        j += 1;
                    }
                }
            }
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if let Some(&skipped) = chars.get(i) {
                    out.push(blank(skipped));
                }
                i += 1;
            }
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}'); anything else is a lifetime.
            if next == Some('\\') {
                let mut j = i + 2;
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
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

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The first segment of every path in the use tree starting at `text` (after `crate::` or
/// `super::`): `a::b` gives `a`, `{a, b::c, d::{e}}` gives `a`, `b`, `d`.
fn first_segments(text: &str) -> Vec<String> {
    let text = text.trim_start();
    if let Some(group) = text.strip_prefix('{') {
        let mut out = Vec::new();
        let mut depth = 0;
        let mut item_start = true;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if c.is_whitespace() => {}
                _ if item_start && depth == 0 => {
                    item_start = false;
                    let ident: String = group[i..].chars().take_while(|&c| is_ident(c)).collect();
                    if !ident.is_empty() {
                        out.push(ident);
                    }
                }
                _ => {}
            }
        }
        out
    } else {
        let ident: String = text.chars().take_while(|&c| is_ident(c)).collect();
        if ident.is_empty() {
            Vec::new()
        } else {
            vec![ident]
        }
    }
}

/// The module path of a source file: `state/mod.rs` is `[state]`, `state/store.rs` is
/// `[state, store]`, `config.rs` is `[config]`, `lib.rs` is `[]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().unwrap_or_default();
    let stem = file.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// Every module-to-module dependency written in `source`, a file at `path` (module path).
/// `modules` are the top-level modules; `reexports` maps names `lib.rs` re-exports to the
/// module they come from.
fn edges_of(
    source: &str,
    path: &[String],
    file: &str,
    modules: &BTreeSet<String>,
    reexports: &BTreeMap<String, String>,
) -> Vec<Edge> {
    let from = path.first().map_or(ROOT.to_string(), Clone::clone);
    let code = strip(source);
    let mut out = Vec::new();
    let target = |name: &str, from_crate: bool| -> Option<String> {
        if modules.contains(name) {
            Some(name.to_string())
        } else if let Some(m) = reexports.get(name) {
            Some(m.clone())
        } else if from_crate && name != "self" {
            // An item of lib.rs itself.
            Some(ROOT.to_string())
        } else {
            None
        }
    };
    let bytes = code.as_bytes();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut at = 0;
    while let Some(found) = code[at..].find(['c', 's']) {
        let start = at + found;
        at = start + 1;
        let before = start
            .checked_sub(1)
            .map(|b| bytes[b] as char)
            .unwrap_or(' ');
        if is_ident(before) || before == '$' {
            continue;
        }
        let rest = &code[start..];
        let (names, from_crate) = if let Some(after) = rest.strip_prefix("crate::") {
            (first_segments(after), true)
        } else if rest.starts_with("super::") {
            // `super::super::x` from `a::b::c` names `a::x`; reaching the crate root
            // names a top-level module (or an item of lib.rs).
            let mut depth = 0;
            let mut tail = rest;
            while let Some(t) = tail.strip_prefix("super::") {
                depth += 1;
                tail = t;
            }
            if depth < path.len() {
                continue;
            }
            (first_segments(tail), false)
        } else {
            continue;
        };
        for name in names {
            if let Some(to) = target(&name, from_crate) {
                if to != from {
                    out.push(Edge {
                        from: from.clone(),
                        to,
                        at: format!("{file}:{}", line_of(start)),
                    });
                }
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The dependencies between the top-level modules of the library.
fn module_graph(src: &Path) -> Vec<Edge> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut modules = BTreeSet::new();
    for f in &files {
        let relative = f.strip_prefix(src).expect("under src");
        if let Some(first) = module_path(relative).first() {
            modules.insert(first.clone());
        }
    }
    // `main.rs` is the binary, a crate of its own that uses the library by name.
    modules.remove("main");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let mut reexports = BTreeMap::new();
    for line in strip(&lib).lines() {
        let Some(rest) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let rest = rest.trim_end_matches(';');
        if let Some((module, item)) = rest.split_once("::") {
            let module = module
                .trim_start_matches("crate::")
                .trim_start_matches("self::");
            if modules.contains(module) {
                let items = item.trim_matches(|c| c == '{' || c == '}');
                for name in items.split(',') {
                    let name = name.trim().rsplit("::").next().unwrap_or("").trim();
                    let name = name.rsplit(" as ").next().unwrap_or(name).trim();
                    if !name.is_empty() {
                        reexports.insert(name.to_string(), module.to_string());
                    }
                }
            }
        }
    }
    let mut edges = Vec::new();
    for f in &files {
        let relative = f.strip_prefix(src).expect("under src");
        if relative == Path::new("main.rs") {
            continue;
        }
        let source = std::fs::read_to_string(f).expect("read source");
        let path = module_path(relative);
        edges.extend(edges_of(
            &source,
            &path,
            &relative.display().to_string(),
            &modules,
            &reexports,
        ));
    }
    edges.sort();
    edges
}

/// The shortest cycle from `start` back to itself, as the edges that make it.
fn cycle_through(edges: &[Edge], start: &str) -> Option<Vec<Edge>> {
    let mut first_edge: BTreeMap<(&str, &str), &Edge> = BTreeMap::new();
    for e in edges {
        first_edge.entry((&e.from, &e.to)).or_insert(e);
    }
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for ((from, to), _) in first_edge.range((node, "")..) {
            if *from != node {
                break;
            }
            if *to == start {
                let mut path = vec![first_edge[&(node, start)].clone()];
                let mut at = node;
                while at != start {
                    let prev = came_from[at];
                    path.push(first_edge[&(prev, at)].clone());
                    at = prev;
                }
                path.reverse();
                return Some(path);
            }
            if !came_from.contains_key(to) {
                came_from.insert(to, node);
                queue.push_back(to);
            }
        }
    }
    None
}

/// The modules that are on some cycle with `start` (its strongly connected component).
fn component_of(edges: &[Edge], start: &str) -> BTreeSet<String> {
    let reach = |forward: bool| {
        let mut seen = BTreeSet::from([start.to_string()]);
        let mut queue = VecDeque::from([start.to_string()]);
        while let Some(node) = queue.pop_front() {
            for e in edges {
                let (a, b) = if forward {
                    (&e.from, &e.to)
                } else {
                    (&e.to, &e.from)
                };
                if *a == node && seen.insert(b.clone()) {
                    queue.push_back(b.clone());
                }
            }
        }
        seen
    };
    reach(true).intersection(&reach(false)).cloned().collect()
}

fn describe(path: &[Edge]) -> String {
    path.iter()
        .map(|e| format!("  {} -> {}  ({})", e.from, e.to, e.at))
        .collect::<Vec<_>>()
        .join("\n")
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layers, top first, as ARCHITECTURE.md draws them: a module may import modules of its
/// own layer or of a layer below (and, with no cycle, never back).
const LAYERS: &[(&str, &[&str])] = &[
    ("composition root", &[ROOT]),
    ("management API", &["mgmt"]),
    ("data path", &["http", "tcp"]),
    ("registrations", &["registration"]),
    (
        "sockets, certificates, hand-over",
        &["listener", "tls", "upgrade"],
    ),
    ("fleet mode", &["cluster"]),
    ("config file", &["config"]),
    ("feeds and reports", &["discovery", "telemetry"]),
    ("compiled snapshot and pools", &["routing", "upstream"]),
    ("model", &["state"]),
    (
        "leaves",
        &[
            "allocator",
            "boxed",
            "etcd",
            "head_out",
            "shutdown",
            "spares",
            "systemd",
            "workers",
        ],
    ),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// Every set of modules that import each other in a circle (strongly connected
/// components with more than one module), each with one cycle through its first module.
fn cycles(edges: &[Edge]) -> Vec<(BTreeSet<String>, Vec<Edge>)> {
    let mut nodes: BTreeSet<&str> = BTreeSet::new();
    for e in edges {
        nodes.insert(&e.from);
        nodes.insert(&e.to);
    }
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    for node in nodes {
        if seen.contains(node) {
            continue;
        }
        let component = component_of(edges, node);
        seen.extend(component.iter().cloned());
        if component.len() > 1 {
            let cycle = cycle_through(edges, node).expect("a component has a cycle");
            out.push((component, cycle));
        }
    }
    out
}

/// The names `module`'s files take from `target` (`crate::target::Name`, grouped
/// `crate::target::{A, B}`, `crate::{target::Name}` and `target::Name` after a
/// `use crate::target`), each with where it is written.
fn names_taken(src: &Path, module: &str, target: &str) -> BTreeMap<String, Vec<String>> {
    let mut files = Vec::new();
    let dir = src.join(module);
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    }
    let single = src.join(format!("{module}.rs"));
    if single.is_file() {
        files.push(single);
    }
    files.sort();
    let needle = format!("{target}::");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in files {
        let code = strip(&std::fs::read_to_string(&f).expect("read source"));
        let relative = f
            .strip_prefix(src)
            .expect("under src")
            .display()
            .to_string();
        let mut at = 0;
        while let Some(found) = code[at..].find(&needle) {
            let start = at + found;
            at = start + needle.len();
            let before = code[..start].chars().next_back().unwrap_or(' ');
            if is_ident(before) {
                continue;
            }
            let line = code[..start].matches('\n').count() + 1;
            for name in first_segments(&code[at..]) {
                out.entry(name)
                    .or_default()
                    .push(format!("{relative}:{line}"));
            }
        }
    }
    out
}

#[test]
fn there_is_no_import_cycle() {
    let edges = module_graph(&src());
    let found = cycles(&edges);
    assert!(
        found.is_empty(),
        "modules import each other in a circle:\n{}",
        found
            .iter()
            .map(|(component, cycle)| format!("{component:?}, for example:\n{}", describe(cycle)))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn imports_point_to_the_same_layer_or_below() {
    let edges = module_graph(&src());
    let mut unplaced = BTreeSet::new();
    let mut up = Vec::new();
    for e in &edges {
        match (layer_of(&e.from), layer_of(&e.to)) {
            (Some(from), Some(to)) if to < from => up.push(format!(
                "  {} ({}) -> {} ({})  ({})",
                e.from, LAYERS[from].0, e.to, LAYERS[to].0, e.at
            )),
            (Some(_), Some(_)) => {}
            (from, to) => {
                if from.is_none() {
                    unplaced.insert(e.from.clone());
                }
                if to.is_none() {
                    unplaced.insert(e.to.clone());
                }
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "modules in no layer (add them to LAYERS here and to ARCHITECTURE.md): {unplaced:?}"
    );
    assert!(up.is_empty(), "imports pointing up:\n{}", up.join("\n"));
}

#[test]
fn mgmt_uses_no_listener_or_hand_over_internals() {
    // The composition root hands mgmt its accept loops (mgmt::Accepting) and the sockets a
    // previous process passed (mgmt::HandedSockets), and registers the gate with the
    // upgrader; mgmt only starts upgrades.
    let src = src();
    let edges = module_graph(&src);
    let listener: Vec<&Edge> = edges
        .iter()
        .filter(|e| e.from == "mgmt" && e.to == "listener")
        .collect();
    assert!(
        listener.is_empty(),
        "mgmt imports the listener: {listener:?}"
    );
    let allowed = ["Upgrader", "UpgradeError"];
    let taken = names_taken(&src, "mgmt", "upgrade");
    let internals: Vec<String> = taken
        .iter()
        .filter(|(name, _)| !allowed.contains(&name.as_str()))
        .map(|(name, at)| format!("  upgrade::{name}  ({})", at.join(", ")))
        .collect();
    assert!(
        internals.is_empty(),
        "mgmt may take only {allowed:?} from upgrade; it takes:\n{}",
        internals.join("\n")
    );
    // The reader sees the names mgmt does take.
    assert!(taken.contains_key("Upgrader"), "{taken:?}");
}

#[test]
fn the_upgrader_knows_no_participant() {
    // What takes part in a hand-over (the state writer, the management gate, the
    // registrations' ports) implements upgrade's traits and is registered by lib.rs.
    let edges = module_graph(&src());
    let known: Vec<&Edge> = edges
        .iter()
        .filter(|e| e.from == "upgrade")
        .filter(|e| {
            ["state", "mgmt", "registration", "tls", "http", "tcp"].contains(&e.to.as_str())
        })
        .collect();
    assert!(known.is_empty(), "upgrade imports a participant: {known:?}");
}

#[test]
fn state_imports_no_other_module() {
    let edges = module_graph(&src());
    let out: Vec<&Edge> = edges.iter().filter(|e| e.from == "state").collect();
    let mut by_target: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in &out {
        by_target.entry(&e.to).or_default().push(&e.at);
    }
    assert!(
        out.is_empty(),
        "state must import no other module of the daemon; it imports:\n{}",
        by_target
            .iter()
            .map(|(to, at)| format!("  {to}  ({})", at.join(", ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn no_import_cycle_passes_through_state() {
    let edges = module_graph(&src());
    if let Some(cycle) = cycle_through(&edges, "state") {
        panic!(
            "an import cycle passes through state:\n{}\nmodules on a cycle with state: {:?}",
            describe(&cycle),
            component_of(&edges, "state")
        );
    }
}

#[test]
fn routing_and_upstream_sit_below_the_data_path_and_the_control_plane() {
    // The compiled snapshot and the pools are built from state and used by the layers
    // above; they never reach up (the request body type lives in upstream, not http).
    let above = [
        "http",
        "tcp",
        "listener",
        "registration",
        "discovery",
        "mgmt",
        "upgrade",
        "config",
        ROOT,
    ];
    let edges = module_graph(&src());
    let up: Vec<String> = edges
        .iter()
        .filter(|e| ["routing", "upstream"].contains(&e.from.as_str()))
        .filter(|e| above.contains(&e.to.as_str()))
        .map(|e| format!("  {} -> {}  ({})", e.from, e.to, e.at))
        .collect();
    assert!(up.is_empty(), "imports pointing up:\n{}", up.join("\n"));
}

#[test]
fn the_graph_is_read_from_the_source() {
    // The reader sees what the real tree has: routing is built from state.
    let edges = module_graph(&src());
    assert!(
        edges.iter().any(|e| e.from == "routing" && e.to == "state"),
        "routing -> state not found; edges: {edges:?}"
    );
}

#[test]
fn every_form_of_path_is_read() {
    let modules: BTreeSet<String> = ["state", "config", "routing", "tls", "http", "shutdown"]
        .into_iter()
        .map(String::from)
        .collect();
    let reexports = BTreeMap::from([("Shutdown".to_string(), "shutdown".to_string())]);
    let source = r#"
use crate::config::Protocol;
use crate::{routing::Table, tls::{a, b}};
// use crate::http::Commented;
/* use crate::http::Block; */
const S: &str = "crate::http::InString";
const C: char = '"';
fn f<'a>(x: &'a str) -> crate::Shutdown { crate::api_count(); super::http::f() }
"#;
    let path = vec!["state".to_string(), "store".to_string()];
    let edges = edges_of(source, &path, "state/store.rs", &modules, &reexports);
    let targets: BTreeSet<&str> = edges.iter().map(|e| e.to.as_str()).collect();
    // `super::http` from `state::store` is `state::http`: not a dependency.
    assert_eq!(
        targets,
        BTreeSet::from(["config", "routing", "tls", "shutdown", ROOT])
    );
    assert!(
        edges.iter().any(|e| e.at == "state/store.rs:2"),
        "{edges:?}"
    );
    let top = vec!["state".to_string()];
    let edges = edges_of(
        "use super::http::X;",
        &top,
        "state/mod.rs",
        &modules,
        &reexports,
    );
    assert_eq!(edges.len(), 1, "{edges:?}");
    assert_eq!(edges[0].to, "http");

    // And a cycle through state is found and reported.
    let edge = |from: &str, to: &str| Edge {
        from: from.into(),
        to: to.into(),
        at: String::new(),
    };
    let graph = vec![
        edge("config", "state"),
        edge("routing", "state"),
        edge("state", "config"),
        edge("tls", "routing"),
    ];
    let cycle = cycle_through(&graph, "state").expect("cycle");
    assert_eq!(
        cycle,
        vec![edge("state", "config"), edge("config", "state")]
    );
    assert_eq!(
        component_of(&graph, "state"),
        BTreeSet::from(["config".to_string(), "state".to_string()])
    );
    assert!(cycle_through(&graph[..2], "state").is_none());
    let found = cycles(&graph);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].0,
        BTreeSet::from(["config".to_string(), "state".to_string()])
    );
    assert!(cycles(&graph[..2]).is_empty());

    // The names one module takes from another, in every form.
    let dir = std::env::temp_dir().join(format!("architecture-names-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("mgmt")).unwrap();
    std::fs::write(
        dir.join("mgmt/mod.rs"),
        "use crate::upgrade::{HandoffSocket, Upgrader};\n\
         use crate::{state::Change, upgrade::MGMT_SOCKET};\n\
         // crate::upgrade::Commented\n\
         fn f() -> crate::upgrade::UpgradeError { make() }\n",
    )
    .unwrap();
    let taken = names_taken(&dir, "mgmt", "upgrade");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        taken.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["HandoffSocket", "MGMT_SOCKET", "UpgradeError", "Upgrader"]
    );
    assert_eq!(taken["MGMT_SOCKET"], vec!["mgmt/mod.rs:2".to_string()]);
}
