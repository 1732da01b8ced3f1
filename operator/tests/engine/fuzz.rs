//! Arbitrary SwarmJobs the CRD admits, through everything the operator does with one: read,
//! the tenancy check and the builders of its own pools, then the whole engine (planning,
//! fan-out, checks, verification, aggregation) against an instant mock. Nothing may panic
//! or hang, and every spec the API server would admit must be one the operator can read.
//!
//! Specs are the examples' SwarmJobs with one to four fields set, each field chosen from
//! every path the CRD's schema has (so absent optional fields are set too) and each value
//! from what the schema allows at its edges (enum members, minimum, maximum, the longest
//! string) or just past them, and a palette of hostile values. The API server's admission
//! is modelled as it decides: nulls pruned, the structural schema (types, bounds, lengths,
//! enums, required fields), then the CEL rules.

use kube::CustomResourceExt;
use kube::core::cel::{Validator, apply_defaults};
use kubeswarm::api::SwarmJob;
use kubeswarm::controllers::swarm_job::build::job_pool;
use kubeswarm::tenancy::Policy;
use serde_json::{Value, json};

use super::*;

/// A deterministic generator: the same seed, the same specs.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// The schema of `spec`.
fn spec_schema() -> Value {
    let crd = SwarmJob::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("a schema");
    serde_json::to_value(schema).unwrap()
}

/// Every path under `schema`, as a JSON pointer (array items as `/0`), with its schema.
fn paths(schema: &Value, at: &str, out: &mut Vec<(String, Value)>) {
    if !at.is_empty() {
        out.push((at.to_owned(), schema.clone()));
    }
    if let Some(properties) = schema["properties"].as_object() {
        for (name, child) in properties {
            paths(child, &format!("{at}/{name}"), out);
        }
    }
    if schema["items"].is_object() {
        paths(&schema["items"], &format!("{at}/0"), out);
    }
}

/// Values at and past the edges of what `schema` allows, and hostile ones of any type.
fn values(schema: &Value) -> Vec<Value> {
    let mut out = vec![
        Value::Null,
        json!(""),
        json!(-1),
        json!(0),
        json!(1),
        json!(i64::from(i32::MAX)),
        json!(true),
        json!([]),
        json!({}),
        json!("((a+)+)+$"),
        json!("\u{0}\u{202e}ünï\u{1F600}"),
        json!("x".repeat(70_000)),
        json!(["a", "", "b"]),
        json!([{"name": "x", "spec": {}}]),
    ];
    for e in schema["enum"].as_array().into_iter().flatten() {
        out.push(e.clone());
    }
    for bound in ["minimum", "maximum"] {
        if let Some(n) = schema[bound].as_i64() {
            out.extend([json!(n), json!(n - 1), json!(n + 1)]);
        }
        if let Some(x) = schema[bound].as_f64() {
            out.extend([json!(x), json!(x + 0.5), json!(x - 0.5)]);
        }
    }
    if let Some(n) = schema["maxLength"].as_u64() {
        out.extend([
            json!("y".repeat(n as usize)),
            json!("y".repeat(n as usize + 1)),
        ]);
    }
    if let Some(n) = schema["maxItems"].as_u64() {
        out.push(Value::Array(vec![json!("z"); n as usize + 1]));
    }
    out
}

/// A value `schema` allows, at one of its edges where it has them.
fn allowed(schema: &Value, rng: &mut Rng) -> Value {
    if let Some(members) = schema["enum"].as_array() {
        return members[rng.below(members.len())].clone();
    }
    match schema["type"].as_str() {
        Some("integer") => {
            let min = schema["minimum"].as_i64().unwrap_or(0);
            let max = schema["maximum"].as_i64().unwrap_or(min + 1_000);
            json!([min, max, min + 1, min + (max - min) / 2][rng.below(4)])
        }
        Some("number") => {
            let min = schema["minimum"].as_f64().unwrap_or(0.0);
            let max = schema["maximum"].as_f64().unwrap_or(min + 1.0);
            json!([min, max, (min + max) / 2.0][rng.below(3)])
        }
        Some("string") => {
            let max = schema["maxLength"].as_u64().unwrap_or(64) as usize;
            let min = schema["minLength"].as_u64().unwrap_or(0) as usize;
            let choices = [
                "x".repeat(min.max(1)),
                "é".repeat(max),
                "z".repeat(min),
                format!("{}\n{}", "a".repeat(min), "\u{0}"),
            ];
            json!(choices[rng.below(choices.len())])
        }
        Some("boolean") => json!(rng.below(2) == 0),
        Some("array") => json!([]),
        _ => json!({}),
    }
}

/// Fills the required fields an object lacks with values they allow, all the way down:
/// a field set deep in a new list item gets the item's required siblings.
fn complete(schema: &Value, value: &mut Value, rng: &mut Rng) {
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            for required in schema["required"].as_array().into_iter().flatten() {
                let key = required.as_str().unwrap();
                if !map.contains_key(key)
                    && let Some(child) = properties.and_then(|p| p.get(key))
                {
                    map.insert(key.to_owned(), allowed(child, rng));
                }
            }
            for (key, child) in map.iter_mut() {
                if let Some(child_schema) = properties.and_then(|p| p.get(key)) {
                    complete(child_schema, child, rng);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                complete(&schema["items"], item, rng);
            }
        }
        _ => {}
    }
}

/// Sets `pointer` in `target`, making the objects and arrays on the way.
fn set(target: &mut Value, pointer: &str, value: Value) {
    let mut at = target;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let next = || {
            if last {
                Value::Null
            } else if parts[i + 1] == "0" {
                json!([])
            } else {
                json!({})
            }
        };
        at = if *part == "0" {
            if !at.is_array() {
                *at = json!([]);
            }
            let items = at.as_array_mut().unwrap();
            if items.is_empty() {
                items.push(next());
            }
            &mut items[0]
        } else {
            if !at.is_object() {
                *at = json!({});
            }
            at.as_object_mut()
                .unwrap()
                .entry(part.to_string())
                .or_insert_with(next)
        };
    }
    *at = value;
}

/// Drops nulls, as the API server prunes them from fields that are not nullable.
fn prune(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(prune);
        }
        Value::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

/// Why the structural schema refuses `value`, if it does.
fn structural(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let refuse = |why: String| Err(format!("{at}: {why}"));
    if schema["x-kubernetes-preserve-unknown-fields"] == true
        || schema["x-kubernetes-int-or-string"] == true
    {
        return Ok(());
    }
    let fits = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !fits {
        return refuse(format!("not a {}", schema["type"]));
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return refuse("not one of the enum".to_owned());
    }
    if let Some(x) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| x < m) {
            return refuse("below minimum".to_owned());
        }
        if schema["maximum"].as_f64().is_some_and(|m| x > m) {
            return refuse("above maximum".to_owned());
        }
    }
    if let Some(s) = value.as_str() {
        let chars = s.chars().count() as u64;
        if schema["maxLength"].as_u64().is_some_and(|m| chars > m)
            || schema["minLength"].as_u64().is_some_and(|m| chars < m)
        {
            return refuse("length out of bounds".to_owned());
        }
        if let Some(pattern) = schema["pattern"].as_str()
            && !regex::Regex::new(pattern).unwrap().is_match(s)
        {
            return refuse(format!("does not match {pattern}"));
        }
    }
    if let Some(items) = value.as_array() {
        let n = items.len() as u64;
        if schema["maxItems"].as_u64().is_some_and(|m| n > m)
            || schema["minItems"].as_u64().is_some_and(|m| n < m)
        {
            return refuse("item count out of bounds".to_owned());
        }
        for (i, item) in items.iter().enumerate() {
            structural(&schema["items"], item, &format!("{at}/{i}"))?;
        }
    }
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(required.as_str().unwrap()) {
                return refuse(format!("{required} is required"));
            }
        }
        if schema["maxProperties"]
            .as_u64()
            .is_some_and(|m| object.len() as u64 > m)
        {
            return refuse("too many properties".to_owned());
        }
        let properties = schema["properties"].as_object();
        for (key, child) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(child_schema) => structural(child_schema, child, &format!("{at}/{key}"))?,
                None if schema["additionalProperties"].is_object() => structural(
                    &schema["additionalProperties"],
                    child,
                    &format!("{at}/{key}"),
                )?,
                // Unknown fields are pruned, not refused.
                None => {}
            }
        }
    }
    Ok(())
}

/// Drops fields the schema does not name, as the API server prunes them.
fn prune_unknown(schema: &Value, value: &mut Value) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                map.retain(|k, _| properties.contains_key(k));
                for (k, v) in map.iter_mut() {
                    prune_unknown(&properties[k], v);
                }
            } else if schema["additionalProperties"].is_object() {
                for v in map.values_mut() {
                    prune_unknown(&schema["additionalProperties"], v);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| prune_unknown(&schema["items"], item)),
        _ => {}
    }
}

/// The mock's answers: a plan of the size asked for, a passing verdict, and outputs of
/// every shape a check or an answer rule looks for (and none).
fn answer(body: &Value, count: usize) -> Reply {
    if is_plan(body) {
        let schema = &body["response_format"]["json_schema"]["schema"];
        let n = schema["properties"]["subtasks"]["minItems"]
            .as_u64()
            .unwrap_or(1);
        let parts: Vec<String> = (0..n).map(|i| format!("part {i}")).collect();
        return text(json!({ "subtasks": parts }).to_string());
    }
    if is_verdict(body) {
        return verdict(
            !count.is_multiple_of(3),
            (count * 37 % 101) as u8,
            &["too short"],
        );
    }
    let outputs = [
        "The answer is 42.".to_owned(),
        String::new(),
        "```python\ndef add(a, b):\n    return a + b\n```".to_owned(),
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 40 30\"><rect width=\"40\" height=\"30\" fill=\"navy\"/><circle cx=\"20\" cy=\"15\" r=\"9\" fill=\"gold\"/></svg>".to_owned(),
        json!({"answer": "7", "score": 3}).to_string(),
        "\u{0}".repeat(5),
    ];
    text(outputs[count % outputs.len()].clone())
}

#[tokio::test]
async fn specs_the_crd_admits_are_read_built_and_run_without_a_panic_or_a_hang() {
    let schema = spec_schema();
    let spec_at = &schema["properties"]["spec"];
    let mut every = Vec::new();
    paths(spec_at, "", &mut every);
    let bases: Vec<Value> = kubeswarm_test_support::examples::documents()
        .into_iter()
        .filter(|d| d.value["kind"] == "SwarmJob")
        .map(|d| d.value)
        .collect();
    assert!(bases.len() >= 3, "examples lost their SwarmJobs");

    let workers = Mock::start("m", answer).await;
    let validator = Validator::new();
    let policy = Policy::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut admitted, mut completed, mut failed) = (0, 0, 0);
    let mut refused_by_cel = 0;
    for round in 0..3_000 {
        let mut object = bases[rng.below(bases.len())].clone();
        for _ in 0..=rng.below(4) {
            let (path, field) = &every[rng.below(every.len())];
            // Mostly a value the field allows, so that enough specs are admitted and reach
            // the engine; otherwise anything.
            let value = if rng.below(8) != 0 {
                allowed(field, &mut rng)
            } else {
                let choices = values(field);
                choices[rng.below(choices.len())].clone()
            };
            set(&mut object["spec"], path, value);
        }
        prune(&mut object);
        prune_unknown(spec_at, &mut object["spec"]);
        complete(spec_at, &mut object["spec"], &mut rng);
        let object = apply_defaults(&schema, &object);
        if let Err(why) = structural(spec_at, &object["spec"], "spec") {
            if std::env::var_os("FUZZ_WHY").is_some() {
                eprintln!("{why}");
            }
            continue;
        }
        if validator.validate(&schema, &object, None).is_err() {
            refused_by_cel += 1;
            continue;
        }
        admitted += 1;
        let mut job: SwarmJob = serde_json::from_value(object.clone()).unwrap_or_else(|err| {
            panic!("round {round}: the CRD admits a SwarmJob the operator cannot read ({err}): {object}")
        });
        job.metadata.namespace = Some("team-a".to_owned());
        job.metadata.uid = Some("fuzz-uid".to_owned());
        for entry in &job.spec.pools {
            let _ = policy.check(&entry.spec, "registry.local/inference-worker:1");
            let pool = job_pool(&job, entry);
            assert_eq!(pool.spec, entry.spec, "round {round}");
        }
        let used = kubeswarm::swarm::pools_used(&job.spec);
        let urls = vec![workers.url.clone()];
        let entries: Vec<(&str, Vec<String>)> =
            used.iter().map(|p| (p.as_str(), urls.clone())).collect();
        let pools = pools(&entries);
        let store = Memory::default();
        let run = run_with(&job.spec, &pools, &store, fast());
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the run hangs: {object}"));
        match outcome.result {
            Ok(_) => completed += 1,
            Err(failure) => {
                if std::env::var_os("FUZZ_WHY").is_some() {
                    eprintln!("failed {:?}: {}", failure.reason, failure.message);
                }
                failed += 1;
            }
        }
    }
    eprintln!(
        "{admitted} admitted ({refused_by_cel} more refused by CEL): {completed} completed, {failed} failed cleanly"
    );
    assert!(
        admitted >= 150 && completed >= 40 && failed >= 40,
        "too few specs reached the engine to mean anything: {admitted} admitted, {completed} completed, {failed} failed"
    );
}
