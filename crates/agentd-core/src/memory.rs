//! An in-memory [`Store`]: the reference for the trait's semantics and the store of the loop's unit tests.
//! Not durable, so the server never uses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::domain::{Message, Run, Session, Upload};
use crate::event::{Event, EventKind, LoggedEvent};
use crate::store::{
    check_import, check_session_rows, HistoryPage, LogBounds, LogEntry, Store, StoreError,
    StoreResult, StoredRun,
};

#[derive(Default)]
struct Inner {
    sessions: Vec<Session>,
    messages: Vec<Message>,
    runs: Vec<(Run, Option<String>)>,
    events: HashMap<String, Vec<Arc<LoggedEvent>>>,
    last_seq: HashMap<String, u64>,
    /// Per session, oldest first.
    uploads: HashMap<String, Vec<StoredUpload>>,
    aliases: HashMap<String, String>,
}

/// An upload's record and bytes.
type StoredUpload = (Upload, Arc<Vec<u8>>);

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn has_session(&self, id: &str) -> bool {
        self.sessions.iter().any(|s| s.id == id)
    }
}

fn upsert_run(runs: &mut Vec<(Run, Option<String>)>, run: &Run) {
    match runs.iter_mut().find(|(r, _)| r.id == run.id) {
        Some((r, _)) => *r = run.clone(),
        None => runs.push((run.clone(), None)),
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn describe(&self) -> String {
        "memory".into()
    }
    async fn put_alias(&self, key: &str, session_id: &str) -> StoreResult<()> {
        self.lock()
            .aliases
            .insert(key.to_string(), session_id.to_string());
        Ok(())
    }
    async fn find_alias(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self.lock().aliases.get(key).cloned())
    }
    async fn create_session(&self, session: &Session) -> StoreResult<()> {
        let mut inner = self.lock();
        if inner.sessions.iter().any(|s| s.id == session.id) {
            return Err(StoreError::Conflict(format!(
                "session {} already exists",
                session.id
            )));
        }
        inner.sessions.push(session.clone());
        Ok(())
    }
    async fn get_session(&self, id: &str) -> StoreResult<Option<Session>> {
        Ok(self.lock().sessions.iter().find(|s| s.id == id).cloned())
    }
    async fn list_sessions(
        &self,
        principal: Option<&str>,
        limit: usize,
        before: Option<&str>,
    ) -> StoreResult<Vec<Session>> {
        let inner = self.lock();
        let end = match before {
            Some(b) => inner.sessions.iter().position(|s| s.id == b).unwrap_or(0),
            None => inner.sessions.len(),
        };
        Ok(inner.sessions[..end]
            .iter()
            .rev()
            .filter(|s| principal.is_none_or(|p| s.principal == p))
            .take(limit)
            .cloned()
            .collect())
    }
    async fn update_session(&self, session: &Session) -> StoreResult<()> {
        let mut inner = self.lock();
        let s = inner
            .sessions
            .iter_mut()
            .find(|s| s.id == session.id)
            .ok_or(StoreError::NotFound)?;
        *s = session.clone();
        Ok(())
    }
    async fn list_messages(
        &self,
        session_id: &str,
        limit: Option<usize>,
        offset: usize,
    ) -> StoreResult<Vec<Message>> {
        Ok(self
            .lock()
            .messages
            .iter()
            .filter(|m| m.session_id == session_id)
            .skip(offset)
            .take(limit.unwrap_or(usize::MAX))
            .cloned()
            .collect())
    }
    async fn history_page(
        &self,
        session_id: &str,
        run_id: &str,
        limit: usize,
        count_runs_to: usize,
    ) -> StoreResult<HistoryPage> {
        let inner = self.lock();
        let places: HashMap<&str, i64> = inner
            .runs
            .iter()
            .filter(|(r, _)| r.session_id == session_id)
            .zip(0..)
            .map(|((r, _), place)| (r.id.as_str(), place))
            .collect();
        let mut messages: Vec<(Message, Option<i64>)> = inner
            .messages
            .iter()
            .rev()
            .filter(|m| m.session_id == session_id)
            .take(limit)
            .map(|m| {
                let place = m.run_id.as_deref().and_then(|r| places.get(r).copied());
                (m.clone(), place)
            })
            .collect();
        messages.reverse();
        Ok(HistoryPage {
            messages,
            own: places.get(run_id).copied(),
            runs: places.len().min(count_runs_to),
        })
    }
    async fn create_run(&self, run: &Run, client_message_id: Option<&str>) -> StoreResult<()> {
        let mut inner = self.lock();
        if !inner.sessions.iter().any(|s| s.id == run.session_id) {
            return Err(StoreError::NotFound);
        }
        if inner
            .runs
            .iter()
            .any(|(r, _)| r.session_id == run.session_id && r.id == run.id)
        {
            return Err(StoreError::Conflict(format!(
                "run {} already exists",
                run.id
            )));
        }
        if let Some(c) = client_message_id {
            if inner
                .runs
                .iter()
                .any(|(r, cm)| r.session_id == run.session_id && cm.as_deref() == Some(c))
            {
                return Err(StoreError::Conflict("client_message_id".into()));
            }
        }
        inner
            .runs
            .push((run.clone(), client_message_id.map(String::from)));
        Ok(())
    }
    async fn release_client_message_id(&self, session_id: &str, run_id: &str) -> StoreResult<()> {
        let mut inner = self.lock();
        let (_, cmid) = inner
            .runs
            .iter_mut()
            .find(|(r, _)| r.session_id == session_id && r.id == run_id)
            .ok_or(StoreError::NotFound)?;
        *cmid = None;
        Ok(())
    }
    async fn find_run_by_client_message_id(
        &self,
        session_id: &str,
        cmid: &str,
    ) -> StoreResult<Option<Run>> {
        Ok(self
            .lock()
            .runs
            .iter()
            .find(|(r, c)| r.session_id == session_id && c.as_deref() == Some(cmid))
            .map(|(r, _)| r.clone()))
    }
    async fn get_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<Run>> {
        Ok(self
            .lock()
            .runs
            .iter()
            .find(|(r, _)| r.session_id == session_id && r.id == run_id)
            .map(|(r, _)| r.clone()))
    }
    async fn list_runs(&self, session_id: &str) -> StoreResult<Vec<Run>> {
        Ok(self
            .lock()
            .runs
            .iter()
            .filter(|(r, _)| r.session_id == session_id)
            .map(|(r, _)| r.clone())
            .collect())
    }
    async fn update_run(&self, run: &Run) -> StoreResult<()> {
        let mut inner = self.lock();
        let (r, _) = inner
            .runs
            .iter_mut()
            .find(|(r, _)| r.session_id == run.session_id && r.id == run.id)
            .ok_or(StoreError::NotFound)?;
        *r = run.clone();
        Ok(())
    }
    async fn unfinished_runs(&self, session_id: Option<&str>) -> StoreResult<Vec<Run>> {
        Ok(self
            .lock()
            .runs
            .iter()
            .filter(|(r, _)| !r.status.is_terminal())
            .filter(|(r, _)| session_id.is_none_or(|s| r.session_id == s))
            .map(|(r, _)| r.clone())
            .collect())
    }
    async fn append_events(&self, batch: Vec<LogEntry>) -> StoreResult<Vec<Arc<LoggedEvent>>> {
        let mut inner = self.lock();
        // The whole batch or nothing: check every entry before changing anything.
        for entry in &batch {
            let session = &entry.event.session_id;
            if !inner.sessions.iter().any(|s| &s.id == session) {
                return Err(StoreError::NotFound);
            }
            if let EventKind::Message { message } = &entry.event.kind {
                if &message.session_id != session {
                    return Err(StoreError::Other(format!(
                        "message {} belongs to session {} but its event to session {session}",
                        message.id, message.session_id
                    )));
                }
            }
            if let Some(run) = entry.run.as_ref().filter(|r| &r.session_id != session) {
                return Err(StoreError::Other(format!(
                    "run {} belongs to session {} but its event to session {session}",
                    run.id, run.session_id
                )));
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        for entry in batch {
            let e = entry.event;
            let seq = {
                let last = inner.last_seq.entry(e.session_id.clone()).or_insert(0);
                *last += 1;
                *last
            };
            if let EventKind::Message { message } = &e.kind {
                match inner.messages.iter_mut().find(|m| m.id == message.id) {
                    Some(m) => *m = message.clone(),
                    None => inner.messages.push(message.clone()),
                }
            }
            if let Some(run) = &entry.run {
                upsert_run(&mut inner.runs, run);
            }
            let logged = Arc::new(LoggedEvent::new(
                e.session_id.clone(),
                Event {
                    seq,
                    run_id: e.run_id,
                    agent: e.agent,
                    is_subagent: e.is_subagent,
                    kind: e.kind,
                },
            ));
            inner
                .events
                .entry(e.session_id)
                .or_default()
                .push(logged.clone());
            out.push(logged);
        }
        Ok(out)
    }
    async fn read_events(
        &self,
        session_id: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<Arc<LoggedEvent>>> {
        Ok(self
            .lock()
            .events
            .get(session_id)
            .map(|v| {
                v.iter()
                    .filter(|e| e.seq() > after)
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }
    async fn log_bounds(&self, session_id: &str) -> StoreResult<LogBounds> {
        let inner = self.lock();
        Ok(LogBounds {
            first_seq: inner
                .events
                .get(session_id)
                .and_then(|v| v.first())
                .map(|e| e.seq())
                .unwrap_or(0),
            last_seq: inner.last_seq.get(session_id).copied().unwrap_or(0),
        })
    }
    async fn first_seq_of_run(&self, session_id: &str, run_id: &str) -> StoreResult<Option<u64>> {
        Ok(self
            .lock()
            .events
            .get(session_id)
            .and_then(|v| v.iter().find(|e| e.event.run_id == run_id))
            .map(|e| e.seq()))
    }
    async fn prune_events(&self, session_id: &str, keep_runs: usize) -> StoreResult<()> {
        let mut inner = self.lock();
        let runs: Vec<String> = inner
            .runs
            .iter()
            .filter(|(r, _)| r.session_id == session_id)
            .map(|(r, _)| r.id.clone())
            .collect();
        if runs.len() <= keep_runs {
            return Ok(());
        }
        let keep: Vec<String> = runs[runs.len() - keep_runs..].to_vec();
        // Runs are sequential, so the older runs' events are the prefix before the first kept run's event; with
        // no event of a kept run stored, all of them.
        if let Some(v) = inner.events.get_mut(session_id) {
            let first = v
                .iter()
                .position(|e| keep.contains(&e.event.run_id))
                .unwrap_or(v.len());
            v.drain(..first);
        }
        Ok(())
    }
    async fn put_upload(&self, session_id: &str, upload: &Upload, bytes: &[u8]) -> StoreResult<()> {
        let mut inner = self.lock();
        if !inner.has_session(session_id) {
            return Err(StoreError::NotFound);
        }
        let list = inner.uploads.entry(session_id.to_string()).or_default();
        if list
            .iter()
            .any(|(u, _)| u.id == upload.id || u.path == upload.path)
        {
            return Err(StoreError::Conflict(format!(
                "session {session_id} already has an upload {} or a file {}",
                upload.id, upload.path
            )));
        }
        list.push((upload.clone(), Arc::new(bytes.to_vec())));
        Ok(())
    }
    async fn get_upload(&self, session_id: &str, id: &str) -> StoreResult<Option<Upload>> {
        Ok(self
            .lock()
            .uploads
            .get(session_id)
            .and_then(|l| l.iter().find(|(u, _)| u.id == id))
            .map(|(u, _)| u.clone()))
    }
    async fn read_upload(&self, session_id: &str, id: &str) -> StoreResult<Option<Vec<u8>>> {
        let bytes = self
            .lock()
            .uploads
            .get(session_id)
            .and_then(|l| l.iter().find(|(u, _)| u.id == id))
            .map(|(_, b)| Arc::clone(b));
        Ok(bytes.map(|b| b.as_ref().clone()))
    }
    async fn list_uploads(&self, session_id: &str) -> StoreResult<Vec<Upload>> {
        Ok(self
            .lock()
            .uploads
            .get(session_id)
            .map(|l| l.iter().map(|(u, _)| u.clone()).collect())
            .unwrap_or_default())
    }
    async fn export_runs(&self, session_id: &str) -> StoreResult<Vec<StoredRun>> {
        Ok(self
            .lock()
            .runs
            .iter()
            .filter(|(r, _)| r.session_id == session_id)
            .map(|(r, c)| StoredRun {
                run: r.clone(),
                client_message_id: c.clone(),
            })
            .collect())
    }
    async fn import_session(
        &self,
        session: &Session,
        messages: &[Message],
        runs: &[StoredRun],
    ) -> StoreResult<()> {
        let mut inner = self.lock();
        if inner.has_session(&session.id) {
            return Err(StoreError::Conflict(format!(
                "session {} already exists",
                session.id
            )));
        }
        check_session_rows(session, messages, runs)?;
        inner.sessions.push(session.clone());
        inner.messages.extend(messages.iter().cloned());
        inner.runs.extend(
            runs.iter()
                .map(|r| (r.run.clone(), r.client_message_id.clone())),
        );
        Ok(())
    }
    async fn import_events(
        &self,
        session_id: &str,
        events: &[Arc<LoggedEvent>],
        last_seq: u64,
    ) -> StoreResult<()> {
        let mut inner = self.lock();
        if !inner.has_session(session_id) {
            return Err(StoreError::NotFound);
        }
        let current = inner.last_seq.get(session_id).copied().unwrap_or(0);
        let has_events = inner.events.get(session_id).is_some_and(|v| !v.is_empty());
        let last = check_import(session_id, current, has_events, events, last_seq)?;
        inner
            .events
            .entry(session_id.to_string())
            .or_default()
            .extend(events.iter().cloned());
        inner.last_seq.insert(session_id.to_string(), last);
        Ok(())
    }
}
