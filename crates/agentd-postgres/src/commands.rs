//! Commands across nodes (SPEC.md section 6; `agentd_core::remote`): a node writes a command for another into
//! `commands` and, in the same statement, sends `NOTIFY agentd_cmd '<node> <id>'`. The addressee's listening
//! connection hears it (`notify`), and its taker deletes the row and hands the command on
//! ([`agentd_core::store::Store::commands`]). Deleting is taking: a command is acted on once. When the listening
//! connection is (re)opened, the taker takes every command written for its node meanwhile; one older than
//! [`STALE_S`] is dropped (its sender stopped waiting long ago).

use std::sync::Arc;

use agentd_core::store::NodeCommand;
use deadpool_postgres::Pool;
use tokio::sync::{broadcast, mpsc};

use crate::lease::Lease;
use crate::notify::CommandNote;

/// Writes command `$2` for node `$1` and announces it.
pub(crate) const SEND: &str = "
WITH c AS (INSERT INTO commands (node, body) VALUES ($1, $2) RETURNING id)
SELECT pg_notify('agentd_cmd', $1 || ' ' || c.id) FROM c";

const TAKE_ONE: &str = "
DELETE FROM commands WHERE id = $1 AND node = $2
RETURNING body, created_at > now() - make_interval(secs => $3)";

const TAKE_MISSED: &str = "
DELETE FROM commands WHERE node = $1
RETURNING body, created_at > now() - make_interval(secs => $2)";

/// Seconds after which a command is no longer acted on.
const STALE_S: f64 = 30.0;

/// Commands handed on at most, waiting for the node to act on them.
pub(crate) const QUEUE: usize = 256;

/// Takes the commands `notes` announce for this node and hands them to `out`, until the notifier is gone.
pub(crate) fn take(
    pool: Pool,
    lease: Arc<Lease>,
    mut notes: mpsc::Receiver<CommandNote>,
    out: broadcast::Sender<NodeCommand>,
) {
    tokio::spawn(async move {
        while let Some(note) = notes.recv().await {
            // Not registered yet: no command can be meant for this process.
            let Some((me, _)) = lease.holder() else {
                continue;
            };
            let client = match pool.get().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "postgres: cannot take a command from another node");
                    continue;
                }
            };
            let rows = match note {
                CommandNote::One { node, id } if node == me => {
                    client.query(TAKE_ONE, &[&id, &me, &STALE_S]).await
                }
                CommandNote::One { .. } => continue,
                CommandNote::Missed => client.query(TAKE_MISSED, &[&me, &STALE_S]).await,
            };
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "postgres: cannot take a command from another node");
                    continue;
                }
            };
            for row in rows {
                let (Ok(body), Ok(fresh)) =
                    (row.try_get::<_, String>(0), row.try_get::<_, bool>(1))
                else {
                    continue;
                };
                if !fresh {
                    continue;
                }
                match serde_json::from_str::<NodeCommand>(&body) {
                    Ok(command) => {
                        let _ = out.send(command);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "postgres: a command from another node is not understood")
                    }
                }
            }
        }
    });
}
