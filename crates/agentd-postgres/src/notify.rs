//! Live events across nodes (SPEC.md section 6). While other nodes are alive (the run manager's sweep tells the
//! store, [`Notifier::set_peers`]), each append's commit also sends `NOTIFY agentd_log` naming, per session, the
//! range of seqs it added; PostgreSQL delivers it only if the transaction commits. Every store keeps one
//! connection of its own listening on that channel and hands what other stores committed to the event log
//! ([`agentd_core::store::Store::remote_appends`]), which reads those events from the log and publishes them to
//! the node's own subscribers. So a subscriber on any node gets a run's events live, each durable before it is
//! sent; the notification carries only pointers, the events come from the table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentd_core::event::LoggedEvent;
use agentd_core::store::RemoteAppend;
use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, NoTls};

/// The channel every node listens on.
pub(crate) const CHANNEL: &str = "agentd_log";
/// `pg_notify` refuses payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7900;
/// Notifications waiting for the event log at most (a lagging reader skips; subscribers catch up from the
/// log at the next event).
const QUEUE: usize = 4096;

/// This store's side of the channel: whether to notify, who it is, and what others committed.
pub(crate) struct Notifier {
    /// Other nodes are alive: commits notify.
    peers: AtomicBool,
    /// Tells this store's own notifications from others'.
    instance: String,
    tx: broadcast::Sender<RemoteAppend>,
}

impl Notifier {
    pub(crate) fn new() -> Arc<Notifier> {
        let (tx, _) = broadcast::channel(QUEUE);
        Arc::new(Notifier {
            peers: AtomicBool::new(false),
            instance: agentd_core::domain::new_id(),
            tx,
        })
    }

    pub(crate) fn set_peers(&self, peers: bool) {
        self.peers.store(peers, Ordering::Relaxed);
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<RemoteAppend> {
        self.tx.subscribe()
    }

    /// The payloads announcing `logged` (none while no other node is alive): `<instance> <session> <first>
    /// <last>` lines, each payload under PostgreSQL's limit.
    pub(crate) fn payloads(&self, logged: &[Arc<LoggedEvent>]) -> Vec<String> {
        if !self.peers.load(Ordering::Relaxed) || logged.is_empty() {
            return Vec::new();
        }
        let mut ranges: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for ev in logged {
            let r = ranges.entry(&ev.session_id).or_insert((ev.seq(), ev.seq()));
            r.0 = r.0.min(ev.seq());
            r.1 = r.1.max(ev.seq());
        }
        let mut out = Vec::new();
        let mut cur = String::new();
        for (session, (first, last)) in ranges {
            let line = format!("{} {session} {first} {last}\n", self.instance);
            if !cur.is_empty() && cur.len() + line.len() > MAX_PAYLOAD {
                out.push(std::mem::take(&mut cur));
            }
            cur.push_str(&line);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// Hands another store's announcement to the event log.
    fn received(&self, payload: &str) {
        for line in payload.lines() {
            let mut parts = line.split(' ');
            let (Some(instance), Some(session), Some(first), Some(last)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if instance == self.instance {
                continue;
            }
            let (Ok(first_seq), Ok(last_seq)) = (first.parse(), last.parse()) else {
                continue;
            };
            let _ = self.tx.send(RemoteAppend {
                session_id: session.to_string(),
                first_seq,
                last_seq,
            });
        }
    }
}

/// Keeps a connection listening on [`CHANNEL`] for as long as `notifier` is in use, connecting again (after a
/// second, then up to ten) when it is lost.
pub(crate) fn listen(config: tokio_postgres::Config, notifier: &Arc<Notifier>) {
    let weak = Arc::downgrade(notifier);
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(1);
        loop {
            if weak.strong_count() == 0 {
                return;
            }
            match config.connect(NoTls).await {
                Ok((client, mut connection)) => {
                    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(QUEUE);
                    // Polling the connection drives the client's requests and yields the notifications.
                    let driver = tokio::spawn(async move {
                        let mut messages =
                            futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                        while let Some(Ok(message)) = messages.next().await {
                            if let AsyncMessage::Notification(n) = message {
                                if tx.send(n.payload().to_string()).await.is_err() {
                                    return;
                                }
                            }
                        }
                    });
                    if client
                        .batch_execute(&format!("LISTEN {CHANNEL}"))
                        .await
                        .is_ok()
                    {
                        wait = Duration::from_secs(1);
                        while let Some(payload) = rx.recv().await {
                            let Some(notifier) = weak.upgrade() else {
                                driver.abort();
                                return;
                            };
                            notifier.received(&payload);
                        }
                    }
                    driver.abort();
                    tracing::debug!("postgres: the listening connection ended; connecting again");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "postgres: cannot open the listening connection")
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    });
}
