//! Run control across nodes (SPEC.md section 6): a cancel, an `ask_human` reply or a `multitask` decision that
//! a client brings to a node other than the one executing the run. The run's row names its node
//! (`Run.node`); the command travels there through the store ([`Store::send_command`], on Postgres a row and a
//! `NOTIFY`), and that node's [`RunManager`] acts on it as if the client had asked it. A reply is answered
//! (`Replied`), so the client learns whether a question was pending; a cancel is confirmed by the run's row
//! reaching its end, which the executing node records.
//!
//! Only a store shared by several processes carries commands ([`Store::commands`]); on one node this part is
//! absent and every command is local.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, oneshot};

use crate::domain::{new_id, Run, RunStatus};
use crate::runs::{Answer, RunManager};
use crate::store::{NodeCommand, Store, StoreResult};

/// How long a reply waits for the executing node's answer.
const REPLY_WAIT: Duration = Duration::from_secs(5);
/// How long a cancel waits for the executing node to record the run's end.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// How often a cancel looks at the run's row meanwhile.
const CANCEL_POLL: Duration = Duration::from_millis(10);

/// This node's side of the commands: sends them to other nodes, acts on theirs.
pub struct Remote {
    store: Arc<dyn Store>,
    runs: Arc<RunManager>,
    /// Replies sent to other nodes, waiting for their `Replied`, by ticket.
    waiting: Mutex<HashMap<String, oneshot::Sender<Option<String>>>>,
}

impl Remote {
    /// Starts receiving other nodes' commands; None when the store serves one process.
    pub fn start(store: Arc<dyn Store>, runs: Arc<RunManager>) -> Option<Arc<Remote>> {
        let rx = store.commands()?;
        let remote = Arc::new(Remote {
            store,
            runs,
            waiting: Mutex::default(),
        });
        tokio::spawn(receive(Arc::downgrade(&remote), rx));
        Some(remote)
    }

    fn elsewhere<'a>(&self, run: &'a Run) -> Option<&'a str> {
        if run.status.is_terminal() {
            return None;
        }
        run.node.as_deref().filter(|n| *n != self.runs.node_id())
    }

    /// Cancels a run another node executes (the session's active one when `run_id` is None) and returns it
    /// once its end is recorded (or as it stands after [`CANCEL_WAIT`]); None when no other node executes it.
    pub async fn cancel(&self, session_id: &str, run_id: Option<&str>) -> StoreResult<Option<Run>> {
        let target = match run_id {
            Some(id) => self.store.get_run(session_id, id).await?,
            None => {
                let runs = self.store.unfinished_runs(Some(session_id)).await?;
                let started = runs
                    .iter()
                    .find(|r| matches!(r.status, RunStatus::Running | RunStatus::WaitingInput));
                started
                    .or_else(|| runs.iter().find(|r| r.status == RunStatus::Queued))
                    .cloned()
            }
        };
        let Some(run) = target else { return Ok(None) };
        let Some(node) = self.elsewhere(&run) else {
            return Ok(None);
        };
        let command = NodeCommand::Cancel {
            session_id: session_id.to_string(),
            run_id: run.id.clone(),
        };
        self.store.send_command(node, &command).await?;
        let deadline = Instant::now() + CANCEL_WAIT;
        loop {
            tokio::time::sleep(CANCEL_POLL).await;
            let now = self.store.get_run(session_id, &run.id).await?;
            match now {
                Some(r) if r.status.is_terminal() || Instant::now() >= deadline => {
                    return Ok(Some(r))
                }
                Some(_) => {}
                None => return Ok(Some(run)),
            }
        }
    }

    /// Tells node `to` to start the queued run it was routed ([`Store::route_run`]), and returns a watch of its
    /// end ([`Remote::watch_end`]).
    pub async fn start_elsewhere(
        &self,
        to: &str,
        session_id: &str,
        run_id: &str,
    ) -> StoreResult<tokio::sync::watch::Receiver<crate::runs::RunResult>> {
        let command = NodeCommand::Start {
            session_id: session_id.to_string(),
            run_id: run_id.to_string(),
        };
        self.store.send_command(to, &command).await?;
        Ok(self.watch_end(session_id, run_id))
    }

    /// A watch of the end of a run another node executes, which this node learns from the run's row.
    pub fn watch_end(
        &self,
        session_id: &str,
        run_id: &str,
    ) -> tokio::sync::watch::Receiver<crate::runs::RunResult> {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let store = self.store.clone();
        let (session_id, run_id) = (session_id.to_string(), run_id.to_string());
        tokio::spawn(async move {
            // Polled (a waiting send is rare: another node held the session's turn), more slowly as it lasts;
            // nobody waiting any more ends it.
            let mut every = Duration::from_millis(50);
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                every = (every * 2).min(Duration::from_secs(1));
                match store.get_run(&session_id, &run_id).await {
                    Ok(Some(run)) if run.status.is_terminal() => {
                        let answer =
                            crate::service::final_message_of(store.as_ref(), &session_id, &run_id)
                                .await
                                .ok()
                                .flatten();
                        let _ = tx.send(Some((run, answer)));
                        return;
                    }
                    Ok(None) => return,
                    _ => {}
                }
            }
        });
        rx
    }

    /// Cancels every unfinished run of the session that other nodes execute (`multitask = interrupt`),
    /// without waiting for them to stop.
    pub async fn cancel_all(&self, session_id: &str) -> StoreResult<()> {
        for run in self.store.unfinished_runs(Some(session_id)).await? {
            if let Some(node) = self.elsewhere(&run) {
                let command = NodeCommand::Cancel {
                    session_id: session_id.to_string(),
                    run_id: run.id.clone(),
                };
                self.store.send_command(node, &command).await?;
            }
        }
        Ok(())
    }

    /// The run of the session another node is executing (started, not queued), if any.
    pub async fn active_run(&self, session_id: &str) -> StoreResult<Option<String>> {
        let runs = self.store.unfinished_runs(Some(session_id)).await?;
        Ok(runs
            .into_iter()
            .find(|r| {
                matches!(r.status, RunStatus::Running | RunStatus::WaitingInput)
                    && self.elsewhere(r).is_some()
            })
            .map(|r| r.id))
    }

    /// Whether another node has a run of the session queued or going (`multitask = reject`).
    pub async fn busy(&self, session_id: &str) -> StoreResult<bool> {
        let runs = self.store.unfinished_runs(Some(session_id)).await?;
        Ok(runs.iter().any(|r| self.elsewhere(r).is_some()))
    }

    /// Answers a question or an approval pending on another node: returns the run it answered, or None when
    /// no node executing a run of the session waiting for input had that request id pending.
    pub async fn reply(
        &self,
        session_id: &str,
        request_id: &str,
        answer: &Answer,
    ) -> StoreResult<Option<String>> {
        let (content, decision) = match answer {
            Answer::Text(t) => (t.clone(), None),
            Answer::Decision(d) => (String::new(), Some(d.clone())),
        };
        let runs = self.store.unfinished_runs(Some(session_id)).await?;
        let mut nodes: Vec<&str> = runs
            .iter()
            .filter(|r| r.status == RunStatus::WaitingInput)
            .filter_map(|r| self.elsewhere(r))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        for node in nodes {
            let ticket = new_id();
            let (tx, rx) = oneshot::channel();
            self.waiting().insert(ticket.clone(), tx);
            let command = NodeCommand::Reply {
                session_id: session_id.to_string(),
                request_id: request_id.to_string(),
                content: content.clone(),
                decision: decision.clone(),
                from: self.runs.node_id().to_string(),
                ticket: ticket.clone(),
            };
            let sent = self.store.send_command(node, &command).await;
            let answer = match sent {
                Ok(()) => tokio::time::timeout(REPLY_WAIT, rx)
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            };
            self.waiting().remove(&ticket);
            sent?;
            if let Some(Some(run_id)) = answer {
                return Ok(Some(run_id));
            }
        }
        Ok(None)
    }

    fn waiting(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Option<String>>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Acts on another node's command.
    fn handle(self: &Arc<Self>, command: NodeCommand) {
        match command {
            NodeCommand::Cancel { session_id, run_id } => {
                let runs = self.runs.clone();
                tokio::spawn(async move { runs.cancel(&session_id, Some(&run_id)).await });
            }
            NodeCommand::Start { session_id, run_id } => {
                let runs = self.runs.clone();
                tokio::spawn(async move {
                    if let Err(e) = runs.adopt(&session_id, &run_id).await {
                        tracing::warn!(run_id = %run_id, error = %e, "could not start a run another node accepted");
                    }
                });
            }
            NodeCommand::Reply {
                session_id,
                request_id,
                content,
                decision,
                from,
                ticket,
            } => {
                let answer = match decision {
                    Some(d) => Answer::Decision(d),
                    None => Answer::Text(content),
                };
                let run_id = self.runs.answer(&session_id, &request_id, answer).ok();
                let store = self.store.clone();
                tokio::spawn(async move {
                    let answer = NodeCommand::Replied { ticket, run_id };
                    if let Err(e) = store.send_command(&from, &answer).await {
                        tracing::warn!(node = %from, error = %e, "could not answer another node's reply");
                    }
                });
            }
            NodeCommand::Replied { ticket, run_id } => {
                if let Some(tx) = self.waiting().remove(&ticket) {
                    let _ = tx.send(run_id);
                }
            }
        }
    }
}

/// Hands other nodes' commands to `remote` while it is in use.
async fn receive(remote: Weak<Remote>, mut rx: broadcast::Receiver<NodeCommand>) {
    loop {
        let command = match rx.recv().await {
            Ok(c) => c,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "commands from other nodes were dropped");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(remote) = remote.upgrade() else {
            return;
        };
        remote.handle(command);
    }
}
