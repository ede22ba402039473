//! The SQLite store against the Store contract (crate `agentd-store-contract`), on real database files in a
//! temporary directory; reopening opens the same file again (replaying the log's tail file if one is left).

use std::path::PathBuf;
use std::sync::Arc;

use agentd_core::store::Store;
use agentd_sqlite::SqliteStore;
use agentd_store_contract::Harness;

struct Sqlite {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

#[async_trait::async_trait]
impl Harness for Sqlite {
    async fn open(&self) -> Arc<dyn Store> {
        let path = self.path.clone();
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
            .await
            .expect("open task")
            .expect("open the database");
        Arc::new(store)
    }
}

async fn sqlite() -> Option<Sqlite> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nested/dir/agentd.db");
    Some(Sqlite { _dir: dir, path })
}

agentd_store_contract::store_contract!(sqlite());
