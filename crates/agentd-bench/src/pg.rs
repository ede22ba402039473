//! agentd on PostgreSQL in the benchmark: a fresh database per run, the server's settings for the report, and
//! PostgreSQL's own CPU, which is part of what agentd costs per token on that store.
//!
//! The server is `AGENTD_BENCH_PG` (default `postgres://postgres@127.0.0.1:5432`, no database name). Each run
//! creates `agentd_bench_<pid>_<n>` and drops it at the end; databases a killed run left behind (their pid is
//! gone) are dropped by the next run.
//!
//! CPU: PostgreSQL names its processes in their command line (`postgres: 15/main: <user> <database> <client>
//! <state>` for a backend, `postgres: 15/main: walwriter` for an auxiliary one). Counted for agentd are the
//! backends connected to its database (autovacuum workers on it included) and the processes that do the
//! server's shared write work (walwriter, checkpointer, background writer), sampled with the server's own CPU
//! before and after each measured window. The shared ones also work for any other database on the server, so
//! the figure is only clean on a server nobody else uses during the run; a backend that exits inside a window
//! takes its CPU with it (agentd's pool keeps its connections, so that is rare).

use tokio_postgres::NoTls;

use crate::{Error, Result};

/// Where databases are created unless `AGENTD_BENCH_PG` says otherwise.
pub const DEFAULT_BASE: &str = "postgres://postgres@127.0.0.1:5432";
const PREFIX: &str = "agentd_bench_";
/// Auxiliary processes whose work is the write path's (WAL writes and flushes, checkpoints, dirty pages).
const SHARED: [&str; 3] = ["walwriter", "checkpointer", "background writer"];

/// `AGENTD_BENCH_PG`, or [`DEFAULT_BASE`], without a trailing `/`.
pub fn base_url() -> String {
    std::env::var("AGENTD_BENCH_PG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_BASE.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// A database of this run.
#[derive(Debug, Clone)]
pub struct BenchDatabase {
    /// Its name.
    pub name: String,
    /// Its URL, for `store.url`.
    pub url: String,
    /// The server's settings that bear on the figures, `(name, value)`.
    pub settings: Vec<(String, String)>,
}

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| Error::new(format!("cannot connect to {}: {e}", printable(url))))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The URL without a password.
fn printable(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Creates a fresh database (and drops those of runs that are gone).
pub async fn create() -> Result<BenchDatabase> {
    let base = base_url();
    let admin = connect(&format!("{base}/postgres")).await?;
    let leftovers = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'agentd\\_bench\\_%'",
            &[],
        )
        .await
        .map_err(|e| Error::new(format!("listing databases: {e}")))?;
    for row in leftovers {
        let Ok(name) = row.try_get::<_, String>(0) else {
            continue;
        };
        let pid = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('_').next())
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !crate::procfs::alive(p)) {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = format!("{PREFIX}{}_{stamp}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| Error::new(format!("creating database {name}: {e}")))?;
    let mut settings = Vec::new();
    for setting in [
        "server_version",
        "synchronous_commit",
        "fsync",
        "wal_sync_method",
        "full_page_writes",
        "shared_buffers",
        "wal_buffers",
        "max_wal_size",
        "checkpoint_timeout",
        "commit_delay",
        "wal_compression",
        "max_connections",
    ] {
        if let Ok(row) = admin.query_one(&format!("SHOW {setting}"), &[]).await {
            if let Ok(v) = row.try_get::<_, String>(0) {
                settings.push((setting.to_string(), v));
            }
        }
    }
    Ok(BenchDatabase {
        url: format!("{base}/{name}"),
        name,
        settings,
    })
}

/// Drops the run's database (the server using it must be stopped first).
pub async fn drop_database(db: &BenchDatabase) {
    match connect(&format!("{}/postgres", base_url())).await {
        Ok(admin) => {
            if let Err(e) = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.name))
                .await
            {
                eprintln!("agentd-bench: dropping {}: {e}", db.name);
            }
        }
        Err(e) => eprintln!("agentd-bench: dropping {}: {e}", db.name),
    }
}

/// One line for the report: the settings.
pub fn settings_note(db: &BenchDatabase) -> String {
    let list: Vec<String> = db
        .settings
        .iter()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    format!(
        "agentd on Postgres: a fresh database on {} for the run; server settings: {}. Its CPU includes the database's backends and the walwriter, checkpointer and background writer.",
        printable(&base_url()),
        list.join(", ")
    )
}

/// Is this a PostgreSQL process title that works for `database` (see the module docs)?
pub fn counts_for(title: &str, database: &str) -> bool {
    let Some(rest) = title.strip_prefix("postgres: ") else {
        return false;
    };
    let rest = rest.trim_end();
    if SHARED.iter().any(|s| rest.ends_with(s)) {
        return true;
    }
    rest.split_whitespace().any(|word| word == database)
}

/// User + system CPU seconds of the PostgreSQL processes that work for `database`, now.
pub fn cpu_seconds(database: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut total = 0.0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        // A process title set by the server is one string (NUL-padded); a plain command line is NUL-separated.
        let title = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if counts_for(&title, database) {
            total += crate::procfs::process_cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_titles_are_told_apart() {
        let db = "agentd_bench_1_2";
        assert!(counts_for(
            "postgres: 15/main: postgres agentd_bench_1_2 127.0.0.1(5000) idle",
            db
        ));
        assert!(counts_for("postgres: 15/main: walwriter   ", db));
        assert!(counts_for("postgres: 15/main: background writer ", db));
        assert!(counts_for(
            "postgres: 15/main: autovacuum worker agentd_bench_1_2",
            db
        ));
        assert!(!counts_for(
            "postgres: 15/main: postgres agentd_test_9 127.0.0.1(5001) idle",
            db
        ));
        assert!(!counts_for(
            "postgres: 15/main: logical replication launcher",
            db
        ));
        assert!(!counts_for("/usr/lib/postgresql/15/bin/postgres -D /x", db));
        assert_eq!(
            printable("postgres://u:pw@h:1/db"),
            "postgres://u@h:1/db".to_string()
        );
    }
}
