//! The native API (SPEC.md section 3): REST handlers here, the WebSocket in [`ws`], SSE in [`sse`].
//! Each handler extracts, calls one `Agentd` method, and renders JSON.

pub mod frame;
pub mod sse;
pub mod ws;

use agentd_core::config::Multitask;
use agentd_core::domain::{Message, Run, Session, SessionStatus};
use agentd_core::service::{Agentd, SendMessage};
use agentd_core::store::SessionFilter;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

type ApiResult<T> = Result<T, ApiError>;

/// Request bodies with images can be large; content itself is limited by `server.max_message_bytes`.
const MAX_JSON_BODY: usize = 64 * 1024 * 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/agents", get(agents))
        .route("/v1/cluster", get(cluster))
        .route("/v1/mcp", get(mcp))
        .route("/v1/sessions", post(create_session).get(list_sessions))
        .route(
            "/v1/sessions/{id}",
            get(get_session).delete(close_session).patch(rename_session),
        )
        .route(
            "/v1/sessions/{id}/messages",
            get(list_messages).post(send_message),
        )
        .route("/v1/sessions/{id}/runs", get(list_runs))
        .route("/v1/sessions/{id}/runs/{run_id}", get(get_run))
        .route("/v1/sessions/{id}/runs/{run_id}/cancel", post(cancel_run))
        .route("/v1/sessions/{id}/runs/{run_id}/input", post(input))
        .route(
            "/v1/sessions/{id}/runs/{run_id}/approvals/{request_id}",
            post(approval),
        )
        .route(
            "/v1/sessions/{id}/files",
            post(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/sessions/{id}/events", get(sse::events))
        .route("/v1/sessions/{id}/ws", get(ws::upgrade))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
}

#[derive(Serialize)]
struct AgentView<'a> {
    name: &'a str,
    description: &'a str,
    model: &'a str,
    /// Built-ins, then the MCP tools the agent's entries match now.
    tools: Vec<String>,
    skills: &'a [String],
    subagents: &'a [String],
}

async fn agents(State(st): State<AppState>, Caller(_): Caller) -> Json<Value> {
    let list: Vec<AgentView> = st
        .app
        .agents()
        .iter()
        .map(|a| AgentView {
            name: &a.name,
            description: &a.description,
            model: &a.model,
            tools: st.app.tools().agent_tools(a),
            skills: &a.skills,
            subagents: &a.subagents,
        })
        .collect();
    Json(json!(list))
}

/// The live nodes (SPEC.md section 6; admin).
async fn cluster(
    State(st): State<AppState>,
    Caller(p): Caller,
) -> ApiResult<Json<Vec<agentd_core::domain::NodeInfo>>> {
    Ok(Json(st.app.cluster(&p).await?))
}

/// Each MCP server's state, last error, tools and call counts (SPEC.md section 7; admin).
async fn mcp(
    State(st): State<AppState>,
    Caller(p): Caller,
) -> ApiResult<Json<Vec<agentd_core::registry::McpServerStatus>>> {
    Ok(Json(st.app.mcp_servers(&p)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSession {
    agent: String,
    metadata: Option<Value>,
    title: Option<String>,
}

async fn create_session(
    State(st): State<AppState>,
    Caller(p): Caller,
    body: Result<Json<CreateSession>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Session>)> {
    let Json(body) = body?;
    let s = st
        .app
        .create_session(&p, &body.agent, body.title, body.metadata)
        .await?;
    Ok((StatusCode::CREATED, Json(s)))
}

#[derive(Deserialize)]
struct ListSessions {
    limit: Option<usize>,
    before: Option<String>,
    /// A case-insensitive substring of the title.
    q: Option<String>,
    /// `active` or `closed`.
    status: Option<String>,
}

async fn list_sessions(
    State(st): State<AppState>,
    Caller(p): Caller,
    q: Result<Query<ListSessions>, QueryRejection>,
) -> ApiResult<Json<Vec<Session>>> {
    let Query(q) = q?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(SessionStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(format!("`status` must be active or closed, not `{s}`"))
        })?),
    };
    let filter = SessionFilter {
        query: q.q.filter(|t| !t.trim().is_empty()),
        status,
    };
    Ok(Json(
        st.app
            .search_sessions(&p, &filter, q.limit.unwrap_or(50), q.before.as_deref())
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameSession {
    title: String,
}

async fn rename_session(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
    body: Result<Json<RenameSession>, JsonRejection>,
) -> ApiResult<Json<Session>> {
    let Json(body) = body?;
    Ok(Json(st.app.rename_session(&p, &id, &body.title).await?))
}

async fn get_session(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Session>> {
    Ok(Json(st.app.session_shown(&p, &id).await?))
}

async fn close_session(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Session>> {
    Ok(Json(st.app.close_session(&p, &id).await?))
}

#[derive(Deserialize)]
struct Page {
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn list_messages(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
    q: Result<Query<Page>, QueryRejection>,
) -> ApiResult<Json<Vec<Message>>> {
    let Query(q) = q?;
    Ok(Json(
        st.app
            .messages(&p, &id, q.limit, q.offset.unwrap_or(0))
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    content: String,
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    files: Vec<String>,
    client_message_id: Option<String>,
    multitask: Option<String>,
    wait: Option<bool>,
}

#[derive(Serialize)]
struct SendReply {
    run: Run,
    message: Option<Message>,
}

/// Parses a `multitask` value, shared with the WebSocket.
pub fn parse_multitask(m: Option<&str>) -> Result<Option<Multitask>, String> {
    match m {
        None => Ok(None),
        Some(s) => Multitask::parse(s)
            .map(Some)
            .ok_or_else(|| format!("`multitask` must be reject, enqueue or interrupt, not `{s}`")),
    }
}

async fn send_message(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
    body: Result<Json<SendBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let multitask = parse_multitask(body.multitask.as_deref()).map_err(ApiError::invalid)?;
    let send = SendMessage {
        content: body.content,
        images: body.images,
        files: body.files,
        client_message_id: body.client_message_id,
        multitask,
        ..Default::default()
    };
    let accepted = st.app.send(&p, &id, send).await?;
    if body.wait.unwrap_or(true) {
        let (run, message) = Agentd::wait(accepted.done).await?;
        Ok((StatusCode::OK, Json(SendReply { run, message })).into_response())
    } else {
        Ok((
            StatusCode::ACCEPTED,
            Json(SendReply {
                run: accepted.run,
                message: accepted.message,
            }),
        )
            .into_response())
    }
}

async fn list_runs(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<Run>>> {
    Ok(Json(st.app.list_runs(&p, &id).await?))
}

async fn get_run(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path((id, run_id)): Path<(String, String)>,
) -> ApiResult<Json<Run>> {
    Ok(Json(st.app.run(&p, &id, &run_id).await?))
}

async fn cancel_run(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path((id, run_id)): Path<(String, String)>,
) -> ApiResult<Json<Run>> {
    st.app.cancel(&p, &id, Some(&run_id)).await?;
    Ok(Json(st.app.run(&p, &id, &run_id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputBody {
    request_id: String,
    content: String,
}

async fn input(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path((id, run_id)): Path<(String, String)>,
    body: Result<Json<InputBody>, JsonRejection>,
) -> ApiResult<Json<Run>> {
    let Json(body) = body?;
    st.app.run(&p, &id, &run_id).await?;
    st.app
        .reply(&p, &id, &body.request_id, body.content)
        .await?;
    Ok(Json(st.app.run(&p, &id, &run_id).await?))
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum DecisionWord {
    Allow,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalBody {
    decision: DecisionWord,
    reason: Option<String>,
}

/// Decides a pending approval (SPEC.md section 7): 200 with the run; a second answer 409.
async fn approval(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path((id, run_id, request_id)): Path<(String, String, String)>,
    body: Result<Json<ApprovalBody>, JsonRejection>,
) -> ApiResult<Json<Run>> {
    let Json(body) = body?;
    let decision = agentd_core::tools::Decision {
        allow: matches!(body.decision, DecisionWord::Allow),
        reason: body.reason,
    };
    st.app
        .decide(&p, &id, Some(&run_id), &request_id, decision)
        .await?;
    Ok(Json(st.app.run(&p, &id, &run_id).await?))
}

async fn upload(
    State(st): State<AppState>,
    Caller(p): Caller,
    Path(id): Path<String>,
    mut form: Multipart,
) -> ApiResult<(StatusCode, Json<Value>)> {
    // Ownership first, so a stranger learns nothing and uploads nothing; a closed session takes no upload.
    st.app.open_session(&p, &id).await?;
    let limit = st.app.config.server.max_upload_bytes;
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| ApiError::invalid(format!("bad multipart body: {e}")))?;
        let Some(mut field) = field else {
            return Err(ApiError::invalid("multipart body has no `file` field"));
        };
        if field.name() != Some("file") {
            continue;
        }
        let name = field.file_name().unwrap_or("upload").to_string();
        let content_type = field.content_type().unwrap_or("").to_string();
        let mut bytes: Vec<u8> = Vec::new();
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| ApiError::invalid(format!("bad multipart body: {e}")))?
        {
            if bytes.len() + chunk.len() > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the file is larger than the limit of {limit} bytes"),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        let up = st.app.upload(&p, &id, &name, &content_type, &bytes).await?;
        return Ok((StatusCode::CREATED, Json(json!(up))));
    }
}
