//! Which store a test server runs on: SQLite in the test's directory (the default), or with
//! `AGENTD_TEST_STORE=postgres` a PostgreSQL database of its own (see `agentd_store_contract::pg`), one per test
//! directory, so a server restarted on the same directory finds its data again.
//!
//! A directory's database is dropped once every `Server` on it, its app and the directory are gone. Databases
//! of configs written by hand (`config_text` for a spawned binary), and any the reaper had no time for (a
//! `DROP DATABASE` waits for a checkpoint, so the last few of a test binary usually remain), live until the
//! process ends; the next test process drops them (their names carry the pid of a gone process).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use agentd_store_contract::pg::TestDatabase;

fn databases() -> &'static Mutex<HashMap<PathBuf, Arc<TestDatabase>>> {
    static DATABASES: OnceLock<Mutex<HashMap<PathBuf, Arc<TestDatabase>>>> = OnceLock::new();
    DATABASES.get_or_init(Default::default)
}

fn postgres() -> bool {
    match std::env::var("AGENTD_TEST_STORE").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Ok("") | Err(_) => false,
        Ok(other) => panic!("AGENTD_TEST_STORE={other}: use sqlite (the default) or postgres"),
    }
}

/// The `store.url` for a server whose files are in `dir`.
pub fn url_for(dir: &Path) -> String {
    if !postgres() {
        return format!("sqlite://{}/agentd.db", dir.display());
    }
    let mut map = databases().lock().unwrap_or_else(|p| p.into_inner());
    let db = map.entry(dir.to_path_buf()).or_insert_with(|| {
        Arc::new(
            TestDatabase::try_create_blocking()
                .unwrap_or_else(|e| panic!("AGENTD_TEST_STORE=postgres: {e}")),
        )
    });
    db.url().to_string()
}

/// Held by a `Server`: once the server's directory and its app are both gone (a test may restart a server on
/// the same directory, or keep using the app's store after shutdown), the directory's database is dropped, by
/// a reaper thread that looks every 100 ms.
pub struct Lease(Watch);

/// What the reaper watches: a directory and an app built on its database.
#[derive(Clone)]
struct Watch {
    dir: Weak<tempfile::TempDir>,
    app: Weak<agentd_core::service::Agentd>,
    key: PathBuf,
}

impl Watch {
    fn done(&self) -> bool {
        self.dir.strong_count() == 0 && self.app.strong_count() == 0
    }
}

impl Lease {
    pub fn new(dir: &Arc<tempfile::TempDir>, app: &Arc<agentd_core::service::Agentd>) -> Lease {
        Lease(Watch {
            dir: Arc::downgrade(dir),
            app: Arc::downgrade(app),
            key: dir.path().to_path_buf(),
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !postgres() {
            return;
        }
        static REAPER: OnceLock<()> = OnceLock::new();
        watched()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.0.clone());
        REAPER.get_or_init(|| {
            std::thread::spawn(|| loop {
                std::thread::sleep(std::time::Duration::from_millis(100));
                reap();
            });
        });
    }
}

fn watched() -> &'static Mutex<Vec<Watch>> {
    static WATCHED: OnceLock<Mutex<Vec<Watch>>> = OnceLock::new();
    WATCHED.get_or_init(Default::default)
}

/// Drops the databases of directories whose every server is gone.
fn reap() {
    let finished: Vec<PathBuf> = {
        let mut list = watched().lock().unwrap_or_else(|p| p.into_inner());
        let done: Vec<PathBuf> = list
            .iter()
            .filter(|w| w.done())
            .map(|w| w.key.clone())
            .collect();
        list.retain(|w| !w.done());
        done.into_iter()
            .filter(|key| !list.iter().any(|w| &w.key == key))
            .collect()
    };
    for key in finished {
        let db = databases()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        drop(db);
    }
}
