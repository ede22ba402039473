//! The event log's appender against a store whose row-changing commits can be held open or made to fail: a
//! session's turn starting or ending (a message or run row to store) must never hold up other sessions'
//! tokens, and must keep its own session's events in order and gap-free.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentd_core::domain::{Message, Run, Session, Upload};
use agentd_core::event::{EventKind, LoggedEvent, NewEvent};
use agentd_core::event_log::{EventLog, LogError, Subscription};
use agentd_core::memory::MemoryStore;
use agentd_core::store::{
    HistoryPage, LogBounds, LogEntry, Store, StoreError, StoreResult, StoredRun,
};
use async_trait::async_trait;
use tokio::sync::Semaphore;

/// A [`MemoryStore`] whose calls carrying a row change wait for a permit of `gate` first (and fail instead
/// when `fail_next_row_call` is set). Token-only calls go straight through.
struct GatedStore {
    inner: MemoryStore,
    gate: Semaphore,
    fail_next_row_call: AtomicBool,
    /// Row-changing calls that have started waiting at the gate.
    row_calls: AtomicUsize,
    /// Every call fails as a database that cannot be reached would (`StoreError::Unavailable`).
    unavailable: AtomicBool,
    /// What [`Store::commit_gather`] answers.
    gather: Duration,
    /// Calls of `read_events`.
    reads: AtomicUsize,
}

impl GatedStore {
    /// A store holding the sessions `ids` (a store refuses events of a session it does not have).
    async fn new(ids: &[&str]) -> Arc<GatedStore> {
        let inner = MemoryStore::default();
        for id in ids {
            let now = agentd_core::domain::now_rfc3339();
            let session = Session {
                id: id.to_string(),
                agent: "assistant".into(),
                title: None,
                status: agentd_core::domain::SessionStatus::Active,
                metadata: serde_json::json!({}),
                created_at: now.clone(),
                updated_at: now,
                active_run_id: None,
                principal: "local".into(),
            };
            inner.create_session(&session).await.expect("a new session");
        }
        Arc::new(GatedStore {
            inner,
            gate: Semaphore::new(0),
            fail_next_row_call: AtomicBool::new(false),
            row_calls: AtomicUsize::new(0),
            unavailable: AtomicBool::new(false),
            gather: Duration::ZERO,
            reads: AtomicUsize::new(0),
        })
    }

    /// The same, with a gather interval.
    async fn gathering(ids: &[&str], gather: Duration) -> Arc<GatedStore> {
        let mut store = Arc::into_inner(Self::new(ids).await).expect("the only handle");
        store.gather = gather;
        Arc::new(store)
    }
}

#[async_trait]
impl Store for GatedStore {
    fn describe(&self) -> String {
        "gated memory".into()
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
    fn commit_gather(&self) -> Duration {
        self.gather
    }
    async fn append_events(&self, batch: Vec<LogEntry>) -> StoreResult<Vec<Arc<LoggedEvent>>> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "injected: connection refused".into(),
            ));
        }
        if batch.iter().any(LogEntry::changes_rows) {
            self.row_calls.fetch_add(1, Ordering::SeqCst);
            let permit = self
                .gate
                .acquire()
                .await
                .map_err(|_| StoreError::Other("gate closed".into()))?;
            permit.forget();
            if self.fail_next_row_call.swap(false, Ordering::SeqCst) {
                return Err(StoreError::Other("injected commit failure".into()));
            }
        }
        self.inner.append_events(batch).await
    }
    async fn read_events(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Arc<LoggedEvent>>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_events(session_id, after, limit).await
    }
    async fn log_bounds(&self, session_id: &str) -> StoreResult<LogBounds> {
        self.inner.log_bounds(session_id).await
    }
    async fn first_seq_of_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<u64>> {
        self.inner.first_seq_of_run(session_id, run_id).await
    }
    async fn prune_events(&self, session_id: &str, keep_runs: usize) -> StoreResult<()> {
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

fn event(session_id: &str, kind: EventKind) -> NewEvent {
    NewEvent {
        session_id: session_id.into(),
        run_id: "r".into(),
        agent: "assistant".into(),
        is_subagent: false,
        kind,
    }
}

fn token(session_id: &str, text: &str) -> NewEvent {
    event(session_id, EventKind::TextDelta { delta: text.into() })
}

/// A run change, as a turn's start appends it.
fn started(session_id: &str) -> (NewEvent, Option<Run>) {
    let run = Run::queued(session_id);
    (
        event(session_id, EventKind::RunStarted { run: run.clone() }),
        Some(run),
    )
}

/// What an event is, for comparing streams: its seq and its text or type.
fn describe(ev: &LoggedEvent) -> (u64, String) {
    let what = match &ev.event.kind {
        EventKind::TextDelta { delta } => delta.clone(),
        other => other.type_name().to_string(),
    };
    (ev.seq(), what)
}

async fn next(sub: &mut Subscription) -> (u64, String) {
    let ev = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("an event within 5 s")
        .expect("log readable")
        .expect("log open");
    describe(&ev)
}

/// Appends a turn's start (a run change) durably on a task of its own; the handle yields the commit's result.
fn start_turn_in_background(
    log: &Arc<EventLog>,
    session_id: &str,
) -> tokio::task::JoinHandle<Result<Arc<LoggedEvent>, agentd_core::event_log::LogError>> {
    let (ev, run) = started(session_id);
    let log = Arc::clone(log);
    tokio::spawn(async move { log.append_durable(ev, run).await })
}

/// Waits until the store has seen `n` row-changing calls arrive at its gate.
async fn row_calls_reach(store: &GatedStore, n: usize) {
    for _ in 0..500 {
        if store.row_calls.load(Ordering::SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no row-changing call reached the store");
}

#[tokio::test]
async fn a_pending_row_change_holds_up_only_its_own_session() {
    let store = GatedStore::new(&["a", "b"]).await;
    let log = EventLog::start(store.clone());
    let mut sub_a = log.subscribe("a", 0);
    let mut sub_b = log.subscribe("b", 0);

    // Session a's turn starts: its run row commit is held open by the store.
    let durable = start_turn_in_background(&log, "a");
    row_calls_reach(&store, 1).await;
    // Meanwhile a streams on, and so does b.
    log.append(token("a", "a1"), None).await.unwrap();
    for i in 0..50 {
        log.append(token("b", &format!("b{i}")), None)
            .await
            .unwrap();
    }

    // b's tokens are all committed and delivered while a's commit is still out.
    for i in 0..50 {
        assert_eq!(next(&mut sub_b).await, (i + 1, format!("b{i}")));
    }
    assert!(!durable.is_finished(), "a's commit is still held");
    // a has delivered nothing yet: its token waits behind its run change.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), sub_a.next())
            .await
            .is_err(),
        "nothing of a may be delivered before its run change is committed"
    );

    store.gate.add_permits(1);
    let committed = durable.await.unwrap().unwrap();
    assert_eq!(committed.seq(), 1);
    assert_eq!(next(&mut sub_a).await, (1, "run_started".to_string()));
    assert_eq!(next(&mut sub_a).await, (2, "a1".to_string()));
}

#[tokio::test]
async fn a_failed_row_change_leaves_no_gap_and_frees_its_session() {
    let store = GatedStore::new(&["a"]).await;
    let log = EventLog::start(store.clone());
    let mut sub = log.subscribe("a", 0);

    log.append(token("a", "t1"), None).await.unwrap();
    assert_eq!(next(&mut sub).await, (1, "t1".to_string()));

    store.fail_next_row_call.store(true, Ordering::SeqCst);
    let failing = start_turn_in_background(&log, "a");
    row_calls_reach(&store, 1).await;
    // Queued behind the failing call.
    log.append(token("a", "t2"), None).await.unwrap();
    store.gate.add_permits(1);
    assert!(
        failing.await.unwrap().is_err(),
        "the producer hears of the failure"
    );

    // The token behind it goes on with the next seq: the failed event took none.
    assert_eq!(next(&mut sub).await, (2, "t2".to_string()));
    // And the session can change rows again.
    store.gate.add_permits(1);
    let (ev, run) = started("a");
    assert_eq!(log.append_durable(ev, run).await.unwrap().seq(), 3);
    assert_eq!(next(&mut sub).await, (3, "run_started".to_string()));
}

/// A store that gave up on a batch (the database stayed away past its grace): a producer waiting for its
/// commit hears `Unavailable`; a run whose queued tokens were lost cannot go on appending as if nothing
/// happened (its next `append` fails, so the turn ends), but its `run_finished` is still recorded once the
/// store takes writes again, and the log has no gap.
#[tokio::test]
async fn a_batch_the_store_gave_up_on_breaks_its_run_and_fails_its_waiters_as_unavailable() {
    let store = GatedStore::new(&["a"]).await;
    let log = EventLog::start(store.clone());
    let mut sub = log.subscribe("a", 0);
    log.append(token("a", "t1"), None).await.unwrap();
    assert_eq!(next(&mut sub).await, (1, "t1".to_string()));

    store.unavailable.store(true, Ordering::SeqCst);
    let durable = log.append_durable(token("a", "acked"), None).await;
    assert!(
        matches!(durable, Err(LogError::Unavailable(_))),
        "{durable:?}"
    );
    // A token nobody waits for is lost with its batch: its run is broken from then on.
    log.append(token("a", "lost"), None).await.unwrap();
    let mut broken = false;
    for _ in 0..200 {
        if matches!(
            log.append(token("a", "after"), None).await,
            Err(LogError::Broken)
        ) {
            broken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        broken,
        "the run that lost a token is refused further tokens"
    );

    // The database is back: the run's end is recorded, right after what was committed, and the run is
    // forgotten.
    store.unavailable.store(false, Ordering::SeqCst);
    store.gate.add_permits(1);
    let run = Run::queued("a");
    let finished = event(
        "a",
        EventKind::RunFinished {
            run: run.clone(),
            content: String::new(),
            context_tokens: 0,
            max_context_tokens: 0,
        },
    );
    let ended = log.append_durable(finished, Some(run)).await.unwrap();
    let mut seen = vec![next(&mut sub).await];
    while seen.last().map(|(_, w)| w.as_str()) != Some("run_finished") {
        seen.push(next(&mut sub).await);
    }
    let last = seen.last().unwrap().0;
    assert_eq!(ended.seq(), last);
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (2..=last).collect::<Vec<_>>(), "gap-free: {seen:?}");
    assert!(
        seen.iter().all(|(_, w)| w != "lost" && w != "acked"),
        "{seen:?}"
    );
    log.append(token("a", "next run"), None).await.unwrap();
}

#[tokio::test]
async fn many_sessions_mixing_row_changes_and_tokens_keep_each_stream_in_order() {
    const SESSIONS: usize = 8;
    const EVENTS: usize = 200;
    let ids: Vec<String> = (0..SESSIONS).map(|i| format!("s{i}")).collect();
    let store = GatedStore::new(&ids.iter().map(String::as_str).collect::<Vec<_>>()).await;
    // Enough permits for every row change; they still take a detour through their own task.
    store.gate.add_permits(SESSIONS * EVENTS);
    let log = EventLog::start(store.clone());
    let mut subs: Vec<Subscription> = ids.iter().map(|id| log.subscribe(id, 0)).collect();

    let mut producers = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let log = Arc::clone(&log);
        producers.spawn(async move {
            let mut sent = Vec::with_capacity(EVENTS);
            for i in 0..EVENTS {
                if i % 17 == 0 {
                    let (ev, run) = started(&id);
                    log.append(ev, run).await.unwrap();
                    sent.push("run_started".to_string());
                } else {
                    let text = format!("{id}-{i}");
                    log.append(token(&id, &text), None).await.unwrap();
                    sent.push(text);
                }
                if i % 5 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            (id, sent)
        });
    }
    let mut sent_by_session = std::collections::HashMap::new();
    while let Some(done) = producers.join_next().await {
        let (id, sent) = done.unwrap();
        sent_by_session.insert(id, sent);
    }
    for (id, sub) in ids.iter().zip(subs.iter_mut()) {
        let sent = &sent_by_session[id];
        for (i, what) in sent.iter().enumerate() {
            assert_eq!(
                next(sub).await,
                (i as u64 + 1, what.clone()),
                "session {id}: seq 1..N in the order produced"
            );
        }
    }
}

/// Tokens appended one every 10 ms, then one durably: how many batches they took and how long the durable
/// one waited.
async fn trickle(log: &Arc<EventLog>, session_id: &str, n: usize) -> (u64, Duration) {
    let before = log.stats().batches;
    for i in 0..n {
        log.append(token(session_id, &format!("t{i}")), None)
            .await
            .expect("appended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = std::time::Instant::now();
    log.append_durable(token(session_id, "last"), None)
        .await
        .expect("committed");
    (log.stats().batches - before, t.elapsed())
}

#[tokio::test]
async fn a_store_with_a_gather_interval_gets_a_steady_flow_in_groups_and_a_lone_event_at_once() {
    let gather = Duration::from_millis(600);
    let store = GatedStore::gathering(&["s"], gather).await;
    let log = EventLog::start(store.clone());
    let mut sub = log.subscribe("s", 0);

    // After a quiet spell an event goes at once, not after the interval.
    let t = std::time::Instant::now();
    let first = log.append_durable(token("s", "first"), None).await.unwrap();
    assert_eq!(first.seq(), 1);
    assert!(
        t.elapsed() < gather / 2,
        "a lone event was held {:?}",
        t.elapsed()
    );

    // Twenty tokens 10 ms apart (200 ms, inside one interval) and a durable one: one batch for all of them,
    // which waits for the interval that began with the first event's commit.
    let (batches, waited) = trickle(&log, "s", 20).await;
    assert_eq!(batches, 1, "the flow inside one interval is one commit");
    assert!(
        waited >= Duration::from_millis(200),
        "the durable event waited out the interval ({waited:?})"
    );
    // Every event, once and in order.
    assert_eq!(next(&mut sub).await, (1, "first".to_string()));
    for i in 0..20 {
        assert_eq!(next(&mut sub).await, (i + 2, format!("t{i}")));
    }
    assert_eq!(next(&mut sub).await, (22, "last".to_string()));
}

#[tokio::test]
async fn a_store_without_a_gather_interval_commits_each_trickled_event_at_once() {
    let store = GatedStore::new(&["s"]).await;
    let log = EventLog::start(store.clone());
    let (batches, waited) = trickle(&log, "s", 20).await;
    // 10 ms apart, each event finds the appender idle: a batch of its own (a few may share one on a slow
    // machine), and nothing waits for a timer.
    assert!(
        batches >= 15,
        "only {batches} batches for 21 trickled events"
    );
    assert!(waited < Duration::from_millis(300), "waited {waited:?}");
}

#[tokio::test]
async fn a_subscriber_at_the_end_of_the_log_gets_what_follows_live_without_reading_the_store() {
    let store = GatedStore::new(&["s"]).await;
    let log = EventLog::start(store.clone());
    for t in ["a", "b"] {
        log.append_durable(token("s", t), None).await.unwrap();
    }
    // As an attach does it: listen, then read where the log ends. An event committed after that read but
    // before the subscription is made (the window a store read used to close) still arrives.
    let listener = log.listen("s");
    let bounds = store.log_bounds("s").await.unwrap();
    assert_eq!(bounds.last_seq, 2);
    log.append_durable(token("s", "c"), None).await.unwrap();
    let mut sub = listener.at_end(bounds.last_seq);
    log.append_durable(token("s", "d"), None).await.unwrap();
    assert_eq!(next(&mut sub).await, (3, "c".to_string()));
    assert_eq!(next(&mut sub).await, (4, "d".to_string()));
    assert_eq!(store.reads.load(Ordering::SeqCst), 0, "the store was read");

    // From an earlier point the store is read, then the rest comes live, each event once.
    let mut older = log.listen("s").after(1);
    assert_eq!(next(&mut older).await, (2, "b".to_string()));
    assert_eq!(next(&mut older).await, (3, "c".to_string()));
    assert_eq!(next(&mut older).await, (4, "d".to_string()));
    assert!(store.reads.load(Ordering::SeqCst) >= 1);
    log.append_durable(token("s", "e"), None).await.unwrap();
    assert_eq!(next(&mut older).await, (5, "e".to_string()));
    assert_eq!(next(&mut sub).await, (5, "e".to_string()));
}

/// A turn's answer and its end are one commit: the pair reaches the store in one call (the gate lets one
/// row-changing call through, and both entries are committed by it, numbered consecutively), also when it
/// queues behind its session's outstanding call, and never split by another session's tokens.
#[tokio::test]
async fn a_pair_of_entries_is_committed_in_one_call() {
    let store = GatedStore::new(&["a", "b"]).await;
    let log = EventLog::start(store.clone());
    let mut sub = log.subscribe("a", 0);
    let answer = |session: &str| {
        let m = Message {
            id: agentd_core::domain::new_id(),
            session_id: session.into(),
            run_id: Some("r".into()),
            role: agentd_core::domain::Role::Assistant,
            content: "the answer".into(),
            tool_calls: None,
            tool_call_id: None,
            agent: Some("assistant".into()),
            images: Vec::new(),
            created_at: agentd_core::domain::now_rfc3339(),
        };
        LogEntry {
            event: event(session, EventKind::Message { message: m }),
            run: None,
        }
    };
    let finished = |session: &str| {
        let (ev, run) = started(session);
        LogEntry { event: ev, run }
    };

    // Alone: one permit, one call, both committed.
    let pair = {
        let log = log.clone();
        let (first, second) = (answer("a"), finished("a"));
        tokio::spawn(async move { log.append_durable_pair(first, second).await })
    };
    row_calls_reach(&store, 1).await;
    store.gate.add_permits(1);
    let second = tokio::time::timeout(Duration::from_secs(5), pair)
        .await
        .expect("the pair is committed by the one call the gate let through")
        .unwrap()
        .unwrap();
    assert_eq!(second.seq(), 2, "the second entry follows the first");
    assert_eq!(next(&mut sub).await, (1, "message".to_string()));
    assert_eq!(next(&mut sub).await, (2, "run_started".to_string()));

    // Behind the session's outstanding call, with another session's tokens flowing: still one call.
    let held = start_turn_in_background(&log, "a");
    row_calls_reach(&store, 2).await;
    let pair = {
        let log = log.clone();
        let (first, second) = (answer("a"), finished("a"));
        tokio::spawn(async move { log.append_durable_pair(first, second).await })
    };
    for i in 0..20 {
        log.append(token("b", &format!("b{i}")), None)
            .await
            .unwrap();
    }
    store.gate.add_permits(1);
    assert_eq!(held.await.unwrap().unwrap().seq(), 3);
    row_calls_reach(&store, 3).await;
    store.gate.add_permits(1);
    let second = tokio::time::timeout(Duration::from_secs(5), pair)
        .await
        .expect("the queued pair is committed by one more call")
        .unwrap()
        .unwrap();
    assert_eq!(second.seq(), 5);
    assert_eq!(store.row_calls.load(Ordering::SeqCst), 3);

    // Entries of two sessions are refused as a pair, and nothing of them is stored.
    let err = log
        .append_durable_pair(answer("a"), finished("b"))
        .await
        .expect_err("a pair spans one session");
    assert!(matches!(err, LogError::Write(_)), "{err:?}");
    assert_eq!(
        store.inner.log_bounds("a").await.unwrap().last_seq,
        5,
        "nothing of a refused pair is stored"
    );
}
