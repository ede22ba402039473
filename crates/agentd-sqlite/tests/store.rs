//! The SQLite store's own insides, against real database files in temporary directories: its URLs, its
//! counters, the log's tail file and its ingestion into chunked rows, crash replay, locking, migrations, corrupt
//! rows, thread priorities and where reads run. What every store promises (sessions, messages, runs,
//! numbering, pruning, reopening) is the contract suite in `tests/contract.rs` (crate `agentd-store-contract`).

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use agentd_core::domain::{new_id, now_rfc3339, Run, RunStatus, Session, SessionStatus};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_append_call_is_one_commit_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let s = new_session(&store, "alice").await;
    let other = new_session(&store, "alice").await;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let store = Arc::clone(&store);
        let (a, b) = (s.id.clone(), other.id.clone());
        tasks.spawn(async move {
            for i in 0..10 {
                let mut batch = vec![delta(&a, "r", &format!("{t}-{i}"))];
                if i % 2 == 0 {
                    batch.push(delta(&b, "r", &format!("{t}-{i}")));
                }
                store.append_events(batch).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.append_calls, 80);
    assert_eq!(stats.appended_events, 80 + 40);
    // Each call is one durable write (group commit happens above the store, in the event log).
    assert_eq!(stats.append_commits, 80);

    // The event log hands the store one call per batch.
    let log = agentd_core::event_log::EventLog::start(store.clone());
    for i in 0..200 {
        log.append(delta(&s.id, "r", &i.to_string()).event, None)
            .await
            .unwrap();
    }
    log.append_durable(delta(&s.id, "r", "last").event, None)
        .await
        .unwrap();
    assert_eq!(store.stats().append_calls, 80 + log.stats().batches);
}

#[tokio::test]
async fn urls_name_the_file_and_describe_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data/agentd.db");
    let store = SqliteStore::open_url(&format!("sqlite://{}", path.display())).unwrap();
    assert_eq!(store.describe(), format!("sqlite:{}", path.display()));
    assert_eq!(store.path(), path);
    assert!(path.exists());
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
    let mut appended = Vec::new();
    for i in 0..10 {
        appended.extend(
            store
                .append_events(vec![delta(&s.id, "r", &format!("{i} \"q\"\n"))])
                .await
                .unwrap(),
        );
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
    // Stored compact (the first event whole, the other deltas as their text), about a fifth of the JSON ...
    let payload: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT payload FROM events WHERE session_id = ?1",
            [&s.id],
            |r| r.get(0),
        )
        .unwrap();
    let lines: Vec<&str> = payload.lines().collect();
    assert_eq!(lines[0], appended[0].json);
    assert_eq!(lines[9], r#"t"9 \"q\"\n""#);
    let full: usize = appended.iter().map(|e| e.json.len() + 1).sum();
    assert!(
        payload.len() * 3 < full,
        "{} of {full} bytes",
        payload.len()
    );
    // ... and read back as the very JSON that was appended.
    let back = store.read_events(&s.id, 0, 100).await.unwrap();
    assert_eq!(
        back.iter().map(|e| e.json.as_str()).collect::<Vec<_>>(),
        appended.iter().map(|e| e.json.as_str()).collect::<Vec<_>>()
    );
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

/// A database of schema version 3 (before uploads were stored) opens with its sessions, and takes uploads.
#[tokio::test]
async fn a_version_3_database_gains_the_uploads_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.db");
    let raw = rusqlite::Connection::open(&path).unwrap();
    for sql in [
        include_str!("../src/migrations/0001_init.sql"),
        include_str!("../src/migrations/0002_lean_events.sql"),
        include_str!("../src/migrations/0003_event_chunks.sql"),
    ] {
        raw.execute_batch(sql).unwrap();
    }
    raw.pragma_update(None, "user_version", 3).unwrap();
    raw.execute(
        "INSERT INTO sessions (id, principal, agent, status, metadata, created_at, updated_at)
         VALUES ('s1', 'alice', 'assistant', 'active', '{}', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
        [],
    )
    .unwrap();
    drop(raw);

    let store = SqliteStore::open(&path).unwrap();
    assert!(store.get_session("s1").await.unwrap().is_some());
    assert!(store.list_uploads("s1").await.unwrap().is_empty());
    let up = agentd_store_contract::upload("a.txt", 2);
    store.put_upload("s1", &up, b"hi").await.unwrap();
    assert_eq!(store.get_upload("s1", &up.id).await.unwrap(), Some(up));
}

/// On a current-thread runtime (agentd pinned to one CPU) a point lookup runs on the calling task instead of
/// hopping to the blocking pool: here the pool's only thread is held by another task, and the lookups still
/// answer. A read that grows with the session (its messages) does go to the pool, so it waits for that thread:
/// which also shows the pool really was held.
#[test]
fn point_lookups_do_not_wait_for_the_blocking_pool_on_a_current_thread_runtime() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .unwrap();
    rt.block_on(async {
        let store = open(dir.path());
        let s = new_session(&store, "alice").await;
        let run = Run::queued(&s.id);
        store.create_run(&run, Some("cm-1")).await.unwrap();

        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let blocker = tokio::task::spawn_blocking(move || {
            let _ = started.send(());
            let _ = held.recv();
        });
        running.await.unwrap();

        let limit = Duration::from_secs(2);
        let session = tokio::time::timeout(limit, store.get_session(&s.id)).await;
        let got_run = tokio::time::timeout(limit, store.get_run(&s.id, &run.id)).await;
        let by_client_id =
            tokio::time::timeout(limit, store.find_run_by_client_message_id(&s.id, "cm-1")).await;
        let bounds = tokio::time::timeout(limit, store.log_bounds(&s.id)).await;
        let messages = tokio::time::timeout(
            Duration::from_millis(300),
            store.list_messages(&s.id, None, 0),
        )
        .await;
        release.send(()).unwrap();
        blocker.await.unwrap();

        let session = session
            .expect("get_session waited for the blocking pool")
            .unwrap();
        assert_eq!(session.map(|x| x.id), Some(s.id.clone()));
        let got_run = got_run
            .expect("get_run waited for the blocking pool")
            .unwrap();
        assert_eq!(got_run.map(|r| r.id), Some(run.id.clone()));
        let by_client_id = by_client_id
            .expect("find_run_by_client_message_id waited for the blocking pool")
            .unwrap();
        assert_eq!(by_client_id.map(|r| r.id), Some(run.id.clone()));
        let bounds = bounds
            .expect("log_bounds waited for the blocking pool")
            .unwrap();
        assert_eq!(bounds, LogBounds::default());
        assert!(
            messages.is_err(),
            "list_messages answered while the pool's only thread was held: the pool was not held"
        );
        assert!(store
            .list_messages(&s.id, None, 0)
            .await
            .unwrap()
            .is_empty());
    });
}
