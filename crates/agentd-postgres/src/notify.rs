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
/// The channel of commands across nodes (see `commands`): `<node> <id>` payloads.
pub(crate) const COMMANDS: &str = "agentd_cmd";
/// The payload on [`COMMANDS`] that a node sends when it joins (`* <node>`): every node has peers from then on.
pub(crate) const JOINED: &str = "* ";
/// `pg_notify` refuses payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7900;
/// Notifications waiting for the event log at most (a lagging reader skips; subscribers catch up from the
/// log at the next event).
const QUEUE: usize = 16384;

/// This store's side of the channel: whether to notify, who it is, and what others committed.
pub(crate) struct Notifier {
    /// Other nodes are alive: commits notify.
    peers: AtomicBool,
    /// Tells this store's own notifications from others'.
    instance: String,
    tx: broadcast::Sender<RemoteAppend>,
    /// Commands announced on [`COMMANDS`], for the store to take (see `commands`).
    commands: tokio::sync::mpsc::Sender<CommandNote>,
}

/// What the listening connection tells the command taker.
#[derive(Debug)]
pub(crate) enum CommandNote {
    /// Command `id` was written for node `node`.
    One { node: String, id: i64 },
    /// The connection was (re)opened: commands written meanwhile were not announced to this node.
    Missed,
}

impl Notifier {
    pub(crate) fn new(commands: tokio::sync::mpsc::Sender<CommandNote>) -> Arc<Notifier> {
        let (tx, _) = broadcast::channel(QUEUE);
        Arc::new(Notifier {
            peers: AtomicBool::new(false),
            instance: agentd_core::domain::new_id(),
            tx,
            commands,
        })
    }

    pub(crate) fn set_peers(&self, peers: bool) {
        self.peers.store(peers, Ordering::Relaxed);
    }

    pub(crate) fn has_peers(&self) -> bool {
        self.peers.load(Ordering::Relaxed)
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

    /// Hands a command's announcement to the command taker (a full queue drops it: commands are few, and a
    /// sender that hears nothing back times out).
    fn command(&self, payload: &str) {
        if payload.starts_with(JOINED) {
            // Another node just joined: commits announce themselves from now on (not from this node's next
            // sweep, which would leave a subscriber on the new node without a run's events meanwhile).
            self.set_peers(true);
            return;
        }
        let mut parts = payload.split(' ');
        if let (Some(node), Some(Ok(id))) = (parts.next(), parts.next().map(str::parse)) {
            let note = CommandNote::One {
                node: node.to_string(),
                id,
            };
            if self.commands.try_send(note).is_err() {
                tracing::warn!("postgres: a command from another node was dropped (queue full)");
            }
        }
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

/// Keeps a connection listening on [`CHANNEL`] and [`COMMANDS`] for as long as `notifier` is in use, connecting again (after a
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
                    let (tx, mut rx) = tokio::sync::mpsc::channel::<(bool, String)>(QUEUE);
                    // Polling the connection drives the client's requests and yields the notifications.
                    let driver = tokio::spawn(async move {
                        let mut messages =
                            futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                        while let Some(Ok(message)) = messages.next().await {
                            if let AsyncMessage::Notification(n) = message {
                                let command = n.channel() == COMMANDS;
                                if tx.send((command, n.payload().to_string())).await.is_err() {
                                    return;
                                }
                            }
                        }
                    });
                    if client
                        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {COMMANDS}"))
                        .await
                        .is_ok()
                    {
                        wait = Duration::from_secs(1);
                        if let Some(notifier) = weak.upgrade() {
                            // What was announced while the connection was down never arrives.
                            let _ = notifier.commands.try_send(CommandNote::Missed);
                            let _ = notifier.tx.send(RemoteAppend::resync());
                        }
                        while let Some((command, payload)) = rx.recv().await {
                            let Some(notifier) = weak.upgrade() else {
                                driver.abort();
                                return;
                            };
                            if command {
                                notifier.command(&payload);
                            } else {
                                notifier.received(&payload);
                            }
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
