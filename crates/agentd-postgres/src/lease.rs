//! Fencing (SPEC.md section 6): a node writes only while the registry holds its process.
//!
//! A node's first heartbeat registers its process (`nodes.instance`); from then on each append's first round
//! trip also takes a `FOR KEY SHARE` lock on that registry row ([`FENCE`]), in the same transaction as the
//! events. A node that finds another's heartbeat lapsed deletes its row ([`EXPEL_LAPSED`]) before taking any of
//! its runs over; the delete waits for the lapsed node's appends in flight (their locks) and every later
//! append of that node finds no row and is refused. So a node that was frozen or cut off and comes back cannot
//! add a single event to a run another node now executes: the check and the write commit together. A renewal
//! that finds no row is refused too, and the store then tells the process ([`Lease::fenced`]), which stops.
//!
//! A heartbeat renews the row with an `UPDATE` of `last_seen`, a column no key covers, so it never waits for
//! the appends' `KEY SHARE` locks.

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

/// The registry row an append of this process must find: `(node_id, instance)`. No rows: fenced.
pub(crate) const FENCE: &str =
    "SELECT 1 FROM nodes WHERE node_id = $1 AND instance = $2 FOR KEY SHARE";

/// Registers a process (its node's row, replacing a previous process's under the same node id).
pub(crate) const JOIN: &str = "
INSERT INTO nodes (node_id, instance, listen, started_at, last_seen) VALUES ($1, $2, $3, $4, now())
ON CONFLICT (node_id) DO UPDATE SET instance = EXCLUDED.instance, listen = EXCLUDED.listen,
    started_at = EXCLUDED.started_at, last_seen = now()";

/// Tells the other nodes that node `$1` joined (see `notify`).
pub(crate) const ANNOUNCE: &str = "SELECT pg_notify('agentd_cmd', '* ' || $1::text)";

/// Renews a registered process's row; no row changed: it was expelled.
pub(crate) const RENEW: &str =
    "UPDATE nodes SET last_seen = now() WHERE node_id = $1 AND instance = $2";

/// Expels every node but `$2` (the one asking: a node that can sweep is not lost) whose heartbeat is older
/// than `$1` seconds.
pub(crate) const EXPEL_LAPSED: &str = "
DELETE FROM nodes WHERE last_seen <= now() - make_interval(secs => $1) AND node_id IS DISTINCT FROM $2::text
RETURNING node_id";

/// Who this store writes for, once registered, and whether it has been fenced.
#[derive(Default)]
pub(crate) struct Lease {
    me: Mutex<Option<(String, String)>>,
    fenced: CancellationToken,
}

impl Lease {
    /// `(node_id, instance)` once registered: each append checks it ([`FENCE`]).
    pub(crate) fn holder(&self) -> Option<(String, String)> {
        self.me.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `(node_id, instance)` is the process already registered (a renewal, not a join).
    pub(crate) fn is(&self, node_id: &str, instance: &str) -> bool {
        self.me
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(n, i)| n == node_id && i == instance)
    }

    pub(crate) fn joined(&self, node_id: &str, instance: &str) {
        *self.me.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((node_id.to_string(), instance.to_string()));
    }

    /// Notes that the registry no longer holds this process; returns the error to answer.
    pub(crate) fn lost(&self, what: &str) -> agentd_core::store::StoreError {
        if !self.fenced.is_cancelled() {
            tracing::error!(
                "postgres: {what} refused: another node found this node's lease lapsed and took its runs over"
            );
        }
        self.fenced.cancel();
        agentd_core::store::StoreError::Fenced(format!(
            "{what}: this node's lease lapsed and another node took its runs over"
        ))
    }

    pub(crate) fn token(&self) -> CancellationToken {
        self.fenced.clone()
    }
}
