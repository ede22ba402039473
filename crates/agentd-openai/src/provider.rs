//! [`OpenAiProvider`]: settings, the HTTP call, and the mapping of HTTP failures to [`ProviderError`].
//!
//! One client per provider, so connections to the upstream are pooled across runs: [`PlainHttp`] for a plain
//! `http://` upstream (it reads the socket itself, so deltas that arrive together are handled together; see
//! `http1.rs`), `reqwest` for the rest (`https://`, a proxy, credentials in the URL). The timeout applies to the
//! wait for response headers and to each gap between body chunks, never to the whole answer (a long answer
//! that keeps streaming is healthy).

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use agentd_core::provider::{ModelRequest, ModelStream, Provider, ProviderError};
use async_trait::async_trait;
use futures_util::StreamExt;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Response, Url};

use crate::http1::PlainHttp;
use crate::stream::ChunkStream;
use crate::wire::ChatRequest;

/// How much of an error body is kept in [`ProviderError::Status`].
const ERROR_BODY_CHARS: usize = 500;
/// How much of an error body is read at most (the rest is dropped with the connection).
const ERROR_BODY_READ_BYTES: usize = 16 * 1024;

/// Settings of one `openai` provider (SPEC.md section 2, `[providers.NAME]` with `kind = "openai"`).
#[derive(Clone)]
pub struct OpenAiSettings {
    /// E.g. `http://127.0.0.1:9000/v1`; requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer ...` when set. Never logged.
    pub api_key: Option<String>,
    /// Longest wait, in seconds, for response headers and for each next chunk. At least 1.
    pub timeout_s: u64,
    /// The model's context window, when configured.
    pub context_tokens: Option<u64>,
}

impl fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout_s", &self.timeout_s)
            .field("context_tokens", &self.context_tokens)
            .finish()
    }
}

/// A [`Provider`] for any OpenAI-compatible `/chat/completions` upstream.
pub struct OpenAiProvider {
    client: reqwest::Client,
    /// The client for a plain `http://` upstream; `None`: everything goes through `client`.
    plain: Option<Arc<PlainHttp>>,
    url: Url,
    /// `Bearer <key>`, marked sensitive so reqwest and hyper never print it.
    authorization: Option<HeaderValue>,
    timeout: Duration,
    timeout_s: u64,
    context_tokens: Option<u64>,
}

impl fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("url", &self.url.as_str())
            .field("plain_http", &self.plain.is_some())
            .field(
                "api_key",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout_s", &self.timeout_s)
            .field("context_tokens", &self.context_tokens)
            .finish()
    }
}

impl OpenAiProvider {
    /// Validates the settings and builds the HTTP client. Errors are messages for the configuration's user.
    pub fn new(settings: OpenAiSettings) -> Result<Self, String> {
        let base = settings.base_url.trim_end_matches('/');
        let url = Url::parse(&format!("{base}/chat/completions"))
            .map_err(|e| format!("base_url {:?} is not a valid URL: {e}", settings.base_url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "base_url {:?} must be an http:// or https:// URL",
                settings.base_url
            ));
        }
        if settings.timeout_s == 0 {
            return Err("timeout_s must be at least 1".into());
        }
        let authorization = match &settings.api_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                    // Deliberately not echoing the key.
                    .map_err(|_| {
                        "api_key contains characters that cannot be sent in an HTTP header"
                            .to_owned()
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let timeout = Duration::from_secs(settings.timeout_s);
        let plain = PlainHttp::for_url(&url, authorization.as_ref().and_then(|v| v.to_str().ok()))
            .map(Arc::new);
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            // Tokens are small writes; Nagle would hold them back.
            .tcp_nodelay(true)
            .user_agent(concat!("agentd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(OpenAiProvider {
            client,
            plain,
            url,
            authorization,
            timeout,
            timeout_s: settings.timeout_s,
            context_tokens: settings.context_tokens,
        })
    }

    /// Where requests go: `{base_url}/chat/completions`.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// Sends the request and waits (at most the timeout) for the response headers.
    async fn send(&self, request: &ModelRequest) -> Result<Response, ProviderError> {
        let body = Self::request_body(request)?;
        let mut builder = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(body);
        if let Some(authorization) = &self.authorization {
            builder = builder.header(AUTHORIZATION, authorization.clone());
        }
        match tokio::time::timeout(self.timeout, builder.send()).await {
            Err(_) => Err(ProviderError::Timeout(self.timeout_s)),
            Ok(Err(e)) if e.is_timeout() => Err(ProviderError::Timeout(self.timeout_s)),
            Ok(Err(e)) => Err(ProviderError::Connect(describe(&e))),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// The error for a non-2xx answer, with the start of its body.
    async fn status_error(&self, mut response: Response) -> ProviderError {
        let status = response.status().as_u16();
        let mut raw = Vec::new();
        let read = async {
            while raw.len() < ERROR_BODY_READ_BYTES {
                match response.chunk().await {
                    Ok(Some(chunk)) => raw.extend_from_slice(&chunk),
                    Ok(None) | Err(_) => break,
                }
            }
        };
        // The body is only decoration: if it does not come in time, report the status without it.
        let _ = tokio::time::timeout(self.timeout, read).await;
        status_error(status, &raw)
    }

    fn request_body(request: &ModelRequest) -> Result<Vec<u8>, ProviderError> {
        serde_json::to_vec(&ChatRequest::new(request))
            .map_err(|e| ProviderError::Other(format!("cannot serialise the request: {e}")))
    }

    /// The call through [`PlainHttp`].
    async fn stream_plain(
        &self,
        plain: &Arc<PlainHttp>,
        request: &ModelRequest,
    ) -> Result<ModelStream, ProviderError> {
        let body = Self::request_body(request)?;
        let response = match tokio::time::timeout(self.timeout, plain.post(&body)).await {
            Err(_) => return Err(ProviderError::Timeout(self.timeout_s)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(ProviderError::Timeout(self.timeout_s))
            }
            Ok(Err(e)) => return Err(ProviderError::Connect(describe(&e))),
            Ok(Ok(response)) => response,
        };
        if !(200..300).contains(&response.status) {
            let status = response.status;
            let read = response.read_prefix(ERROR_BODY_READ_BYTES);
            // As above: the body is only decoration.
            let raw = tokio::time::timeout(self.timeout, read)
                .await
                .unwrap_or_default();
            return Err(status_error(status, &raw));
        }
        if is_json(response.content_type.as_deref().unwrap_or("")) {
            return Err(not_a_stream());
        }
        let body = response.into_body().map(|chunk| {
            chunk.map_err(|e| ProviderError::Connect(format!("the stream broke: {}", describe(&e))))
        });
        Ok(Box::pin(ChunkStream::new(body, self.timeout_s)))
    }
}

/// The error for a non-2xx answer whose body starts with `raw`.
fn status_error(status: u16, raw: &[u8]) -> ProviderError {
    let text = String::from_utf8_lossy(raw);
    let body = truncate_chars(text.trim(), ERROR_BODY_CHARS);
    if is_context_overflow(status, &text) {
        return ProviderError::ContextOverflow(format!("upstream returned HTTP {status}: {body}"));
    }
    ProviderError::Status { status, body }
}

fn is_json(content_type: &str) -> bool {
    content_type.starts_with("application/json")
}

/// The upstream ignored `stream: true`; say so rather than report a stream with no events.
fn not_a_stream() -> ProviderError {
    ProviderError::Malformed(
        "the upstream answered with a JSON document, not an event stream (does it support stream: true?)"
            .into(),
    )
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        tracing::debug!(url = %self.url, model = %request.model, messages = request.messages.len(), "openai call");
        if let Some(plain) = &self.plain {
            return self.stream_plain(plain, &request).await;
        }
        let response = self.send(&request).await?;
        if !response.status().is_success() {
            return Err(self.status_error(response).await);
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if is_json(content_type) {
            return Err(not_a_stream());
        }
        let body = response.bytes_stream().map(|chunk| {
            chunk.map_err(|e| ProviderError::Connect(format!("the stream broke: {}", describe(&e))))
        });
        Ok(Box::pin(ChunkStream::new(Box::pin(body), self.timeout_s)))
    }

    fn context_tokens(&self) -> Option<u64> {
        self.context_tokens
    }
}

/// An error and its causes, `outer: inner: root`, without repeats (reqwest's own message is terse; the cause,
/// e.g. "Connection refused", is what an operator needs).
fn describe(error: &(dyn StdError + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Whether an error answer says the prompt is too long. Upstreams word it differently: OpenAI's code
/// `context_length_exceeded`, vLLM's "maximum context length", llama.cpp's `exceed_context_size_error`.
fn is_context_overflow(status: u16, body: &str) -> bool {
    if !matches!(status, 400 | 413) {
        return false;
    }
    let body = body.to_ascii_lowercase();
    [
        "context_length_exceeded",
        "maximum context length",
        "exceed_context_size",
        "exceeds the available context",
    ]
    .iter()
    .any(|marker| body.contains(marker))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(base_url: &str) -> OpenAiSettings {
        OpenAiSettings {
            base_url: base_url.into(),
            api_key: None,
            timeout_s: 5,
            context_tokens: Some(4096),
        }
    }

    #[test]
    fn settings_are_validated() {
        let p = OpenAiProvider::new(settings("http://127.0.0.1:9000/v1/"))
            .expect("test input is valid");
        assert_eq!(p.url(), "http://127.0.0.1:9000/v1/chat/completions");
        assert_eq!(p.context_tokens(), Some(4096));
        assert!(OpenAiProvider::new(settings("not a url")).is_err());
        assert!(OpenAiProvider::new(settings("ftp://host/v1")).is_err());
        assert!(OpenAiProvider::new(OpenAiSettings {
            timeout_s: 0,
            ..settings("http://h/v1")
        })
        .is_err());
        let bad_key = OpenAiSettings {
            api_key: Some("sk-\nsecret".into()),
            ..settings("http://h/v1")
        };
        let error = OpenAiProvider::new(bad_key).expect_err("should fail");
        assert!(!error.contains("secret"));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let s = OpenAiSettings {
            api_key: Some("sk-very-secret".into()),
            ..settings("http://h/v1")
        };
        assert!(!format!("{s:?}").contains("sk-very-secret"));
        let p = OpenAiProvider::new(s).expect("test input is valid");
        assert!(!format!("{p:?}").contains("sk-very-secret"));
    }

    #[test]
    fn context_overflow_is_recognised() {
        let openai = r#"{"error":{"message":"This model's maximum context length is 8192 tokens.","code":"context_length_exceeded"}}"#;
        assert!(is_context_overflow(400, openai));
        assert!(!is_context_overflow(500, openai));
        assert!(!is_context_overflow(
            400,
            r#"{"error":{"message":"bad tool schema"}}"#
        ));
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_chars("ééé", 2), "éé…");
        assert_eq!(truncate_chars("ab", 2), "ab");
    }
}
