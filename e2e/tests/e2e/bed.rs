//! The test bed as the tests see it: a cluster started by `e2e/cluster up` in a directory of
//! its own, a client as cluster admin, and the helpers every scenario shares.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Discovery, Scope};
use kube::runtime::wait::conditions::is_deleted;
use kube::runtime::wait::{Condition, await_condition};
use kube::{Api, Client, Config, Resource, ResourceExt};
use kubeswarm::api::SwarmJob;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub fn repo_root() -> PathBuf {
    // Read when the test runs: clones share one target directory, and a compiled-in path
    // would name the clone that built this binary.
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("..")
}

pub struct Bed {
    pub dir: PathBuf,
    pub client: Client,
    /// The addresses `e2e/cluster up` wrote to DIR/env.
    pub env: BTreeMap<String, String>,
    /// The test model, mounted into worker pods by hostPath.
    pub model: PathBuf,
    discovery: Discovery,
}

/// Runs `e2e/cluster ACTION DIR ARGS...`.
pub fn cluster(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(repo_root().join("e2e/cluster"))
        .args([args[0], dir.to_str().context("a UTF-8 directory")?])
        .args(&args[1..])
        .status()?;
    if !status.success() {
        bail!("e2e/cluster {} failed ({status})", args.join(" "));
    }
    Ok(())
}

impl Bed {
    pub async fn up(dir: PathBuf, model: PathBuf) -> anyhow::Result<Self> {
        // The tenancy policy lets pools mount the test model's folder and no other.
        let folder = model.parent().context("the model is in a folder")?;
        let status = Command::new(repo_root().join("e2e/cluster"))
            .args(["up", dir.to_str().context("a UTF-8 directory")?])
            .env("E2E_HOST_PATH", folder)
            .status()?;
        if !status.success() {
            bail!("e2e/cluster up failed ({status})");
        }
        let env: BTreeMap<String, String> = std::fs::read_to_string(dir.join("env"))?
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let kubeconfig = Kubeconfig::read_from(dir.join("admin.kubeconfig"))?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        let client = Client::try_from(config)?;
        let discovery = Discovery::new(client.clone()).run().await?;
        Ok(Self {
            dir,
            client,
            env,
            model,
            discovery,
        })
    }

    pub fn down(&self) -> anyhow::Result<()> {
        cluster(&self.dir, &["down"])
    }

    /// Stops a part with SIGKILL, or starts it again (`e2e/cluster stop|start`).
    pub fn part(&self, action: &str, part: &str) -> anyhow::Result<()> {
        cluster(&self.dir, &[action, part])
    }

    /// The pid of a running part (its container's process, for the operator).
    pub fn pid(&self, part: &str) -> anyhow::Result<u32> {
        let pid = std::fs::read_to_string(self.dir.join("pids").join(part))
            .with_context(|| format!("{part} is not running"))?;
        Ok(pid.trim().parse()?)
    }

    /// The operator's metric `name` (with its labels, as exposed), from its metrics
    /// endpoint; None while it has no sample (a counter never incremented).
    pub async fn operator_metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
        let url = format!(
            "http://127.0.0.1:{}/metrics",
            self.env["OPERATOR_METRICS_PORT"]
        );
        let text = reqwest::get(&url).await?.text().await?;
        Ok(text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()))
    }

    /// `kubectl` against the cluster as admin: its standard output, or an error with its
    /// standard error.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.env["KUBECTL"])
            .arg("--kubeconfig")
            .arg(self.dir.join("admin.kubeconfig"))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// A fresh namespace for one test. One the bed made before installing the chart (for
    /// a RoleBinding the chart puts there) is taken as it is, if still empty of jobs.
    pub async fn namespace(&self, name: &str) -> anyhow::Result<String> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubeswarm.dev/e2e": "true"}}
        }))?;
        match api.create(&PostParams::default(), &ns).await {
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let jobs: Api<SwarmJob> = Api::namespaced(self.client.clone(), name);
                ensure!(
                    jobs.list(&Default::default()).await?.items.is_empty(),
                    "namespace {name} is already in use"
                );
            }
            created => {
                created?;
            }
        }
        Ok(name.to_owned())
    }

    fn api_for(
        &self,
        object: &Value,
        namespace: Option<&str>,
    ) -> anyhow::Result<Api<DynamicObject>> {
        let (group, version) = match object["apiVersion"].as_str().context("apiVersion")? {
            gv if gv.contains('/') => gv.split_once('/').expect("checked"),
            v => ("", v),
        };
        let gvk = GroupVersionKind::gvk(group, version, object["kind"].as_str().context("kind")?);
        let (resource, caps) = self
            .discovery
            .resolve_gvk(&gvk)
            .with_context(|| format!("{gvk:?} is not served"))?;
        Ok(match (caps.scope, namespace) {
            (Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(self.client.clone(), ns, &resource)
            }
            _ => Api::all_with(self.client.clone(), &resource),
        })
    }

    /// Applies manifests (YAML, several documents) server-side, into `namespace` where the
    /// kind is namespaced.
    pub async fn apply(&self, namespace: Option<&str>, yaml: &str) -> anyhow::Result<()> {
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let object: Value = serde::Deserialize::deserialize(doc)?;
            if object.is_null() {
                continue;
            }
            let api = self.api_for(&object, namespace)?;
            let name = object["metadata"]["name"]
                .as_str()
                .context("metadata.name")?;
            api.patch(
                name,
                &PatchParams::apply("kubeswarm-e2e").force(),
                &Patch::Apply(&object),
            )
            .await
            .with_context(|| format!("applying {} {name}", object["kind"]))?;
        }
        Ok(())
    }

    /// Creates an object with a server-side dry run, nothing stored. The outer error is
    /// ours (a kind the server does not serve); the inner result is the API server's answer.
    pub async fn dry_run_create(
        &self,
        namespace: &str,
        object: &Value,
    ) -> anyhow::Result<kube::Result<()>> {
        let api = self.api_for(object, Some(namespace))?;
        let object: DynamicObject = serde_json::from_value(object.clone())?;
        let dry_run = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        Ok(api.create(&dry_run, &object).await.map(drop))
    }

    pub fn resource(&self, group: &str, version: &str, kind: &str) -> ApiResource {
        ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
    }
}

/// Waits until `condition` holds for the object, or fails after `timeout` with what the
/// object looked like last.
pub async fn until<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    condition: impl Condition<K>,
) -> anyhow::Result<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, condition)).await {
        Ok(Ok(Some(object))) => Ok(object),
        Ok(Ok(None)) => bail!("{name} was deleted while waiting until {what}"),
        Ok(Err(err)) => Err(err).with_context(|| format!("watching {name}")),
        Err(_) => {
            let last = api.get_opt(name).await.ok().flatten();
            bail!("{name}: not {what} after {timeout:?}; last seen: {last:#?}")
        }
    }
}

/// Waits until the object with this uid is gone (deleted, or replaced by another).
pub async fn gone<K>(api: &Api<K>, name: &str, uid: &str, timeout: Duration) -> anyhow::Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, is_deleted(uid))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(err).with_context(|| format!("watching {name}")),
        Err(_) => bail!("{name} is still there after {timeout:?}"),
    }
}

/// Deletes an object (its dependents in the background) and waits until it is gone.
pub async fn delete_and_wait<K>(api: &Api<K>, name: &str, timeout: Duration) -> anyhow::Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let object = api.get(name).await?;
    api.delete(name, &DeleteParams::background()).await?;
    gone(api, name, &object.uid().unwrap_or_default(), timeout).await
}

/// Waits until every object the list returns now is gone.
pub async fn all_gone<K>(
    api: &Api<K>,
    list: &ListParams,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    for object in api.list(list).await? {
        gone(
            api,
            &object.name_any(),
            &object.uid().unwrap_or_default(),
            timeout,
        )
        .await
        .with_context(|| format!("{what} left behind"))?;
    }
    Ok(())
}

/// A condition of a kubeswarm or Kueue object's status.conditions, as JSON.
pub fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

pub fn has_condition(object: &Value, type_: &str, status: &str) -> bool {
    condition(object, type_).is_some_and(|c| c["status"] == status)
}

/// A `Condition` over an object's JSON form.
pub fn json_condition<K: serde::Serialize>(
    check: impl Fn(&Value) -> bool,
) -> impl Fn(Option<&K>) -> bool {
    move |object: Option<&K>| {
        object
            .and_then(|o| serde_json::to_value(o).ok())
            .is_some_and(|v| check(&v))
    }
}
