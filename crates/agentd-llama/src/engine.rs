//! The inference engine: one loaded model, one context with several sequences (slots), one dedicated thread
//! that decodes the turns of all slots together, step by step (continuous batching, as `llama-server
//! --parallel N` does).
//!
//! Why a thread of its own: decoding is seconds of CPU-bound FFI work that must not run on the async runtime's
//! workers, and a llama.cpp context is not `Sync`, so exactly one thread owns it. Contexts are created only
//! here, one per model, once (llama-cpp-2 documents creating contexts from one model in parallel as unsound).
//!
//! Why one batch for several turns: generating one token reads every weight of the model once, and reading
//! them dominates its cost on a CPU, so the next tokens of several turns decoded in one batch cost little more
//! than one. Turns beyond the slots wait in a bounded FIFO (tokio's bounded channel hands out places in arrival
//! order) and take a slot as one frees, at the next step.
//!
//! A call goes: [`Engine::submit`] renders and tokenizes the prompt on a blocking thread (so a context overflow
//! is reported before anything is queued), builds the samplers, and enqueues a [`Job`] holding the sending half
//! of a bounded event channel; the caller gets the receiving half as its stream. The engine thread gives the
//! job the free slot whose cache shares the longest prefix with its prompt (an agent loop resends the same
//! history every round, and each slot keeps its last turn's tokens), drops the rest of that slot's cache, then
//! feeds the remaining prompt in shares of each step's batch and samples one token per step with the turn's
//! own samplers (and grammar). Before each step it checks every stream: a dropped one (the cancel signal)
//! frees its slot at once, and the other turns go on.

use std::collections::VecDeque;
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
use llama_cpp_2::vocab::LlamaVocab;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::grammar::{self, Output, OutputRouter, GRAMMAR_ROOT};
use crate::utf8::Utf8Stream;
use crate::{model_file, prompt, GenerateOptions, LlamaSettings, ToolChoice};

/// Calls waiting for a slot beyond the running ones. More callers wait (fairly) for a place in the queue.
const JOB_QUEUE: usize = 64;
/// Events buffered per call before its turn pauses for the consumer; small, so a slow reader slows its own
/// generation instead of letting it run far ahead, and a cancel wastes few tokens.
const EVENT_BUFFER: usize = 16;
/// Largest number of tokens decoded in one step (one llama.cpp batch).
const MAX_BATCH: u32 = 512;
/// Prompt tokens decoded per step while turns generate, and the first step's budget when only prompts are fed
/// (see [`Worker::prompt_budget`]).
const PROMPT_STEP: usize = 64;
/// Most slots a context may have (llama.cpp allows 256 sequences; more turns at once than this would each
/// crawl on a CPU).
pub(crate) const MAX_PARALLEL: u32 = agentd_core::config::MAX_PARALLEL;
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
        if !(1..=MAX_PARALLEL).contains(&settings.parallel) {
            return Err(fail(&format!(
                "parallel must be between 1 and {MAX_PARALLEL}"
            )));
        }
        if settings
            .context_tokens
            .checked_mul(settings.parallel)
            .is_none()
        {
            return Err(fail("context_tokens × parallel is too large"));
        }

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
        let shape = ContextShape {
            context_tokens,
            parallel: settings.parallel,
            threads,
        };
        std::thread::Builder::new()
            .name("agentd-llama".to_string())
            .spawn(move || {
                engine_thread(&thread_model, shape, jobs_rx, &ready_tx, &thread_counters)
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

/// The engine thread: creates the context, reports readiness, then runs the step loop until every [`Engine`]
/// handle (and with it the queue's sender) is gone and the last turn has ended.
fn engine_thread(
    model: &LlamaModel,
    shape: ContextShape,
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
    let ContextShape {
        context_tokens,
        parallel,
        threads,
    } = shape;
    // One KV stream per sequence (llama.cpp's default, as `llama-server --parallel N` has): each sequence holds
    // `context_tokens` and attends only to its own cells, so an idle slot's cached prompt costs a running turn
    // nothing. The total is checked at start-up, so the product fits.
    let total = context_tokens.saturating_mul(parallel);
    let n_batch = total.min(MAX_BATCH);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(total))
        .with_n_seq_max(parallel)
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let ctx = match model.new_context(backend, params) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "llama.cpp could not create a context of {parallel} × {context_tokens} tokens: {e}"
            )));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let slots = (0..parallel)
        .map(|seq| Slot {
            // `parallel` is at most MAX_PARALLEL, so the cast is lossless.
            seq: seq as i32,
            cached: Vec::new(),
            last_used: 0,
            turn: None,
        })
        .collect();
    // `n_batch` is at most MAX_BATCH, so the cast is lossless.
    let mut worker = Worker {
        model,
        ctx,
        batch: LlamaBatch::new(n_batch as usize, 1),
        n_batch: n_batch as usize,
        counters,
        slots,
        clock: 0,
        ramp: 0,
    };
    while worker.admit(&mut jobs) {
        worker.deliver();
        if !worker.step() && worker.busy() {
            // Every running turn waits for its consumer to read: nothing to decode until one does.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// What the engine thread's context is made of.
#[derive(Clone, Copy)]
struct ContextShape {
    /// Per sequence, i.e. per turn: what one turn may hold, prompt and answer.
    context_tokens: u32,
    /// Sequences (slots) decoded together.
    parallel: u32,
    threads: i32,
}

/// One sequence of the context: its cached tokens, and the turn using it, if any.
struct Slot {
    /// The llama.cpp sequence id.
    seq: i32,
    /// The tokens whose keys and values are in this sequence's cache, in order: what the slot's last turn fed
    /// and generated. Kept after the turn ends, so the next call that extends it (an agent loop resends its
    /// history) decodes only what is new.
    cached: Vec<LlamaToken>,
    /// When the slot was last taken or released ([`Worker::clock`]), to pick the least recently used slot.
    last_used: u64,
    turn: Option<Turn>,
}

/// A call in progress in a slot.
struct Turn {
    job: Job,
    /// Prompt tokens in the slot's cache; the prompt is being fed while this is short of its length.
    fed: usize,
    /// The token sampled last, to decode in the next step (while generating).
    next: Option<LlamaToken>,
    /// This turn's logits in the step being decoded: their batch index.
    logits_at: Option<i32>,
    utf8: Utf8Stream,
    router: OutputRouter,
    piece: Vec<u8>,
    produced: u32,
    /// Events the consumer has not taken yet (its buffer was full). The turn decodes nothing while any wait, so
    /// a slow reader slows only its own turn.
    outbox: VecDeque<Result<ModelEvent, ProviderError>>,
    /// The answer is complete (or failed): the slot is released once the outbox is delivered.
    done: bool,
}

impl Turn {
    fn feeding(&self) -> bool {
        self.fed < self.job.prompt.len()
    }

    /// Decodes nothing this step: the consumer has events to read first, or the turn is over.
    fn waiting(&self) -> bool {
        self.done || !self.outbox.is_empty()
    }

    fn emit(&mut self, event: ModelEvent) {
        self.outbox.push_back(Ok(event));
    }

    fn fail(&mut self, error: ProviderError) {
        self.outbox.push_back(Err(error));
        self.done = true;
    }

    /// Takes the token just sampled: streams its text, and either ends the answer or decodes it next step.
    fn take(&mut self, token: LlamaToken, vocab: &LlamaVocab<'_>, counters: &Counters) {
        // A control token other than end-of-turn (e.g. ChatML's `<|im_start|>`) means the model is starting
        // another turn: the answer is over either way.
        if vocab.is_eog(token) || vocab.is_control(token) {
            return self.finish();
        }
        self.produced += 1;
        counters.generated.fetch_add(1, Ordering::Relaxed);
        self.piece.clear();
        vocab.token_to_piece_into(token, &mut self.piece, false, None);
        if let Some(text) = self.router.push(&self.utf8.push(&self.piece)) {
            self.emit(ModelEvent::Text(text));
        }
        if self.router.tool_call_closed() || self.produced >= self.job.max_new {
            return self.finish();
        }
        self.next = Some(token);
    }

    /// The end of the answer: the rest of its text, its tool call if it wrote one, and the usage.
    fn finish(&mut self) {
        if let Some(text) = self.router.push(&self.utf8.finish()) {
            self.emit(ModelEvent::Text(text));
        }
        let router = std::mem::replace(&mut self.router, OutputRouter::new(false));
        if let Output::ToolCall(raw) = router.finish() {
            match grammar::parse_tool_call(&raw, &self.job.tools) {
                Ok((name, arguments)) => {
                    let id = format!("call_{}", uuid::Uuid::new_v4().simple());
                    self.emit(ModelEvent::ToolCall(ToolCall {
                        id,
                        name,
                        arguments,
                    }));
                }
                Err(e) => {
                    // The start of what the model wrote, escaped onto one line, so the failure can be diagnosed.
                    let start: String = raw.chars().take(160).collect();
                    return self.fail(ProviderError::Malformed(format!(
                        "{e}; the model wrote {start:?}"
                    )));
                }
            }
        }
        self.emit(ModelEvent::Usage(Usage {
            prompt_tokens: self.job.prompt.len() as u64,
            completion_tokens: u64::from(self.produced),
        }));
        self.done = true;
    }
}

/// The engine thread's state: the context, its slots, and the batch reused every step.
struct Worker<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    n_batch: usize,
    counters: &'m Counters,
    slots: Vec<Slot>,
    /// Counts slot hand-outs and releases, for [`Slot::last_used`].
    clock: u64,
    /// Steps in a row that only fed prompts, with no turn admitted meanwhile: the prompt budget doubles with
    /// each (see [`Worker::prompt_budget`]).
    ramp: u32,
}

impl Worker<'_> {
    /// Whether any slot has a turn.
    fn busy(&self) -> bool {
        self.slots.iter().any(|s| s.turn.is_some())
    }

    /// Gives queued jobs the free slots, in arrival order: waits for one when nothing runs, otherwise takes
    /// only what is already queued. False once the queue is closed and nothing runs: the thread's end.
    fn admit(&mut self, jobs: &mut mpsc::Receiver<Job>) -> bool {
        while self.slots.iter().any(|s| s.turn.is_none()) {
            let job = if self.busy() {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            } else {
                match jobs.blocking_recv() {
                    Some(job) => job,
                    None => return false,
                }
            };
            // Cancelled while it waited in the queue: skip it without decoding anything.
            if job.events.is_closed() {
                continue;
            }
            self.start(job);
        }
        true
    }

    /// Puts `job` in a free slot (see [`slot_preference`]) and drops what of that slot's cache its prompt does
    /// not share.
    fn start(&mut self, job: Job) {
        let prompt = &job.prompt;
        let Some(slot) = self
            .slots
            .iter_mut()
            .filter(|s| s.turn.is_none())
            .max_by_key(|s| slot_preference(s, prompt))
        else {
            return;
        };
        // At least one prompt token is always decoded: its logits start the generation.
        let mut keep = common_prefix(&slot.cached, prompt).min(prompt.len().saturating_sub(1));
        if keep < slot.cached.len() {
            let removed = u32::try_from(keep)
                .ok()
                .is_some_and(|p0| self.ctx.kv_cache_seq_rm(slot.seq, Some(p0), None).is_ok());
            if !removed {
                // Removing a whole sequence always succeeds.
                let _ = self.ctx.kv_cache_seq_rm(slot.seq, None, None);
                keep = 0;
            }
            slot.cached.truncate(keep);
        }
        self.clock += 1;
        slot.last_used = self.clock;
        self.ramp = 0;
        let tools = !job.tools.is_empty();
        slot.turn = Some(Turn {
            job,
            fed: keep,
            next: None,
            logits_at: None,
            utf8: Utf8Stream::default(),
            router: OutputRouter::new(tools),
            piece: Vec::new(),
            produced: 0,
            outbox: VecDeque::new(),
            done: false,
        });
    }

    /// Hands each turn's waiting events to its consumer as far as its buffer takes them, and releases the slots
    /// of turns that are over or whose stream was dropped (the cancel signal: within one step).
    fn deliver(&mut self) {
        for slot in &mut self.slots {
            let Some(turn) = slot.turn.as_mut() else {
                continue;
            };
            let mut closed = turn.job.events.is_closed();
            while let Some(event) = turn.outbox.pop_front() {
                match turn.job.events.try_send(event) {
                    Ok(()) => {}
                    Err(TrySendError::Full(event)) => {
                        turn.outbox.push_front(event);
                        break;
                    }
                    Err(TrySendError::Closed(_)) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed || (turn.done && turn.outbox.is_empty()) {
                slot.turn = None;
                self.clock += 1;
                slot.last_used = self.clock;
            }
        }
    }

    /// Prompt tokens this step may decode. While any turn generates, a fixed small share, so a long prompt
    /// delays the others' next tokens by one short decode per step, not by its whole length. While only prompts
    /// are fed, the budget starts small and doubles every step until a new turn arrives, so turns that arrive
    /// together are fed together (and get their first tokens about together) while a lone prompt still goes
    /// through in few, large batches.
    fn prompt_budget(&self, generating: usize) -> usize {
        let room = self.n_batch.saturating_sub(generating);
        if generating > 0 {
            return PROMPT_STEP.min(room);
        }
        PROMPT_STEP
            .checked_shl(self.ramp)
            .unwrap_or(usize::MAX)
            .min(room)
    }

    /// One step: one batch with the next token of every generating turn and a share of the prompts being fed,
    /// one decode, then a token sampled for every turn whose logits it computed. False when there was nothing
    /// to decode.
    fn step(&mut self) -> bool {
        self.batch.clear();
        let mut generating = 0;
        let mut feeding: Vec<(usize, usize)> = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(turn) = slot.turn.as_mut() else {
                continue;
            };
            turn.logits_at = None;
            if turn.waiting() {
                continue;
            }
            if let Some(token) = turn.next.take() {
                let pos = i32::try_from(slot.cached.len()).unwrap_or(i32::MAX);
                let at = self.batch.n_tokens();
                if let Err(e) = self.batch.add(token, pos, &[slot.seq], true) {
                    turn.fail(ProviderError::Other(format!(
                        "cannot fill a llama.cpp batch: {e}"
                    )));
                    continue;
                }
                turn.logits_at = Some(at);
                slot.cached.push(token);
                generating += 1;
            } else if turn.feeding() {
                feeding.push((i, turn.job.prompt.len() - turn.fed));
            }
        }
        let budget = self.prompt_budget(generating);
        self.ramp = if generating == 0 && !feeding.is_empty() {
            self.ramp.saturating_add(1)
        } else {
            0
        };
        for (i, take) in share(budget, feeding) {
            self.feed(i, take);
        }
        if self.batch.n_tokens() == 0 {
            return false;
        }
        if let Err(e) = self.ctx.decode(&mut self.batch) {
            self.fail_all(&format!("llama.cpp failed to decode: {e}"));
            return true;
        }
        let vocab = self.model.vocab();
        for slot in &mut self.slots {
            let Some(turn) = slot.turn.as_mut() else {
                continue;
            };
            let Some(at) = turn.logits_at.take() else {
                continue;
            };
            match turn.job.sampling.sample(&self.ctx, at) {
                Ok(token) => turn.take(token, &vocab, self.counters),
                Err(e) => turn.fail(e),
            }
        }
        true
    }

    /// Adds the next `take` prompt tokens of slot `i`'s turn to the batch; the prompt's last token asks for
    /// logits, which start the generation.
    fn feed(&mut self, i: usize, take: usize) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        let Some(turn) = slot.turn.as_mut() else {
            return;
        };
        let end = (turn.fed + take).min(turn.job.prompt.len());
        for (j, &token) in turn.job.prompt[turn.fed..end].iter().enumerate() {
            let pos = i32::try_from(slot.cached.len()).unwrap_or(i32::MAX);
            let last = turn.fed + j + 1 == turn.job.prompt.len();
            if last {
                turn.logits_at = Some(self.batch.n_tokens());
            }
            if let Err(e) = self.batch.add(token, pos, &[slot.seq], last) {
                turn.logits_at = None;
                return turn.fail(ProviderError::Other(format!(
                    "cannot fill a llama.cpp batch: {e}"
                )));
            }
            slot.cached.push(token);
        }
        self.counters
            .prompt_decoded
            .fetch_add((end - turn.fed) as u64, Ordering::Relaxed);
        turn.fed = end;
    }

    /// After a failed decode the cache contents are unknown: every running turn fails and every slot forgets
    /// its cache, so the next calls start clean.
    fn fail_all(&mut self, message: &str) {
        self.ctx.clear_kv_cache();
        for slot in &mut self.slots {
            slot.cached.clear();
            if let Some(turn) = slot.turn.as_mut() {
                turn.logits_at = None;
                if !turn.done {
                    turn.fail(ProviderError::Other(message.to_string()));
                }
            }
        }
    }
}

/// How much a call with `prompt` wants `slot`, the most wanted first: a slot whose cache the prompt mostly
/// continues (at least half of it: the same conversation's next round), the longest shared prefix first; then an
/// empty slot; then the least recently used. So a new conversation does not take the slot of another one that
/// merely starts with the same chat template or system prompt, and that other conversation's next round still
/// finds its cache.
fn slot_preference(slot: &Slot, prompt: &[LlamaToken]) -> (bool, usize, std::cmp::Reverse<u64>) {
    let shared = common_prefix(&slot.cached, prompt);
    let continues = shared * 2 >= slot.cached.len();
    (
        continues,
        if continues { shared } else { 0 },
        std::cmp::Reverse(slot.last_used),
    )
}

/// How many leading tokens `a` and `b` have in common.
fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Splits `budget` prompt tokens among the prompts being fed, `(slot, tokens left)`, in equal shares; a prompt
/// that needs less than its share leaves the rest to the others. Returns `(slot, tokens to feed)`.
fn share(budget: usize, mut feeding: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    feeding.sort_by_key(|(_, left)| *left);
    let mut budget = budget;
    let mut out = Vec::with_capacity(feeding.len());
    let count = feeding.len();
    for (n, (slot, left)) in feeding.into_iter().enumerate() {
        let fair = budget.div_ceil(count - n);
        let take = left.min(fair);
        if take > 0 {
            out.push((slot, take));
        }
        budget -= take;
    }
    out
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
