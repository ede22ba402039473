//! The `agentd` program: assembles the parts from a config (store, providers, service, surfaces) and runs
//! them. The binary (`main.rs`) is the command line; tests call [`build`] and [`agentd_server::serve`] directly,
//! so they run exactly what `agentd serve` runs.

pub mod chat;
pub mod copy_store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use agentd_core::config::{Config, ProviderSettings};
use agentd_core::provider::Provider;
use agentd_core::service::Agentd;
use agentd_core::store::Store;

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
                parallel,
            } => {
                if !Path::new(model_path).exists() {
                    return Err(format!(
                        "providers.{name}: {}",
                        agentd_llama::missing_model_message(Path::new(model_path))
                    ));
                }
                let settings = agentd_llama::LlamaSettings {
                    model_path: model_path.into(),
                    context_tokens: u32::try_from(*context_tokens).unwrap_or(u32::MAX),
                    threads: *threads,
                    parallel: *parallel,
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

/// Binds `server.listen`: an address (`127.0.0.1:8080`, `[::1]:8080`) or a host name and port
/// (`localhost:8080`), resolved, IPv4 addresses first. The first address is served; the next one is tried only
/// when the first cannot be had on this machine (no IPv6, say), not when its port is taken: that is an error
/// naming the port. Called before anything is created on disk.
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener, String> {
    let addrs: Vec<SocketAddr> = match listen.parse::<SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) => {
            let mut found: Vec<SocketAddr> = tokio::net::lookup_host(listen)
                .await
                .map_err(|e| format!("server.listen: cannot resolve `{listen}`: {e}"))?
                .collect();
            found.sort_by_key(SocketAddr::is_ipv6);
            found.dedup();
            found
        }
    };
    let mut failed = format!("server.listen: `{listen}` resolves to no address");
    for addr in addrs {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(format!(
                    "server.listen: cannot listen on {addr}: the port is already in use (another agentd or \
                     program listens there; pick another port with --listen or server.listen)"
                ));
            }
            Err(e) => failed = format!("server.listen: cannot bind {addr}: {e}"),
        }
    }
    Err(failed)
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
