//! `ModelPool`: a set of identical inference workers serving one model, or an existing
//! OpenAI-compatible endpoint that the operator routes to.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pool of identical inference workers serving one model, or an existing
/// OpenAI-compatible endpoint. SwarmJobs name pools for their subagents, planner and gate.
// Each printcolumn(...) repeats `type_ = ...`, which clippy mistakes for a duplicated
// attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubeswarm.dev",
    version = "v1alpha1",
    kind = "ModelPool",
    namespaced,
    status = "ModelPoolStatus",
    shortname = "mp",
    category = "kubeswarm",
    derive = "PartialEq",
    doc = "A pool of identical GPU-pinned inference workers serving one model, or an existing OpenAI-compatible endpoint.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model.source",
        description = "Where the weights come from"
    ),
    printcolumn(
        name = "External",
        type_ = "string",
        json_path = ".spec.external.url",
        description = "Endpoint of an external pool",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Workers ready to serve"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Workers asked for"
    ),
    printcolumn(
        name = "Queue",
        type_ = "string",
        json_path = ".spec.queueName",
        description = "Kueue LocalQueue admitting the workers"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status",
        description = "Whether the pool serves requests"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("has(self.model) != has(self.external)")
        .message("exactly one of spec.model or spec.external must be set: spec.model runs workers on this cluster's GPUs, spec.external.url routes to an endpoint that already exists"),
    validation = Rule::new("!has(self.external) || !has(self.queueName)")
        .message("spec.queueName admits worker pods through Kueue, and an external pool runs no pods: remove spec.queueName or use spec.model"),
    validation = Rule::new("!has(self.external) || !has(self.template)")
        .message("spec.template customises worker pods, and an external pool runs no pods: remove spec.template or use spec.model")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelPoolSpec {
    /// Weights to serve on this pool's own workers. Exactly one of `model` and `external`
    /// is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSource>,

    /// An OpenAI-compatible endpoint that already exists (vLLM, SGLang, llama.cpp, another
    /// kubeswarm worker). The operator runs no pods for it and routes requests there.
    /// Exactly one of `model` and `external` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalEndpoint>,

    /// Number of worker replicas, each a pod with its own GPUs. Between 0 and 64; 0 keeps
    /// the pool defined but releases its GPUs. Ignored for external pools. Defaults to `1`.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 64").message("spec.replicas must be between 0 and 64"))]
    pub replicas: i32,

    /// Compute each worker replica asks for.
    #[serde(default)]
    pub resources: WorkerResources,

    /// Settings of the inference engine inside each worker.
    #[serde(default)]
    pub engine: EngineSettings,

    /// Overrides for the worker pods: image, node selection, tolerations, environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<WorkerTemplate>,

    /// Kueue LocalQueue in this namespace that admits the workers against the tenant's GPU
    /// quota. When unset the workers are created directly, without Kueue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub queue_name: Option<String>,

    /// PriorityClass of the workers; with Kueue it also orders admission and preemption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub priority_class_name: Option<String>,
}

fn default_replicas() -> i32 {
    1
}

/// Where a pool's weights come from and how they are loaded.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(self.isq) || !has(self.format) || self.format == 'safetensors'")
        .message("spec.model.isq quantizes safetensors weights when they load; GGUF files are quantized already: remove isq or use format safetensors"),
    validation = Rule::new("!has(self.files) || !has(self.format) || self.format == 'gguf'")
        .message("spec.model.files lists GGUF files; safetensors weights load from the whole directory: remove files or use format gguf"),
    validation = Rule::new("!has(self.format) || self.format != 'gguf' || has(self.files) || self.source.endsWith('.gguf')")
        .message("spec.model.format gguf needs the file to load: list it in spec.model.files, or point spec.model.source at the .gguf file")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Location of the weights: `file:///abs/path` (a directory or file on the node),
    /// `pvc://claim/path` (a PersistentVolumeClaim in this namespace, mounted read-only), or
    /// `hf://org/repo` (only on clusters whose workers can reach the Hugging Face hub).
    #[schemars(length(min = 8, max = 512))]
    #[x_kube(validation = Rule::new("self.matches('^file:///[^\\\\s]*$') || self.matches('^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\\\\s]*)?$') || self.matches('^hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*$')")
        .message("spec.model.source must be file:///absolute/path, pvc://claim-name/path or hf://org/repo"))]
    pub source: String,

    /// Weight format. Detected from the files when unset: `.gguf` files are GGUF, a
    /// directory with `.safetensors` files is safetensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ModelFormat>,

    /// GGUF file names inside `source`, more than one for split models. Plain names, not
    /// paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 16),
        inner(length(min = 1, max = 255), pattern(r"^[^/]+$"))
    )]
    pub files: Option<Vec<String>>,

    /// In-situ quantization applied to safetensors weights while they load, so a larger
    /// model fits the GPU. Unset keeps the weights as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isq: Option<IsqType>,

    /// Jinja chat template that replaces the one inside the weights, for models that ship
    /// none or a broken one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32768))]
    pub chat_template: Option<String>,
}

/// Format of the weights.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// GGUF files, already quantized.
    Gguf,
    /// A Hugging Face safetensors directory with its config and tokenizer.
    Safetensors,
}

/// In-situ quantization types the inference engine applies to safetensors weights.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsqType {
    #[serde(rename = "Q4_0")]
    Q4_0,
    #[serde(rename = "Q4_1")]
    Q4_1,
    #[serde(rename = "Q5_0")]
    Q5_0,
    #[serde(rename = "Q5_1")]
    Q5_1,
    #[serde(rename = "Q8_0")]
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

/// An OpenAI-compatible endpoint outside kubeswarm's control.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalEndpoint {
    /// Base URL of the OpenAI-compatible API, for example
    /// `http://vllm.models.svc:8000/v1`.
    #[schemars(length(min = 8, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^\\\\s/]+(/[^\\\\s]*)?$')")
        .message("spec.external.url must be an http:// or https:// URL such as http://vllm.models.svc:8000/v1"))]
    pub url: String,

    /// Model name the endpoint serves, sent as `model` in every request.
    #[schemars(length(min = 1, max = 253))]
    pub model: String,

    /// Secret key in this namespace holding the endpoint's API key, sent as a bearer token.
    /// The Secret must be labelled `kubeswarm.dev/api-key=true` by whoever owns it, and
    /// the platform team must let the operator read this namespace's Secrets (Helm value
    /// `tenancy.apiKeyNamespaces`); until both hold the pool reports `ApiKeyUnavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyReference>,

    /// `Namespace` sends every request with a `cache_salt` unique to this namespace (and
    /// unguessable: derived with the operator's key), so a server shared by several
    /// tenants keeps their prefix caches apart and one tenant cannot learn another's
    /// prompts from cache-hit timing (CVE-2025-46570). Only for servers that accept
    /// `cache_salt` (vLLM 0.9 or newer); others may refuse the field. Defaults to `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_salt: Option<CacheSalt>,
}

/// What an external pool's requests carry to keep tenants' prefix caches apart:
/// `Namespace` sends every request with a `cache_salt` unique to the pool's namespace and
/// unguessable (derived with the operator's key), so a server shared by several tenants
/// keeps their prefix caches apart (CVE-2025-46570). Only for servers that accept
/// `cache_salt` (vLLM 0.9 or newer). Defaults to `None`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheSalt {
    /// No salt: the server's cache is shared with whoever else calls it.
    None,
    /// A salt per namespace.
    Namespace,
}

/// A key of a Secret in the pool's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Compute each worker replica asks for.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerResources {
    /// GPUs per replica, set as both request and limit of `gpuResourceName`. 0 runs the
    /// worker on CPU, for small models and tests. Defaults to `1`.
    #[serde(default = "default_gpus")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 16").message("spec.resources.gpus must be between 0 and 16 GPUs per replica"))]
    pub gpus: i32,

    /// Extended resource name of the GPUs, as the device plugin advertises it. Defaults to
    /// `nvidia.com/gpu`.
    #[serde(default = "default_gpu_resource_name")]
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    )]
    pub gpu_resource_name: String,

    /// CPU request of each worker; the limit is left unset so tokenization can burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,

    /// Memory request and limit of each worker: room for the weights while they load and
    /// for the host side of the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

fn default_gpus() -> i32 {
    1
}

fn default_gpu_resource_name() -> String {
    "nvidia.com/gpu".to_owned()
}

impl Default for WorkerResources {
    fn default() -> Self {
        Self {
            gpus: default_gpus(),
            gpu_resource_name: default_gpu_resource_name(),
            cpu: None,
            memory: None,
        }
    }
}

/// Settings of the inference engine inside each worker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EngineSettings {
    /// Sequences one worker decodes at once with continuous batching; requests beyond it
    /// wait in the worker's queue. Defaults to `32`.
    #[serde(default = "default_max_concurrent_sequences")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1024").message("spec.engine.maxConcurrentSequences must be between 1 and 1024"))]
    pub max_concurrent_sequences: i32,

    /// Percent of GPU memory left after the weights that paged attention reserves for the
    /// KV cache. Unset lets the engine choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 5 && self <= 95").message("spec.engine.kvCacheMemoryPercent must be between 5 and 95"))]
    pub kv_cache_memory_percent: Option<i32>,

    /// Sequences whose KV cache is kept for reuse by later requests with the same prompt
    /// prefix (subagents of one job share their instructions). 0 turns the prefix cache
    /// off. Defaults to `16`.
    #[serde(default = "default_prefix_cache_sequences")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1024").message("spec.engine.prefixCacheSequences must be between 0 and 1024"))]
    pub prefix_cache_sequences: i32,

    /// Longest context, prompt and completion together, in tokens. Unset uses the model's
    /// own limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 256 && self <= 1048576").message("spec.engine.maxContextTokens must be between 256 and 1048576"))]
    pub max_context_tokens: Option<i32>,
}

fn default_max_concurrent_sequences() -> i32 {
    32
}

fn default_prefix_cache_sequences() -> i32 {
    16
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_concurrent_sequences: default_max_concurrent_sequences(),
            kv_cache_memory_percent: None,
            prefix_cache_sequences: default_prefix_cache_sequences(),
            max_context_tokens: None,
        }
    }
}

/// Overrides for the worker pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTemplate {
    /// Worker image. Unset uses the image the operator was installed with, which matches
    /// its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Node labels the workers must run on, for example a GPU model. With Kueue, the
    /// admitted flavor's labels are added to these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the workers, for GPU nodes that are tainted. With Kueue, the admitted
    /// flavor's tolerations are added to these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// Extra environment variables of the worker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,
}

/// Observed state of a ModelPool.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelPoolStatus {
    /// Current state of the pool: `Admitted` (Kueue admitted the workers; reasons such as
    /// `WaitingForQuota`, `NoQueue`, `KueueNotInstalled`), `Available` (at least one replica
    /// serves requests), `Progressing` (replicas are being created or loading the model) and
    /// `Degraded` (a replica is failing; the message names the pod and why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Worker pods that exist.
    #[serde(default)]
    pub replicas: i32,

    /// Worker pods that have loaded the model and accept requests.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the Kueue Workloads that hold this pool's quota, when it has a
    /// queue: one Workload per replica, named `<pool>-<index>`, so a pool runs with the
    /// replicas its quota allows. `kubectl get workloads -l <this>` lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 320))]
    pub workload: Option<String>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
