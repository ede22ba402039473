//! The `agentd` program: assembles the parts from a config (store, providers, service, surfaces) and runs
//! them. The binary (`main.rs`) is the command line; tests call [`build`] and [`agentd_server::serve`] directly,
//! so they run exactly what `agentd serve` runs.

pub mod chat;
pub mod copy_store;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use agentd_core::config::{Config, ProviderSettings};
use agentd_core::provider::Provider;
use agentd_core::service::Agentd;
use agentd_core::store::Store;

/// The command that fetches the default model, named in the error when it is missing.
pub const FETCH_MODEL_COMMAND: &str = "./scripts/fetch-model.sh";

/// Builds every configured provider. A missing or unreadable model file is a one-line error.
pub async fn providers(config: &Config) -> Result<HashMap<String, Arc<dyn Provider>>, String> {
    let mut out: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    for (name, settings) in &config.providers {
        let provider: Arc<dyn Provider> = match settings {
            ProviderSettings::OpenAi {
                base_url,
                api_key,
                timeout_s,
                context_tokens,
            } => {
                let p = agentd_openai::OpenAiProvider::new(agentd_openai::OpenAiSettings {
                    base_url: base_url.clone(),
                    api_key: api_key.clone(),
                    timeout_s: *timeout_s,
                    context_tokens: *context_tokens,
                })
                .map_err(|e| format!("providers.{name}: {e}"))?;
                Arc::new(p)
            }
            ProviderSettings::Llama {
                model_path,
                context_tokens,
                threads,
            } => {
                if !Path::new(model_path).exists() {
                    return Err(format!(
                        "providers.{name}: model file `{model_path}` not found; fetch the default model with `{FETCH_MODEL_COMMAND}` (the README's run command does it for you)"
                    ));
                }
                let settings = agentd_llama::LlamaSettings {
                    model_path: model_path.into(),
                    context_tokens: u32::try_from(*context_tokens).unwrap_or(u32::MAX),
                    threads: *threads,
                };
                let p = tokio::task::spawn_blocking(move || {
                    agentd_llama::LlamaProvider::load(settings)
                })
                .await
                .map_err(|e| format!("providers.{name}: model loading crashed: {e}"))?
                .map_err(|e| format!("providers.{name}: {e}"))?;
                Arc::new(p)
            }
        };
        out.insert(name.clone(), provider);
    }
    Ok(out)
}

/// Opens the store named by `store.url` (see [`open_store`]).
pub async fn store(config: &Config) -> Result<Arc<dyn Store>, String> {
    open_store(&config.store_url, config.store_max_connections)
        .await
        .map_err(|e| format!("store.url: {e}"))
}

/// Opens a store from its URL: PostgreSQL for `postgres://` (and `postgresql://`) URLs, with at most
/// `max_connections`; SQLite otherwise. An error is one line naming the database (never a password) and the
/// cause.
pub async fn open_store(url: &str, max_connections: usize) -> Result<Arc<dyn Store>, String> {
    if agentd_postgres::is_postgres_url(url) {
        let store = agentd_postgres::PgStore::open(url, max_connections)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(Arc::new(store));
    }
    let url = url.to_string();
    let store = tokio::task::spawn_blocking(move || agentd_sqlite::SqliteStore::open_url(&url))
        .await
        .map_err(|e| format!("opening the store crashed: {e}"))?
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(store))
}

/// Assembles the service from a validated config. MCP servers start in the background (their supervisors
/// live as long as the returned service).
pub async fn build(config: Config) -> Result<Arc<Agentd>, String> {
    let config = Arc::new(config);
    // Providers first: a missing model file should fail before anything is created on disk.
    let providers = providers(&config).await?;
    let store = store(&config).await?;
    let metrics = Arc::new(agentd_core::metrics::Metrics::new());
    let mcp = agentd_mcp::McpHub::start(&config, metrics.clone())
        .map(|hub| hub as Arc<dyn agentd_core::registry::ExternalTools>);
    Agentd::start_with_tools(config, store, providers, metrics, mcp).await
}
