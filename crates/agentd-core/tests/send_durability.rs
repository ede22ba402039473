//! `Agentd::send` keeps its promises whatever happens around it: a caller that drops the send future mid-way
//! (a closed WebSocket, an HTTP client that hung up) still gets its stored message run, and a send whose message
//! a killed process never stored is stored and run on the client's retry with the same `client_message_id`.
//! And a hello taken right after a run's end is committed never names that run as active. Driven with the
//! scripted provider and the in-memory store (behind a store that can hold a commit).

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentd_core::config::Config;
use agentd_core::domain::{Message, Role, Run, RunStatus, Session, Upload};
use agentd_core::event::{EventKind, LoggedEvent};
use agentd_core::memory::MemoryStore;
use agentd_core::provider::Provider;
use agentd_core::scripted::{Scripted, ScriptedProvider};
use agentd_core::service::{Agentd, Principal, SendMessage};
use agentd_core::store::{HistoryPage, LogBounds, LogEntry, Store, StoreResult, StoredRun};
use async_trait::async_trait;
use tokio::sync::{Notify, Semaphore};

const CONFIG: &str = r#"
[server]
workspace_dir = "WORKSPACE"

[providers.p]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"

[[agents]]
name = "assistant"
provider = "p"
model = "m"
"#;

/// The in-memory store, except that the first commit of a user message can be held: `reached` is notified when
/// it arrives, and it goes on once `release` has a permit.
struct HoldStore {
    inner: MemoryStore,
    armed: AtomicBool,
    reached: Notify,
    release: Semaphore,
    /// The next commit of a user message fails as a database that went away would (nothing stored).
    fail_message: AtomicBool,
    /// The next retention prune (which follows a run's committed end) waits like a held commit.
    hold_prune: AtomicBool,
    /// Calls of `prune_events`.
    prunes: AtomicUsize,
}

impl HoldStore {
    fn new(armed: bool) -> HoldStore {
        HoldStore {
            inner: MemoryStore::default(),
            armed: AtomicBool::new(armed),
            reached: Notify::new(),
            release: Semaphore::new(0),
            fail_message: AtomicBool::new(false),
            hold_prune: AtomicBool::new(false),
            prunes: AtomicUsize::new(0),
        }
    }
}

fn is_user_message(e: &LogEntry) -> bool {
    matches!(&e.event.kind, EventKind::Message { message } if message.role == Role::User)
}

#[async_trait]
impl Store for HoldStore {
    fn describe(&self) -> String {
        "holding memory".into()
    }
    async fn create_session(&self, session: &Session) -> StoreResult<()> {
        self.inner.create_session(session).await
    }
    async fn get_session(&self, id: &str) -> StoreResult<Option<Session>> {
        self.inner.get_session(id).await
    }
    async fn list_sessions(
        &self,
        principal: Option<&str>,
        limit: usize,
        before: Option<&str>,
    ) -> StoreResult<Vec<Session>> {
        self.inner.list_sessions(principal, limit, before).await
    }
    async fn update_session(&self, session: &Session) -> StoreResult<()> {
        self.inner.update_session(session).await
    }
    async fn list_messages(
        &self,
        session_id: &str,
        limit: Option<usize>,
        offset: usize,
    ) -> StoreResult<Vec<Message>> {
        self.inner.list_messages(session_id, limit, offset).await
    }
    async fn history_page(
        &self,
        session_id: &str,
        run_id: &str,
        limit: usize,
        count_runs_to: usize,
    ) -> StoreResult<HistoryPage> {
        self.inner
            .history_page(session_id, run_id, limit, count_runs_to)
            .await
    }
    async fn create_run(&self, run: &Run, client_message_id: Option<&str>) -> StoreResult<()> {
        self.inner.create_run(run, client_message_id).await
    }
    async fn release_client_message_id(&self, session_id: &str, run_id: &str) -> StoreResult<()> {
        self.inner
            .release_client_message_id(session_id, run_id)
            .await
    }
    async fn find_run_by_client_message_id(
        &self,
        session_id: &str,
        client_message_id: &str,
    ) -> StoreResult<Option<Run>> {
        self.inner
            .find_run_by_client_message_id(session_id, client_message_id)
            .await
    }
    async fn get_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<Run>> {
        self.inner.get_run(session_id, run_id).await
    }
    async fn list_runs(&self, session_id: &str) -> StoreResult<Vec<Run>> {
        self.inner.list_runs(session_id).await
    }
    async fn update_run(&self, run: &Run) -> StoreResult<()> {
        self.inner.update_run(run).await
    }
    async fn unfinished_runs(&self, session_id: Option<&str>) -> StoreResult<Vec<Run>> {
        self.inner.unfinished_runs(session_id).await
    }
    async fn append_events(&self, batch: Vec<LogEntry>) -> StoreResult<Vec<Arc<LoggedEvent>>> {
        if batch.iter().any(is_user_message) && self.fail_message.swap(false, Ordering::SeqCst) {
            return Err(agentd_core::store::StoreError::Unavailable(
                "injected: connection refused".into(),
            ));
        }
        if batch.iter().any(is_user_message) && self.armed.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
        self.inner.append_events(batch).await
    }
    async fn read_events(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Arc<LoggedEvent>>> {
        self.inner.read_events(session_id, after, limit).await
    }
    async fn log_bounds(&self, session_id: &str) -> StoreResult<LogBounds> {
        self.inner.log_bounds(session_id).await
    }
    async fn first_seq_of_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<u64>> {
        self.inner.first_seq_of_run(session_id, run_id).await
    }
    async fn prune_events(&self, session_id: &str, keep_runs: usize) -> StoreResult<()> {
        self.prunes.fetch_add(1, Ordering::SeqCst);
        if self.hold_prune.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            self.release.acquire().await.unwrap().forget();
        }
        self.inner.prune_events(session_id, keep_runs).await
    }
    async fn put_upload(&self, session_id: &str, upload: &Upload, bytes: &[u8]) -> StoreResult<()> {
        self.inner.put_upload(session_id, upload, bytes).await
    }
    async fn get_upload(&self, session_id: &str, id: &str) -> StoreResult<Option<Upload>> {
        self.inner.get_upload(session_id, id).await
    }
    async fn read_upload(&self, session_id: &str, id: &str) -> StoreResult<Option<Vec<u8>>> {
        self.inner.read_upload(session_id, id).await
    }
    async fn list_uploads(&self, session_id: &str) -> StoreResult<Vec<Upload>> {
        self.inner.list_uploads(session_id).await
    }
    async fn export_runs(&self, session_id: &str) -> StoreResult<Vec<StoredRun>> {
        self.inner.export_runs(session_id).await
    }
    async fn import_session(
        &self,
        session: &Session,
        messages: &[Message],
        runs: &[StoredRun],
    ) -> StoreResult<()> {
        self.inner.import_session(session, messages, runs).await
    }
    async fn import_events(
        &self,
        session_id: &str,
        events: &[Arc<LoggedEvent>],
        last_seq: u64,
    ) -> StoreResult<()> {
        self.inner.import_events(session_id, events, last_seq).await
    }
}

struct Harness {
    app: Arc<Agentd>,
    store: Arc<HoldStore>,
    _dir: tempfile::TempDir,
}

async fn harness(replies: Vec<Scripted>, hold: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let text = CONFIG.replace("WORKSPACE", &dir.path().display().to_string());
    let config = Arc::new(Config::parse(&text, "test").unwrap());
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    providers.insert("p".into(), Arc::new(ScriptedProvider::new(replies)));
    let store = Arc::new(HoldStore::new(hold));
    let app = Agentd::start(config, store.clone(), providers)
        .await
        .unwrap();
    Harness {
        app,
        store,
        _dir: dir,
    }
}

/// A harness that holds nothing yet, and a session of the assistant.
async fn with_session(replies: Vec<Scripted>) -> (Harness, Session) {
    let h = harness(replies, false).await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    (h, s)
}

fn me() -> Principal {
    Principal::local()
}

fn msg(content: &str, cmid: Option<&str>) -> SendMessage {
    SendMessage {
        content: content.into(),
        client_message_id: cmid.map(String::from),
        ..Default::default()
    }
}

/// The session's runs once every one of them has ended (panics after 10 s: a run was left unfinished).
async fn ended_runs(app: &Agentd, session: &str) -> Vec<Run> {
    let wait = async {
        loop {
            let runs = app.store.list_runs(session).await.unwrap();
            if !runs.is_empty() && runs.iter().all(|r| r.status.is_terminal()) {
                return runs;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), wait).await {
        Ok(runs) => runs,
        Err(_) => panic!(
            "a run never ended: {:?}",
            app.store
                .list_runs(session)
                .await
                .unwrap()
                .iter()
                .map(|r| (r.id.clone(), r.status))
                .collect::<Vec<_>>()
        ),
    }
}

async fn run_finished_count(app: &Agentd, session: &str, run_id: &str) -> usize {
    app.store
        .read_events(session, 0, 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| {
            e.event.run_id == run_id && matches!(e.event.kind, EventKind::RunFinished { .. })
        })
        .count()
}

async fn user_messages(app: &Agentd, session: &str) -> Vec<Message> {
    app.store
        .list_messages(session, None, 0)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.role == Role::User)
        .collect()
}

#[tokio::test]
async fn a_send_dropped_while_its_message_commits_still_runs_to_the_end() {
    let h = harness(vec![Scripted::text(&["fine"])], true).await;
    let s = h
        .app
        .create_session(&me(), "assistant", None, None)
        .await
        .unwrap();
    {
        let p = me();
        let send = h.app.send(&p, &s.id, msg("hi", None));
        tokio::pin!(send);
        tokio::select! {
            r = &mut send => panic!("the send returned while its message was held: ok={}", r.is_ok()),
            _ = h.store.reached.notified() => {}
        }
        // The worst point: the message (with its run row: a send without client_message_id writes both in
        // one commit) is on its way to the store. The caller goes away (its future is dropped here).
    }
    h.store.release.add_permits(1);
    let runs = ended_runs(&h.app, &s.id).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Completed);
    assert_eq!(run_finished_count(&h.app, &s.id, &runs[0].id).await, 1);
    let users = user_messages(&h.app, &s.id).await;
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].run_id.as_deref(), Some(runs[0].id.as_str()));
}

/// What a process killed between the run row and the user message leaves, after the next start's sweep.
async fn orphan(h: &Harness, session: &str, cmid: &str) -> Run {
    let orphan = Run::queued(session);
    h.app.store.create_run(&orphan, Some(cmid)).await.unwrap();
    assert_eq!(h.app.runs.recover_leftovers().await.unwrap(), (0, 1));
    let swept = h
        .app
        .store
        .get_run(session, &orphan.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(swept.status, RunStatus::Interrupted);
    swept
}

#[tokio::test]
async fn a_retry_of_a_send_whose_message_was_never_stored_is_a_new_turn() {
    let (h, s) = with_session(vec![Scripted::text(&["fine"])]).await;
    let orphan = orphan(&h, &s.id, "m-1").await;
    let first = h
        .app
        .send(&me(), &s.id, msg("hi", Some("m-1")))
        .await
        .unwrap();
    assert!(!first.repeated, "the first send was never acknowledged");
    assert_ne!(first.run.id, orphan.id);
    assert_eq!(first.message.as_ref().unwrap().content, "hi");
    let (run, reply) = Agentd::wait(first.done).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(reply.unwrap().content, "fine");
    // Now it is stored, a repeat is a repeat.
    let again = h
        .app
        .send(&me(), &s.id, msg("hi", Some("m-1")))
        .await
        .unwrap();
    assert!(again.repeated);
    assert_eq!(again.run.id, run.id);
    assert_eq!(again.message.unwrap().content, "hi");
    let users = user_messages(&h.app, &s.id).await;
    assert_eq!(users.len(), 1, "stored once");
    assert_eq!(users[0].run_id.as_deref(), Some(run.id.as_str()));
    // The orphan keeps its one run_finished (from the sweep); the new run has its own.
    assert_eq!(run_finished_count(&h.app, &s.id, &orphan.id).await, 1);
    assert_eq!(run_finished_count(&h.app, &s.id, &run.id).await, 1);
    let runs = ended_runs(&h.app, &s.id).await;
    assert_eq!(runs.len(), 2);
}

#[tokio::test]
async fn two_concurrent_retries_after_an_orphan_store_one_message() {
    let (h, s) = with_session(vec![Scripted::text(&["fine"])]).await;
    let orphan = orphan(&h, &s.id, "m-1").await;
    let p = me();
    let (a, b) = tokio::join!(
        h.app.send(&p, &s.id, msg("hi", Some("m-1"))),
        h.app.send(&p, &s.id, msg("hi", Some("m-1"))),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.run.id, b.run.id, "both answered with the one new run");
    assert_ne!(a.run.id, orphan.id);
    assert_eq!(
        [a.repeated, b.repeated].iter().filter(|r| !**r).count(),
        1,
        "one send stored it, the other repeated it"
    );
    let runs = ended_runs(&h.app, &s.id).await;
    assert_eq!(runs.len(), 2, "the orphan and one new run");
    let users = user_messages(&h.app, &s.id).await;
    assert_eq!(users.len(), 1, "stored once");
    assert_eq!(users[0].run_id.as_deref(), Some(a.run.id.as_str()));
}

/// The database goes away between a send's run row and its message: the send answers `Unavailable` (503),
/// the run whose message was lost is ended (`failed`, one `run_finished`) rather than left queued, and the
/// client's retry with the same `client_message_id` is a new turn.
#[tokio::test]
async fn a_send_whose_message_cannot_be_stored_ends_its_run_and_its_retry_is_a_new_turn() {
    let (h, s) = with_session(vec![Scripted::text(&["fine"])]).await;
    h.store.fail_message.store(true, Ordering::SeqCst);
    let refused = h.app.send(&me(), &s.id, msg("hi", Some("m-1"))).await;
    assert!(
        matches!(
            refused,
            Err(agentd_core::service::ServiceError::Unavailable(_))
        ),
        "{:?}",
        refused.err()
    );
    let runs = ended_runs(&h.app, &s.id).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Failed);
    assert_eq!(run_finished_count(&h.app, &s.id, &runs[0].id).await, 1);

    let retry = h
        .app
        .send(&me(), &s.id, msg("hi", Some("m-1")))
        .await
        .unwrap();
    assert!(!retry.repeated, "the first send was never acknowledged");
    assert_ne!(retry.run.id, runs[0].id);
    let (run, reply) = Agentd::wait(retry.done).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(reply.unwrap().content, "fine");
    assert_eq!(user_messages(&h.app, &s.id).await.len(), 1);
}

/// A client attaching right after a run's end is committed (here: while the retention prune that follows it
/// is held; the session's 21st run, so that there is something to prune past the 20 the log keeps) is not
/// told the run is active: its hello's `last_seq` already covers the `run_finished`.
#[tokio::test]
async fn a_hello_after_a_runs_end_is_committed_names_no_active_run() {
    let (h, s) = with_session((0..21).map(|_| Scripted::text(&["done"])).collect()).await;
    turns(&h, &s, 20).await;
    h.store.hold_prune.store(true, Ordering::SeqCst);
    let acc = h.app.send(&me(), &s.id, msg("hi", None)).await.unwrap();
    let run_id = acc.run.id.clone();
    tokio::time::timeout(Duration::from_secs(5), h.store.reached.notified())
        .await
        .expect("the run's end was never committed");
    assert_eq!(run_finished_count(&h.app, &s.id, &run_id).await, 1);
    let attached = h.app.attach(&me(), &s.id, Some(0)).await.unwrap();
    let end = h
        .app
        .store
        .read_events(&s.id, 0, 10_000)
        .await
        .unwrap()
        .iter()
        .find(|e| e.event.run_id == run_id && matches!(e.event.kind, EventKind::RunFinished { .. }))
        .map(|e| e.seq())
        .unwrap();
    assert!(attached.last_seq >= end);
    assert_eq!(attached.active_run_id, None);
    h.store.release.add_permits(1);
    let (run, _) = Agentd::wait(acc.done).await.unwrap();
    assert_eq!(run.status, RunStatus::Completed);
}

/// `n` turns, one after the other, each waited for.
async fn turns(h: &Harness, s: &Session, n: usize) {
    for i in 0..n {
        let acc = h
            .app
            .send(&me(), &s.id, msg(&format!("turn {i}"), None))
            .await
            .unwrap();
        Agentd::wait(acc.done).await.unwrap();
    }
}

/// Pruning follows a run's end only when the session has more runs than the log keeps (20, the least
/// `server.event_retention_runs` can be): a statement per run saved for every session still within
/// retention, and the log still pruned once past it.
#[tokio::test]
async fn the_log_is_pruned_only_once_a_session_has_more_runs_than_it_keeps() {
    let (h, s) = with_session((0..22).map(|_| Scripted::text(&["ok"])).collect()).await;
    turns(&h, &s, 20).await;
    assert_eq!(h.store.prunes.load(Ordering::SeqCst), 0);
    assert_eq!(h.app.store.log_bounds(&s.id).await.unwrap().first_seq, 1);
    turns(&h, &s, 1).await;
    assert_eq!(h.store.prunes.load(Ordering::SeqCst), 1);
    let first_kept = h.app.store.log_bounds(&s.id).await.unwrap().first_seq;
    assert!(first_kept > 1, "the first run's events were pruned");
    turns(&h, &s, 1).await;
    assert_eq!(h.store.prunes.load(Ordering::SeqCst), 2);
    assert!(h.app.store.log_bounds(&s.id).await.unwrap().first_seq > first_kept);
}
