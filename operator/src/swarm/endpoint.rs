//! What every caller of an OpenAI-compatible endpoint shares besides completions: one way
//! to build the HTTP client, and one way to ask an endpoint which models it serves
//! (`GET /models`), used by the ModelPool controller's probe of external pools and by
//! local mode for the endpoints given with `--pool`.

use std::time::Duration;

/// The most of a model list that is read by default: an endpoint is not trusted to send
/// a small one, and the operator that probes it serves every tenant.
pub const MAX_MODELS_BYTES: usize = 1 << 20;

/// The HTTP client for model endpoints: pooled connections kept while a job runs.
pub fn http_client() -> reqwest::Client {
    builder()
        .build()
        .expect("the HTTP client builds with its defaults")
}

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(90))
}

/// The header that names the caller to kubeswarm's workers, which log it with each call.
pub const CALLER_HEADER: &str = "kubeswarm-caller";

/// The client of kubeswarm's own workers, naming `caller` (the operator replica's Lease
/// identity) in every request, so that the workers' logs show which replica called and
/// when. Never used for external endpoints, which are told nothing about the operator.
pub fn worker_client(caller: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(value) = reqwest::header::HeaderValue::from_str(caller) {
        headers.insert(CALLER_HEADER, value);
    }
    builder()
        .default_headers(headers)
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
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("GET {url} sent more than the {limit} bytes a model list may take")]
    TooLarge { url: String, limit: usize },
    #[error("GET {url} did not answer JSON")]
    NotJson {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The ids of the models the endpoint at `base` (its `/v1` URL) serves, read within
/// `timeout` and `limit` bytes. Read as OpenAI's list (`data[].id`); a list without them
/// serves nothing.
pub async fn served_models(
    http: &reqwest::Client,
    base: &str,
    api_key: Option<&str>,
    timeout: Duration,
    limit: usize,
) -> Result<Vec<String>, ModelsError> {
    let url = format!("{}/models", base.trim_end_matches('/'));
    // reqwest's errors name the URL themselves; ours does, once.
    let request_failed = |source: reqwest::Error| ModelsError::Request {
        url: url.clone(),
        source: source.without_url(),
    };
    let mut request = http.get(&url).timeout(timeout);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let mut response = request.send().await.map_err(request_failed)?;
    if !response.status().is_success() {
        return Err(ModelsError::Status {
            url,
            status: response.status(),
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(request_failed)? {
        if body.len() + chunk.len() > limit {
            return Err(ModelsError::TooLarge { url, limit });
        }
        body.extend_from_slice(&chunk);
    }
    let list: serde_json::Value =
        serde_json::from_slice(&body).map_err(|source| ModelsError::NotJson { url, source })?;
    Ok(list["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint on loopback whose `/v1/models` answers `body`.
    async fn serving(body: Vec<u8>) -> String {
        let app = axum::Router::new().route(
            "/v1/models",
            axum::routing::get(move || {
                let body = body.clone();
                async move { body }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    async fn models(body: &[u8]) -> Result<Vec<String>, ModelsError> {
        let url = serving(body.to_vec()).await;
        served_models(
            &http_client(),
            &url,
            None,
            Duration::from_secs(5),
            MAX_MODELS_BYTES,
        )
        .await
    }

    #[tokio::test]
    async fn a_model_list_is_read_and_anything_else_serves_nothing_or_fails() {
        let list = br#"{"object": "list", "data": [{"id": "llama-3"}, {"id": "qwen"}]}"#;
        assert_eq!(models(list).await.unwrap(), ["llama-3", "qwen"]);
        assert!(models(br#"{"object": "list"}"#).await.unwrap().is_empty());
        assert!(matches!(
            models(b"<html>").await,
            Err(ModelsError::NotJson { .. })
        ));
    }

    #[tokio::test]
    async fn an_endpoint_that_sends_too_much_is_cut_off() {
        let huge = vec![b' '; MAX_MODELS_BYTES + 1];
        assert!(matches!(
            models(&huge).await,
            Err(ModelsError::TooLarge { .. })
        ));
    }
}
