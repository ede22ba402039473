//! The REST half of `agentd chat`: agents, sessions and history over the native API, and the WebSocket URL.
//! Every failure becomes one readable line (a refused key says so, an unreachable server names the URL).

use std::time::Duration;

use serde_json::{json, Value};

/// A native-API client for one server and key.
pub struct Api {
    /// `http(s)://host:port`, without a trailing slash.
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

/// What the user sees when the server answers 401.
pub fn unauthorized_message(has_key: bool) -> String {
    if has_key {
        "the server refused the API key (401 Unauthorized); check --api-key or AGENTD_API_KEY"
            .into()
    } else {
        "the server needs an API key (401 Unauthorized); pass --api-key or set AGENTD_API_KEY"
            .into()
    }
}

impl Api {
    /// Accepts `http://host:port`, `https://...`, or a bare `host:port` (taken as http).
    pub fn new(url: &str, key: Option<String>) -> Result<Api, String> {
        let url = url.trim().trim_end_matches('/');
        let base = if url.starts_with("http://") || url.starts_with("https://") {
            url.to_string()
        } else if url.contains("://") {
            return Err(format!(
                "--url `{url}` must be an http:// or https:// address"
            ));
        } else {
            format!("http://{url}")
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("cannot set up HTTP: {e}"))?;
        Ok(Api {
            base,
            key: key.filter(|k| !k.is_empty()),
            http,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        self.call_status(method, path, body)
            .await
            .map_err(|(_, e)| e)
    }

    /// Like `call`, keeping the HTTP status of a failure (None when the server was not reached).
    async fn call_status(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, (Option<u16>, String)> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            (
                None,
                format!("cannot reach {}: {}", self.base, root_cause(&e)),
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            (
                Some(status.as_u16()),
                format!("{method} {path}: reading the answer failed: {e}"),
            )
        })?;
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err((Some(401), unauthorized_message(self.key.is_some())));
        }
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| value.to_string());
            return Err((
                Some(status.as_u16()),
                format!("{method} {path}: {status}: {message}"),
            ));
        }
        Ok(value)
    }

    /// The configured agents' names, in the server's order.
    pub async fn agents(&self) -> Result<Vec<String>, String> {
        let agents = self.list("/v1/agents").await?;
        Ok(agents
            .iter()
            .filter_map(|x| x["name"].as_str().map(String::from))
            .collect())
    }

    /// Creates a session with `agent`; its id. No title: the server names a session after its first message.
    pub async fn create_session(&self, agent: &str) -> Result<String, String> {
        let s = self
            .call(
                reqwest::Method::POST,
                "/v1/sessions",
                Some(json!({"agent": agent, "metadata": {"client": "agentd chat"}})),
            )
            .await?;
        s["id"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| "the server's session has no id".to_string())
    }

    /// The caller's latest sessions, newest first.
    pub async fn sessions(&self, limit: usize) -> Result<Vec<Value>, String> {
        self.list(&format!("/v1/sessions?limit={limit}")).await
    }

    pub async fn session(&self, id: &str) -> Result<Value, String> {
        self.call_status(
            reqwest::Method::GET,
            &format!("/v1/sessions/{}", path_segment(id)),
            None,
        )
        .await
        .map_err(|(status, e)| match status {
            Some(404) => format!("session `{id}` not found on {}", self.base),
            _ => e,
        })
    }

    pub async fn messages(&self, id: &str) -> Result<Vec<Value>, String> {
        self.list(&format!("/v1/sessions/{}/messages", path_segment(id)))
            .await
    }

    pub async fn runs(&self, id: &str) -> Result<Vec<Value>, String> {
        self.list(&format!("/v1/sessions/{}/runs", path_segment(id)))
            .await
    }

    /// A GET answering a JSON array.
    async fn list(&self, path: &str) -> Result<Vec<Value>, String> {
        let v = self.call(reqwest::Method::GET, path, None).await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Cancels a run over REST (used when the socket is down at the moment of Ctrl-C).
    pub async fn cancel(&self, session: &str, run: &str) -> Result<(), String> {
        self.call(
            reqwest::Method::POST,
            &format!(
                "/v1/sessions/{}/runs/{}/cancel",
                path_segment(session),
                path_segment(run)
            ),
            None,
        )
        .await
        .map(|_| ())
    }

    /// The session's native WebSocket URL, resuming after `after` when given.
    pub fn ws_url(&self, session: &str, after: Option<u64>) -> String {
        let base = if let Some(rest) = self.base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            self.base.replacen("http://", "ws://", 1)
        };
        let mut query = Vec::new();
        if let Some(n) = after {
            query.push(format!("after={n}"));
        }
        if let Some(k) = &self.key {
            query.push(format!("api_key={}", percent_encode(k)));
        }
        let mut url = format!("{base}/v1/sessions/{}/ws", path_segment(session));
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query.join("&"));
        }
        url
    }

    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }
}

/// The innermost error's text: reqwest's top level only says "error sending request".
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn path_segment(s: &str) -> String {
    percent_encode(s)
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

    use super::*;

    #[test]
    fn urls_are_normalised_and_keys_encoded() {
        let api = Api::new("127.0.0.1:8080/", Some("k y&1".into())).unwrap();
        assert_eq!(api.base(), "http://127.0.0.1:8080");
        assert_eq!(
            api.ws_url("abc", Some(7)),
            "ws://127.0.0.1:8080/v1/sessions/abc/ws?after=7&api_key=k%20y%261"
        );
        let api = Api::new("https://example.test", None).unwrap();
        assert_eq!(api.ws_url("s", None), "wss://example.test/v1/sessions/s/ws");
        assert!(Api::new("ftp://x", None).is_err());
    }
}
