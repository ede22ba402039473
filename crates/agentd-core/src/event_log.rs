//! The per-session event log: append with group commit, then fan out to live subscribers.
//!
//! Path of one event: a producer (a run) sends it into a bounded channel; one appender task takes everything
//! waiting (from all sessions) and hands it to [`Store::append_events`] as one batch, which assigns each
//! event its `seq`; only after the commit does the appender publish the events to the session's broadcast. So
//! an event is durable before any client sees it, with one store write per batch, not per token. Events that
//! change rows (messages, runs) are committed beside the token stream, never in front of it (see `appender`).
//!
//! Subscribers ([`Subscription`]) first subscribe to the broadcast, then read the log from their cursor, then
//! go live, dropping what they already had by `seq`. A subscriber that falls behind the bounded broadcast
//! (`Lagged`) reads the missed part from the store: the log is the truth, the broadcast only an optimisation.
//! Nothing here grows with a slow client.
//!
//! Multi-node later: the broadcast becomes a bus (NATS / Postgres LISTEN) behind [`Fanout`]'s two methods.
//!
//! **When the store cannot be reached** (a database that went away): a store keeps trying a batch itself for a
//! bounded time (PostgreSQL: 60 s, finding out first whether a commit whose connection was lost went through,
//! so a retry never duplicates). Meanwhile the appender waits for that call: nothing is published, later
//! events queue up behind it, and once the bounded queue is full the producers wait in `append` too. So a turn
//! in flight during a short outage pauses and then goes on, its log complete and gap-free; nothing a producer
//! was told is queued is dropped while the store may still take it. If the store gives up (the outage outlasted
//! its grace), the batch is lost: producers waiting for an acknowledgement get the error
//! ([`LogError::Unavailable`] when the store says the database is unreachable, so surfaces answer 503), and the
//! runs whose un-acknowledged events (tokens) were in it are marked *broken*: their next `append` fails with
//! [`LogError::Broken`], which ends the turn `failed` with that reason, and its `run_finished` (a durable
//! append, allowed for a broken run) records it once the store takes writes again. Their log then has no gap in
//! `seq` (numbers are given in the commit) but lacks the lost tokens; the run's stored messages and final
//! answer are complete. If the store is still down when the `run_finished` is written, that fails too (logged),
//! and the run stays `running` in the store until the next start-up's sweep marks it interrupted.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures_util::{FutureExt, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::event::{LoggedEvent, NewEvent};
use crate::metrics::Metrics;
use crate::store::{LogEntry, Store, StoreError};

/// Events waiting for the appender at most; producers wait (backpressure) beyond it.
const APPEND_QUEUE: usize = 8192;
/// The most events committed in one transaction.
const MAX_BATCH: usize = 4096;
/// Events waiting behind their session's outstanding row change at most; the appender stops taking new ones
/// beyond it (backpressure through [`APPEND_QUEUE`]).
const MAX_HELD: usize = 4096;
/// With a gather interval ([`Store::commit_gather`]): a batch this large goes without waiting out the rest.
const GATHER_ENOUGH: usize = 256;
/// Events buffered per session for live subscribers; a subscriber further behind reads the store. Each slot
/// is preallocated, so this is also most of what an idle session's fan-out costs.
const BROADCAST_CAPACITY: usize = 128;
/// Sessions whose announced events the relay reads in one round (more wait for the next).
const RELAY_SESSIONS: usize = 1024;
/// Reads of other nodes' events the relay has going at once.
const RELAY_READS: usize = 8;
/// Page size when a subscriber reads from the store.
const READ_PAGE: usize = 512;

type Ack = oneshot::Sender<Result<Arc<LoggedEvent>, LogError>>;

struct Pending {
    entry: LogEntry,
    ack: Option<Ack>,
    /// An entry of the same session that must share this one's commit ([`EventLog::append_durable_pair`]).
    then: Option<Box<Pending>>,
}

/// Live delivery of committed events to the subscribers of each session, in this process.
#[derive(Default)]
pub struct Fanout {
    sessions: Mutex<HashMap<String, broadcast::Sender<Arc<LoggedEvent>>>>,
}

impl Fanout {
    fn subscribe(&self, session_id: &str) -> broadcast::Receiver<Arc<LoggedEvent>> {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(session_id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(BROADCAST_CAPACITY);
                map.insert(session_id.to_string(), tx);
                rx
            }
        }
    }

    /// Whether this process has live subscribers of `session_id`.
    fn has(&self, session_id: &str) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(session_id)
    }

    /// The sessions this process has live subscribers of.
    fn sessions(&self) -> Vec<String> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn publish(&self, events: &[Arc<LoggedEvent>]) {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for ev in events {
            if let Some(tx) = map.get(&ev.session_id) {
                if tx.send(ev.clone()).is_err() {
                    // Nobody listens any more: forget the channel so idle sessions cost nothing.
                    map.remove(&ev.session_id);
                }
            }
        }
    }
}

/// Counters for tests and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogStats {
    pub batches: u64,
    pub events: u64,
}

/// The event log of every session.
pub struct EventLog {
    tx: mpsc::Sender<Pending>,
    store: Arc<dyn Store>,
    fanout: Arc<Fanout>,
    stats: Arc<Mutex<LogStats>>,
    metrics: Arc<Metrics>,
    broken: Arc<Broken>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("the event log is closed")]
    Closed,
    #[error("event log write failed: {0}")]
    Write(String),
    /// The store could not be reached (nothing of the write was committed); a later write may succeed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// Events of this run were lost: the store stayed unreachable past its grace (see the module docs).
    #[error("events of this run could not be stored: the database stayed unreachable")]
    Broken,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LogError {
    /// What a failed commit tells each producer that waits for it.
    fn of(e: &StoreError) -> LogError {
        match e {
            StoreError::Unavailable(m) => LogError::Unavailable(m.clone()),
            other => LogError::Write(other.to_string()),
        }
    }
}

/// Runs that lost events to a failed commit (see the module docs). Checked on every `append`: one relaxed load
/// while there are none.
#[derive(Default)]
struct Broken {
    any: std::sync::atomic::AtomicBool,
    runs: Mutex<std::collections::HashSet<String>>,
}

impl Broken {
    fn contains(&self, run_id: &str) -> bool {
        self.any.load(std::sync::atomic::Ordering::Relaxed)
            && self
                .runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(run_id)
    }

    fn add(&self, run_ids: impl IntoIterator<Item = String>) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.extend(run_ids);
        self.any
            .store(!runs.is_empty(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Forgets the runs whose end was just recorded.
    fn ended(&self, events: &[Arc<LoggedEvent>]) {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        for ev in events {
            if matches!(ev.event.kind, crate::event::EventKind::RunFinished { .. }) {
                runs.remove(&ev.event.run_id);
            }
        }
        self.any
            .store(!runs.is_empty(), std::sync::atomic::Ordering::Relaxed);
    }
}

impl EventLog {
    /// Starts the appender task. It ends when every `EventLog` handle is dropped and the queue is drained.
    pub fn start(store: Arc<dyn Store>) -> Arc<EventLog> {
        Self::start_with_metrics(store, Arc::new(Metrics::new()))
    }

    /// [`EventLog::start`], counting appends, batches, commit latency and catch-ups in `metrics`.
    pub fn start_with_metrics(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<EventLog> {
        let (tx, rx) = mpsc::channel(APPEND_QUEUE);
        let fanout = Arc::new(Fanout::default());
        let stats = Arc::new(Mutex::new(LogStats::default()));
        let broken = Arc::new(Broken::default());
        let this = Appender {
            store: store.clone(),
            fanout: fanout.clone(),
            stats: stats.clone(),
            metrics: metrics.clone(),
            broken: broken.clone(),
        };
        tokio::spawn(appender(rx, this));
        if let Some(remote) = store.remote_appends() {
            tokio::spawn(relay_remote(remote, store.clone(), fanout.clone()));
        }
        Arc::new(EventLog {
            tx,
            store,
            fanout,
            stats,
            metrics,
            broken,
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn stats(&self) -> LogStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends without waiting for the commit (the hot path: text deltas). Order per producer is kept. Fails
    /// with [`LogError::Broken`] for a run that already lost events (see the module docs).
    pub async fn append(
        &self,
        event: NewEvent,
        run: Option<crate::domain::Run>,
    ) -> Result<(), LogError> {
        if self.broken.contains(&event.run_id) {
            return Err(LogError::Broken);
        }
        self.tx
            .send(Pending {
                entry: LogEntry { event, run },
                ack: None,
                then: None,
            })
            .await
            .map_err(|_| LogError::Closed)
    }

    /// Appends and waits until the event is committed; returns it with its `seq`.
    pub async fn append_durable(
        &self,
        event: NewEvent,
        run: Option<crate::domain::Run>,
    ) -> Result<Arc<LoggedEvent>, LogError> {
        self.committed(LogEntry { event, run }, None).await
    }

    /// Appends two entries of one session in one commit (consecutive seqs, both or neither) and waits for it;
    /// returns the second with its `seq`. A turn's answer and its end go this way: one transaction, not two.
    pub async fn append_durable_pair(
        &self,
        first: LogEntry,
        second: LogEntry,
    ) -> Result<Arc<LoggedEvent>, LogError> {
        if first.event.session_id != second.event.session_id {
            return Err(LogError::Write(
                "a pair of log entries must belong to one session".into(),
            ));
        }
        self.committed(second, Some(first)).await
    }

    /// Queues `entry` (after `before`, in the same commit) and waits for `entry`'s commit.
    async fn committed(
        &self,
        entry: LogEntry,
        before: Option<LogEntry>,
    ) -> Result<Arc<LoggedEvent>, LogError> {
        let (ack_tx, ack_rx) = oneshot::channel();
        let last = Pending {
            entry,
            ack: Some(ack_tx),
            then: None,
        };
        let pending = match before {
            None => last,
            Some(first) => Pending {
                entry: first,
                ack: None,
                then: Some(Box::new(last)),
            },
        };
        self.tx.send(pending).await.map_err(|_| LogError::Closed)?;
        match ack_rx.await {
            Ok(result) => result,
            Err(_) => Err(LogError::Closed),
        }
    }

    /// Events of `session_id` with `seq > after`, then live ones, each exactly once and in order.
    pub fn subscribe(&self, session_id: &str, after: u64) -> Subscription {
        self.listen(session_id).after(after)
    }

    /// Starts listening to `session_id`'s live events, before the caller reads where the log ends: an event is
    /// published only after its commit, so every event the caller's read does not see reaches the listener, and
    /// a subscriber that starts at the end it read needs no read of the store ([`Listener::at_end`]).
    pub fn listen(&self, session_id: &str) -> Listener {
        Listener {
            store: self.store.clone(),
            session_id: session_id.to_string(),
            live: self.fanout.subscribe(session_id),
            catchups: self.metrics.subscriber_catchups.clone(),
        }
    }
}

/// A session's live events from a moment on, not yet a [`Subscription`] (see [`EventLog::listen`]).
pub struct Listener {
    store: Arc<dyn Store>,
    session_id: String,
    live: broadcast::Receiver<Arc<LoggedEvent>>,
    catchups: prometheus::IntCounter,
}

impl Listener {
    fn subscription(self, after: u64, catching_up: bool) -> Subscription {
        Subscription {
            store: self.store,
            session_id: self.session_id,
            next: after + 1,
            live: self.live,
            backlog: std::collections::VecDeque::new(),
            catching_up,
            catchups: self.catchups,
        }
    }

    /// Events with `seq > after`: read from the store first, then live.
    pub fn after(self, after: u64) -> Subscription {
        self.subscription(after, true)
    }

    /// Events after `last_seq`, where the log ended when read after this listener started: all of them come
    /// live, so the store is not read (unless the subscriber falls behind).
    pub fn at_end(self, last_seq: u64) -> Subscription {
        self.subscription(last_seq, false)
    }
}

/// Everything the appender task works with besides its queue.
struct Appender {
    store: Arc<dyn Store>,
    fanout: Arc<Fanout>,
    stats: Arc<Mutex<LogStats>>,
    metrics: Arc<Metrics>,
    broken: Arc<Broken>,
}

impl Appender {
    /// Hands a batch to the store, then publishes the committed events and answers the waiting producers.
    /// `rows` says which path it is (row changes or tokens only), for the commit-latency metric.
    async fn commit(&self, batch: Vec<Pending>, rows: bool) {
        let mut acks: Vec<Option<Ack>> = Vec::with_capacity(batch.len());
        let mut entries = Vec::with_capacity(batch.len());
        // The runs of un-acknowledged entries, known only if the commit fails.
        let mut unacked: Vec<String> = Vec::new();
        for p in batch {
            entries.push(p.entry);
            acks.push(p.ack);
        }
        let n = entries.len();
        let started = std::time::Instant::now();
        // Kept only for a failure's report: the run ids of the entries nobody waits for.
        for (entry, ack) in entries.iter().zip(&acks) {
            if ack.is_none() && unacked.last() != Some(&entry.event.run_id) {
                unacked.push(entry.event.run_id.clone());
            }
        }
        let result = self.store.append_events(entries).await;
        let m = &self.metrics;
        let commit = if rows {
            &m.log_commit_rows
        } else {
            &m.log_commit_tokens
        };
        commit.observe(started.elapsed().as_secs_f64());
        m.log_batch.observe(n as f64);
        match result {
            Ok(events) => {
                m.log_events.inc_by(n as u64);
                {
                    let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                    s.batches += 1;
                    s.events += n as u64;
                }
                self.fanout.publish(&events);
                self.broken.ended(&events);
                for (ev, ack) in events.into_iter().zip(acks) {
                    if let Some(ack) = ack {
                        let _ = ack.send(Ok(ev));
                    }
                }
            }
            Err(e) => {
                m.log_failures.inc();
                unacked.sort_unstable();
                unacked.dedup();
                tracing::error!(error = %e, events = n, broken_runs = unacked.len(),
                    "event log batch failed; runs that lost events in it end failed");
                self.broken.add(unacked);
                for ack in acks.into_iter().flatten() {
                    let _ = ack.send(Err(LogError::of(&e)));
                }
            }
        }
    }
}

/// The appender task: group commit, with row changes off the token path.
///
/// Whatever queued up while the previous batch was written, and whatever the tasks that were ready when it
/// came add, goes in the next one. No timed wait for more on a store whose commit is cheap (SQLite's tail
/// append): under load the queue fills by itself, and a lone event is not held back. (There a 1 ms collection
/// window saved about 5% CPU per token at 1,000 streams, but doubled the median latency and made the p99
/// several times worse.) A store whose commit has a high fixed cost names a gather interval
/// ([`Store::commit_gather`]): a batch then starts at most once per interval, gathering what arrives until
/// then (up to [`GATHER_ENOUGH`] events), so a light steady flow is committed in groups rather than an event
/// or two per database transaction; the first event after a quiet interval still goes at once.
///
/// A batch's entries that change rows (a message, a run: see [`LogEntry::changes_rows`]) cost a store more
/// than a token, e.g. a database transaction. Their sessions' events go to the store in a call of their own,
/// on a task of its own, so one session's turn starting or ending never delays another session's tokens. Until
/// that call returns, later events of those sessions wait here, in order, un-numbered: so a session never has
/// two calls outstanding (the store may number and undo a failed call as if alone), and its events are
/// published in `seq` order.
async fn appender(mut rx: mpsc::Receiver<Pending>, this: Appender) {
    let gather = this.store.commit_gather();
    // When the last batch of token events started (for the gather interval).
    let mut last_start: Option<tokio::time::Instant> = None;
    let this = Arc::new(this);
    // Entries free to go in the next batch, in arrival order.
    let mut ready: Vec<Pending> = Vec::with_capacity(64);
    // Entries of sessions with a row-changing call outstanding, per session in arrival order.
    let mut held: HashMap<String, Vec<Pending>> = HashMap::new();
    let mut held_count = 0usize;
    // The outstanding row-changing calls; each yields the sessions it covered.
    let mut slow: JoinSet<Vec<String>> = JoinSet::new();
    let mut open = true;

    // Routes a received entry: behind its session's outstanding call, or into the next batch.
    // A pair goes in as two adjacent entries of one session: whichever way they are routed, they stay
    // together in one call to the store (a session's entries of a batch are never split).
    let route = |mut p: Pending,
                 ready: &mut Vec<Pending>,
                 held: &mut HashMap<String, Vec<Pending>>,
                 held_count: &mut usize| {
        let then = p.then.take();
        let queue = match held.get_mut(&p.entry.event.session_id) {
            Some(waiting) => {
                *held_count += 1 + usize::from(then.is_some());
                waiting
            }
            None => ready,
        };
        queue.push(p);
        if let Some(then) = then {
            queue.push(*then);
        }
    };
    // A row-changing call returned: its sessions' waiting entries are free again, in order.
    let release = |sessions: Vec<String>,
                   ready: &mut Vec<Pending>,
                   held: &mut HashMap<String, Vec<Pending>>,
                   held_count: &mut usize| {
        for session in sessions {
            if let Some(waiting) = held.remove(&session) {
                *held_count -= waiting.len();
                ready.extend(waiting);
            }
        }
    };

    loop {
        if ready.is_empty() {
            if !open && slow.is_empty() {
                return; // every handle dropped, everything committed (nothing is held without a call out)
            }
            tokio::select! {
                done = slow.join_next(), if !slow.is_empty() => {
                    release(joined(done), &mut ready, &mut held, &mut held_count);
                }
                p = rx.recv(), if open && held_count < MAX_HELD => match p {
                    Some(p) => route(p, &mut ready, &mut held, &mut held_count),
                    None => open = false,
                },
                // Unreachable: entries are held only while their session's call is out.
                else => return,
            }
            continue;
        }
        // A store with a gather interval: a batch starts at most once per interval (see above).
        if let Some(until) = last_start.map(|t| t + gather).filter(|_| !gather.is_zero()) {
            let sleep = tokio::time::sleep_until(until);
            tokio::pin!(sleep);
            while open && ready.len() < GATHER_ENOUGH && held_count < MAX_HELD {
                tokio::select! {
                    biased;
                    () = &mut sleep => break,
                    p = rx.recv() => match p {
                        Some(p) => route(p, &mut ready, &mut held, &mut held_count),
                        None => open = false,
                    },
                }
            }
        }
        // Let every task that is ready now run first: streams whose tokens arrived in the same poll of the
        // sockets add them to this batch, so a busy log writes once per scheduler pass, not once per token,
        // and an idle one adds no wait (no timer).
        tokio::task::yield_now().await;
        while let Some(done) = slow.try_join_next() {
            release(joined(Some(done)), &mut ready, &mut held, &mut held_count);
        }
        while open && ready.len() < MAX_BATCH && held_count < MAX_HELD {
            match rx.try_recv() {
                Ok(p) => route(p, &mut ready, &mut held, &mut held_count),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }

        // Sessions with a row change in this batch take all their entries of it into a call of their own.
        let mut row_sessions: HashMap<String, Vec<Pending>> = HashMap::new();
        for p in &ready {
            if p.entry.changes_rows() {
                row_sessions
                    .entry(p.entry.event.session_id.clone())
                    .or_default();
            }
        }
        let mut tokens: Vec<Pending> = Vec::with_capacity(ready.len());
        for p in ready.drain(..) {
            match row_sessions.get_mut(&p.entry.event.session_id) {
                Some(own) => own.push(p),
                None => tokens.push(p),
            }
        }
        if !row_sessions.is_empty() {
            let mut batch = Vec::new();
            let mut sessions = Vec::with_capacity(row_sessions.len());
            for (session, entries) in row_sessions {
                batch.extend(entries);
                held.insert(session.clone(), Vec::new());
                sessions.push(session);
            }
            let this = Arc::clone(&this);
            slow.spawn(async move {
                // Whatever happens to the call, its sessions must be freed afterwards.
                if AssertUnwindSafe(this.commit(batch, true))
                    .catch_unwind()
                    .await
                    .is_err()
                {
                    tracing::error!("event log commit panicked; its events are lost");
                }
                sessions
            });
        }
        if !tokens.is_empty() {
            last_start = Some(tokio::time::Instant::now());
            this.commit(tokens, false).await;
        }
    }
}

/// Publishes what other nodes commit to the sessions this process has subscribers of: each announced range is
/// read from the log (so it is durable) and published like a local commit. Subscribers drop what they already
/// have and read any gap from the store, so the order in which local and remote commits are published does
/// not matter; a notification missed (lagging) is made up by the next event's gap read.
async fn relay_remote(
    mut remote: broadcast::Receiver<crate::store::RemoteAppend>,
    store: Arc<dyn Store>,
    fanout: Arc<Fanout>,
) {
    loop {
        // Everything announced meanwhile, merged per session (a session's ranges from consecutive commits
        // become one read), then read concurrently: one round trip per session and wake-up, not per commit.
        let mut ranges: HashMap<String, (u64, u64)> = HashMap::new();
        let mut missed = false;
        let mut next = remote.recv().await;
        loop {
            match next {
                Ok(ra) if ra.is_resync() => missed = true,
                Ok(ra) => {
                    if ra.last_seq >= ra.first_seq && fanout.has(&ra.session_id) {
                        let r = ranges
                            .entry(ra.session_id)
                            .or_insert((ra.first_seq, ra.last_seq));
                        r.0 = r.0.min(ra.first_seq);
                        r.1 = r.1.max(ra.last_seq);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(
                        missed = n,
                        "announcements of other nodes' commits were skipped"
                    );
                    missed = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
            if ranges.len() >= RELAY_SESSIONS {
                break;
            }
            next = match remote.try_recv() {
                Ok(ra) => Ok(ra),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(broadcast::error::RecvError::Lagged(n))
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    Err(broadcast::error::RecvError::Closed)
                }
                Err(broadcast::error::TryRecvError::Empty) => break,
            };
        }
        if missed {
            resync(&store, &fanout).await;
        }
        let reads = futures_util::stream::iter(ranges)
            .map(|(session, (first, last))| {
                let store = store.clone();
                async move {
                    // The tail of a long range: a subscriber missing what comes before reads it itself.
                    let after = first
                        .saturating_sub(1)
                        .max(last.saturating_sub(READ_PAGE as u64));
                    let want = usize::try_from(last - after).unwrap_or(READ_PAGE);
                    let read = store.read_events(&session, after, want).await;
                    (session, read)
                }
            })
            .buffer_unordered(RELAY_READS);
        futures_util::pin_mut!(reads);
        while let Some((session, read)) = reads.next().await {
            match read {
                Ok(events) => fanout.publish(&events),
                Err(e) => {
                    tracing::debug!(session = %session, error = %e, "reading another node's events failed")
                }
            }
        }
    }
}

/// After announcements were missed: publishes the latest event of every session this process has subscribers
/// of. A subscriber that lacks events before it reads them from the store, one that has it drops it, so nobody
/// waits for an announcement that will never come.
async fn resync(store: &Arc<dyn Store>, fanout: &Fanout) {
    for session in fanout.sessions() {
        let last = match store.log_bounds(&session).await {
            Ok(bounds) if bounds.last_seq > 0 => bounds.last_seq,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(session = %session, error = %e, "reading a session's bounds to resync failed");
                continue;
            }
        };
        match store.read_events(&session, last - 1, 1).await {
            Ok(events) => fanout.publish(&events),
            Err(e) => {
                tracing::debug!(session = %session, error = %e, "reading a session's latest event to resync failed")
            }
        }
    }
}

/// The sessions a finished row-changing call covered (none if its task was aborted: the runtime is stopping).
fn joined(done: Option<Result<Vec<String>, tokio::task::JoinError>>) -> Vec<String> {
    match done {
        Some(Ok(sessions)) => sessions,
        Some(Err(e)) => {
            tracing::error!(error = %e, "event log commit task failed");
            Vec::new()
        }
        None => Vec::new(),
    }
}

/// A cursor over one session's log: replay from the store, then live.
pub struct Subscription {
    store: Arc<dyn Store>,
    session_id: String,
    /// The next `seq` this subscriber must receive.
    next: u64,
    live: broadcast::Receiver<Arc<LoggedEvent>>,
    backlog: std::collections::VecDeque<Arc<LoggedEvent>>,
    catching_up: bool,
    /// `agentd_subscriber_catchups_total`: counted each time this live subscriber has to read the store.
    catchups: prometheus::IntCounter,
}

impl Subscription {
    /// The `seq` the next event will have.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// The next event, waiting for it if necessary. `Ok(None)` when the log is gone (server shutting down).
    pub async fn next(&mut self) -> Result<Option<Arc<LoggedEvent>>, StoreError> {
        loop {
            if let Some(ev) = self.backlog.pop_front() {
                self.next = ev.seq() + 1;
                return Ok(Some(ev));
            }
            if self.catching_up {
                let page = self
                    .store
                    .read_events(&self.session_id, self.next - 1, READ_PAGE)
                    .await?;
                if page.len() < READ_PAGE {
                    self.catching_up = false;
                }
                // Events older than retention may be gone: start where the log starts.
                self.backlog
                    .extend(page.into_iter().filter(|e| e.seq() >= self.next));
                continue;
            }
            match self.live.recv().await {
                Ok(ev) => {
                    if ev.seq() < self.next {
                        continue; // already delivered from the store
                    }
                    if ev.seq() > self.next {
                        // Missed something between the store read and now: read it, then retry this one.
                        self.catching_up = true;
                        self.catchups.inc();
                        continue;
                    }
                    self.next = ev.seq() + 1;
                    return Ok(Some(ev));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.catching_up = true;
                    self.catchups.inc();
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }

    /// Takes an event that is ready right now without waiting, if any (lets a writer batch frames).
    pub fn try_next(&mut self) -> Option<Arc<LoggedEvent>> {
        if let Some(ev) = self.backlog.pop_front() {
            self.next = ev.seq() + 1;
            return Some(ev);
        }
        if self.catching_up {
            return None;
        }
        loop {
            match self.live.try_recv() {
                Ok(ev) if ev.seq() < self.next => continue,
                Ok(ev) if ev.seq() == self.next => {
                    self.next = ev.seq() + 1;
                    return Some(ev);
                }
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.catching_up = true;
                    self.catchups.inc();
                    return None;
                }
                Err(_) => return None,
            }
        }
    }
}
