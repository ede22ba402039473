//! WAL checkpoints on their own thread and connection, once per [`INTERVAL`].
//!
//! The writer connection has `wal_autocheckpoint = 0`, so its commits never stop to copy pages into the
//! database file. Here a `PASSIVE` checkpoint (which never blocks the writer or readers) runs periodically: a
//! page that many small commits rewrote, like the tail of a busy session's log, is copied once per interval
//! instead of once per 1,000 WAL frames. Closing the store's last connection checkpoints what is left.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use agentd_core::store::{StoreError, StoreResult};
use rusqlite::Connection;

const INTERVAL: Duration = Duration::from_millis(500);

pub(crate) struct Checkpointer {
    /// Dropping it wakes the thread to stop.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub(crate) fn start(path: &Path) -> StoreResult<Checkpointer> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Other(format!("opening the checkpoint connection: {e}")))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| StoreError::Other(format!("setting busy_timeout: {e}")))?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("agentd-sqlite-ckpt".into())
            .spawn(move || {
                crate::background::lower_priority();
                loop {
                match stopped.recv_timeout(INTERVAL) {
                    Err(RecvTimeoutError::Timeout) => {
                        let r: rusqlite::Result<(i64, i64, i64)> =
                            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)));
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "passive checkpoint failed; retrying next interval");
                        }
                    }
                    _ => return,
                }
                }
            })
            .map_err(|e| StoreError::Other(format!("starting the checkpoint thread: {e}")))?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
