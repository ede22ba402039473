//! The inference engine: one loaded model, one context, one dedicated thread, a FIFO of jobs.
//!
//! Why a thread of its own: decoding is seconds of CPU-bound FFI work that must not run on the async runtime's
//! workers, and a llama.cpp context is not `Sync`, so exactly one thread owns it. Contexts are created only
//! here, one per model, once (llama-cpp-2 documents creating contexts from one model in parallel as unsound).
//!
//! Why a queue: the machine has few cores and one generation already uses `threads` of them, so concurrent
//! turns wait in a bounded FIFO (tokio's bounded channel hands out slots in arrival order) rather than running
//! side by side and slowing each other down.
//!
//! A call goes: [`Engine::submit`] renders and tokenizes the prompt on a blocking thread (so a context overflow
//! is reported before anything is queued), builds the samplers, and enqueues a [`Job`] holding the sending half
//! of a bounded event channel; the caller gets the receiving half as its stream. The engine thread reuses the
//! longest prefix of the previous prompt still in the KV cache (an agent loop resends the same history every
//! round), decodes the rest, then samples token by token. Before each token it checks whether the stream was
//! dropped, so a cancel stops generation within one token.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agentd_core::domain::{ToolCall, Usage};
use agentd_core::provider::{ModelEvent, ModelRequest, ModelStream, ProviderError};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::{LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use crate::grammar::{self, Output, OutputRouter, GRAMMAR_ROOT};
use crate::utf8::Utf8Stream;
use crate::{model_file, prompt, GenerateOptions, LlamaSettings, ToolChoice};

/// Calls waiting for the engine beyond the one running. More callers wait (fairly) for a free slot.
const JOB_QUEUE: usize = 64;
/// Events buffered per call before the engine waits for the consumer; small, so a slow reader slows generation
/// instead of letting it run far ahead, and a cancel wastes few tokens.
const EVENT_BUFFER: usize = 16;
/// Largest number of prompt tokens decoded in one llama.cpp batch.
const MAX_BATCH: u32 = 512;
/// Sampling: top-k then top-p before temperature, as llama.cpp's defaults do.
const TOP_K: i32 = 40;
const TOP_P: f32 = 0.9;

type EventSender = mpsc::Sender<Result<ModelEvent, ProviderError>>;

/// The shared half of a loaded model: what callers need to prepare jobs, and the queue to the engine thread.
pub(crate) struct Engine {
    jobs: mpsc::Sender<Job>,
    /// Shared with the engine thread; read-only use here (tokenizing, grammar set-up) is thread-safe.
    model: Arc<LlamaModel>,
    template: LlamaChatTemplate,
    /// Tokens that end a reply (end-of-generation and other control tokens), banned when
    /// [`GenerateOptions::ignore_eos`] is set.
    stop_tokens: Vec<LlamaToken>,
    counters: Arc<Counters>,
    pub(crate) model_path: PathBuf,
    pub(crate) context_tokens: u32,
}

/// Running totals since the model was loaded, for tests and metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Tokens sampled, over all calls, cancelled ones included.
    pub(crate) generated: AtomicU64,
    /// Prompt tokens actually run through the model, i.e. not served from the cached prefix.
    pub(crate) prompt_decoded: AtomicU64,
}

/// One model call, as queued.
struct Job {
    prompt: Vec<LlamaToken>,
    sampling: Sampling,
    /// Most tokens to generate: the caller's limit, or the room left in the context.
    max_new: u32,
    /// The request's tool names; empty means no grammar and plain text.
    tools: Vec<String>,
    events: EventSender,
}

/// Why a generation ended early.
enum Stop {
    /// The caller dropped the stream.
    Cancelled,
    Failed(ProviderError),
}

impl From<ProviderError> for Stop {
    fn from(e: ProviderError) -> Self {
        Stop::Failed(e)
    }
}

impl Engine {
    /// Loads the model, starts the engine thread and waits until its context exists.
    pub(crate) fn start(settings: LlamaSettings) -> Result<Engine, String> {
        let path = settings.model_path.clone();
        let fail = |cause: &str| format!("cannot load model {}: {cause}", path.display());
        if settings.context_tokens == 0 {
            return Err(fail("context_tokens must be at least 1"));
        }
        let threads = i32::try_from(settings.threads)
            .ok()
            .filter(|t| *t > 0)
            .ok_or_else(|| fail("threads must be at least 1"))?;

        let model = Arc::new(model_file::load_model(&path)?);
        let template = prompt::model_template(&model);
        let vocab = model.vocab();
        let stop_tokens: Vec<LlamaToken> = vocab
            .tokens()
            .filter(|t| vocab.is_eog(*t) || vocab.is_control(*t))
            .collect();
        let counters = Arc::new(Counters::default());

        let (jobs_tx, jobs_rx) = mpsc::channel(JOB_QUEUE);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread_model = Arc::clone(&model);
        let thread_counters = Arc::clone(&counters);
        let context_tokens = settings.context_tokens;
        std::thread::Builder::new()
            .name("agentd-llama".to_string())
            .spawn(move || {
                engine_thread(
                    &thread_model,
                    context_tokens,
                    threads,
                    jobs_rx,
                    &ready_tx,
                    &thread_counters,
                )
            })
            .map_err(|e| fail(&format!("cannot start the inference thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(cause)) => return Err(fail(&cause)),
            Err(_) => return Err(fail("the inference thread exited during start-up")),
        }

        Ok(Engine {
            jobs: jobs_tx,
            model,
            template,
            stop_tokens,
            counters,
            model_path: path,
            context_tokens,
        })
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Prepares the call off the async workers, queues it, and returns its event stream.
    pub(crate) async fn submit(
        engine: &Arc<Engine>,
        request: ModelRequest,
        options: GenerateOptions,
    ) -> Result<ModelStream, ProviderError> {
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let preparer = Arc::clone(engine);
        let job = tokio::task::spawn_blocking(move || preparer.prepare(&request, &options, events))
            .await
            .map_err(|e| ProviderError::Other(format!("preparing the prompt failed: {e}")))??;
        engine.jobs.send(job).await.map_err(|_| {
            ProviderError::Other("the llama inference thread has stopped".to_string())
        })?;
        // Dropping this stream drops the receiver, which closes the channel: that is the engine's cancel signal.
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|event| (event, receiver))
        });
        Ok(Box::pin(stream))
    }

    /// Renders and tokenizes the prompt, checks it fits, and builds the samplers: everything but the decoding.
    fn prepare(
        &self,
        request: &ModelRequest,
        options: &GenerateOptions,
        events: EventSender,
    ) -> Result<Job, ProviderError> {
        if options.tool_choice == ToolChoice::Required && request.tools.is_empty() {
            return Err(ProviderError::Other(
                "tool_choice Required needs at least one tool".to_string(),
            ));
        }
        if options.max_tokens == Some(0) {
            return Err(ProviderError::Other(
                "max_tokens must be at least 1".to_string(),
            ));
        }
        let text = prompt::render(
            &self.model,
            &self.template,
            &request.messages,
            &request.tools,
        )
        .map_err(ProviderError::Other)?;
        let vocab = self.model.vocab();
        // `parse_special`: the template writes its turn markers as text; they must become the special tokens.
        let mut tokens = vocab.tokenize(text.as_bytes(), false, true);
        if vocab.should_add_bos() && tokens.first() != Some(&vocab.bos()) {
            tokens.insert(0, vocab.bos());
        }
        let prompt_len = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        if prompt_len == 0 {
            return Err(ProviderError::Other("the prompt is empty".to_string()));
        }
        if prompt_len >= self.context_tokens {
            return Err(ProviderError::ContextOverflow(format!(
                "the prompt is {prompt_len} tokens but the model's context holds {} (including at least 1 generated token)",
                self.context_tokens
            )));
        }
        let room = self.context_tokens - prompt_len;
        let max_new = options.max_tokens.map_or(room, |m| m.min(room));
        let sampling = Sampling::new(&self.model, &request.tools, options, &self.stop_tokens)?;
        let tools = request.tools.iter().map(|t| t.name.clone()).collect();
        Ok(Job {
            prompt: tokens,
            sampling,
            max_new,
            tools,
            events,
        })
    }
}

/// A fresh random seed (the v4 UUID generator is the randomness already in the dependency tree).
fn random_seed() -> u32 {
    // Truncation is the point: any 32 bits of a random value are random.
    uuid::Uuid::new_v4().as_u128() as u32
}

/// The samplers of one call: the ordinary chain, plus the tool grammar when the request has tools.
struct Sampling {
    chain: LlamaSampler,
    grammar: Option<LlamaSampler>,
    /// The chain's first stage keeps this many tokens (top-k, or 1 for greedy): see [`top_candidates`].
    keep: usize,
    /// Tokens the chain's logit bias bans (the stop tokens, when the caller asked to ignore them).
    bans: Vec<LlamaToken>,
}

impl Sampling {
    fn new(
        model: &LlamaModel,
        tools: &[agentd_core::provider::ToolSpec],
        options: &GenerateOptions,
        stop_tokens: &[LlamaToken],
    ) -> Result<Sampling, ProviderError> {
        let mut stages = Vec::new();
        let mut banned = Vec::new();
        if options.ignore_eos && tools.is_empty() {
            banned = stop_tokens.to_vec();
            let bans: Vec<LlamaLogitBias> = stop_tokens
                .iter()
                .map(|t| LlamaLogitBias::new(*t, f32::NEG_INFINITY))
                .collect();
            stages.push(LlamaSampler::logit_bias(model.n_vocab(), &bans));
        }
        let keep = if options.temperature <= 0.0 {
            1
        } else {
            TOP_K.unsigned_abs() as usize
        };
        if options.temperature <= 0.0 {
            stages.push(LlamaSampler::greedy());
        } else {
            stages.push(LlamaSampler::top_k(TOP_K));
            stages.push(LlamaSampler::top_p(TOP_P, 1));
            stages.push(LlamaSampler::temp(options.temperature));
            stages.push(LlamaSampler::dist(options.seed.unwrap_or_else(random_seed)));
        }
        let chain = LlamaSampler::chain_simple(stages);
        let grammar = if tools.is_empty() {
            None
        } else {
            let text =
                grammar::tool_grammar(tools, options.tool_choice).map_err(ProviderError::Other)?;
            let sampler = LlamaSampler::grammar(model, &text, GRAMMAR_ROOT).map_err(|e| {
                ProviderError::Other(format!("llama.cpp rejected the tool grammar: {e}"))
            })?;
            Some(sampler)
        };
        Ok(Sampling {
            chain,
            grammar,
            keep,
            bans: banned,
        })
    }

    /// Picks the next token from the logits at batch index `at`, and records it in the samplers' state.
    ///
    /// The chain runs on the few tokens its first stage would keep ([`top_candidates`]), not on the whole
    /// vocabulary. With a grammar this follows llama.cpp's own shortcut: sample without the grammar first and check only that
    /// token against it, because running the grammar over the whole vocabulary (49k tokens for SmolLM2) on
    /// every step would cost more than the model itself. Only a rejected token pays for the full pass.
    fn sample(&mut self, ctx: &LlamaContext<'_>, at: i32) -> Result<LlamaToken, ProviderError> {
        let mut candidates = top_candidates(ctx.get_logits_ith(at), self.keep, &self.bans);
        candidates.apply_sampler(&mut self.chain);
        let Some(grammar) = self.grammar.as_mut() else {
            let token = candidates
                .selected_token()
                .ok_or_else(|| ProviderError::Other("the sampler chose no token".to_string()))?;
            self.chain.accept(token);
            return Ok(token);
        };
        let first_choice = candidates
            .selected_token()
            .filter(|token| grammar_allows(grammar, *token));
        let token = match first_choice {
            Some(token) => token,
            None => {
                let mut candidates = ctx.token_data_array_ith(at);
                candidates.apply_sampler(grammar);
                candidates.apply_sampler(&mut self.chain);
                candidates
                    .selected_token()
                    .filter(|token| grammar_allows(grammar, *token))
                    .ok_or_else(|| {
                        ProviderError::Other("no token satisfies the tool grammar".to_string())
                    })?
            }
        };
        // Allowed by the grammar (checked on both paths): accepting it cannot fail. llama.cpp's grammar throws
        // on a token its state does not allow, and a throw cannot cross into Rust, hence the check first.
        grammar.accept(token);
        self.chain.accept(token);
        Ok(token)
    }
}

/// Whether `grammar`, in its current state, allows `token` next: the grammar applied to that one token leaves
/// its logit finite.
fn grammar_allows(grammar: &mut LlamaSampler, token: LlamaToken) -> bool {
    let mut single = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 0.0, 0.0)], false);
    single.apply_sampler(grammar);
    single.data.first().is_some_and(|d| d.logit().is_finite())
}

/// The `keep` tokens with the highest logits, none of them in `bans`, found in one pass over the vocabulary.
///
/// The sampling chain starts with top-k (or greedy, `keep` = 1), so these are exactly the tokens it would go
/// on with: the chain gives the same choice on them as on the whole vocabulary, without building and sorting
/// a 49k-entry candidate array on every token (which llama-bench, the speed this is measured against, never
/// does). Most logits fail the comparison with the current k-th best and cost one compare.
fn top_candidates(logits: &[f32], keep: usize, bans: &[LlamaToken]) -> LlamaTokenDataArray {
    let keep = keep.max(1);
    let mut top: Vec<LlamaTokenData> = Vec::with_capacity(keep);
    // The smallest kept logit and its slot, once `top` is full.
    let mut floor = (0usize, f32::NEG_INFINITY);
    for (id, &logit) in logits.iter().enumerate() {
        if top.len() == keep && logit <= floor.1 || logit.is_nan() {
            continue;
        }
        let Ok(id) = i32::try_from(id) else { break };
        let token = LlamaToken::new(id);
        if bans.contains(&token) {
            continue;
        }
        let data = LlamaTokenData::new(token, logit, 0.0);
        if top.len() < keep {
            top.push(data);
            if top.len() < keep {
                continue;
            }
        } else {
            top[floor.0] = data;
        }
        floor = top
            .iter()
            .enumerate()
            .fold((0, f32::INFINITY), |low, (i, d)| {
                if d.logit() < low.1 {
                    (i, d.logit())
                } else {
                    low
                }
            });
    }
    LlamaTokenDataArray::new(top, false)
}

/// The engine thread: creates the context, reports readiness, then runs jobs in arrival order until every
/// [`Engine`] handle (and with it the queue's sender) is gone.
fn engine_thread(
    model: &LlamaModel,
    context_tokens: u32,
    threads: i32,
    mut jobs: mpsc::Receiver<Job>,
    ready: &std::sync::mpsc::SyncSender<Result<(), String>>,
    counters: &Counters,
) {
    let backend = match model_file::backend() {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let n_batch = context_tokens.min(MAX_BATCH);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(context_tokens))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let ctx = match model.new_context(backend, params) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "llama.cpp could not create a {context_tokens}-token context: {e}"
            )));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    // `n_batch` is at most MAX_BATCH, so the cast is lossless.
    let mut worker = Worker {
        model,
        ctx,
        cached: Vec::new(),
        batch: LlamaBatch::new(n_batch as usize, 1),
        n_batch,
        counters,
    };
    while let Some(job) = jobs.blocking_recv() {
        worker.run(job);
    }
}

/// The engine thread's state between jobs.
struct Worker<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    /// The tokens whose keys and values are in the context's cache (sequence 0), in order.
    cached: Vec<LlamaToken>,
    batch: LlamaBatch<'static>,
    n_batch: u32,
    counters: &'m Counters,
}

impl Worker<'_> {
    fn run(&mut self, mut job: Job) {
        // Cancelled while it waited in the queue: skip it without decoding anything.
        if job.events.is_closed() {
            return;
        }
        match self.generate(&mut job) {
            Ok(()) | Err(Stop::Cancelled) => {}
            Err(Stop::Failed(e)) => {
                let _ = job.events.blocking_send(Err(e));
            }
        }
    }

    fn generate(&mut self, job: &mut Job) -> Result<(), Stop> {
        let reused = self.reuse_prefix(&job.prompt);
        let fresh = &job.prompt[reused..];
        self.counters
            .prompt_decoded
            .fetch_add(fresh.len() as u64, Ordering::Relaxed);
        let mut logits_at = self.feed(fresh, &job.events)?;

        let vocab = self.model.vocab();
        let mut utf8 = Utf8Stream::default();
        let mut router = OutputRouter::new(!job.tools.is_empty());
        let mut piece = Vec::new();
        let mut produced: u32 = 0;
        while produced < job.max_new {
            if job.events.is_closed() {
                return Err(Stop::Cancelled);
            }
            let token = job.sampling.sample(&self.ctx, logits_at)?;
            // A control token other than end-of-turn (e.g. ChatML's `<|im_start|>`) means the model is starting
            // another turn: the answer is over either way.
            if vocab.is_eog(token) || vocab.is_control(token) {
                break;
            }
            produced += 1;
            self.counters.generated.fetch_add(1, Ordering::Relaxed);
            piece.clear();
            vocab.token_to_piece_into(token, &mut piece, false, None);
            if let Some(text) = router.push(&utf8.push(&piece)) {
                send(&job.events, ModelEvent::Text(text))?;
            }
            if router.tool_call_closed() || produced == job.max_new {
                break;
            }
            logits_at = self.feed(&[token], &job.events)?;
        }
        if let Some(text) = router.push(&utf8.finish()) {
            send(&job.events, ModelEvent::Text(text))?;
        }
        if let Output::ToolCall(raw) = router.finish() {
            let (name, arguments) = grammar::parse_tool_call(&raw, &job.tools).map_err(|e| {
                // The start of what the model wrote, escaped onto one line, so the failure can be diagnosed.
                let start: String = raw.chars().take(160).collect();
                ProviderError::Malformed(format!("{e}; the model wrote {start:?}"))
            })?;
            let id = format!("call_{}", uuid::Uuid::new_v4().simple());
            send(
                &job.events,
                ModelEvent::ToolCall(ToolCall {
                    id,
                    name,
                    arguments,
                }),
            )?;
        }
        let usage = Usage {
            prompt_tokens: job.prompt.len() as u64,
            completion_tokens: u64::from(produced),
        };
        send(&job.events, ModelEvent::Usage(usage))
    }

    /// Keeps the longest prefix of `prompt` already in the cache, drops the rest of the cache, and returns how
    /// many prompt tokens need no decoding. At least one token is always left to decode: its logits start
    /// the generation.
    fn reuse_prefix(&mut self, prompt: &[LlamaToken]) -> usize {
        let mut keep = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        keep = keep.min(prompt.len().saturating_sub(1));
        if keep < self.cached.len() {
            let removed = u32::try_from(keep)
                .ok()
                .is_some_and(|p0| self.ctx.kv_cache_seq_rm(0, Some(p0), None).is_ok());
            if !removed {
                self.ctx.clear_kv_cache();
                keep = 0;
            }
            self.cached.truncate(keep);
        }
        keep
    }

    /// Decodes `tokens` after the cached ones, in batches, checking for cancel between batches. Returns the
    /// batch index of the last token, whose logits the next sample reads.
    fn feed(&mut self, tokens: &[LlamaToken], events: &EventSender) -> Result<i32, Stop> {
        let mut last = 0;
        let chunks = tokens.chunks(self.n_batch as usize);
        let n_chunks = chunks.len();
        for (i, chunk) in chunks.enumerate() {
            if events.is_closed() {
                return Err(Stop::Cancelled);
            }
            self.batch.clear();
            for (j, token) in chunk.iter().enumerate() {
                let pos = i32::try_from(self.cached.len() + j).unwrap_or(i32::MAX);
                let wants_logits = i + 1 == n_chunks && j + 1 == chunk.len();
                if let Err(e) = self.batch.add(*token, pos, &[0], wants_logits) {
                    return Err(self.fail(format!("cannot fill a llama.cpp batch: {e}")));
                }
            }
            if let Err(e) = self.ctx.decode(&mut self.batch) {
                return Err(self.fail(format!("llama.cpp failed to decode: {e}")));
            }
            self.cached.extend_from_slice(chunk);
            last = self.batch.n_tokens() - 1;
        }
        Ok(last)
    }

    /// After a failed decode the cache contents are unknown: forget them, so the next job starts clean.
    fn fail(&mut self, message: String) -> Stop {
        self.ctx.clear_kv_cache();
        self.cached.clear();
        Stop::Failed(ProviderError::Other(message))
    }
}

/// Sends one event, waiting while the consumer's buffer is full; a dropped stream ends the job.
fn send(events: &EventSender, event: ModelEvent) -> Result<(), Stop> {
    events.blocking_send(Ok(event)).map_err(|_| Stop::Cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(array: &LlamaTokenDataArray) -> Vec<i32> {
        let mut ids: Vec<i32> = array.data.iter().map(|d| d.id().0).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn top_candidates_are_the_highest_logits_of_the_whole_vocabulary() {
        // A pseudo-random vocabulary; the expected answer by sorting all of it.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let logits: Vec<f32> = (0..49_152)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 100_000) as f32 / 1000.0 - 50.0
            })
            .collect();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        for keep in [1, 2, 40] {
            let mut want: Vec<i32> = order[..keep].iter().map(|i| *i as i32).collect();
            want.sort_unstable();
            let got = top_candidates(&logits, keep, &[]);
            assert_eq!(ids(&got), want, "keep {keep}");
            for d in &got.data {
                assert_eq!(d.logit(), logits[d.id().0 as usize]);
            }
        }
        // Banned tokens are never candidates, however likely.
        let best = LlamaToken::new(order[0] as i32);
        let got = top_candidates(&logits, 1, &[best]);
        assert_eq!(ids(&got), vec![order[1] as i32]);
    }

    #[test]
    fn top_candidates_skip_nan_and_handle_a_small_vocabulary() {
        let logits = [1.0, f32::NAN, 3.0, 2.0];
        assert_eq!(ids(&top_candidates(&logits, 40, &[])), vec![0, 2, 3]);
        assert_eq!(ids(&top_candidates(&logits, 2, &[])), vec![2, 3]);
        assert!(top_candidates(&[], 40, &[]).data.is_empty());
    }
}
