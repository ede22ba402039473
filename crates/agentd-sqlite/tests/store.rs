//! The SQLite store against real database files in temporary directories: sessions, messages, runs, the event
//! log (numbering under concurrent appends, group commit, pruning), durability across reopen, and errors.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use agentd_core::domain::{
    new_id, now_rfc3339, Message, Role, Run, RunError, RunErrorCode, RunStatus, Session,
    SessionStatus, ToolCall, Usage,
};
use agentd_core::event::{EventKind, LoggedEvent, NewEvent};
use agentd_core::store::{LogBounds, LogEntry, Store, StoreError};
use agentd_sqlite::SqliteStore;
use serde_json::json;

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(&dir.join("nested/dir/agentd.db")).unwrap()
}

fn session(principal: &str) -> Session {
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

async fn new_session(store: &SqliteStore, principal: &str) -> Session {
    let s = session(principal);
    store.create_session(&s).await.unwrap();
    s
}

fn entry(session_id: &str, run_id: &str, kind: EventKind) -> LogEntry {
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

fn delta(session_id: &str, run_id: &str, text: &str) -> LogEntry {
    entry(
        session_id,
        run_id,
        EventKind::TextDelta { delta: text.into() },
    )
}

fn message(session_id: &str, run_id: &str, role: Role, content: &str) -> Message {
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

fn message_entry(m: &Message) -> LogEntry {
    entry(
        &m.session_id,
        m.run_id.as_deref().unwrap_or(""),
        EventKind::Message { message: m.clone() },
    )
}

/// A `run_started` entry carrying the run's new state.
fn run_started(run: &Run) -> LogEntry {
    LogEntry {
        run: Some(run.clone()),
        ..entry(
            &run.session_id,
            &run.id,
            EventKind::RunStarted { run: run.clone() },
        )
    }
}

fn run_finished(run: &Run) -> LogEntry {
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

fn seqs(events: &[Arc<LoggedEvent>]) -> Vec<u64> {
    events.iter().map(|e| e.seq()).collect()
}

/// Appends a whole run (started, two deltas, finished) and returns the run as finished.
async fn append_run(store: &SqliteStore, session_id: &str) -> Run {
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

#[tokio::test]
async fn sessions_crud_and_pagination() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());

    // Interleave two principals: a0 b0 a1 a2 b1 a3 a4 (oldest to newest).
    let mut alice = Vec::new();
    let mut bob = Vec::new();
    let mut all = Vec::new();
    for who in ["alice", "bob", "alice", "alice", "bob", "alice", "alice"] {
        let s = new_session(&store, who).await;
        all.push(s.id.clone());
        if who == "alice" {
            alice.push(s.id.clone())
        } else {
            bob.push(s.id.clone())
        }
    }

    let got = store.get_session(&alice[0]).await.unwrap().unwrap();
    assert_eq!(got.principal, "alice", "the store keeps the principal");
    assert_eq!(got.active_run_id, None);
    assert_eq!(got.metadata, json!({"k": 1}));
    assert!(store.get_session("nope").await.unwrap().is_none());

    let dup = store.create_session(&got).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");

    let ids = |v: Vec<Session>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    let newest_first: Vec<String> = all.iter().rev().cloned().collect();
    assert_eq!(
        ids(store.list_sessions(None, 100, None).await.unwrap()),
        newest_first
    );
    let alice_newest: Vec<String> = alice.iter().rev().cloned().collect();
    assert_eq!(
        ids(store.list_sessions(Some("alice"), 100, None).await.unwrap()),
        alice_newest
    );

    // Page through alice's sessions two at a time with `before`.
    let page1 = ids(store.list_sessions(Some("alice"), 2, None).await.unwrap());
    assert_eq!(page1, alice_newest[..2]);
    let page2 = ids(store
        .list_sessions(Some("alice"), 2, Some(&page1[1]))
        .await
        .unwrap());
    assert_eq!(page2, alice_newest[2..4]);
    let page3 = ids(store
        .list_sessions(Some("alice"), 2, Some(&page2[1]))
        .await
        .unwrap());
    assert_eq!(page3, alice_newest[4..]);
    // `before` without a principal (admin) pages over everyone.
    assert_eq!(
        ids(store.list_sessions(None, 3, Some(&all[3])).await.unwrap()),
        vec![all[2].clone(), all[1].clone(), all[0].clone()]
    );
    assert_eq!(
        ids(store.list_sessions(Some("bob"), 10, None).await.unwrap()),
        vec![bob[1].clone(), bob[0].clone()]
    );

    let mut updated = got.clone();
    updated.title = Some("renamed".into());
    updated.status = SessionStatus::Closed;
    updated.metadata = json!({"tags": ["x"]});
    updated.updated_at = now_rfc3339();
    store.update_session(&updated).await.unwrap();
    assert_eq!(store.get_session(&got.id).await.unwrap().unwrap(), updated);

    let missing = store.update_session(&session("alice")).await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
}

#[tokio::test]
async fn messages_are_upserted_by_message_events_and_listed_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let s = new_session(&store, "alice").await;
    let run = Run::queued(&s.id);
    store.create_run(&run, None).await.unwrap();

    let mut user = message(&s.id, &run.id, Role::User, "hi");
    user.images = vec!["data:image/png;base64,AAAA".into()];
    let mut assistant = message(&s.id, &run.id, Role::Assistant, "");
    assistant.tool_calls = Some(vec![ToolCall {
        id: "c1".into(),
        name: "calculator".into(),
        arguments: "{\"expr\":\"1+1\"}".into(),
    }]);
    let mut tool = message(&s.id, &run.id, Role::Tool, "2");
    tool.tool_call_id = Some("c1".into());
    tool.agent = None;
    let mut answer = message(&s.id, &run.id, Role::Assistant, "partial");

    let logged = store
        .append_events(vec![
            message_entry(&user),
            message_entry(&assistant),
            delta(&s.id, &run.id, "x"),
        ])
        .await
        .unwrap();
    assert_eq!(seqs(&logged), vec![1, 2, 3]);
    store
        .append_events(vec![message_entry(&tool), message_entry(&answer)])
        .await
        .unwrap();
    // A second event for the same message updates it in place (its position in the history stays).
    answer.content = "partial, then final".into();
    let user_again = user.clone();
    store
        .append_events(vec![message_entry(&answer), message_entry(&user_again)])
        .await
        .unwrap();

    let all = store.list_messages(&s.id, None, 0).await.unwrap();
    assert_eq!(
        all,
        vec![
            user.clone(),
            assistant.clone(),
            tool.clone(),
            answer.clone()
        ]
    );
    assert_eq!(
        store.list_messages(&s.id, Some(2), 1).await.unwrap(),
        vec![assistant, tool]
    );
    assert_eq!(
        store.list_messages(&s.id, Some(10), 3).await.unwrap(),
        vec![answer]
    );
    assert!(store
        .list_messages(&s.id, None, 4)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .list_messages("other", None, 0)
        .await
        .unwrap()
        .is_empty());

    // The log holds the message events too, as the native frames.
    let events = store.read_events(&s.id, 0, 100).await.unwrap();
    assert_eq!(seqs(&events), (1..=7).collect::<Vec<_>>());
    assert_eq!(events[0].event.kind, EventKind::Message { message: user });
    let frame: serde_json::Value = serde_json::from_str(&events[0].json).unwrap();
    assert_eq!(frame["type"], "message");
    assert_eq!(frame["seq"], 1);
}

#[tokio::test]
async fn runs_crud_and_client_message_id_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let s = new_session(&store, "alice").await;
    let other = new_session(&store, "alice").await;

    let first = Run::queued(&s.id);
    store.create_run(&first, Some("cm-1")).await.unwrap();
    let dup = store.create_run(&Run::queued(&s.id), Some("cm-1")).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    // The same client_message_id in another session is another message.
    store
        .create_run(&Run::queued(&other.id), Some("cm-1"))
        .await
        .unwrap();
    // Runs without one never conflict with each other.
    let second = Run::queued(&s.id);
    store.create_run(&second, None).await.unwrap();
    let third = Run::queued(&s.id);
    store.create_run(&third, None).await.unwrap();
    let same_id = store.create_run(&first, None).await;
    assert!(
        matches!(same_id, Err(StoreError::Conflict(_))),
        "{same_id:?}"
    );
    let no_session = store.create_run(&Run::queued("missing"), None).await;
    assert!(
        matches!(no_session, Err(StoreError::NotFound)),
        "{no_session:?}"
    );

    assert_eq!(
        store
            .find_run_by_client_message_id(&s.id, "cm-1")
            .await
            .unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store
            .find_run_by_client_message_id(&s.id, "cm-2")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.get_run(&s.id, &first.id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.get_run(&other.id, &first.id).await.unwrap(),
        None,
        "runs are looked up within their session"
    );

    let mut failed = second.clone();
    failed.status = RunStatus::Failed;
    failed.started_at = Some(now_rfc3339());
    failed.ended_at = Some(now_rfc3339());
    failed.error = Some(RunError {
        code: RunErrorCode::UpstreamTimeout,
        message: "slow".into(),
    });
    failed.usage = Usage {
        prompt_tokens: 12,
        completion_tokens: 34,
    };
    store.update_run(&failed).await.unwrap();
    assert_eq!(
        store.get_run(&s.id, &second.id).await.unwrap(),
        Some(failed.clone())
    );
    let missing = store.update_run(&Run::queued(&s.id)).await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");

    // A run change carried by an event is upserted with it, and keeps its client_message_id.
    let mut running = first.clone();
    running.status = RunStatus::Running;
    running.started_at = Some(now_rfc3339());
    store
        .append_events(vec![run_started(&running)])
        .await
        .unwrap();
    assert_eq!(
        store.get_run(&s.id, &first.id).await.unwrap(),
        Some(running.clone())
    );
    assert_eq!(
        store
            .find_run_by_client_message_id(&s.id, "cm-1")
            .await
            .unwrap(),
        Some(running.clone())
    );

    assert_eq!(
        store.list_runs(&s.id).await.unwrap(),
        vec![running, failed, third]
    );
}

#[tokio::test]
async fn unfinished_runs_are_queued_running_or_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = new_session(&store, "alice").await;
    let b = new_session(&store, "bob").await;
    let mut expected = Vec::new();
    for (sid, status) in [
        (&a.id, RunStatus::Completed),
        (&a.id, RunStatus::Queued),
        (&b.id, RunStatus::Running),
        (&b.id, RunStatus::Cancelled),
        (&a.id, RunStatus::WaitingInput),
        (&b.id, RunStatus::Failed),
        (&a.id, RunStatus::Interrupted),
    ] {
        let mut run = Run::queued(sid);
        run.status = status;
        store.create_run(&run, None).await.unwrap();
        if !status.is_terminal() {
            expected.push(run);
        }
    }
    let mut got = store.unfinished_runs().await.unwrap();
    let key = |r: &Run| r.id.clone();
    got.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(got, expected);

    // Finishing one takes it out.
    let mut done = expected[0].clone();
    done.status = RunStatus::Interrupted;
    store.update_run(&done).await.unwrap();
    assert_eq!(store.unfinished_runs().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_number_each_session_without_gaps_and_share_commits() {
    const SESSIONS: usize = 4;
    const TASKS: usize = 64;
    const APPENDS_PER_TASK: usize = 40;

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        sessions.push(new_session(&store, "alice").await.id);
    }

    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        let sessions = sessions.clone();
        tasks.spawn(async move {
            let mut got: Vec<(String, u64, String)> = Vec::new();
            for i in 0..APPENDS_PER_TASK {
                // Batches of 1-3 events, sometimes spanning two sessions.
                let s1 = &sessions[(t + i) % SESSIONS];
                let s2 = &sessions[(t * 7 + i) % SESSIONS];
                let mut batch = vec![delta(s1, "r", &format!("{t}-{i}-a"))];
                if i % 3 == 1 {
                    batch.push(delta(s2, "r", &format!("{t}-{i}-b")));
                }
                if i % 5 == 2 {
                    batch.push(delta(s1, "r", &format!("{t}-{i}-c")));
                }
                let texts: Vec<String> = batch
                    .iter()
                    .map(|e| match &e.event.kind {
                        EventKind::TextDelta { delta } => delta.clone(),
                        _ => unreachable!(),
                    })
                    .collect();
                let logged = store.append_events(batch).await.unwrap();
                assert_eq!(logged.len(), texts.len());
                for (ev, text) in logged.iter().zip(texts) {
                    // Returned in input order: each event is the one we sent.
                    assert_eq!(
                        ev.event.kind,
                        EventKind::TextDelta {
                            delta: text.clone()
                        }
                    );
                    got.push((ev.session_id.clone(), ev.seq(), text));
                }
            }
            got
        });
    }
    let mut by_session: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    while let Some(result) = tasks.join_next().await {
        for (sid, seq, text) in result.unwrap() {
            by_session.entry(sid).or_default().push((seq, text));
        }
    }

    let mut total = 0;
    for sid in &sessions {
        let mut appended = by_session.remove(sid).unwrap_or_default();
        appended.sort();
        let n = appended.len() as u64;
        total += n;
        assert_eq!(
            appended.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "seq 1..N, no gaps, no duplicates"
        );

        // The log holds exactly those events, in seq order, each with the text it was appended with.
        let stored = store.read_events(sid, 0, 100_000).await.unwrap();
        let stored: Vec<(u64, String)> = stored
            .iter()
            .map(|e| match &e.event.kind {
                EventKind::TextDelta { delta } => (e.seq(), delta.clone()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(stored, appended);
        // `after` gives exactly the tail, and `limit` caps it.
        let tail = store.read_events(sid, n - 5, 100).await.unwrap();
        assert_eq!(seqs(&tail), ((n - 4)..=n).collect::<Vec<_>>());
        let capped = store.read_events(sid, 10, 3).await.unwrap();
        assert_eq!(seqs(&capped), vec![11, 12, 13]);
        assert!(store.read_events(sid, n, 100).await.unwrap().is_empty());
        assert_eq!(
            store.log_bounds(sid).await.unwrap(),
            LogBounds {
                first_seq: 1,
                last_seq: n
            }
        );
    }

    let stats = store.stats();
    let calls = (TASKS * APPENDS_PER_TASK) as u64;
    assert_eq!(stats.append_calls, calls);
    assert_eq!(stats.appended_events, total);
    // Each call is one durable write (group commit happens above the store, in the event log).
    assert_eq!(stats.append_commits, calls);
}

#[tokio::test]
async fn the_event_log_group_commits_many_queued_events_in_few_store_writes() {
    // Tokens of many sessions queued at once reach the store as a few batches, not one write each.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(new_session(&store, "alice").await.id);
    }
    let log = agentd_core::event_log::EventLog::start(store.clone());
    for i in 0..500 {
        let e = delta(&ids[i % 10], "r", &i.to_string());
        log.append(e.event, None).await.unwrap();
    }
    let last = log
        .append_durable(delta(&ids[0], "r", "last").event, None)
        .await
        .unwrap();
    assert_eq!(last.seq(), 51);
    let stats = log.stats();
    assert_eq!(stats.events, 501);
    assert!(
        stats.batches < 100,
        "501 queued events took {} batches",
        stats.batches
    );
    assert_eq!(store.stats().append_calls, stats.batches);
    for id in &ids {
        let seqs: Vec<u64> = store
            .read_events(id, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq())
            .collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn reopening_keeps_everything_and_seq_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/agentd.db");
    let (s, run, user) = {
        let store = SqliteStore::open_url(&format!("sqlite://{}", path.display())).unwrap();
        assert_eq!(store.describe(), format!("sqlite:{}", path.display()));
        let s = new_session(&store, "alice").await;
        let run = append_run(&store, &s.id).await;
        let user = message(&s.id, &run.id, Role::User, "remember me");
        let logged = store
            .append_events(vec![message_entry(&user)])
            .await
            .unwrap();
        assert_eq!(logged[0].seq(), 5);
        (s, run, user)
    };
    assert!(path.exists());

    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.get_session(&s.id).await.unwrap(), Some(s.clone()));
    assert_eq!(
        store.get_run(&s.id, &run.id).await.unwrap(),
        Some(run.clone())
    );
    assert_eq!(
        store.list_messages(&s.id, None, 0).await.unwrap(),
        vec![user]
    );
    let events = store.read_events(&s.id, 0, 100).await.unwrap();
    assert_eq!(seqs(&events), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        events[0].event.kind,
        EventKind::RunStarted {
            run: {
                let mut r = run.clone();
                r.status = RunStatus::Running;
                r.ended_at = None;
                r
            }
        }
    );
    assert_eq!(
        store.log_bounds(&s.id).await.unwrap(),
        LogBounds {
            first_seq: 1,
            last_seq: 5
        }
    );
    assert_eq!(
        store.first_seq_of_run(&s.id, &run.id).await.unwrap(),
        Some(1)
    );

    let next = store
        .append_events(vec![delta(&s.id, &run.id, "more")])
        .await
        .unwrap();
    assert_eq!(
        next[0].seq(),
        6,
        "seq continues from the last one after a restart"
    );
}

#[tokio::test]
async fn pruning_keeps_the_latest_runs_and_seq_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.db");
    let store = SqliteStore::open(&path).unwrap();
    let s = new_session(&store, "alice").await;
    let other = new_session(&store, "alice").await;
    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(append_run(&store, &s.id).await);
    }
    let other_run = append_run(&store, &other.id).await;
    // 5 runs x 4 events.
    assert_eq!(
        store.log_bounds(&s.id).await.unwrap(),
        LogBounds {
            first_seq: 1,
            last_seq: 20
        }
    );
    assert_eq!(
        store.first_seq_of_run(&s.id, &runs[3].id).await.unwrap(),
        Some(13)
    );

    // Keeping more runs than exist deletes nothing.
    store.prune_events(&s.id, 20).await.unwrap();
    assert_eq!(store.read_events(&s.id, 0, 100).await.unwrap().len(), 20);

    store.prune_events(&s.id, 2).await.unwrap();
    assert_eq!(
        store.log_bounds(&s.id).await.unwrap(),
        LogBounds {
            first_seq: 13,
            last_seq: 20
        }
    );
    let kept = store.read_events(&s.id, 0, 100).await.unwrap();
    assert_eq!(seqs(&kept), (13..=20).collect::<Vec<_>>());
    assert!(kept
        .iter()
        .all(|e| e.event.run_id == runs[3].id || e.event.run_id == runs[4].id));
    assert_eq!(
        store.first_seq_of_run(&s.id, &runs[0].id).await.unwrap(),
        None
    );
    assert_eq!(
        store.first_seq_of_run(&s.id, &runs[4].id).await.unwrap(),
        Some(17)
    );
    // Runs themselves and other sessions are untouched.
    assert_eq!(store.list_runs(&s.id).await.unwrap().len(), 5);
    assert_eq!(store.read_events(&other.id, 0, 100).await.unwrap().len(), 4);
    assert_eq!(
        store
            .first_seq_of_run(&other.id, &other_run.id)
            .await
            .unwrap(),
        Some(1)
    );

    let next = store
        .append_events(vec![delta(&s.id, &runs[4].id, "late")])
        .await
        .unwrap();
    assert_eq!(next[0].seq(), 21);

    // Pruning everything leaves an empty log whose numbering still goes on, also after a restart.
    store.prune_events(&s.id, 0).await.unwrap();
    assert_eq!(
        store.log_bounds(&s.id).await.unwrap(),
        LogBounds {
            first_seq: 0,
            last_seq: 21
        }
    );
    assert!(store.read_events(&s.id, 0, 100).await.unwrap().is_empty());
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.log_bounds(&s.id).await.unwrap(),
        LogBounds {
            first_seq: 0,
            last_seq: 21
        }
    );
    let next = store
        .append_events(vec![delta(&s.id, &runs[4].id, "again")])
        .await
        .unwrap();
    assert_eq!(next[0].seq(), 22);
    assert_eq!(
        store.log_bounds(&s.id).await.unwrap(),
        LogBounds {
            first_seq: 22,
            last_seq: 22
        }
    );
}

#[tokio::test]
async fn a_failing_batch_fails_alone_and_consumes_no_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let s = new_session(&store, "alice").await;
    let other = new_session(&store, "alice").await;
    assert_eq!(
        store
            .append_events(vec![delta(&s.id, "r", "1")])
            .await
            .unwrap()[0]
            .seq(),
        1
    );

    // An unknown session.
    let unknown = store
        .append_events(vec![delta(&s.id, "r", "x"), delta("missing", "r", "y")])
        .await;
    assert!(matches!(unknown, Err(StoreError::NotFound)), "{unknown:?}");
    // A message whose session is not the event's.
    let stray = message(&other.id, "r", Role::User, "stray");
    let mut bad = message_entry(&stray);
    bad.event.session_id = s.id.clone();
    let mismatch = store.append_events(vec![bad]).await;
    assert!(
        matches!(mismatch, Err(StoreError::Other(_))),
        "{mismatch:?}"
    );

    // Mixed into a group with good batches, the bad one fails alone.
    let (good_a, bad_b, good_c) = tokio::join!(
        store.append_events(vec![delta(&s.id, "r", "2")]),
        store.append_events(vec![
            delta(&s.id, "r", "nope"),
            delta("missing", "r", "nope")
        ]),
        store.append_events(vec![delta(&s.id, "r", "3")]),
    );
    assert!(bad_b.is_err());
    let mut got = vec![good_a.unwrap()[0].seq(), good_c.unwrap()[0].seq()];
    got.sort_unstable();
    assert_eq!(got, vec![2, 3], "failed batches leave no gap");
    let texts: Vec<String> = store
        .read_events(&s.id, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| match &e.event.kind {
            EventKind::TextDelta { delta } => delta.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(texts.len(), 3);
    assert!(
        !texts.iter().any(|t| t == "x" || t == "nope"),
        "nothing of a failed batch is stored: {texts:?}"
    );
    assert!(store
        .list_messages(&s.id, None, 0)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.log_bounds(&s.id).await.unwrap().last_seq, 3);
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.db");
    let store = SqliteStore::open(&path).unwrap();
    let s = new_session(&store, "alice").await;
    let run = Run::queued(&s.id);
    store.create_run(&run, None).await.unwrap();
    // A run change commits straight to the table (a bare delta would still be in the log's tail).
    store.append_events(vec![run_started(&run)]).await.unwrap();

    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        "UPDATE sessions SET metadata = '{not json' WHERE id = ?1",
        [&s.id],
    )
    .unwrap();
    raw.execute(
        "UPDATE runs SET status = 'exploded' WHERE id = ?1",
        [&run.id],
    )
    .unwrap();
    raw.execute(
        "UPDATE events SET payload = '[1,2' WHERE session_id = ?1",
        [&s.id],
    )
    .unwrap();
    drop(raw);

    let session = store.get_session(&s.id).await;
    assert!(
        matches!(&session, Err(StoreError::Other(m)) if m.contains("metadata")),
        "{session:?}"
    );
    let runs = store.list_runs(&s.id).await;
    assert!(
        matches!(&runs, Err(StoreError::Other(m)) if m.contains("exploded")),
        "{runs:?}"
    );
    let events = store.read_events(&s.id, 0, 10).await;
    assert!(matches!(&events, Err(StoreError::Other(_))), "{events:?}");
}

#[tokio::test]
async fn open_errors_name_the_path_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    let err = SqliteStore::open(&blocker.join("agentd.db"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("a-file"), "{err}");

    let err = SqliteStore::open_url("postgres://db/agentd")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("postgres"), "{err}");

    // A database a newer binary migrated is refused rather than used.
    let newer = dir.path().join("newer.db");
    let raw = rusqlite::Connection::open(&newer).unwrap();
    raw.pragma_update(None, "user_version", 999).unwrap();
    drop(raw);
    let err = SqliteStore::open(&newer).err().unwrap().to_string();
    assert!(err.contains("newer.db") && err.contains("999"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_reads_share_the_reader_pool() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let s = new_session(&store, "alice").await;
    let batch = (0..20).map(|i| delta(&s.id, "r", &i.to_string())).collect();
    store.append_events(batch).await.unwrap();

    // Far more readers than pooled connections: they queue for one and all get the right answer.
    let mut reads = tokio::task::JoinSet::new();
    for after in 0..100u64 {
        let store = Arc::clone(&store);
        let sid = s.id.clone();
        reads.spawn(async move {
            (
                after,
                store.read_events(&sid, after % 20, 100).await.unwrap(),
            )
        });
    }
    let mut done = 0;
    while let Some(result) = reads.join_next().await {
        let (after, events) = result.unwrap();
        assert_eq!(seqs(&events), ((after % 20 + 1)..=20).collect::<Vec<_>>());
        done += 1;
    }
    assert_eq!(done, 100);
}

/// The rows of the `events` table itself (not through the store, which also reads the tail): each a chunk of
/// events `first..=last`.
fn table_rows(path: &Path, session_id: &str) -> Vec<std::ops::RangeInclusive<u64>> {
    let raw = rusqlite::Connection::open(path).unwrap();
    let mut stmt = raw
        .prepare("SELECT first_seq, seq FROM events WHERE session_id = ?1 ORDER BY seq")
        .unwrap();
    let rows = stmt
        .query_map([session_id], |row| {
            Ok(row.get::<_, i64>(0)? as u64..=row.get::<_, i64>(1)? as u64)
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    rows
}

/// Event seqs as stored in the `events` table itself.
fn table_seqs(path: &Path, session_id: &str) -> Vec<u64> {
    table_rows(path, session_id).into_iter().flatten().collect()
}

/// The log tail's segment files next to the database.
fn tail_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tail."))
        .collect()
}

#[tokio::test]
async fn token_events_wait_in_the_tail_then_move_to_the_table_in_bulk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.db");
    let store = SqliteStore::open(&path).unwrap();
    let s = new_session(&store, "alice").await;
    for i in 0..10 {
        store
            .append_events(vec![delta(&s.id, "r", &i.to_string())])
            .await
            .unwrap();
    }
    // Readable at once, but not yet in the table: they are in the tail (file and memory).
    let seqs: Vec<u64> = store
        .read_events(&s.id, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq())
        .collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    assert_eq!(store.tail_len(), 10);
    assert!(table_seqs(&path, &s.id).is_empty());
    assert_eq!(
        store.log_bounds(&s.id).await.unwrap(),
        LogBounds {
            first_seq: 1,
            last_seq: 10
        }
    );
    let stats = store.stats();
    assert_eq!(stats.appended_events, 10);
    assert_eq!(stats.ingested_events, 0);

    // After the ingestion age the writer moves them, in one transaction, and deletes nothing readers need.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.tail_len() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the tail was never ingested"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(table_seqs(&path, &s.id), (1..=10).collect::<Vec<_>>());
    // As one row: a chunk of the ten, not a row per token.
    assert_eq!(table_rows(&path, &s.id), vec![1..=10]);
    let stats = store.stats();
    assert_eq!(stats.ingested_events, 10);
    assert_eq!(stats.ingest_commits, 1);
    let seqs: Vec<u64> = store
        .read_events(&s.id, 3, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq())
        .collect();
    assert_eq!(seqs, (4..=10).collect::<Vec<_>>());
    // A limit inside the chunk cuts it.
    let page = store.read_events(&s.id, 3, 4).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq()).collect::<Vec<_>>(),
        vec![4, 5, 6, 7]
    );
    drop(store);
    assert!(
        tail_files(dir.path()).is_empty(),
        "a clean shutdown leaves no tail file"
    );
}

#[tokio::test]
async fn a_run_change_commits_its_sessions_tail_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.db");
    let store = SqliteStore::open(&path).unwrap();
    let s = new_session(&store, "alice").await;
    let other = new_session(&store, "alice").await;
    let mut run = Run::queued(&s.id);
    store.create_run(&run, None).await.unwrap();
    store.append_events(vec![run_started(&run)]).await.unwrap();
    for i in 0..5 {
        store
            .append_events(vec![
                delta(&s.id, &run.id, &i.to_string()),
                delta(&other.id, "r", "x"),
            ])
            .await
            .unwrap();
    }
    assert_eq!(table_seqs(&path, &s.id), vec![1]);
    run.status = RunStatus::Completed;
    let logged = store
        .append_events(vec![delta(&s.id, &run.id, "last"), run_finished(&run)])
        .await
        .unwrap();
    assert_eq!(
        logged.iter().map(|e| e.seq()).collect::<Vec<_>>(),
        vec![7, 8]
    );
    // The session's whole log and its run row are in the table together; the other session's tail is not.
    assert_eq!(table_seqs(&path, &s.id), (1..=8).collect::<Vec<_>>());
    assert_eq!(
        store.get_run(&s.id, &run.id).await.unwrap().unwrap().status,
        RunStatus::Completed
    );
    assert!(table_seqs(&path, &other.id).is_empty());
    assert_eq!(store.tail_len(), 5);
}

#[tokio::test]
async fn a_killed_process_leaves_its_tail_file_and_the_next_start_replays_it() {
    // The writer's tail file as a killed process leaves it: the store is opened in a child process that is
    // killed with SIGKILL right after its appends returned. Here that child is this test binary itself.
    if let Ok(dir) = std::env::var("AGENTD_TAIL_CHILD_DIR") {
        let store = SqliteStore::open(&Path::new(&dir).join("agentd.db")).unwrap();
        let s = store.list_sessions(None, 1, None).await.unwrap().remove(0);
        for i in 0..20 {
            store
                .append_events(vec![delta(&s.id, "r", &format!("t{i}"))])
                .await
                .unwrap();
        }
        println!("APPENDED");
        std::thread::sleep(std::time::Duration::from_secs(60));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.db");
    let id = {
        let store = SqliteStore::open(&path).unwrap();
        let s = new_session(&store, "alice").await;
        store
            .append_events(vec![delta(&s.id, "r", "before")])
            .await
            .unwrap();
        s.id
    };
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args([
            "--exact",
            "a_killed_process_leaves_its_tail_file_and_the_next_start_replays_it",
            "--nocapture",
        ])
        .env("AGENTD_TAIL_CHILD_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "the child ended before appending");
        if line.contains("APPENDED") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !tail_files(dir.path()).is_empty(),
        "the killed process left its tail file"
    );
    assert_eq!(
        table_seqs(&path, &id),
        vec![1],
        "the 20 appends were only in the tail"
    );

    let store = SqliteStore::open(&path).unwrap();
    let events = store.read_events(&id, 0, 100).await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq()).collect();
    assert_eq!(seqs, (1..=21).collect::<Vec<_>>());
    assert_eq!(
        events[20].event.kind,
        EventKind::TextDelta {
            delta: "t19".into()
        }
    );
    assert_eq!(
        table_seqs(&path, &id),
        (1..=21).collect::<Vec<_>>(),
        "replayed into the table"
    );
    assert!(tail_files(dir.path())
        .iter()
        .all(|n| std::fs::metadata(dir.path().join(n)).unwrap().len() == 0));
    // And numbering continues after the replayed events.
    let next = store
        .append_events(vec![delta(&id, "r", "after")])
        .await
        .unwrap();
    assert_eq!(next[0].seq(), 22);
}

#[tokio::test]
async fn a_second_process_cannot_open_a_database_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.db");
    let store = SqliteStore::open(&path).unwrap();
    let err = SqliteStore::open(&path).err().unwrap().to_string();
    assert!(err.contains("in use by another agentd process"), "{err}");
    drop(store);
    assert!(
        SqliteStore::open(&path).is_ok(),
        "the lock goes with the store"
    );
}

#[tokio::test]
async fn readers_see_a_gap_free_log_while_the_writer_moves_the_tail() {
    // A fast stream fills a session's tail past its cap again and again, so ingestion runs between appends
    // while a reader keeps reading the whole log: every read must be 1..=n with no gap and no repeat.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let s = new_session(&store, "alice").await;
    let writer = {
        let store = Arc::clone(&store);
        let id = s.id.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                let batch = (0..10)
                    .map(|j| delta(&id, "r", &format!("{i}-{j}")))
                    .collect();
                store.append_events(batch).await.unwrap();
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() || reads == 0 {
        let seqs: Vec<u64> = store
            .read_events(&s.id, 0, 10_000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq())
            .collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "read {reads}"
        );
        // A page that starts inside the log, too.
        if seqs.len() > 100 {
            let page: Vec<u64> = store
                .read_events(&s.id, 50, 20)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq())
                .collect();
            assert_eq!(page, (51..=70).collect::<Vec<_>>());
        }
        reads += 1;
    }
    writer.await.unwrap();
    let all = store.read_events(&s.id, 0, 10_000).await.unwrap();
    assert_eq!(all.len(), 3000);
    assert!(store.stats().ingested_events > 0, "{:?}", store.stats());
}

/// A database of schema version 2 (one row per event) opens with its events intact: they become chunks of one,
/// read back, numbered on from, and pruned as before.
#[tokio::test]
async fn a_version_2_database_keeps_its_events_when_migrated_to_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(include_str!("../src/migrations/0001_init.sql"))
        .unwrap();
    raw.execute_batch(include_str!("../src/migrations/0002_lean_events.sql"))
        .unwrap();
    raw.pragma_update(None, "user_version", 2).unwrap();
    raw.execute(
        "INSERT INTO sessions (id, principal, agent, status, metadata, created_at, updated_at)
         VALUES ('s1', 'alice', 'assistant', 'active', '{}', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
        [],
    )
    .unwrap();
    let old: Vec<LoggedEvent> = (1..=3)
        .map(|seq| {
            LoggedEvent::new(
                "s1".into(),
                agentd_core::event::Event {
                    seq,
                    run_id: "r1".into(),
                    agent: "assistant".into(),
                    is_subagent: false,
                    kind: EventKind::TextDelta {
                        delta: format!("old {seq}"),
                    },
                },
            )
        })
        .collect();
    for e in &old {
        raw.execute(
            "INSERT INTO events (session_id, seq, run_id, payload) VALUES ('s1', ?1, 'r1', ?2)",
            rusqlite::params![e.seq() as i64, e.json],
        )
        .unwrap();
    }
    drop(raw);

    let store = SqliteStore::open(&path).unwrap();
    let read = store.read_events("s1", 0, 100).await.unwrap();
    assert_eq!(
        read.iter().map(|e| e.json.as_str()).collect::<Vec<_>>(),
        old.iter().map(|e| e.json.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(table_rows(&path, "s1"), vec![1..=1, 2..=2, 3..=3]);
    let appended = store
        .append_events(vec![delta("s1", "r1", "new")])
        .await
        .unwrap();
    assert_eq!(appended[0].seq(), 4);
    assert_eq!(
        seqs(&store.read_events("s1", 2, 100).await.unwrap()),
        vec![3, 4]
    );
}

/// The nice value in a `/proc/.../stat` line (field 19; fields counted after the parenthesised name, which may
/// itself hold spaces or parentheses).
#[cfg(target_os = "linux")]
fn nice_in_stat(stat: &str) -> i64 {
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(16).unwrap().parse().unwrap()
}

/// This process's threads' nice values, by thread name.
#[cfg(target_os = "linux")]
fn thread_nice_values() -> HashMap<String, Vec<i64>> {
    let mut nice_of: HashMap<String, Vec<i64>> = HashMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue;
        };
        nice_of
            .entry(name.trim().to_string())
            .or_default()
            .push(nice_in_stat(&stat));
    }
    nice_of
}

/// The writer's and the checkpointer's threads run 10 nice levels below the process (at most 19), so bulk work
/// (ingestion, checkpoints) on a shared CPU gives way to the token path, also in a process started niced: under
/// `nice -n 19` they stay at 19 (never above the process), under `nice -n 5` they run at 15.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn background_threads_run_at_a_lower_priority() {
    // The process's own nice (its main thread's), as `nice -n N` started it.
    let process_nice = nice_in_stat(&std::fs::read_to_string("/proc/self/stat").unwrap());
    let expected = (process_nice + 10).min(19);
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path());
    let of_thread = |nice_of: &HashMap<String, Vec<i64>>, thread: &str| -> Vec<i64> {
        nice_of
            .iter()
            .filter(|(name, _)| name.starts_with(thread))
            .flat_map(|(_, n)| n.clone())
            .collect()
    };
    let threads = ["agentd-sqlite-w", "agentd-sqlite-c"];
    // A new thread names itself once it runs, then lowers its priority: wait (within a generous bound) until
    // both threads are there and past that first step.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let nice_of = loop {
        let nice_of = thread_nice_values();
        let settled = threads.iter().all(|t| {
            let nices = of_thread(&nice_of, t);
            !nices.is_empty() && nices.iter().all(|n| *n == expected)
        });
        if settled || std::time::Instant::now() > deadline {
            break nice_of;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    for thread in threads {
        let nices = of_thread(&nice_of, thread);
        assert!(!nices.is_empty(), "no {thread}* thread: {nice_of:?}");
        assert!(
            nices.iter().all(|n| *n == expected),
            "{thread}: {nices:?}, expected {expected} in a process at nice {process_nice}"
        );
    }
    // The test's own thread keeps the process's priority.
    let mine: Vec<i64> = nice_of
        .iter()
        .filter(|(name, _)| !name.starts_with("agentd-sqlite"))
        .flat_map(|(_, n)| n.clone())
        .collect();
    assert!(mine.contains(&process_nice), "{nice_of:?}");
}

/// The same test in a process started niced: this test binary runs it again under `nice -n 5` (threads at 15,
/// where an absolute nice 10 would leave them only 5 below the process) and `nice -n 15` (threads capped at 19,
/// where an absolute 10 would put them above the process), added to whatever nice this run itself has.
#[cfg(target_os = "linux")]
#[test]
fn background_priority_is_relative_to_a_niced_process() {
    let process_nice = nice_in_stat(&std::fs::read_to_string("/proc/self/stat").unwrap());
    let exe = std::env::current_exe().unwrap();
    for step in [5, 15] {
        if process_nice + step > 19 {
            continue; // cannot go lower than 19; the plain run already covers this process's nice
        }
        let out = std::process::Command::new("nice")
            .arg("-n")
            .arg(step.to_string())
            .arg(&exe)
            .args([
                "--exact",
                "background_threads_run_at_a_lower_priority",
                "--test-threads=1",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "under nice -n {step}: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
