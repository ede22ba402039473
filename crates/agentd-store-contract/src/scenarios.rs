//! The scenarios. Each takes a fresh [`Harness`] and panics on the first broken promise.

use std::collections::HashMap;
use std::sync::Arc;

use agentd_core::domain::{
    now_rfc3339, Role, Run, RunError, RunErrorCode, RunStatus, Session, SessionStatus, ToolCall,
    Usage,
};
use agentd_core::domain::{Message, Upload};
use agentd_core::event::{EventKind, LoggedEvent};
use agentd_core::store::{HistoryPage, LogBounds, SessionFilter, Store, StoreError, StoredRun};
use serde_json::json;

use crate::{
    append_run, delta, message, message_entry, new_session, run_finished, run_started, seqs,
    session, text_of, upload, Harness,
};

pub async fn sessions_are_searched_by_title_and_status_and_paged(h: &dyn Harness) {
    let store = h.open().await;
    // Oldest to newest; the last is bob's. More than one internal page (256) of alice's sessions, so the
    // search reads on past a page where nothing matched.
    let mut titled = Vec::new();
    for (i, title) in [
        Some("Über die Rechnung"),
        Some("weather report"),
        None,
        Some("ÜBER alles"),
        Some("closed über"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = session("alice");
        s.title = title.map(str::to_string);
        if i == 4 {
            s.status = SessionStatus::Closed;
        }
        store.create_session(&s).await.unwrap();
        titled.push(s.id);
    }
    for _ in 0..300 {
        new_session(&*store, "alice").await;
    }
    let mut bobs = session("bob");
    bobs.title = Some("über bob".into());
    store.create_session(&bobs).await.unwrap();

    let ids = |v: Vec<Session>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    let search = |q: Option<&str>, status: Option<SessionStatus>| SessionFilter {
        query: q.map(str::to_string),
        status,
    };
    let f = search(Some("über"), None);
    // Case-insensitive beyond ASCII, newest first, only the principal's.
    assert_eq!(
        ids(store
            .search_sessions(Some("alice"), &f, 10, None)
            .await
            .unwrap()),
        vec![titled[4].clone(), titled[3].clone(), titled[0].clone()]
    );
    let active = search(Some("über"), Some(SessionStatus::Active));
    assert_eq!(
        ids(store
            .search_sessions(Some("alice"), &active, 10, None)
            .await
            .unwrap()),
        vec![titled[3].clone(), titled[0].clone()]
    );
    let closed = search(None, Some(SessionStatus::Closed));
    assert_eq!(
        ids(store
            .search_sessions(Some("alice"), &closed, 10, None)
            .await
            .unwrap()),
        vec![titled[4].clone()]
    );
    // Paged with `limit` and `before` like list_sessions.
    let page1 = ids(store
        .search_sessions(Some("alice"), &f, 2, None)
        .await
        .unwrap());
    assert_eq!(page1, vec![titled[4].clone(), titled[3].clone()]);
    let page2 = ids(store
        .search_sessions(Some("alice"), &f, 2, Some(&page1[1]))
        .await
        .unwrap());
    assert_eq!(page2, vec![titled[0].clone()]);
    // Admin (no principal) sees bob's too; a title-less session never matches a query.
    assert_eq!(
        store
            .search_sessions(None, &f, 10, None)
            .await
            .unwrap()
            .len(),
        4
    );
    assert!(store
        .search_sessions(
            Some("alice"),
            &search(Some("nothing like it"), None),
            10,
            None
        )
        .await
        .unwrap()
        .is_empty());
    // Status only, no query: every active session of alice's but the closed one.
    let all_active = store
        .search_sessions(
            Some("alice"),
            &search(None, Some(SessionStatus::Active)),
            1000,
            None,
        )
        .await
        .unwrap();
    assert_eq!(all_active.len(), 304);
    assert!(all_active.iter().all(|s| s.status == SessionStatus::Active));
}

pub async fn sessions_crud_and_pagination(h: &dyn Harness) {
    let store = h.open().await;

    // Interleave two principals: a0 b0 a1 a2 b1 a3 a4 (oldest to newest).
    let mut alice = Vec::new();
    let mut bob = Vec::new();
    let mut all = Vec::new();
    for who in ["alice", "bob", "alice", "alice", "bob", "alice", "alice"] {
        let s = new_session(&*store, who).await;
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
    // The oldest session has nothing before it; an unknown `before` lists nothing.
    assert!(store
        .list_sessions(None, 10, Some(&all[0]))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .list_sessions(None, 10, Some("unknown"))
        .await
        .unwrap()
        .is_empty());

    let mut updated = got.clone();
    updated.title = Some("renamed".into());
    updated.status = SessionStatus::Closed;
    updated.metadata = json!({"tags": ["x"], "nested": {"a": [1, 2.5, null, "é"]}});
    updated.updated_at = now_rfc3339();
    store.update_session(&updated).await.unwrap();
    assert_eq!(store.get_session(&got.id).await.unwrap().unwrap(), updated);

    let missing = store.update_session(&session("alice")).await;
    assert!(matches!(missing, Err(StoreError::NotFound)), "{missing:?}");
}

pub async fn messages_are_upserted_by_message_events_and_listed_in_order(h: &dyn Harness) {
    let store = h.open().await;
    let s = new_session(&*store, "alice").await;
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
    // A second event for the same message updates it in place (its position in the history stays), also
    // twice in one batch.
    answer.content = "partial, then".into();
    let first_update = message_entry(&answer);
    answer.content = "partial, then final".into();
    let user_again = user.clone();
    store
        .append_events(vec![
            first_update,
            message_entry(&answer),
            message_entry(&user_again),
        ])
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
    // The newest ones, oldest first, each with its run's place.
    let page = store.history_page(&s.id, &run.id, 2, 10).await.unwrap();
    let own = page.own.expect("the run's place");
    let placed = |ms: &[Message]| {
        ms.iter()
            .map(|m| (m.clone(), Some(own)))
            .collect::<Vec<_>>()
    };
    assert_eq!(page.messages, placed(&all[2..]));
    assert_eq!(page.runs, 1);
    let page = store.history_page(&s.id, &run.id, 10, 10).await.unwrap();
    assert_eq!(page.messages, placed(&all));
    assert_eq!(
        store.history_page("other", &run.id, 5, 10).await.unwrap(),
        HistoryPage::default()
    );

    // The log holds the message events too, as the native frames.
    let events = store.read_events(&s.id, 0, 100).await.unwrap();
    assert_eq!(seqs(&events), (1..=8).collect::<Vec<_>>());
    assert_eq!(events[0].event.kind, EventKind::Message { message: user });
    let frame: serde_json::Value = serde_json::from_str(&events[0].json).unwrap();
    assert_eq!(frame["type"], "message");
    assert_eq!(frame["seq"], 1);
    // What was returned at append time is what is read back.
    assert_eq!(events[..3].len(), logged.len());
    for (read, appended) in events.iter().zip(&logged) {
        assert_eq!(read.json, appended.json);
        assert_eq!(read.session_id, appended.session_id);
    }
}

/// A turn's history page: the newest messages in the order they were stored, each placed in its run (a user
/// message sent while the previous turn ran is stored before that turn's answer, yet placed in its own, later
/// run), the turn's own place, and the runs counted only up to the bound asked for.
pub async fn a_turns_history_page_places_each_message_in_its_run(h: &dyn Harness) {
    let store = h.open().await;
    let s = new_session(&*store, "alice").await;
    let elsewhere = new_session(&*store, "alice").await;
    let runs = [Run::queued(&s.id), Run::queued(&s.id), Run::queued(&s.id)];
    for run in &runs {
        store.create_run(run, None).await.unwrap();
    }
    let other = Run::queued(&elsewhere.id);
    store.create_run(&other, None).await.unwrap();
    let first = message(&s.id, &runs[0].id, Role::User, "one");
    let second = message(&s.id, &runs[1].id, Role::User, "two");
    let answer = message(&s.id, &runs[0].id, Role::Assistant, "one's answer");
    let mut loose = message(&s.id, "", Role::System, "of no run");
    loose.run_id = None;
    let stray = message(
        &s.id,
        &other.id,
        Role::Assistant,
        "names a run of another session",
    );
    let third = message(&s.id, &runs[2].id, Role::User, "three");
    let all = [&first, &second, &answer, &loose, &stray, &third];
    let entries = all.iter().map(|m| message_entry(m)).collect();
    store.append_events(entries).await.unwrap();

    let page = store
        .history_page(&s.id, &runs[1].id, 10, 10)
        .await
        .unwrap();
    let stored: Vec<&Message> = page.messages.iter().map(|(m, _)| m).collect();
    assert_eq!(stored, all, "oldest first, in the order they were stored");
    let place = |i: usize| page.messages[i].1;
    let (one, two, three) = (place(0), place(1), place(5));
    assert!(one.is_some() && two.is_some() && three.is_some());
    assert!(one < two && two < three, "a later run has a larger place");
    assert_eq!(place(2), one, "an answer is placed in its own run");
    assert_eq!(place(3), None, "a message of no run has no place");
    assert_eq!(place(4), None, "nor one naming another session's run");
    assert_eq!(page.own, two);
    assert_eq!(page.runs, 3);

    // The newest `limit` only; the runs counted to the bound; an unknown run has no place.
    let page = store.history_page(&s.id, &runs[2].id, 2, 2).await.unwrap();
    let stored: Vec<&Message> = page.messages.iter().map(|(m, _)| m).collect();
    assert_eq!(stored, all[4..].to_vec());
    assert_eq!((page.own, page.runs), (three, 2));
    let page = store.history_page(&s.id, "unknown", 1, 0).await.unwrap();
    assert_eq!((page.messages.len(), page.own, page.runs), (1, None, 0));
}

pub async fn runs_crud_and_client_message_id_conflict(h: &dyn Harness) {
    let store = h.open().await;
    let s = new_session(&*store, "alice").await;
    let other = new_session(&*store, "alice").await;

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
    assert!(store.list_runs("missing").await.unwrap().is_empty());

    // A released client_message_id (an orphan run's) may be taken by a new run; the orphan stays.
    let orphan = Run::queued(&s.id);
    store.create_run(&orphan, Some("cm-3")).await.unwrap();
    store
        .release_client_message_id(&s.id, &orphan.id)
        .await
        .unwrap();
    assert_eq!(
        store
            .find_run_by_client_message_id(&s.id, "cm-3")
            .await
            .unwrap(),
        None
    );
    let retried = Run::queued(&s.id);
    store.create_run(&retried, Some("cm-3")).await.unwrap();
    assert_eq!(
        store
            .find_run_by_client_message_id(&s.id, "cm-3")
            .await
            .unwrap(),
        Some(retried.clone())
    );
    assert_eq!(
        store.get_run(&s.id, &orphan.id).await.unwrap(),
        Some(orphan.clone())
    );
    let unknown = store
        .release_client_message_id(&s.id, &Run::queued(&s.id).id)
        .await;
    assert!(matches!(unknown, Err(StoreError::NotFound)), "{unknown:?}");
}

pub async fn unfinished_runs_are_queued_running_or_waiting(h: &dyn Harness) {
    let store = h.open().await;
    let a = new_session(&*store, "alice").await;
    let b = new_session(&*store, "bob").await;
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
    // One session's: its own, oldest first.
    for sid in [&a.id, &b.id] {
        let of: Vec<Run> = expected
            .iter()
            .filter(|r| r.session_id == *sid)
            .cloned()
            .collect();
        assert_eq!(store.unfinished_runs(Some(sid)).await.unwrap(), of);
    }
    let none = new_session(&*store, "alice").await;
    assert!(store
        .unfinished_runs(Some(&none.id))
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .unfinished_runs(Some("no-such-session"))
        .await
        .unwrap()
        .is_empty());

    let mut got = store.unfinished_runs(None).await.unwrap();
    let key = |r: &Run| r.id.clone();
    got.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(got, expected);

    // Finishing one takes it out.
    let mut done = expected[0].clone();
    done.status = RunStatus::Interrupted;
    store.update_run(&done).await.unwrap();
    assert_eq!(store.unfinished_runs(None).await.unwrap().len(), 2);
    let of_done = store.unfinished_runs(Some(&done.session_id)).await.unwrap();
    assert!(of_done.iter().all(|r| r.id != done.id), "{of_done:?}");
    // So does a run_finished event carrying the run.
    let mut finished = expected[1].clone();
    finished.status = RunStatus::Completed;
    store
        .append_events(vec![run_finished(&finished)])
        .await
        .unwrap();
    assert_eq!(store.unfinished_runs(None).await.unwrap().len(), 1);
    let of_finished = store
        .unfinished_runs(Some(&finished.session_id))
        .await
        .unwrap();
    assert!(
        of_finished.iter().all(|r| r.id != finished.id),
        "{of_finished:?}"
    );
}

pub async fn concurrent_appends_number_each_session_without_gaps(h: &dyn Harness) {
    const SESSIONS: usize = 4;
    const TASKS: usize = 64;
    const APPENDS_PER_TASK: usize = 40;

    let store = h.open().await;
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        sessions.push(new_session(&*store, "alice").await.id);
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
                    assert_eq!(text_of(ev), text);
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

    for sid in &sessions {
        let mut appended = by_session.remove(sid).unwrap_or_default();
        appended.sort();
        let n = appended.len() as u64;
        assert_eq!(
            appended.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "seq 1..N, no gaps, no duplicates"
        );

        // The log holds exactly those events, in seq order, each with the text it was appended with.
        let stored = store.read_events(sid, 0, 100_000).await.unwrap();
        let stored: Vec<(u64, String)> = stored.iter().map(|e| (e.seq(), text_of(e))).collect();
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
}

/// Batches over several sessions each, the sessions in different orders, all at once: a store that locks
/// per session must not deadlock, and every batch commits whole.
pub async fn appends_sharing_sessions_in_any_order_all_commit(h: &dyn Harness) {
    const SESSIONS: usize = 6;
    const TASKS: usize = 16;
    const ROUNDS: usize = 25;
    let store = h.open().await;
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        sessions.push(new_session(&*store, "alice").await.id);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        let sessions = sessions.clone();
        tasks.spawn(async move {
            for i in 0..ROUNDS {
                // Every session, starting at a different one and going either way round.
                let batch = (0..SESSIONS)
                    .map(|k| {
                        let j = if t % 2 == 0 {
                            (t + i + k) % SESSIONS
                        } else {
                            (SESSIONS * 4 + t + i - k) % SESSIONS
                        };
                        delta(&sessions[j], "r", &format!("{t}-{i}"))
                    })
                    .collect();
                let logged = tokio::time::timeout(
                    std::time::Duration::from_secs(60),
                    store.append_events(batch),
                )
                .await
                .expect("an append finishes (no deadlock)")
                .unwrap();
                assert_eq!(logged.len(), SESSIONS);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let n = (TASKS * ROUNDS) as u64;
    for sid in &sessions {
        let events = store.read_events(sid, 0, 100_000).await.unwrap();
        assert_eq!(seqs(&events), (1..=n).collect::<Vec<_>>());
        // Each batch's events went in whole: every (task, round) once per session.
        let mut texts: Vec<String> = events.iter().map(|e| text_of(e)).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len() as u64, n);
    }
}

pub async fn the_event_log_group_commits_many_queued_events_in_few_batches(h: &dyn Harness) {
    // Tokens of many sessions queued at once reach the store as a few batches, not one write each.
    let store = h.open().await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(new_session(&*store, "alice").await.id);
    }
    let log = agentd_core::event_log::EventLog::start(Arc::clone(&store));
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
    for (k, id) in ids.iter().enumerate() {
        let events = store.read_events(id, 0, 100).await.unwrap();
        let mut expected: Vec<String> = (0..500)
            .filter(|i| i % 10 == k)
            .map(|i| i.to_string())
            .collect();
        if k == 0 {
            expected.push("last".into());
        }
        assert_eq!(
            seqs(&events),
            (1..=expected.len() as u64).collect::<Vec<_>>()
        );
        assert_eq!(
            events.iter().map(|e| text_of(e)).collect::<Vec<_>>(),
            expected
        );
    }
}

pub async fn reopening_keeps_everything_and_seq_continues(h: &dyn Harness) {
    let (s, run, user, described) = {
        let store = h.open().await;
        let s = new_session(&*store, "alice").await;
        let run = append_run(&*store, &s.id).await;
        let user = message(&s.id, &run.id, Role::User, "remember me");
        let logged = store
            .append_events(vec![message_entry(&user)])
            .await
            .unwrap();
        assert_eq!(logged[0].seq(), 5);
        (s, run, user, store.describe())
    };

    let store = h.open().await;
    assert_eq!(store.describe(), described);
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

pub async fn pruning_keeps_the_latest_runs_and_seq_continues(h: &dyn Harness) {
    let store = h.open().await;
    let s = new_session(&*store, "alice").await;
    let other = new_session(&*store, "alice").await;
    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(append_run(&*store, &s.id).await);
    }
    let other_run = append_run(&*store, &other.id).await;
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
    assert_eq!(
        store.first_seq_of_run(&s.id, "no-such-run").await.unwrap(),
        None
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
    let store = h.open().await;
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
    // An unknown session has an empty log.
    assert_eq!(
        store.log_bounds("missing").await.unwrap(),
        LogBounds::default()
    );
}

/// A run's first seq (what retention and re-attach go by) is the seq of its first event, however the turn's
/// events are grouped into batches: its user message and its start together, its user message alone before
/// its start, its end alone (a run that never started), with other sessions' events in between.
pub async fn a_runs_first_seq_is_its_first_event_whatever_shares_its_batch(h: &dyn Harness) {
    let store = h.open().await;
    let s = new_session(&*store, "alice").await;
    let other = new_session(&*store, "alice").await;
    let begin = |run: &mut Run| {
        run.status = RunStatus::Running;
        run.started_at = Some(now_rfc3339());
    };
    let end = |run: &mut Run| {
        run.status = RunStatus::Completed;
        run.ended_at = Some(now_rfc3339());
    };

    // 1. The user message and the start in one batch, behind another session's token; the answer and the end
    // in one batch later.
    let mut a = Run::queued(&s.id);
    store.create_run(&a, None).await.unwrap();
    begin(&mut a);
    store
        .append_events(vec![
            delta(&other.id, "x", "elsewhere"),
            delta(&s.id, "earlier", "an earlier run's last token"),
            message_entry(&message(&s.id, &a.id, Role::User, "hi")),
            run_started(&a),
        ])
        .await
        .unwrap();
    store
        .append_events(vec![delta(&s.id, &a.id, "tok")])
        .await
        .unwrap();
    end(&mut a);
    store
        .append_events(vec![
            message_entry(&message(&s.id, &a.id, Role::Assistant, "tok")),
            run_finished(&a),
        ])
        .await
        .unwrap();
    assert_eq!(store.first_seq_of_run(&s.id, &a.id).await.unwrap(), Some(2));

    // 2. The user message alone, then the start: the message's seq.
    let mut b = Run::queued(&s.id);
    store.create_run(&b, None).await.unwrap();
    let user = store
        .append_events(vec![message_entry(&message(
            &s.id,
            &b.id,
            Role::User,
            "again",
        ))])
        .await
        .unwrap();
    begin(&mut b);
    store.append_events(vec![run_started(&b)]).await.unwrap();
    end(&mut b);
    store.append_events(vec![run_finished(&b)]).await.unwrap();
    assert_eq!(
        store.first_seq_of_run(&s.id, &b.id).await.unwrap(),
        Some(user[0].seq())
    );

    // 3. A run that never started: its end is its first event, also in a batch with another run's start.
    let mut c = Run::queued(&s.id);
    store.create_run(&c, None).await.unwrap();
    c.status = RunStatus::Cancelled;
    c.ended_at = Some(now_rfc3339());
    let mut d = Run::queued(&s.id);
    store.create_run(&d, None).await.unwrap();
    begin(&mut d);
    let logged = store
        .append_events(vec![run_finished(&c), run_started(&d)])
        .await
        .unwrap();
    assert_eq!(
        store.first_seq_of_run(&s.id, &c.id).await.unwrap(),
        Some(logged[0].seq())
    );
    assert_eq!(
        store.first_seq_of_run(&s.id, &d.id).await.unwrap(),
        Some(logged[1].seq())
    );
}

pub async fn a_failing_batch_fails_alone_and_consumes_no_seq(h: &dyn Harness) {
    let store = h.open().await;
    let s = new_session(&*store, "alice").await;
    let other = new_session(&*store, "alice").await;
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
    // A run whose session is not the event's.
    let mut stray_run = run_started(&Run::queued(&other.id));
    stray_run.event.session_id = s.id.clone();
    let mismatch = store.append_events(vec![stray_run]).await;
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
        .map(|e| text_of(e))
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
    assert!(store.list_runs(&s.id).await.unwrap().is_empty());
    assert_eq!(store.log_bounds(&s.id).await.unwrap().last_seq, 3);
    assert_eq!(store.log_bounds(&other.id).await.unwrap().last_seq, 0);
}

pub async fn many_concurrent_reads_all_get_their_answer(h: &dyn Harness) {
    let store = h.open().await;
    let s = new_session(&*store, "alice").await;
    let batch = (0..20).map(|i| delta(&s.id, "r", &i.to_string())).collect();
    store.append_events(batch).await.unwrap();

    // Far more readers than any pool has connections: they queue and all get the right answer.
    let mut reads = tokio::task::JoinSet::new();
    for after in 0..100u64 {
        let store: Arc<dyn Store> = Arc::clone(&store);
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

pub async fn uploads_are_kept_with_their_bytes(h: &dyn Harness) {
    let (s, a, b, bytes) = {
        let store = h.open().await;
        let s = new_session(&*store, "alice").await;
        let other = new_session(&*store, "bob").await;
        // Every byte value, and more than a page or a packet.
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let a = upload("a.bin", bytes.len());
        let b = Upload {
            content_type: "text/plain".into(),
            ..upload("b.txt", 0)
        };
        store.put_upload(&s.id, &a, &bytes).await.unwrap();
        store.put_upload(&s.id, &b, b"").await.unwrap();
        assert_eq!(
            store.get_upload(&s.id, &a.id).await.unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            store.read_upload(&s.id, &a.id).await.unwrap(),
            Some(bytes.clone())
        );
        assert_eq!(
            store.read_upload(&s.id, &b.id).await.unwrap(),
            Some(Vec::new())
        );
        assert_eq!(
            store.list_uploads(&s.id).await.unwrap(),
            vec![a.clone(), b.clone()],
            "oldest first"
        );
        // Another session's id is not this session's; an unknown id is nothing.
        assert_eq!(store.get_upload(&other.id, &a.id).await.unwrap(), None);
        assert_eq!(store.read_upload(&other.id, &a.id).await.unwrap(), None);
        assert_eq!(store.get_upload(&s.id, "nope").await.unwrap(), None);
        assert!(store.list_uploads(&other.id).await.unwrap().is_empty());
        // The same id, or the same path, twice in a session is a conflict; the same path elsewhere is fine.
        let same_id = Upload {
            path: "c.txt".into(),
            ..a.clone()
        };
        let r = store.put_upload(&s.id, &same_id, b"x").await;
        assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
        let same_path = upload("a.bin", 1);
        let r = store.put_upload(&s.id, &same_path, b"x").await;
        assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
        store.put_upload(&other.id, &same_path, b"x").await.unwrap();
        let r = store.put_upload("missing", &upload("z", 1), b"x").await;
        assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
        (s, a, b, bytes)
    };
    let store = h.open().await;
    assert_eq!(store.list_uploads(&s.id).await.unwrap(), vec![a.clone(), b]);
    assert_eq!(store.read_upload(&s.id, &a.id).await.unwrap(), Some(bytes));
}

/// A session as a copy sees it: rows, runs with their client_message_id, the whole stored log and its bounds.
struct Dump {
    messages: Vec<agentd_core::domain::Message>,
    runs: Vec<StoredRun>,
    events: Vec<Arc<LoggedEvent>>,
    bounds: LogBounds,
    first_seqs: Vec<Option<u64>>,
}

async fn dump(store: &dyn Store, id: &str) -> Dump {
    let runs = store.export_runs(id).await.unwrap();
    let mut first_seqs = Vec::new();
    for r in &runs {
        first_seqs.push(store.first_seq_of_run(id, &r.run.id).await.unwrap());
    }
    Dump {
        messages: store.list_messages(id, None, 0).await.unwrap(),
        runs,
        events: store.read_events(id, 0, 10_000).await.unwrap(),
        bounds: store.log_bounds(id).await.unwrap(),
        first_seqs,
    }
}

/// Imports `d` as session `to` (a copy under another id, so one store can hold both).
async fn import_as(store: &dyn Store, from: &Session, d: &Dump, to: &str, batch: usize) {
    let session = Session {
        id: to.into(),
        ..from.clone()
    };
    let messages: Vec<_> = d
        .messages
        .iter()
        .map(|m| agentd_core::domain::Message {
            session_id: to.into(),
            ..m.clone()
        })
        .collect();
    let runs: Vec<StoredRun> = d
        .runs
        .iter()
        .map(|r| StoredRun {
            run: Run {
                session_id: to.into(),
                ..r.run.clone()
            },
            client_message_id: r.client_message_id.clone(),
        })
        .collect();
    store
        .import_session(&session, &messages, &runs)
        .await
        .unwrap();
    let events: Vec<Arc<LoggedEvent>> = d
        .events
        .iter()
        .map(|e| Arc::new(LoggedEvent::from_json(to.into(), e.json.clone()).unwrap()))
        .collect();
    // The batches as they come, then the last seq (which may lie past the last stored event).
    for part in events.chunks(batch.max(1)) {
        store.import_events(to, part, 0).await.unwrap();
    }
    store
        .import_events(to, &[], d.bounds.last_seq)
        .await
        .unwrap();
}

fn same(a: &Dump, b: &Dump) {
    assert_eq!(a.messages.len(), b.messages.len());
    for (x, y) in a.messages.iter().zip(&b.messages) {
        assert_eq!(
            (&x.id, &x.content, &x.role, &x.created_at),
            (&y.id, &y.content, &y.role, &y.created_at)
        );
        assert_eq!(
            (&x.tool_calls, &x.tool_call_id, &x.images),
            (&y.tool_calls, &y.tool_call_id, &y.images)
        );
    }
    assert_eq!(a.runs.len(), b.runs.len());
    for (x, y) in a.runs.iter().zip(&b.runs) {
        assert_eq!(x.client_message_id, y.client_message_id);
        assert_eq!(
            x.run,
            Run {
                session_id: x.run.session_id.clone(),
                ..y.run.clone()
            }
        );
    }
    assert_eq!(seqs(&a.events), seqs(&b.events));
    for (x, y) in a.events.iter().zip(&b.events) {
        assert_eq!(x.json, y.json, "an imported event is stored as given");
    }
    assert_eq!(a.bounds, b.bounds);
    assert_eq!(a.first_seqs, b.first_seqs);
}

pub async fn an_imported_session_reads_the_same_and_its_seq_continues(h: &dyn Harness) {
    let store = h.open().await;
    // A session with messages, runs (one holding a client_message_id) and a log whose start was pruned.
    let s = new_session(&*store, "alice").await;
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(append_run(&*store, &s.id).await);
    }
    let mut asked = Run::queued(&s.id);
    store.create_run(&asked, Some("client-1")).await.unwrap();
    let user = message(&s.id, &asked.id, Role::User, "hello");
    let mut answer = message(&s.id, &asked.id, Role::Assistant, "calling");
    answer.tool_calls = Some(vec![ToolCall {
        id: "c1".into(),
        name: "calculator".into(),
        arguments: "{\"expression\":\"1+1\"}".into(),
    }]);
    store
        .append_events(vec![message_entry(&user), message_entry(&answer)])
        .await
        .unwrap();
    asked.status = RunStatus::Completed;
    asked.ended_at = Some(now_rfc3339());
    store
        .append_events(vec![run_finished(&asked)])
        .await
        .unwrap();
    store.prune_events(&s.id, 2).await.unwrap();
    let source = dump(&*store, &s.id).await;
    assert_eq!(
        source.bounds,
        LogBounds {
            first_seq: 9,
            last_seq: 15
        }
    );
    assert_eq!(
        source.runs[3].client_message_id.as_deref(),
        Some("client-1")
    );

    // Imported in batches of 3 (the log continues across calls) under another id.
    let copy = agentd_core::domain::new_id();
    import_as(&*store, &s, &source, &copy, 3).await;
    same(&source, &dump(&*store, &copy).await);
    assert_eq!(
        store
            .find_run_by_client_message_id(&copy, "client-1")
            .await
            .unwrap()
            .map(|r| r.id),
        Some(asked.id.clone())
    );
    let got = store.get_session(&copy).await.unwrap().unwrap();
    assert_eq!(
        (got.principal, got.metadata),
        (s.principal.clone(), s.metadata.clone())
    );

    // What does not continue the log, an unknown session, an existing session: refused.
    let renamed: Vec<Arc<LoggedEvent>> = source
        .events
        .iter()
        .map(|e| Arc::new(LoggedEvent::from_json(copy.clone(), e.json.clone()).unwrap()))
        .collect();
    let r = store.import_events(&copy, &renamed[..1], 15).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    let r = store.import_events("missing", &[], 3).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let r = store
        .import_session(&got_session(&*store, &copy).await, &[], &[])
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");

    // Numbering goes on right after the copied last seq, also after a restart.
    let next = store
        .append_events(vec![delta(&copy, &asked.id, "more")])
        .await
        .unwrap();
    assert_eq!(next[0].seq(), 16);
    drop(store);
    let store = h.open().await;
    let reread = dump(&*store, &copy).await;
    assert_eq!(seqs(&reread.events), (9..=16).collect::<Vec<_>>());
    assert_eq!(
        reread.bounds,
        LogBounds {
            first_seq: 9,
            last_seq: 16
        }
    );
    let next = store
        .append_events(vec![delta(&copy, &asked.id, "again")])
        .await
        .unwrap();
    assert_eq!(next[0].seq(), 17);
}

async fn got_session(store: &dyn Store, id: &str) -> Session {
    store.get_session(id).await.unwrap().unwrap()
}

pub async fn an_imported_session_whose_log_was_pruned_away_numbers_on(h: &dyn Harness) {
    let store = h.open().await;
    let s = new_session(&*store, "alice").await;
    append_run(&*store, &s.id).await;
    append_run(&*store, &s.id).await;
    store.prune_events(&s.id, 0).await.unwrap();
    let source = dump(&*store, &s.id).await;
    assert_eq!(
        source.bounds,
        LogBounds {
            first_seq: 0,
            last_seq: 8
        }
    );
    let copy = agentd_core::domain::new_id();
    import_as(&*store, &s, &source, &copy, 100).await;
    same(&source, &dump(&*store, &copy).await);
    let run = Run::queued(&copy);
    store.create_run(&run, None).await.unwrap();
    let next = store
        .append_events(vec![delta(&copy, &run.id, "x")])
        .await
        .unwrap();
    assert_eq!(next[0].seq(), 9);
    // A session with no log at all imports as one.
    let empty = new_session(&*store, "bob").await;
    let copy2 = agentd_core::domain::new_id();
    import_as(&*store, &empty, &dump(&*store, &empty.id).await, &copy2, 10).await;
    assert_eq!(
        store.log_bounds(&copy2).await.unwrap(),
        LogBounds::default()
    );
}

pub async fn aliases_name_a_session_and_survive_reopening(h: &dyn Harness) {
    let (a, b) = {
        let store = h.open().await;
        let a = new_session(&*store, "alice").await;
        let b = new_session(&*store, "alice").await;
        assert_eq!(store.find_alias("chat:k1").await.unwrap(), None);
        store.put_alias("chat:k1", &a.id).await.unwrap();
        store.put_alias("chat:k2", &a.id).await.unwrap();
        assert_eq!(
            store.find_alias("chat:k1").await.unwrap(),
            Some(a.id.clone())
        );
        // A key put again names the newer session.
        store.put_alias("chat:k2", &b.id).await.unwrap();
        assert_eq!(
            store.find_alias("chat:k2").await.unwrap(),
            Some(b.id.clone())
        );
        (a, b)
    };
    let store = h.open().await;
    assert_eq!(store.find_alias("chat:k1").await.unwrap(), Some(a.id));
    assert_eq!(store.find_alias("chat:k2").await.unwrap(), Some(b.id));
    assert_eq!(store.find_alias("chat:k3").await.unwrap(), None);
}
