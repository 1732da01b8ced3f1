//! What every caller of an OpenAI-compatible endpoint shares besides completions: one way
//! to build the HTTP client, and one way to ask an endpoint which models it serves
//! (`GET /models`), used by the ModelPool controller's probe of external pools and by
//! local mode for the endpoints given with `--pool`.

use std::time::Duration;

use serde::Deserialize;

/// The most of a model list that is read: an endpoint is not trusted to send a small
/// one, and the operator that probes it serves every tenant.
const MAX_MODELS_BYTES: usize = 1 << 20;

/// The HTTP client for model endpoints: pooled connections kept while a job runs.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .expect("the HTTP client builds with its defaults")
}

/// Why an endpoint's model list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("GET {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url} sent more than {MAX_MODELS_BYTES} bytes")]
    TooLarge { url: String },
    #[error("GET {url} did not answer an OpenAI model list")]
    NotAModelList {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The ids of the models the endpoint at `base` (its `/v1` URL) serves, read within
/// `timeout`.
pub async fn served_models(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
) -> Result<Vec<String>, ModelsError> {
    #[derive(Deserialize)]
    struct Models {
        data: Vec<Model>,
    }
    #[derive(Deserialize)]
    struct Model {
        id: String,
    }
    let url = format!("{}/models", base.trim_end_matches('/'));
    let mut response = http
        .get(&url)
        .timeout(timeout)
        .send()
        .await
        .map_err(|source| ModelsError::Request {
            url: url.clone(),
            source,
        })?;
    if !response.status().is_success() {
        return Err(ModelsError::Status {
            url,
            status: response.status().as_u16(),
        });
    }
    let request_failed = |source| ModelsError::Request {
        url: url.clone(),
        source,
    };
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(request_failed)? {
        if body.len() + chunk.len() > MAX_MODELS_BYTES {
            return Err(ModelsError::TooLarge { url });
        }
        body.extend_from_slice(&chunk);
    }
    let models: Models = serde_json::from_slice(&body)
        .map_err(|source| ModelsError::NotAModelList { url, source })?;
    Ok(models.data.into_iter().map(|m| m.id).collect())
}
