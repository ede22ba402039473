//! A PostgreSQL database of its own for each test: created on the server named by `AGENTD_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432`), dropped when the [`TestDatabase`] is dropped.
//!
//! When the server cannot be reached, [`TestDatabase::create`] returns `None` (the test skips), unless
//! `CI=true` or `AGENTD_REQUIRE_PG=1`: then it panics, so a CI run without Postgres fails instead of passing
//! on nothing. Databases a killed test process left behind (their names carry its pid) are dropped by the
//! next process that creates one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tokio_postgres::NoTls;

/// The server tests create their databases on, without a database name.
pub const DEFAULT_BASE: &str = "postgres://postgres@127.0.0.1:5432";
/// Every test database's name starts with this, then the pid of the process that made it.
const PREFIX: &str = "agentd_test_";

/// `AGENTD_TEST_PG`, or [`DEFAULT_BASE`]; any trailing `/` removed.
pub fn base_url() -> String {
    std::env::var("AGENTD_TEST_PG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_BASE.to_string())
        .trim_end_matches('/')
        .to_string()
}

/// Must tests that need Postgres fail when it is not there (CI, or `AGENTD_REQUIRE_PG=1`)?
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("AGENTD_REQUIRE_PG").is_ok_and(|v| v == "1")
}

/// A database of one test.
pub struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database. `None` when the server is unreachable and not [`required`].
    pub async fn create() -> Option<TestDatabase> {
        match Self::try_create().await {
            Ok(db) => Some(db),
            Err(e) if !required() => {
                eprintln!("postgres at {} is not available ({e}); skipping (set AGENTD_REQUIRE_PG=1 to fail instead)", printable(&base_url()));
                None
            }
            Err(e) => panic!(
                "postgres at {} is required (CI or AGENTD_REQUIRE_PG=1) but: {e}",
                printable(&base_url())
            ),
        }
    }

    /// Creates a fresh, empty database, or says why it could not.
    pub async fn try_create() -> Result<TestDatabase, String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static SWEPT: OnceLock<()> = OnceLock::new();
        let base = base_url();
        let admin = connect(&format!("{base}/postgres")).await?;
        if SWEPT.set(()).is_ok() {
            sweep(&admin).await;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{PREFIX}{}_{}_{nanos:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| format!("creating database {name}: {e}"))?;
        Ok(TestDatabase {
            url: format!("{base}/{name}"),
            name,
        })
    }

    /// [`TestDatabase::create`] from synchronous code (it runs on a thread of its own, so it may be called
    /// from inside a runtime too).
    pub fn create_blocking() -> Option<TestDatabase> {
        on_own_runtime(Self::create())
    }

    /// [`TestDatabase::try_create`] from synchronous code.
    pub fn try_create_blocking() -> Result<TestDatabase, String> {
        on_own_runtime(Self::try_create())
    }

    /// The database's URL, ready for `store.url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // `WITH (FORCE)` ends the connections a store still holds (the test's server may still be running).
        let result = on_own_runtime(async move {
            let admin = connect(&format!("{}/postgres", base_url())).await?;
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .map_err(|e| e.to_string())
        });
        if let Err(e) = result {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// Runs a future to completion on a fresh current-thread runtime on a thread of its own.
fn on_own_runtime<T: Send + 'static>(
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("a runtime for the test database: {e}"));
        rt.block_on(future)
    });
    match thread.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
    config.connect_timeout(std::time::Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await.map_err(|e| {
        let mut text = format!("cannot connect: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Drops the test databases of processes that are gone.
async fn sweep(admin: &tokio_postgres::Client) {
    let Ok(rows) = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'agentd\\_test\\_%'",
            &[],
        )
        .await
    else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let pid = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
}

/// A URL without its password, for messages.
fn printable(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) if c.get_password().is_some() => {
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            format!(
                "postgres://{}@{}",
                c.get_user().unwrap_or(""),
                hosts.join(",")
            )
        }
        _ => url.to_string(),
    }
}
