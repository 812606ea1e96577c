//! The module graph stays a ladder: each top-level module of `src/` may use
//! only the modules below it in [`LAYERS`] (the order `docs/ARCHITECTURE.md`
//! draws), read from the `crate::` paths of its non-test code, doc links
//! included. A new module must be placed in the list.

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom first: shared nouns, then the services the stages share, then the
/// stages (each above the stages it hands mail to), the operator's tools
/// and the wiring.
const LAYERS: &[&str] = &[
    // Nouns.
    "reply",
    "clock",
    "envelope",
    "event",
    "metrics",
    "config",
    "net",
    "tls",
    "dns",
    "verp",
    // Shared services and event sinks.
    "ratelimit",
    "report",
    "suppression",
    "control",
    // Stages of the mail path.
    "policy",
    "queue",
    "deliver",
    "bounces",
    "receive",
    // The operator's side and the wiring.
    "diagnose",
    "loadgen",
    "admin",
    "server",
];

/// The top-level modules a source text names as `crate::X`, in a path or
/// in a `use crate::{X, ...}` group. Text from the first `#[cfg(test)]` on
/// is test code and ignored.
fn uses(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut found = BTreeSet::new();
    let word = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or("");
            for item in group.split(',') {
                let name = word(item.trim());
                if modules.contains(&name) {
                    found.insert(name);
                }
            }
        } else {
            let name = word(rest);
            if modules.contains(&name) {
                found.insert(name);
            }
        }
    }
    found
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_uses_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeSet::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name != "main" && name != "lib" && (path.is_dir() || !name.is_empty()) {
            modules.insert(name);
        }
    }
    let unplaced: Vec<&String> = modules
        .iter()
        .filter(|m| !LAYERS.contains(&m.as_str()))
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules missing from LAYERS in tests/layers.rs (and docs/ARCHITECTURE.md): {unplaced:?}"
    );
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m).unwrap();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for used in uses(&text, &modules) {
            if used != top && rank(&used) > rank(&top) {
                wrong.push(format!(
                    "{} uses {used}, which sits above {top}",
                    rel.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "upward imports:\n{}", wrong.join("\n"));
}

#[test]
fn the_scanner_sees_paths_groups_and_skips_tests() {
    let modules: BTreeSet<String> = ["queue", "report", "policy", "dns"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let text = "use crate::queue::Queue;\nuse crate::{report, dns::Dns};\n/// [`crate::policy`]\n#[cfg(test)]\nuse crate::admin;";
    let got: Vec<String> = uses(text, &modules).into_iter().collect();
    assert_eq!(got, ["dns", "policy", "queue", "report"]);
}
