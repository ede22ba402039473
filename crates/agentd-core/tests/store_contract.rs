//! The in-memory store against the Store contract (crate `agentd-store-contract`): the reference
//! implementation keeps every promise the durable stores keep, except surviving a restart.

use std::sync::Arc;

use agentd_core::memory::MemoryStore;
use agentd_core::store::Store;
use agentd_store_contract::Harness;

/// A memory store; "reopening" it hands out the same store (it has nothing to reload).
struct Memory(Arc<MemoryStore>);

#[async_trait::async_trait]
impl Harness for Memory {
    async fn open(&self) -> Arc<dyn Store> {
        self.0.clone()
    }
}

async fn memory() -> Option<Memory> {
    Some(Memory(Arc::new(MemoryStore::default())))
}

agentd_store_contract::store_contract!(memory());
