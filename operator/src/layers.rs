//! The crate's layers, checked: a module imports only from layers below its own, so the
//! API types know nothing of Kueue, Kueue nothing of the engine, the engine nothing of the
//! controllers or local mode, and the controllers and local mode nothing of each other.
//! `cargo test --lib layers` runs the check.

/// Top-level modules by layer, lowest first.
const LAYERS: &[&[&str]] = &[
    // The API types.
    &["api"],
    // Helpers that know only the API: conditions, metrics, tracing.
    &["conditions", "metrics", "telemetry"],
    // Protocols around the API: Kueue's Workloads, what a ModelPool promises its callers,
    // what a tenant may ask for, the CRD YAML.
    &["kueue", "pool_contract", "tenancy", "crdgen"],
    // The swarm engine.
    &["swarm"],
    // Where the engine runs: the operator's controllers, and local mode.
    &["controllers", "local"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Every `crate::<module>` a source file names outside comments, with its line number.
fn imports(source: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push((number + 1, name));
        }
    }
    found
}

/// Names the imports of `module`'s file `path` that reach up or sideways.
fn violations(module: &str, path: &str, source: &str) -> Vec<String> {
    let Some(own) = layer(module) else {
        return vec![format!(
            "{path}: module {module} has no layer in src/layers.rs"
        )];
    };
    imports(source)
        .into_iter()
        .filter(|(_, target)| target != module)
        .filter_map(|(line, target)| match layer(&target) {
            Some(l) if l < own => None,
            Some(_) => Some(format!(
                "{path}:{line}: {module} (layer {own}) imports crate::{target} (layer {})",
                layer(&target).unwrap_or(0)
            )),
            None => Some(format!("{path}:{line}: crate::{target} has no layer")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn no_module_imports_from_a_layer_above_or_beside_it() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut problems = Vec::new();
        for file in &files {
            let relative = file.strip_prefix(&src).expect("under src");
            let first = relative.components().next().expect("a path");
            let module = first.as_os_str().to_string_lossy();
            let module = module.trim_end_matches(".rs");
            // The crate root and the binary sit above every layer; this file only names them.
            if ["lib", "main", "layers"].contains(&module) {
                continue;
            }
            let source = std::fs::read_to_string(file).expect("a readable source file");
            problems.extend(violations(module, &relative.display().to_string(), &source));
        }
        assert!(files.len() > 30, "found the sources ({})", files.len());
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn an_import_from_above_or_beside_is_named() {
        let source = "use crate::api::SwarmJob;\n// crate::controllers in a comment\nuse crate::controllers::children;\nuse crate::kueue::Workload;\n";
        assert_eq!(
            violations("swarm", "swarm/x.rs", source),
            ["swarm/x.rs:3: swarm (layer 3) imports crate::controllers (layer 4)"]
        );
        assert_eq!(
            violations(
                "local",
                "local/x.rs",
                "let x = crate::controllers::FIELD_MANAGER;"
            ),
            ["local/x.rs:1: local (layer 4) imports crate::controllers (layer 4)"]
        );
        assert_eq!(
            violations("pool_contract", "p.rs", "use crate::kueue::Admission;"),
            ["p.rs:1: pool_contract (layer 2) imports crate::kueue (layer 2)"]
        );
    }
}
