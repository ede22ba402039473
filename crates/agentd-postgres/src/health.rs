//! Whether the database is reachable, as this process last saw it, and the two log lines an outage gets: one
//! when the first call finds it gone, one when the first call succeeds again. Every call reports its outcome
//! here; on the normal path that is one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use agentd_core::store::{StoreError, StoreResult};

pub(crate) struct Health {
    /// The database, as `postgres://user@host:port/database`.
    name: String,
    down: AtomicBool,
    since: Mutex<Option<Instant>>,
}

impl Health {
    pub(crate) fn new(name: String) -> Health {
        Health {
            name,
            down: AtomicBool::new(false),
            since: Mutex::new(None),
        }
    }

    /// Notes a call's outcome and hands it back.
    pub(crate) fn note<T>(&self, result: StoreResult<T>) -> StoreResult<T> {
        match &result {
            Ok(_) => self.reachable(),
            Err(StoreError::Unavailable(cause)) => self.unreachable(cause),
            Err(_) => {}
        }
        result
    }

    /// Notes a failed call and hands its error back.
    pub(crate) fn failed(&self, e: StoreError) -> StoreError {
        if let StoreError::Unavailable(cause) = &e {
            self.unreachable(cause);
        }
        e
    }

    pub(crate) fn reachable(&self) {
        if !self.down.load(Ordering::Relaxed) || !self.down.swap(false, Ordering::AcqRel) {
            return;
        }
        let since = self.since.lock().unwrap_or_else(|p| p.into_inner()).take();
        let outage_ms = since.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
        tracing::warn!(
            database = %self.name,
            outage_ms,
            "database reachable again; requests are served again"
        );
    }

    fn unreachable(&self, cause: &str) {
        if self.down.load(Ordering::Relaxed) || self.down.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        tracing::error!(
            database = %self.name,
            cause,
            "database unreachable: requests answer 503 until it is back; the event log holds its writes for up \
             to {} s meanwhile",
            crate::append::OUTAGE_GRACE.as_secs()
        );
    }
}
