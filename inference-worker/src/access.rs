//! One log line per chat completion, written when it ends (answered, or abandoned by its
//! client): who asked and when, so that calls can be told apart by caller and lined up in
//! time. kubeswarm's operator names itself in the `kubeswarm-caller` header (its Lease
//! identity), which is how a failover is shown never to have two replicas calling at once.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use tracing::info;

/// The header a caller names itself in.
pub const CALLER: &str = "kubeswarm-caller";
/// The longest caller name logged; anything longer, or with other characters than a
/// Kubernetes name has, is logged as `unknown`, so the header cannot forge log lines.
const MAX_CALLER: usize = 63;

/// A request being served; logs it when dropped.
pub struct Served {
    caller: String,
    started: SystemTime,
    status: Option<u16>,
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Served {
    pub fn start(headers: &HeaderMap) -> Self {
        let caller = headers
            .get(CALLER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= MAX_CALLER
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            })
            .unwrap_or("unknown")
            .to_owned();
        Self {
            caller,
            started: SystemTime::now(),
            status: None,
        }
    }

    /// The request was answered with `status` (a stream: its headers were sent).
    pub fn answered(&mut self, status: u16) {
        self.status = Some(status);
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let outcome = self
            .status
            .map_or_else(|| "abandoned".to_owned(), |s| s.to_string());
        info!(
            caller = %self.caller,
            started_ms = millis(self.started),
            ended_ms = millis(SystemTime::now()),
            %outcome,
            "chat completion"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(value: &[u8]) -> String {
        let mut headers = HeaderMap::new();
        headers.insert(CALLER, axum::http::HeaderValue::from_bytes(value).unwrap());
        Served::start(&headers).caller.clone()
    }

    #[test]
    fn a_caller_is_logged_only_as_a_kubernetes_like_name() {
        assert_eq!(caller(b"kubeswarm-7d9f-x2"), "kubeswarm-7d9f-x2");
        assert_eq!(caller(b"a b\tc"), "unknown");
        assert_eq!(caller(b"x\" ended_ms=0"), "unknown");
        assert_eq!(caller(&[b'a'; 64]), "unknown");
        assert_eq!(Served::start(&HeaderMap::new()).caller, "unknown");
    }
}
