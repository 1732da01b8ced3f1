use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::Validator;
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    // Read when the test runs, not when it was compiled: clones of the repository share
    // one target directory, and a compiled-in path would name the clone that built it.
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("..")
}

/// The openAPIV3Schema of a CRD's only version, as the API server sees it.
pub fn schema(crd: &CustomResourceDefinition) -> Value {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("every generated CRD has a schema");
    serde_json::to_value(schema).expect("schema serializes")
}

/// Messages of the CEL rules `object` breaks, with schema defaults applied first as the
/// API server does. `old` makes it an update, which also runs the transition rules.
pub fn cel_errors(
    crd: &CustomResourceDefinition,
    object: &Value,
    old: Option<&Value>,
) -> Vec<String> {
    match Validator::new().validate(&schema(crd), object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.into_vec().into_iter().map(|e| e.message).collect(),
    }
}

/// Every node of a schema with its path, depth first.
pub fn walk<'a>(schema: &'a Value, path: &str, visit: &mut dyn FnMut(&str, &'a Value)) {
    visit(path, schema);
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, child) in properties {
            walk(child, &format!("{path}.{name}"), visit);
        }
    }
    if let Some(items) = schema.get("items") {
        walk(items, &format!("{path}[]"), visit);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        walk(values, &format!("{path}{{}}"), visit);
    }
}

/// Every `(path, rule, message)` in a schema's `x-kubernetes-validations`.
pub fn cel_rules(schema: &Value) -> Vec<(String, String, String)> {
    let mut rules = Vec::new();
    walk(schema, "", &mut |path, node| {
        for rule in node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            rules.push((
                path.to_owned(),
                rule["rule"].as_str().unwrap_or_default().to_owned(),
                rule["message"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    });
    rules
}
