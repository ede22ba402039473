//! agentd-core: everything agentd is, minus the wire.
//!
//! A tour, in the order a message flows:
//! - [`service`]: the facade every surface calls (`Agentd`): validation, ownership, sends, uploads, attach.
//! - [`skills`]: picks a skill for a message (`@skill:` prefix or keywords).
//! - [`runs`]: the run manager; each turn is a server-owned task, queued per session, cancellable.
//! - [`remote`]: run control across nodes: cancels, replies and `multitask` for runs other nodes execute.
//! - [`agent_loop`]: one turn's ReAct loop: model call, tools, results, until an answer.
//! - [`registry`]: the one tool registry (built-ins, subagents, MCP tools) and the MCP seam (`ExternalTools`).
//! - [`tools`]: built-in tools; [`think`]: `<think>` splitting of streamed text.
//! - [`uploads`]: files kept in a session's workspace (client uploads, tool results too long to show whole).
//! - [`event_log`]: append with group commit, then fan-out to subscribers; replay from the store.
//! - [`event`]: the one internal event model every surface renders.
//! - [`domain`]: sessions, messages, runs (the native API's shapes).
//! - [`store`]: the storage seam (`Store`), implemented by `agentd-sqlite`.
//! - [`provider`]: the model seam (`Provider`), implemented by `agentd-openai`, `agentd-llama`, [`scripted`].
//! - [`limits`]: per-principal limits (messages per minute, open streams), for every surface.
//! - [`metrics`]: the Prometheus registry and every metric's definition (rendered at `GET /metrics`).
//! - [`config`]: the TOML configuration, parsed once and validated into typed settings.
//!
//! Invariant: nothing in this crate speaks HTTP or knows a wire dialect.

pub mod agent_loop;
pub mod config;
pub mod domain;
pub mod event;
pub mod event_log;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod provider;
pub mod registry;
pub mod remote;
pub mod runs;
pub mod scripted;
pub mod service;
pub mod skills;
pub mod store;
pub mod think;
pub mod tools;
pub mod uploads;
