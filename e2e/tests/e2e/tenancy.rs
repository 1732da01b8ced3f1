//! Test 3: the tenancy boundary, tried as a tenant would on the real API server: every
//! way out (SSRF targets, node paths, images, quota, priority) is refused at admission
//! by the chart's ValidatingAdmissionPolicy, legitimate manifests still pass, and with
//! the policy's binding gone the operator still refuses and creates nothing. Objects of
//! another owner under a name the operator would use are never taken over.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kubeswarm::api::ModelPool;
use serde_json::{Value, json};

use crate::bed::{Bed, condition, delete_and_wait, json_condition, until};

const BINDING: &str = "kubeswarm-tenancy-modelpools";

fn pool(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "kubeswarm.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": name},
        "spec": spec,
    })
}

fn external(name: &str, url: &str) -> Value {
    pool(name, json!({"external": {"url": url, "model": "m"}}))
}

fn job(name: &str, pool_spec: Value) -> Value {
    json!({
        "apiVersion": "kubeswarm.dev/v1alpha1",
        "kind": "SwarmJob",
        "metadata": {"name": name},
        "spec": {
            "task": "Name a colour.",
            "fanOut": {"pool": "worker", "subagents": 1},
            "verification": {"mode": "none"},
            "aggregation": {"strategy": "collect"},
            "pools": [{"name": "worker", "spec": pool_spec}],
        },
    })
}

pub async fn attempts_to_leave_the_boundary_are_refused(bed: &Bed) -> anyhow::Result<()> {
    let ns = bed.namespace("e2e-tenancy").await?;
    let model = bed.model.display().to_string();
    let folder = bed
        .model
        .parent()
        .context("the model's folder")?
        .display()
        .to_string();
    let queued = |source: &str| json!({"model": {"source": source}, "queueName": "gpus"});

    // What a tenant might try, and the field the refusal must name.
    let attempts: Vec<(&str, Value, &str)> = vec![
        (
            "cloud metadata",
            external("a1", "http://169.254.169.254/latest/meta-data"),
            "spec.external.url",
        ),
        (
            "loopback",
            external("a2", "http://127.0.0.1:8000/v1"),
            "spec.external.url",
        ),
        (
            "loopback, IPv6",
            external("a3", "http://[::1]:8000/v1"),
            "spec.external.url",
        ),
        (
            "loopback, as one number",
            external("a4", "http://2130706433/v1"),
            "spec.external.url",
        ),
        (
            "localhost",
            external("a5", "http://localhost:8000/v1"),
            "spec.external.url",
        ),
        (
            "the API server",
            external("a6", "https://kubernetes.default.svc/api"),
            "spec.external.url",
        ),
        (
            "the API server, short name",
            external("a7", "https://kubernetes/api"),
            "spec.external.url",
        ),
        (
            "another tenant's workers",
            external(
                "a8",
                "http://gemma-workers.e2e-swarm.svc.cluster.local:8000/v1",
            ),
            "spec.external.url",
        ),
        (
            "a private address",
            external("a9", "http://10.96.0.10:8000/v1"),
            "spec.external.url",
        ),
        (
            "cloud metadata in fullwidth digits",
            external(
                "a11",
                "http://\u{ff11}\u{ff16}\u{ff19}.\u{ff12}\u{ff15}\u{ff14}.\u{ff11}\u{ff16}\u{ff19}.\u{ff12}\u{ff15}\u{ff14}/v1",
            ),
            "spec.external.url",
        ),
        (
            "credentials in the URL",
            external("a10", "https://user:sk-1@api.example.com/v1"),
            "spec.external.url",
        ),
        (
            "the node's root",
            pool("b1", queued("file:///")),
            "spec.model.source",
        ),
        (
            "/etc",
            pool("b2", queued("file:///etc")),
            "spec.model.source",
        ),
        (
            "climbing out with ..",
            pool("b3", queued(&format!("file://{folder}/../../../etc"))),
            "spec.model.source",
        ),
        (
            "pod logs",
            pool("b4", queued("file:///var/log/pods")),
            "spec.model.source",
        ),
        (
            "an image off the list",
            pool(
                "c1",
                json!({"model": {"source": "pvc://weights/m"}, "queueName": "gpus", "template": {"image": "docker.io/evil/miner:1"}}),
            ),
            "spec.template.image",
        ),
        (
            "no queue: no quota",
            pool("d1", json!({"model": {"source": "pvc://weights/m"}})),
            "spec.queueName",
        ),
        (
            "system-node-critical",
            pool(
                "e1",
                json!({"model": {"source": "pvc://weights/m"}, "queueName": "gpus", "priorityClassName": "system-node-critical"}),
            ),
            "spec.priorityClassName",
        ),
        (
            "a job's own pool on /etc",
            job("f1", queued("file:///etc")),
            "spec.pools[].spec.model.source",
        ),
        (
            "a job's own pool at cloud metadata",
            job(
                "f2",
                json!({"external": {"url": "http://169.254.169.254/", "model": "m"}}),
            ),
            "spec.pools[].spec.external.url",
        ),
        (
            "a job's own pool without a queue",
            job("f3", json!({"model": {"source": "pvc://weights/m"}})),
            "spec.pools[].spec.queueName",
        ),
    ];
    let legitimate: Vec<(&str, Value)> = vec![
        (
            "a pool on a claim, in its queue",
            pool("ok1", queued("pvc://weights/m")),
        ),
        (
            "a pool on the allowed node path",
            pool("ok2", queued(&format!("file://{model}"))),
        ),
        (
            "an external endpoint on the internet",
            external("ok3", "https://api.example.com/v1"),
        ),
        (
            "an allowed PriorityClass",
            pool(
                "ok4",
                json!({"model": {"source": "pvc://weights/m"}, "queueName": "gpus", "priorityClassName": "e2e-low"}),
            ),
        ),
        (
            "a job with its own pool",
            job("ok5", queued("pvc://weights/m")),
        ),
    ];

    let mut accepted = Vec::new();
    for (what, object, field) in &attempts {
        match bed.dry_run_create(&ns, object).await? {
            Ok(()) => accepted.push(format!("{what}: accepted")),
            Err(kube::Error::Api(err))
                if err.message.contains(field)
                    && err.message.contains("ValidatingAdmissionPolicy") => {}
            Err(err) => accepted.push(format!("{what}: refused without naming {field}: {err}")),
        }
    }
    let mut refused = Vec::new();
    for (what, object) in &legitimate {
        if let Err(err) = bed.dry_run_create(&ns, object).await? {
            refused.push(format!("{what}: {err}"));
        }
    }
    println!(
        "tenancy: attempts accepted {}/{}, legitimate manifests accepted {}/{}",
        accepted.len(),
        attempts.len(),
        legitimate.len() - refused.len(),
        legitimate.len()
    );
    ensure!(
        accepted.is_empty(),
        "attempts that got through: {accepted:#?}"
    );
    ensure!(
        refused.is_empty(),
        "legitimate manifests refused: {refused:#?}"
    );

    worker_pods_pass_the_restricted_standard(bed).await?;
    names_of_others_are_never_taken_over(bed, &ns).await?;
    operator_refuses_without_the_admission_policy(bed, &ns).await
}

/// The worker pods of every example pool, as the operator builds them, are admitted in a
/// namespace that enforces the restricted Pod Security Standard; a pod on a node path
/// (hostPath), which the tenancy policy keeps off by default, is not.
async fn worker_pods_pass_the_restricted_standard(bed: &Bed) -> anyhow::Result<()> {
    use kubeswarm::controllers::model_pool::build;
    bed.apply(
        None,
        "{apiVersion: v1, kind: Namespace, metadata: {name: e2e-restricted, labels: {pod-security.kubernetes.io/enforce: restricted}}}",
    )
    .await?;
    let settings = build::Settings {
        worker_image: "kubeswarm/inference-worker:e2e".to_owned(),
        operator_namespace: "kubeswarm-system".to_owned(),
        operator_labels: [("app.kubernetes.io/name".to_owned(), "kubeswarm".to_owned())].into(),
        tenancy: Default::default(),
        api_key_role: "kubeswarm-api-keys".to_owned(),
        worker_key: "a key of at least thirty-two characters".to_owned(),
        models_limit: kubeswarm::swarm::MAX_MODELS_BYTES,
    };
    let pools = kubeswarm_test_support::examples::worker_pool_specs();
    ensure!(
        pools.len() >= 2,
        "only {} example pools run workers",
        pools.len()
    );
    let on_node = json!({"model": {"source": "file:///var/lib/models/m.gguf"}});
    for (i, spec) in pools.iter().chain([&on_node]).enumerate() {
        let mut pool = ModelPool::new(&format!("p{i}"), serde_json::from_value(spec.clone())?);
        pool.metadata.namespace = Some("e2e-restricted".to_owned());
        pool.metadata.uid = Some("uid".to_owned());
        let template = build::worker_template(&pool, &settings)?;
        let pod = build::pod(&pool, &template, 0, &Default::default());
        let mut object = serde_json::to_value(&pod)?;
        object["apiVersion"] = json!("v1");
        object["kind"] = json!("Pod");
        let answer = bed.dry_run_create("e2e-restricted", &object).await?;
        match (std::ptr::eq(spec, &on_node), answer) {
            (false, Ok(())) => {}
            (true, Err(kube::Error::Api(err)))
                if err.message.contains("restricted") && err.message.contains("hostPath") => {}
            (_, answer) => bail!("the worker pod of {spec}: {answer:?}"),
        }
    }
    // The pod of a `tests` check's batch, which runs code a model wrote, passes it too.
    let settings = kubeswarm::controllers::swarm_job::sandbox::Settings {
        image: Some("python:3.12-slim".to_owned()),
        cpu: "1".to_owned(),
        memory: "512Mi".to_owned(),
    };
    let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "kubeswarm.dev/v1alpha1".to_owned(),
        kind: "SwarmJob".to_owned(),
        name: "j".to_owned(),
        uid: "uid".to_owned(),
        ..Default::default()
    };
    let job = kubeswarm::controllers::swarm_job::sandbox::build_job(
        &kubeswarm::controllers::swarm_job::sandbox::Batch {
            name: "j-tests-0",
            job: "j",
            uid: "uid",
            image: "python:3.12-slim",
            settings: &settings,
            kind: kubeswarm::controllers::swarm_job::store::Kind::ConfigMap,
            deadline: 130,
        },
        &owner,
    );
    let template = job.spec.context("a Job with no spec")?.template;
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "j-tests-0", "labels": template.metadata.and_then(|m| m.labels)},
        "spec": template.spec,
    });
    if let Err(err) = bed.dry_run_create("e2e-restricted", &pod).await? {
        bail!("the pod of a tests check's batch: {err:?}");
    }
    println!(
        "tenancy: {} example worker pods and a tests check's pod pass the restricted Pod Security Standard",
        pools.len()
    );
    Ok(())
}

/// A Service named like a pool's, and a ModelPool named like a job's own pool, made by
/// someone else: the pool and the job say NameConflict, and neither object is touched.
async fn names_of_others_are_never_taken_over(bed: &Bed, ns: &str) -> anyhow::Result<()> {
    bed.apply(
        Some(ns),
        r#"
apiVersion: v1
kind: Service
metadata: {name: clash-workers}
spec: {ports: [{port: 80}], selector: {app: mine}}
---
apiVersion: kubeswarm.dev/v1alpha1
kind: ModelPool
metadata: {name: clash}
spec: {model: {source: 'pvc://weights/m'}, queueName: gpus}
---
apiVersion: kubeswarm.dev/v1alpha1
kind: ModelPool
metadata: {name: mine-worker}
spec: {external: {url: 'https://api.example.com/v1', model: m}}
---
apiVersion: kubeswarm.dev/v1alpha1
kind: SwarmJob
metadata: {name: mine}
spec:
  task: Name a colour.
  fanOut: {pool: worker, subagents: 1}
  verification: {mode: none}
  aggregation: {strategy: collect}
  pools: [{name: worker, spec: {model: {source: 'pvc://weights/m'}, queueName: gpus}}]
"#,
    )
    .await?;
    let pools: Api<ModelPool> = Api::namespaced(bed.client.clone(), ns);
    until(
        &pools,
        "clash",
        Duration::from_secs(30),
        "the pool names the clash",
        json_condition(|o| conflict(o, "Available")),
    )
    .await?;
    let jobs: Api<kubeswarm::api::SwarmJob> = Api::namespaced(bed.client.clone(), ns);
    until(
        &jobs,
        "mine",
        Duration::from_secs(30),
        "the job names the clash",
        json_condition(|o| conflict(o, "Admitted")),
    )
    .await?;

    let services: Api<Service> = Api::namespaced(bed.client.clone(), ns);
    let service = services.get("clash-workers").await?;
    ensure!(
        service.metadata.owner_references.is_none()
            && service
                .spec
                .and_then(|s| s.selector)
                .is_some_and(|s| s["app"] == "mine"),
        "the pool took over another's Service"
    );
    let squatted = pools.get("mine-worker").await?;
    ensure!(
        squatted.metadata.owner_references.is_none() && squatted.spec.external.is_some(),
        "the job took over another's ModelPool"
    );
    // The job's end does not take the pool it never owned with it.
    delete_and_wait(&jobs, "mine", Duration::from_secs(30)).await?;
    ensure!(
        pools.get_opt("mine-worker").await?.is_some(),
        "deleting the job deleted another's ModelPool"
    );
    Ok(())
}

fn conflict(object: &Value, type_: &str) -> bool {
    condition(object, type_)
        .is_some_and(|c| c["status"] == "False" && c["reason"] == "NameConflict")
}

/// Defence in depth: with the admission policy's binding deleted, a pool on /etc is
/// stored, and the operator reports it and creates nothing for it.
async fn operator_refuses_without_the_admission_policy(bed: &Bed, ns: &str) -> anyhow::Result<()> {
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(bed.client.clone());
    let mut binding = bindings.get(BINDING).await?;
    bindings.delete(BINDING, &DeleteParams::default()).await?;
    let escaping = pool(
        "escape",
        json!({"model": {"source": "file:///etc"}, "queueName": "gpus"}),
    );
    // The API server drops the binding from its policies within a moment.
    let stored = async {
        for _ in 0..60 {
            if bed.dry_run_create(ns, &escaping).await?.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!("the pool was still refused 30 s after the binding was deleted")
    };
    let result = async {
        stored.await?;
        bed.apply(Some(ns), &serde_json::to_string(&escaping)?)
            .await?;
        let pools: Api<ModelPool> = Api::namespaced(bed.client.clone(), ns);
        until(
            &pools,
            "escape",
            Duration::from_secs(30),
            "the operator refuses it",
            json_condition(|p| {
                condition(p, "Available").is_some_and(|c| {
                    c["status"] == "False"
                        && c["reason"] == "PolicyDenied"
                        && c["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("spec.model.source: file:///etc"))
                })
            }),
        )
        .await?;
        let services: Api<Service> = Api::namespaced(bed.client.clone(), ns);
        ensure!(
            services.get_opt("escape-workers").await?.is_none(),
            "the operator created the refused pool's Service"
        );
        let pods: Api<Pod> = Api::namespaced(bed.client.clone(), ns);
        let created = pods
            .list(&ListParams::default().labels("kubeswarm.dev/pool=escape"))
            .await?;
        ensure!(
            created.items.is_empty(),
            "the operator created the refused pool's pods"
        );
        Ok(())
    }
    .await;

    // The binding comes back whatever happened, so later tests run under the policy.
    binding.metadata.resource_version = None;
    binding.metadata.uid = None;
    binding.metadata.creation_timestamp = None;
    binding.metadata.managed_fields = None;
    bindings.create(&PostParams::default(), &binding).await?;
    for _ in 0..60 {
        if bed
            .dry_run_create(
                ns,
                &pool(
                    "again",
                    json!({"model": {"source": "file:///etc"}, "queueName": "gpus"}),
                ),
            )
            .await?
            .is_err()
        {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    result.and(Err(anyhow::anyhow!(
        "the policy did not apply again after its binding came back"
    )))
}
