//! The HTTP transport of model calls: reqwest, with the response body read to a bound.
//! async-openai reads a whole body before parsing it, so an endpoint that answers with
//! gigabytes would take the operator, which serves every tenant, down with it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;

/// The most of one completion's response that is read: far above any answer a call's
/// `max_tokens` allows (32,768 tokens of JSON-escaped text), far below what would
/// hurt the operator.
pub const MAX_RESPONSE_BYTES: usize = 8 << 20;

/// A response that ran past `MAX_RESPONSE_BYTES`.
#[derive(Debug, thiserror::Error)]
#[error("the endpoint sent more than {limit} bytes in one response")]
pub struct TooLarge {
    pub limit: usize,
}

/// Sends a call with `http` and reads its answer, up to `limit` bytes, before handing it
/// to the client.
#[derive(Clone)]
pub struct Bounded {
    pub http: reqwest::Client,
    pub limit: usize,
}

type Answer = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

impl tower::Service<HttpRequestFactory> for Bounded {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), OpenAIError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Answer {
        let (http, limit) = (self.http.clone(), self.limit);
        Box::pin(async move {
            let request = factory.build().await?;
            let mut response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
            // A declared length over the bound is refused before anything is read.
            if response.content_length().is_some_and(|n| n > limit as u64) {
                return Err(OpenAIError::Boxed(Box::new(TooLarge { limit })));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(OpenAIError::Reqwest)? {
                if body.len() + chunk.len() > limit {
                    return Err(OpenAIError::Boxed(Box::new(TooLarge { limit })));
                }
                body.extend_from_slice(&chunk);
            }
            let mut read = http::Response::new(body);
            *read.status_mut() = response.status();
            *read.version_mut() = response.version();
            *read.headers_mut() = std::mem::take(response.headers_mut());
            Ok(reqwest::Response::from(read))
        })
    }
}

/// Whether a call failed on a response over the bound.
pub fn too_large(err: &OpenAIError) -> bool {
    matches!(err, OpenAIError::Boxed(e) if e.is::<TooLarge>())
}
