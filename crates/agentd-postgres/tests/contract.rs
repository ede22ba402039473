//! The Postgres store against the Store contract (crate `agentd-store-contract`), each scenario on a database
//! of its own on the server in `AGENTD_TEST_PG`; reopening connects to the same database again.

use std::sync::Arc;

use agentd_core::store::Store;
use agentd_postgres::PgStore;
use agentd_store_contract::pg::TestDatabase;
use agentd_store_contract::Harness;

struct Postgres {
    db: TestDatabase,
}

#[async_trait::async_trait]
impl Harness for Postgres {
    async fn open(&self) -> Arc<dyn Store> {
        let store = PgStore::open(self.db.url(), 8)
            .await
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.db.name()));
        Arc::new(store)
    }
}

async fn postgres() -> Option<Postgres> {
    Some(Postgres {
        db: TestDatabase::create().await?,
    })
}

agentd_store_contract::store_contract!(postgres());
