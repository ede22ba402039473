//! The OpenAI-compatible surfaces (SPEC.md section 8): `GET /v1/models`, `POST /v1/chat/completions` ([`chat`])
//! and the Responses API ([`responses`]), with OpenAI's error shape. An agent is a model. Like every surface
//! this one only extracts, calls `Agentd`, and renders the session's events ([`render`]); sessions, runs, the
//! log and auth are the core's. Where OpenAI's API and agentd differ, README.md ("OpenAI-compatible") says how.

pub mod chat;
pub mod render;
pub mod responses;

use agentd_core::config::AgentSettings;
use agentd_core::service::{Principal, ServiceError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
}

/// A request carries the conversation (and its images), so bodies may be large, as on the native API.
const MAX_JSON_BODY: usize = 64 * 1024 * 1024;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`. The official SDKs pick their
/// exception by the status (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 409
/// ConflictError, 413/422 ..., 429 RateLimitError, 5xx InternalServerError).
#[derive(Debug)]
pub struct OaiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub message: String,
    pub param: Option<&'static str>,
    pub retry_after: Option<u64>,
}

impl OaiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> OaiError {
        OaiError {
            status,
            kind,
            code: None,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
    pub fn invalid(message: impl Into<String>) -> OaiError {
        OaiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    pub fn param(mut self, param: &'static str) -> OaiError {
        self.param = Some(param);
        self
    }
    pub fn code(mut self, code: &'static str) -> OaiError {
        self.code = Some(code);
        self
    }
    pub fn not_found(message: impl Into<String>) -> OaiError {
        OaiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code("not_found")
    }
    /// The body of the error (also what a stream's `error` event carries).
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<ServiceError> for OaiError {
    fn from(e: ServiceError) -> OaiError {
        let (status, code) = crate::error::classify(&e);
        let kind = match status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::INTERNAL_SERVER_ERROR => "server_error",
            _ => "invalid_request_error",
        };
        OaiError {
            status,
            kind,
            code: Some(code),
            retry_after: crate::error::retry_after(&e),
            message: crate::error::public_message(&e),
            param: None,
        }
    }
}

impl From<JsonRejection> for OaiError {
    fn from(r: JsonRejection) -> OaiError {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return OaiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request body too large",
            );
        }
        OaiError::invalid(r.body_text())
    }
}

impl IntoResponse for OaiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        resp
    }
}

pub type OaiResult<T> = Result<T, OaiError>;

/// The authenticated caller (`Authorization: Bearer KEY`), refused in OpenAI's shape.
pub struct OaiCaller(pub Principal);

impl FromRequestParts<AppState> for OaiCaller {
    type Rejection = OaiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, OaiError> {
        state
            .auth
            .check(crate::auth::bearer(parts))
            .map(OaiCaller)
            .ok_or_else(|| {
                OaiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "missing or invalid API key",
                )
                .code("invalid_api_key")
            })
    }
}

/// The agent a request's `model` names (404 `model_not_found` otherwise, as OpenAI answers).
pub fn agent_of<'a>(st: &'a AppState, model: &str) -> OaiResult<&'a AgentSettings> {
    st.app.config.agent(model).ok_or_else(|| {
        OaiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist: it names no agent"),
        )
        .param("model")
        .code("model_not_found")
    })
}

/// Seconds since the Unix epoch of an RFC 3339 time (OpenAI's `created`); 0 when it does not parse.
pub fn unix_seconds(rfc3339: &str) -> i64 {
    rfc3339
        .parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .unwrap_or(0)
}

/// Seconds since the Unix epoch, now.
pub fn now_seconds() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// The process's start, the `created` of every model (agents have no creation time of their own).
fn started_seconds() -> i64 {
    static STARTED: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *STARTED.get_or_init(now_seconds)
}

fn model_object(a: &AgentSettings) -> Value {
    json!({"id": a.name, "object": "model", "created": started_seconds(), "owned_by": "agentd"})
}

async fn models(State(st): State<AppState>, OaiCaller(_): OaiCaller) -> Json<Value> {
    let data: Vec<Value> = st.app.agents().iter().map(model_object).collect();
    Json(json!({"object": "list", "data": data}))
}

async fn model(
    State(st): State<AppState>,
    OaiCaller(_): OaiCaller,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> OaiResult<Json<Value>> {
    Ok(Json(model_object(agent_of(&st, &id)?)))
}
