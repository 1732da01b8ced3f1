//! The manifests under examples/, one document each, for the tests that check them (the
//! API tests' validation, the e2e bed's Pod Security dry runs).

use serde::Deserialize;
use serde_json::Value;

use crate::helm::repo_root;

/// One YAML document of an example file.
pub struct Doc {
    /// The file's name, for messages.
    pub file: String,
    pub value: Value,
}

/// Every document of every `.yaml` file under examples/, files in name order.
pub fn documents() -> Vec<Doc> {
    let mut paths: Vec<_> = std::fs::read_dir(repo_root().join("examples"))
        .expect("examples/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    paths.sort();
    let mut docs = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("readable");
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).unwrap_or_else(|e| panic!("{file}: {e}"));
            docs.push(Doc {
                file: file.clone(),
                value,
            });
        }
    }
    assert!(docs.len() >= 10, "examples/ lost its manifests");
    docs
}

/// The spec of every example pool, with its file's name: ModelPools, and the pools
/// SwarmJobs bring in `spec.pools`.
pub fn pool_specs() -> Vec<(String, Value)> {
    documents()
        .into_iter()
        .flat_map(|Doc { file, value }| {
            let specs = match value["kind"].as_str() {
                Some("ModelPool") => vec![value["spec"].clone()],
                Some("SwarmJob") => value["spec"]["pools"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| p["spec"].clone())
                    .collect(),
                _ => Vec::new(),
            };
            specs.into_iter().map(move |spec| (file.clone(), spec))
        })
        .collect()
}

/// The specs of the example pools that run workers (have a `model`).
pub fn worker_pool_specs() -> Vec<Value> {
    pool_specs()
        .into_iter()
        .map(|(_, spec)| spec)
        .filter(|spec| spec.get("model").is_some())
        .collect()
}
