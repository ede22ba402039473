//! Prometheus metrics (SPEC.md section 9): the registry and every metric's definition, in one place.
//!
//! One [`Metrics`] is created by `Agentd::start` and shared (an `Arc`) with the run manager, the agent loop
//! and the event log; the server renders it at `GET /metrics` and adds the HTTP figures. Updates are atomic
//! adds on handles resolved ahead of time (a run's status, a turn's provider and model, the event log's
//! commit paths), so the token path takes no lock, allocates nothing, and looks up no label set: a model
//! call adds its tokens once, at its end. Label values are bounded sets: configured provider, model and tool
//! names (a tool the model made up is `unknown`), HTTP statuses, fixed words.
//!
//! Naming: `agentd_` prefix, the unit in the name (`_seconds`, `_bytes`), counters end in `_total`; the
//! exposition is the Prometheus text format and `promtool check metrics` finds nothing in it (a test holds
//! it to that).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::domain::RunStatus;
use crate::provider::ProviderError;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The final statuses a run can end with, in [`Metrics::runs`]'s order.
const FINAL: [RunStatus; 4] = [
    RunStatus::Completed,
    RunStatus::Failed,
    RunStatus::Cancelled,
    RunStatus::Interrupted,
];

/// Every metric agentd exports.
pub struct Metrics {
    registry: Registry,
    /// `agentd_http_requests_total{surface, status}`: answered HTTP requests (a WebSocket counts once, 101).
    pub http_requests: IntCounterVec,
    /// `agentd_http_request_duration_seconds{surface, status}`: time to the response head.
    pub http_request_duration: HistogramVec,
    /// `agentd_open_websockets{surface}`.
    pub open_websockets: IntGaugeVec,
    /// `agentd_open_sse_streams{surface}`.
    pub open_sse_streams: IntGaugeVec,
    runs: [IntCounter; 4],
    /// `agentd_run_queue_wait_seconds`: from a run's acceptance to its turn starting.
    pub run_queue_wait: Histogram,
    /// `agentd_runs_recovered_total`: runs a previous process left unfinished, taken over at start (resumed, queued
    /// again, or ended `interrupted`).
    pub runs_recovered: IntCounter,
    ttft: HistogramVec,
    tpot: HistogramVec,
    input_tokens: IntCounterVec,
    output_tokens: IntCounterVec,
    upstream_errors: IntCounterVec,
    tool_calls: IntCounterVec,
    tool_duration: HistogramVec,
    /// `agentd_pending_inputs{kind="question"}`: `ask_human` questions waiting for a reply.
    pub pending_questions: IntGauge,
    /// `agentd_pending_inputs{kind="approval"}`: tool calls waiting for a person's approval.
    pub pending_approvals: IntGauge,
    /// `agentd_mcp_server_state{server, state}`: 1 for each configured MCP server's current state
    /// (starting, ready, restarting, failed), 0 for the others.
    pub mcp_server_state: IntGaugeVec,
    /// `agentd_mcp_server_restarts_total{server}`.
    pub mcp_restarts: IntCounterVec,
    /// `agentd_mcp_tool_calls_total{server, outcome}`: calls to MCP servers (ok, error, timeout, cancelled).
    pub mcp_calls: IntCounterVec,
    /// `agentd_event_log_events_total`: events committed to the log.
    pub log_events: IntCounter,
    /// `agentd_event_log_batch_events`: events per store call (group commit).
    pub log_batch: Histogram,
    /// `agentd_event_log_commit_duration_seconds{path="tokens"}`: store calls without row changes.
    pub log_commit_tokens: Histogram,
    /// `agentd_event_log_commit_duration_seconds{path="rows"}`: store calls that change rows (messages, runs).
    pub log_commit_rows: Histogram,
    /// `agentd_event_log_commit_failures_total`.
    pub log_failures: IntCounter,
    /// `agentd_subscriber_catchups_total`: live subscribers that fell behind and read the gap from the store.
    pub subscriber_catchups: IntCounter,
}

/// One model's handles, resolved once per turn.
#[derive(Clone)]
pub struct ModelMetrics {
    /// `agentd_model_time_to_first_token_seconds{provider, model}`.
    pub ttft: Histogram,
    /// `agentd_model_time_per_output_token_seconds{provider, model}`.
    pub tpot: Histogram,
    /// `agentd_model_input_tokens_total{provider, model}`.
    pub input_tokens: IntCounter,
    /// `agentd_model_output_tokens_total{provider, model}`.
    pub output_tokens: IntCounter,
}

/// Decrements its gauge when dropped: an open stream, a pending question.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The words a tool call can end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolOutcome {
    Success,
    Error,
    Cancelled,
}

impl ToolOutcome {
    fn as_str(self) -> &'static str {
        match self {
            ToolOutcome::Success => "success",
            ToolOutcome::Error => "error",
            ToolOutcome::Cancelled => "cancelled",
        }
    }
}

/// Second buckets from 1 ms to 30 s (HTTP, tool calls start here).
const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// Defines and registers every metric. The definitions are constants, so this cannot fail in practice; a
    /// unit test builds it.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reg = Reg(&registry);
        let runs_vec = reg.counters(
            "agentd_runs_total",
            "Runs this process ran to their end, by final status.",
            &["status"],
        );
        let runs = FINAL.map(|s| runs_vec.with_label_values(&[status_word(s)]));
        let pending = reg.gauges(
            "agentd_pending_inputs",
            "Requests waiting for a person, by kind (question: ask_human; approval: a tool call to approve).",
            &["kind"],
        );
        let log_commit = reg.histograms(
            "agentd_event_log_commit_duration_seconds",
            "Time the store took to make one batch of events durable, by path (tokens: no row changes; rows: messages and runs).",
            &["path"],
            &[
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 1.0,
            ],
        );
        Metrics {
            http_requests: reg.counters(
                "agentd_http_requests_total",
                "HTTP requests answered, by surface and status (a WebSocket handshake counts once).",
                &["surface", "status"],
            ),
            http_request_duration: reg.histograms(
                "agentd_http_request_duration_seconds",
                "Time from a request to its response head, by surface and status.",
                &["surface", "status"],
                LATENCY,
            ),
            open_websockets: reg.gauges(
                "agentd_open_websockets",
                "WebSockets open now, by surface.",
                &["surface"],
            ),
            open_sse_streams: reg.gauges(
                "agentd_open_sse_streams",
                "Server-sent event streams open now, by surface.",
                &["surface"],
            ),
            runs,
            run_queue_wait: reg.histogram(
                "agentd_run_queue_wait_seconds",
                "Time from a run's acceptance to its turn starting (queued behind the session's earlier turns).",
                &[
                    0.0001, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                ],
            ),
            runs_recovered: reg.counter(
                "agentd_runs_recovered_total",
                "Runs a previous process left unfinished, taken over at start-up (resumed, queued again or ended interrupted).",
            ),
            ttft: reg.histograms(
                "agentd_model_time_to_first_token_seconds",
                "Time from a model call to its first streamed output, by provider and model.",
                &["provider", "model"],
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
                ],
            ),
            tpot: reg.histograms(
                "agentd_model_time_per_output_token_seconds",
                "Mean time between output tokens of one model call, after the first, by provider and model.",
                &["provider", "model"],
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ],
            ),
            input_tokens: reg.counters(
                "agentd_model_input_tokens_total",
                "Prompt tokens sent to models (as reported; estimated when a call reports none), by provider and model.",
                &["provider", "model"],
            ),
            output_tokens: reg.counters(
                "agentd_model_output_tokens_total",
                "Tokens models produced (as reported; streamed deltas when a call reports none), by provider and model.",
                &["provider", "model"],
            ),
            upstream_errors: reg.counters(
                "agentd_upstream_errors_total",
                "Failed model calls, by provider and code (the HTTP status, or timeout, connect, malformed, context_overflow, other).",
                &["provider", "code"],
            ),
            tool_calls: reg.counters(
                "agentd_tool_calls_total",
                "Tool calls, by tool and outcome (success, error, cancelled).",
                &["tool", "outcome"],
            ),
            tool_duration: reg.histograms(
                "agentd_tool_call_duration_seconds",
                "Time a tool call took, by tool.",
                &["tool"],
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 300.0, 600.0,
                ],
            ),
            pending_questions: pending.with_label_values(&["question"]),
            pending_approvals: pending.with_label_values(&["approval"]),
            mcp_server_state: reg.gauges(
                "agentd_mcp_server_state",
                "1 for each MCP server's current state (starting, ready, restarting, failed), 0 for the others.",
                &["server", "state"],
            ),
            mcp_restarts: reg.counters(
                "agentd_mcp_server_restarts_total",
                "Times an MCP server was started again after it failed, crashed or stopped answering.",
                &["server"],
            ),
            mcp_calls: reg.counters(
                "agentd_mcp_tool_calls_total",
                "Tool calls sent to MCP servers, by server and outcome (ok, error, timeout, cancelled).",
                &["server", "outcome"],
            ),
            log_events: reg.counter(
                "agentd_event_log_events_total",
                "Events committed to the event log.",
            ),
            log_batch: reg.histogram(
                "agentd_event_log_batch_events",
                "Events per store call of the event log (group commit).",
                &[
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
                ],
            ),
            log_commit_tokens: log_commit.with_label_values(&["tokens"]),
            log_commit_rows: log_commit.with_label_values(&["rows"]),
            log_failures: reg.counter(
                "agentd_event_log_commit_failures_total",
                "Event log batches the store failed to commit.",
            ),
            subscriber_catchups: reg.counter(
                "agentd_subscriber_catchups_total",
                "Times a live subscriber fell behind the broadcast and read the gap from the store.",
            ),
            registry,
        }
    }

    /// Counts a run that ended here with `status` (no-op for a status that is not final).
    pub fn run_finished(&self, status: RunStatus) {
        if let Some(i) = FINAL.iter().position(|s| *s == status) {
            self.runs[i].inc();
        }
    }

    /// The handles of one provider and model (four label lookups: call once per turn, not per token).
    pub fn model(&self, provider: &str, model: &str) -> ModelMetrics {
        let labels = [provider, model];
        ModelMetrics {
            ttft: self.ttft.with_label_values(&labels),
            tpot: self.tpot.with_label_values(&labels),
            input_tokens: self.input_tokens.with_label_values(&labels),
            output_tokens: self.output_tokens.with_label_values(&labels),
        }
    }

    /// Counts a failed model call.
    pub fn upstream_error(&self, provider: &str, e: &ProviderError) {
        let status;
        let code = match e {
            ProviderError::Status { status: s, .. } => {
                status = s.to_string();
                status.as_str()
            }
            ProviderError::Connect(_) => "connect",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::Malformed(_) => "malformed",
            ProviderError::ContextOverflow(_) => "context_overflow",
            ProviderError::Other(_) => "other",
        };
        self.upstream_errors
            .with_label_values(&[provider, code])
            .inc();
    }

    /// Counts a finished tool call. `tool` must be a configured name (or `unknown`), never the model's text.
    pub fn tool_call(&self, tool: &str, outcome: ToolOutcome, seconds: f64) {
        self.tool_calls
            .with_label_values(&[tool, outcome.as_str()])
            .inc();
        self.tool_duration
            .with_label_values(&[tool])
            .observe(seconds);
    }

    /// The exposition (Prometheus text format).
    pub fn render(&self) -> Result<String, String> {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .map_err(|e| e.to_string())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn status_word(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Completed => "completed",
        RunStatus::Failed => "failed",
        RunStatus::Cancelled => "cancelled",
        RunStatus::Interrupted => "interrupted",
        RunStatus::Queued => "queued",
        RunStatus::Running => "running",
        RunStatus::WaitingInput => "waiting_input",
    }
}

/// Registration helpers: every definition is a constant, so a failure is a programming error caught by the
/// unit test below.
struct Reg<'a>(&'a Registry);

const CONSTANT: &str = "metric definitions are constants";

impl Reg<'_> {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&self, m: M) -> M {
        self.0.register(Box::new(m.clone())).expect(CONSTANT);
        m
    }
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::with_opts(Opts::new(name, help)).expect(CONSTANT))
    }
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect(CONSTANT))
    }
    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect(CONSTANT))
    }
    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(Histogram::with_opts(opts).expect(CONSTANT))
    }
    fn histograms(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(HistogramVec::new(opts, labels).expect(CONSTANT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_register_and_render() {
        let m = Metrics::new();
        m.run_finished(RunStatus::Completed);
        m.run_finished(RunStatus::Running);
        m.upstream_error(
            "p",
            &ProviderError::Status {
                status: 500,
                body: String::new(),
            },
        );
        m.tool_call("calculator", ToolOutcome::Success, 0.01);
        let text = m.render().expect("render");
        assert!(
            text.contains("agentd_runs_total{status=\"completed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("agentd_runs_total{status=\"failed\"} 0"),
            "{text}"
        );
        assert!(!text.contains("status=\"running\""), "{text}");
        assert!(
            text.contains("agentd_upstream_errors_total{code=\"500\",provider=\"p\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("agentd_pending_inputs{kind=\"question\"} 0"),
            "{text}"
        );
    }
}
