//! SSE `GET /v1/sessions/{id}/events[?after=N]` (SPEC.md section 4): `id: seq`, `event: type`, `data: json`;
//! `Last-Event-ID` works like `after` (`after` wins); a comment every 15 s keeps proxies from closing it.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::json;

use super::ws::AfterQuery;
use crate::auth::StreamCaller;
use crate::error::ApiError;
use crate::AppState;

pub async fn events(
    State(st): State<AppState>,
    StreamCaller(p): StreamCaller,
    Path(id): Path<String>,
    q: AfterQuery,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    // One of the principal's stream slots, held by the response body (refused with 429 when none is free).
    let slot = st.app.open_stream(&p)?;
    let attached = st.app.attach(&p, &id, q.after.or(last_event_id)).await?;
    let expired = attached.cursor_expired.then(|| {
        let data = json!({"type": "error", "code": "cursor_expired", "message": "the cursor is older than the retained log; replaying as if none was given"});
        Ok(SseEvent::default().event("error").data(data.to_string()))
    });
    let live = stream::unfold(attached.subscription, |mut sub| async move {
        match sub.next().await {
            Ok(Some(ev)) => {
                let frame = SseEvent::default()
                    .id(ev.seq().to_string())
                    .event(ev.event.kind.type_name())
                    .data(ev.json.as_str());
                Some((Ok(frame), sub))
            }
            _ => None,
        }
    });
    let closing = st.closing.clone();
    let body = stream::iter(expired)
        .chain(live)
        .take_until(async move { closing.cancelled().await })
        .map(move |frame| {
            let _held = &slot; // dropped with the body: when the stream ends or the client goes
            frame
        });
    Ok(Sse::new(body).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    ))
}
