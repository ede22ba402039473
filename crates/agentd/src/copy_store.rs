//! `agentd copy-store FROM_URL TO_URL`: copies everything one store holds into another, empty one (SQLite to
//! PostgreSQL is the move users make; any direction works), then checks the copy.
//!
//! Sessions go over oldest first (so "newest first" lists stay in order), each with its messages and runs
//! (`client_message_id` included) in one transaction, then its event log in batches with every event's `seq`
//! as it was (a log whose start retention pruned starts where it started), and the session's last seq, so a
//! server started on the target numbers each session on right after it; then its uploads, record and bytes.
//! Progress goes to stderr. At the end the counts (sessions, messages, runs, events, uploads) are read again
//! from the target and the last seq of every session from both stores; the command succeeds only if all
//! match. Stop the servers using either store first: a SQLite store refuses a second process anyway, and a
//! source that changes during the copy fails the check.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use agentd_core::domain::Session;
use agentd_core::store::Store;

/// Events read and imported per call.
const EVENT_BATCH: usize = 1000;
/// Sessions listed per call.
const SESSION_PAGE: usize = 500;
/// Connections a Postgres end of the copy uses.
const CONNECTIONS: usize = 4;
/// How often a progress line is printed (and once at the end).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// What a copy holds, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub sessions: u64,
    pub messages: u64,
    pub runs: u64,
    pub events: u64,
    pub uploads: u64,
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} sessions, {} messages, {} runs, {} events, {} uploads",
            self.sessions, self.messages, self.runs, self.events, self.uploads
        )
    }
}

/// Runs the command; `Ok` is the line to print when the copy is complete and checked.
pub async fn run(from_url: &str, to_url: &str) -> Result<String, String> {
    if from_url == to_url {
        return Err("FROM_URL and TO_URL are the same store".into());
    }
    // Opening a SQLite store creates a missing file: a mistyped source would copy nothing, successfully.
    if !agentd_postgres::is_postgres_url(from_url) {
        let path = agentd_sqlite::path_from_url(from_url).map_err(|e| format!("FROM_URL: {e}"))?;
        if !Path::new(&path).is_file() {
            return Err(format!(
                "FROM_URL: no SQLite database at {}",
                path.display()
            ));
        }
    }
    let from = crate::open_store(from_url, CONNECTIONS)
        .await
        .map_err(|e| format!("FROM_URL: {e}"))?;
    let to = crate::open_store(to_url, CONNECTIONS)
        .await
        .map_err(|e| format!("TO_URL: {e}"))?;
    if !to
        .list_sessions(None, 1, None)
        .await
        .map_err(|e| format!("TO_URL: {e}"))?
        .is_empty()
    {
        return Err(format!(
            "the target store {} is not empty; copy-store only copies into an empty store",
            to.describe()
        ));
    }
    let copied = copy(&*from, &*to).await?;
    verify(&*from, &*to, &copied).await?;
    Ok(format!(
        "copied {} from {} to {}; counts and the last seq of every session match",
        copied.counts,
        from.describe(),
        to.describe()
    ))
}

/// What the copy read from the source.
struct Copied {
    counts: Counts,
    /// Every session's id and last seq, oldest first.
    last_seqs: Vec<(String, u64)>,
}

/// Every session of a store, oldest first.
async fn all_sessions(store: &dyn Store) -> Result<Vec<Session>, String> {
    let mut all = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = store
            .list_sessions(None, SESSION_PAGE, before.as_deref())
            .await
            .map_err(|e| format!("listing sessions of {}: {e}", store.describe()))?;
        let Some(last) = page.last() else { break };
        before = Some(last.id.clone());
        let full = page.len() == SESSION_PAGE;
        all.extend(page);
        if !full {
            break;
        }
    }
    all.reverse();
    Ok(all)
}

async fn copy(from: &dyn Store, to: &dyn Store) -> Result<Copied, String> {
    let sessions = all_sessions(from).await?;
    let total = sessions.len();
    eprintln!(
        "copy-store: {total} sessions from {} to {}",
        from.describe(),
        to.describe()
    );
    let mut counts = Counts::default();
    let mut last_seqs = Vec::with_capacity(total);
    let mut shown = Instant::now();
    for (i, session) in sessions.iter().enumerate() {
        let id = session.id.as_str();
        let failed =
            |what: &str, e: agentd_core::store::StoreError| format!("session {id}: {what}: {e}");
        let messages = from
            .list_messages(id, None, 0)
            .await
            .map_err(|e| failed("reading messages", e))?;
        let runs = from
            .export_runs(id)
            .await
            .map_err(|e| failed("reading runs", e))?;
        to.import_session(session, &messages, &runs)
            .await
            .map_err(|e| failed("writing the session", e))?;
        counts.sessions += 1;
        counts.messages += messages.len() as u64;
        counts.runs += runs.len() as u64;

        let bounds = from
            .log_bounds(id)
            .await
            .map_err(|e| failed("reading the log's bounds", e))?;
        let mut after = 0;
        loop {
            let events = from
                .read_events(id, after, EVENT_BATCH)
                .await
                .map_err(|e| failed("reading events", e))?;
            let Some(last) = events.last() else { break };
            after = last.seq();
            to.import_events(id, &events, 0)
                .await
                .map_err(|e| failed("writing events", e))?;
            counts.events += events.len() as u64;
            if events.len() < EVENT_BATCH {
                break;
            }
        }
        // The last seq may lie past the last stored event (all of a log pruned, or never written).
        to.import_events(id, &[], bounds.last_seq)
            .await
            .map_err(|e| failed("writing the last seq", e))?;
        last_seqs.push((id.to_string(), bounds.last_seq.max(after)));

        for upload in from
            .list_uploads(id)
            .await
            .map_err(|e| failed("listing uploads", e))?
        {
            let bytes = from
                .read_upload(id, &upload.id)
                .await
                .map_err(|e| failed("reading an upload", e))?
                .ok_or_else(|| format!("session {id}: upload {} vanished", upload.id))?;
            to.put_upload(id, &upload, &bytes)
                .await
                .map_err(|e| failed("writing an upload", e))?;
            counts.uploads += 1;
        }
        if shown.elapsed() >= PROGRESS_EVERY || i + 1 == total {
            shown = Instant::now();
            eprintln!(
                "copy-store: sessions {}/{total}, events {}, messages {}, runs {}, uploads {}",
                i + 1,
                counts.events,
                counts.messages,
                counts.runs,
                counts.uploads
            );
        }
    }
    Ok(Copied { counts, last_seqs })
}

/// Counts what `store` holds for the sessions `ids`, and their last seqs.
async fn count(store: &dyn Store, ids: &[String]) -> Result<(Counts, Vec<u64>), String> {
    let mut counts = Counts {
        sessions: ids.len() as u64,
        ..Counts::default()
    };
    let mut last = Vec::with_capacity(ids.len());
    let failed = |id: &str, e: agentd_core::store::StoreError| {
        format!("checking session {id} in {}: {e}", store.describe())
    };
    for id in ids {
        counts.messages += store
            .list_messages(id, None, 0)
            .await
            .map_err(|e| failed(id, e))?
            .len() as u64;
        counts.runs += store.list_runs(id).await.map_err(|e| failed(id, e))?.len() as u64;
        counts.uploads += store
            .list_uploads(id)
            .await
            .map_err(|e| failed(id, e))?
            .len() as u64;
        let mut after = 0;
        loop {
            let events = store
                .read_events(id, after, EVENT_BATCH)
                .await
                .map_err(|e| failed(id, e))?;
            let Some(e) = events.last() else { break };
            after = e.seq();
            counts.events += events.len() as u64;
        }
        last.push(
            store
                .log_bounds(id)
                .await
                .map_err(|e| failed(id, e))?
                .last_seq,
        );
    }
    Ok((counts, last))
}

async fn verify(from: &dyn Store, to: &dyn Store, copied: &Copied) -> Result<(), String> {
    eprintln!("copy-store: checking the copy");
    let target_sessions: Vec<String> = all_sessions(to).await?.into_iter().map(|s| s.id).collect();
    let ids: Vec<String> = copied.last_seqs.iter().map(|(id, _)| id.clone()).collect();
    if target_sessions != ids {
        return Err(format!(
            "check failed: the target holds {} sessions, the copy wrote {}",
            target_sessions.len(),
            ids.len()
        ));
    }
    let source_now = all_sessions(from).await?.len() as u64;
    if source_now != copied.counts.sessions {
        return Err(format!(
            "check failed: the source now holds {source_now} sessions, {} were copied (was it in use?)",
            copied.counts.sessions
        ));
    }
    let (counts, last) = count(to, &ids).await?;
    if counts != copied.counts {
        return Err(format!(
            "check failed: the target holds {counts}; the source had {}",
            copied.counts
        ));
    }
    for ((id, want), got) in copied.last_seqs.iter().zip(&last) {
        if want != got {
            return Err(format!(
                "check failed: session {id}: last seq {got} in the target, {want} in the source"
            ));
        }
        let now = from
            .log_bounds(id)
            .await
            .map_err(|e| format!("checking session {id} in {}: {e}", from.describe()))?
            .last_seq;
        if now != *want {
            return Err(format!(
                "check failed: session {id}: the source's last seq moved from {want} to {now} during the copy (was it in use?)"
            ));
        }
    }
    Ok(())
}
