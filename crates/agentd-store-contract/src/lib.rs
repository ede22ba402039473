//! The `Store` contract as one suite of scenarios, run against every implementation.
//!
//! A store crate proves itself with one line in a test file:
//!
//! ```ignore
//! agentd_store_contract::store_contract!(my_harness());
//! ```
//!
//! where `my_harness()` is an async expression giving `Option<impl Harness>` (`None` skips, e.g. when a
//! database server is not there and not required). The macro expands to one `#[tokio::test]` per scenario, so
//! each shows up (and fails) by name. A scenario gets a fresh harness: an empty store of its own.
//!
//! [`pg`] makes a PostgreSQL database per test (created on the server in `AGENTD_TEST_PG`, dropped after).
//!
//! The scenarios are about what the trait promises (see `agentd_core::store`), never about how a store keeps
//! it: numbering from 1 without gaps under concurrent appends, a failed batch using up no seq, upserts by
//! message and run id, pagination, pruning by runs, and everything surviving a reopen.

// Scenarios may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use agentd_core::domain::{
    new_id, now_rfc3339, Message, Role, Run, Session, SessionStatus, Upload,
};
use agentd_core::event::{EventKind, LoggedEvent, NewEvent};
use agentd_core::store::{LogEntry, Store};
use async_trait::async_trait;
use serde_json::json;

pub mod pg;
pub mod proxy;
pub mod scenarios;

/// Where a scenario's store lives.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// Opens the store: empty the first time; after every handle to the previous one is dropped, the same data
    /// again (a restart). A store that is not durable (memory) may hand out the same store each time.
    async fn open(&self) -> Arc<dyn Store>;
}

/// One `#[tokio::test]` per scenario of [`scenarios`], each on a fresh harness from `$harness` (an async
/// expression giving `Option<H: Harness>`; `None` skips the test). The calling crate needs `tokio` with its
/// `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! store_contract {
    ($harness:expr) => {
        $crate::__store_contract_tests!(
            $harness;
            sessions_crud_and_pagination,
            sessions_are_searched_by_title_and_status_and_paged,
            messages_are_upserted_by_message_events_and_listed_in_order,
            a_turns_history_page_places_each_message_in_its_run,
            runs_crud_and_client_message_id_conflict,
            unfinished_runs_are_queued_running_or_waiting,
            concurrent_appends_number_each_session_without_gaps,
            appends_sharing_sessions_in_any_order_all_commit,
            the_event_log_group_commits_many_queued_events_in_few_batches,
            reopening_keeps_everything_and_seq_continues,
            pruning_keeps_the_latest_runs_and_seq_continues,
            a_runs_first_seq_is_its_first_event_whatever_shares_its_batch,
            a_failing_batch_fails_alone_and_consumes_no_seq,
            many_concurrent_reads_all_get_their_answer,
            uploads_are_kept_with_their_bytes,
            an_imported_session_reads_the_same_and_its_seq_continues,
            an_imported_session_whose_log_was_pruned_away_numbers_on,
            aliases_name_a_session_and_survive_reopening,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __store_contract_tests {
    ($harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                match $harness.await {
                    Some(harness) => $crate::scenarios::$name(&harness).await,
                    None => eprintln!("skipped: {} (its store is not available here)", stringify!($name)),
                }
            }
        )*
    };
}

// --- building blocks the scenarios share ---

pub fn session(principal: &str) -> Session {
    let now = now_rfc3339();
    Session {
        id: new_id(),
        agent: "assistant".into(),
        title: None,
        status: SessionStatus::Active,
        metadata: json!({"k": 1}),
        created_at: now.clone(),
        updated_at: now,
        active_run_id: None,
        principal: principal.into(),
    }
}

pub async fn new_session(store: &dyn Store, principal: &str) -> Session {
    let s = session(principal);
    store.create_session(&s).await.unwrap();
    s
}

pub fn entry(session_id: &str, run_id: &str, kind: EventKind) -> LogEntry {
    LogEntry {
        event: NewEvent {
            session_id: session_id.into(),
            run_id: run_id.into(),
            agent: "assistant".into(),
            is_subagent: false,
            kind,
        },
        run: None,
    }
}

pub fn delta(session_id: &str, run_id: &str, text: &str) -> LogEntry {
    entry(
        session_id,
        run_id,
        EventKind::TextDelta { delta: text.into() },
    )
}

pub fn message(session_id: &str, run_id: &str, role: Role, content: &str) -> Message {
    Message {
        id: new_id(),
        session_id: session_id.into(),
        run_id: Some(run_id.into()),
        role,
        content: content.into(),
        tool_calls: None,
        tool_call_id: None,
        agent: Some("assistant".into()),
        images: Vec::new(),
        created_at: now_rfc3339(),
    }
}

pub fn message_entry(m: &Message) -> LogEntry {
    entry(
        &m.session_id,
        m.run_id.as_deref().unwrap_or(""),
        EventKind::Message { message: m.clone() },
    )
}

/// A `run_started` entry carrying the run's new state.
pub fn run_started(run: &Run) -> LogEntry {
    LogEntry {
        run: Some(run.clone()),
        ..entry(
            &run.session_id,
            &run.id,
            EventKind::RunStarted { run: run.clone() },
        )
    }
}

pub fn run_finished(run: &Run) -> LogEntry {
    let kind = EventKind::RunFinished {
        run: run.clone(),
        content: "done".into(),
        context_tokens: 10,
        max_context_tokens: 100,
    };
    LogEntry {
        run: Some(run.clone()),
        ..entry(&run.session_id, &run.id, kind)
    }
}

/// An upload record named `name` (its path too) of `size` bytes, with a fresh id.
pub fn upload(name: &str, size: usize) -> Upload {
    Upload {
        id: new_id(),
        name: name.into(),
        path: name.into(),
        size: size as u64,
        content_type: "application/octet-stream".into(),
    }
}

pub fn seqs(events: &[Arc<LoggedEvent>]) -> Vec<u64> {
    events.iter().map(|e| e.seq()).collect()
}

/// The text of a `text_delta` event (panics on any other kind).
pub fn text_of(e: &LoggedEvent) -> String {
    match &e.event.kind {
        EventKind::TextDelta { delta } => delta.clone(),
        other => panic!("expected a text_delta, got {other:?}"),
    }
}

/// Appends a whole run (started, two deltas, finished: four events) and returns the run as finished.
pub async fn append_run(store: &dyn Store, session_id: &str) -> Run {
    use agentd_core::domain::RunStatus;
    let mut run = Run::queued(session_id);
    store.create_run(&run, None).await.unwrap();
    run.status = RunStatus::Running;
    run.started_at = Some(now_rfc3339());
    store.append_events(vec![run_started(&run)]).await.unwrap();
    store
        .append_events(vec![
            delta(session_id, &run.id, "a"),
            delta(session_id, &run.id, "b"),
        ])
        .await
        .unwrap();
    run.status = RunStatus::Completed;
    run.ended_at = Some(now_rfc3339());
    store.append_events(vec![run_finished(&run)]).await.unwrap();
    run
}
