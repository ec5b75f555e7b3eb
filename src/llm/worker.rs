//! One thread owns the model; requests reach it through a channel and get
//! their result through a one-shot reply. Requests join a running batch
//! between passes (continuous batching, see `batching`): every decode step
//! serves all generating sequences with one read of the weights. A request
//! whose caller went away (client cancelled, deadline passed) leaves the queue
//! or the batch at the next pass.

use super::batching::{self, BatchPolicy, Pass, Priority, Scheduler};
use super::{GenerateParams, Generation, Llm, LlmError, Sequence};
use std::collections::VecDeque;
use crate::metrics;
use crate::models::LlmFiles;
use candle_core::Device;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    /// Loaded; carries the model's context length in tokens.
    Ready { context: usize },
    Failed(String),
}

/// Resolves once `state` leaves Loading; shared by every model thread's handle.
pub async fn wait_not_loading(mut state: watch::Receiver<ModelState>) -> ModelState {
    let _ = state.wait_for(|s| *s != ModelState::Loading).await;
    let s = state.borrow().clone();
    s
}

/// What the model thread is asked to do.
enum Command {
    Generate(GenerateJob),
    /// Drop what is kept of a conversation (its cached prompt and answer);
    /// its generations under way finish without keeping theirs. Replies
    /// whether anything was kept.
    Forget { conversation: String, reply: oneshot::Sender<bool> },
}

struct GenerateJob {
    prompt: Vec<u32>,
    /// Conversation whose cached prompt prefix may be reused.
    conversation: Option<String>,
    params: GenerateParams,
    /// Receives decoded text pieces as they are generated.
    stream: Option<mpsc::UnboundedSender<String>>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Generation, LlmError>>,
    /// Its conversation was forgotten while it waited: keep nothing of it.
    forgotten: bool,
}

/// Counters of the model thread, for metrics and tests.
#[derive(Debug, Default)]
struct Counters {
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    decode_passes: AtomicU64,
    decode_rows: AtomicU64,
    /// Generations asked of this handle and not yet answered (queued or
    /// running), by priority (interactive, background).
    in_flight: [AtomicU64; 2],
}

/// Lets the caller of a background generation have it served as interactive
/// from the next pass on, queued or running: a note prepared in the
/// background that an agent now waits for.
#[derive(Debug, Clone, Default)]
pub struct Raise(Arc<AtomicU8>);

/// `Raise` states. The caller's in-flight count moves with the raise; the
/// order of the two updates (see `Raise::apply`, `InFlight::drop`) keeps the
/// counts from ever going below zero.
const NOT_ASKED: u8 = 0;
const ASKED: u8 = 1;
const APPLIED: u8 = 2;
const OVER: u8 = 3;

impl Raise {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for it; nothing happens once the generation is over.
    pub fn ask(&self) {
        let _ = self.0.compare_exchange(NOT_ASKED, ASKED, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether a raise was asked (and not yet applied).
    pub fn is_asked(&self) -> bool {
        self.0.load(Ordering::Acquire) == ASKED
    }

    /// On the model thread: whether a raise was asked and is now applied,
    /// with the in-flight count moved to interactive.
    fn apply(&self, counters: &Counters) -> bool {
        if self.0.load(Ordering::Acquire) != ASKED {
            return false;
        }
        let [interactive, background] = &counters.in_flight;
        interactive.fetch_add(1, Ordering::Relaxed);
        if self.0.compare_exchange(ASKED, APPLIED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            background.fetch_sub(1, Ordering::Relaxed);
            true
        } else {
            interactive.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }
}

/// Counts a generation as in flight until its caller has the answer or left.
struct InFlight<'a> {
    counters: &'a Counters,
    priority: Priority,
    raise: Option<Raise>,
}

impl<'a> InFlight<'a> {
    fn enter(counters: &'a Counters, params: &GenerateParams) -> Self {
        counters.in_flight[params.priority as usize].fetch_add(1, Ordering::Relaxed);
        Self { counters, priority: params.priority, raise: params.raise.clone() }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let raised = self.raise.as_ref().is_some_and(|r| r.0.swap(OVER, Ordering::AcqRel) == APPLIED);
        let counted = if raised { Priority::Interactive } else { self.priority };
        self.counters.in_flight[counted as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A new request joins the queue in its place; a conversation is forgotten
/// at once, its requests queued or running marked to keep nothing.
fn take(cmd: Command, llm: &mut Llm, waiting: &mut VecDeque<GenerateJob>, batch: &mut [Member]) {
    match cmd {
        Command::Generate(job) => {
            let at = BatchPolicy::queue_position(waiting.iter().map(|j| j.params.priority), job.params.priority);
            waiting.insert(at, job);
        }
        Command::Forget { conversation, reply } => {
            let of_it = |c: Option<&str>| c == Some(conversation.as_str());
            for j in waiting.iter_mut().filter(|j| of_it(j.conversation.as_deref())) {
                j.forgotten = true;
            }
            for m in batch.iter_mut().filter(|m| of_it(m.seq.conversation())) {
                m.seq.forget();
            }
            let _ = reply.send(llm.forget(&conversation));
        }
    }
}

/// Background generations whose caller asked for a raise become interactive:
/// queued ones move up to their place by arrival among interactive ones.
fn apply_raises(waiting: &mut VecDeque<GenerateJob>, batch: &mut [Member], counters: &Counters) {
    let mut moved = false;
    for params in waiting.iter_mut().map(|j| &mut j.params).chain(batch.iter_mut().map(|m| &mut m.job.params)) {
        if params.priority == Priority::Background && params.raise.as_ref().is_some_and(|r| r.apply(counters)) {
            params.priority = Priority::Interactive;
            moved = true;
        }
    }
    if moved {
        waiting.make_contiguous().sort_by_key(|j| (j.params.priority, j.enqueued));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlmStats {
    pub completed: u64,
    /// Stopped because the caller went away (queued or mid-generation).
    pub cancelled: u64,
    pub failed: u64,
    /// Decode steps run, and sequences served by them: rows / passes is the
    /// mean batch size.
    pub decode_passes: u64,
    pub decode_rows: u64,
}

/// Prompt caches kept by default: about 36 threads of 1,000 tokens with the
/// 1.5B model (28 KiB per token in the CPU's f16 cache), 80 with the 0.5B.
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 1 << 30;

/// Whether a prompt row's numbers are independent of the rows read with it on
/// this device, so that a prompt read after a reused prefix gives exactly the
/// cold run's numbers: on CPUs with AVX-512 VNNI (palaver's int8, Q4_K and
/// Q6_K kernels, and candle's repacked Q8_0 kernel for two rows or more; see
/// `Linear`), not with the f32 GEMM fallback or on a GPU.
pub fn prompt_rows_exact(device: &Device) -> bool {
    device.is_cpu() && crate::cpu::avx512_vnni()
}

/// How the model thread serves requests.
#[derive(Debug, Clone, Default)]
pub struct LlmOptions {
    /// Bounds the prompt caches kept per conversation (0: no reuse). `None`:
    /// [`DEFAULT_PREFIX_CACHE_BYTES`] where reuse is bit-exact
    /// ([`prompt_rows_exact`]), else off.
    pub prefix_cache_bytes: Option<usize>,
    pub batch: BatchPolicy,
}

/// Cheap to clone; every clone talks to the same model thread.
#[derive(Clone)]
pub struct LlmHandle {
    id: Arc<str>,
    counters: Arc<Counters>,
    tokenizer: Arc<Tokenizer>,
    tx: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<ModelState>,
}

impl LlmHandle {
    /// Starts the model thread; the model loads there, so the caller (and the
    /// health service) does not wait for it.
    pub fn spawn(files: LlmFiles, device: Device, opts: LlmOptions) -> Result<Self, LlmError> {
        let tokenizer = Tokenizer::from_file(&files.tokenizer)
            .map_err(|e| LlmError::Load(format!("{}: {e}", files.tokenizer.display())))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(ModelState::Loading);
        let id: Arc<str> = files.id.clone().into();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name("palaver-llm".into())
            .spawn(move || run(files, device, opts, rx, state_tx, &c))
            .map_err(|e| LlmError::Load(e.to_string()))?;
        Ok(Self { id, counters, tokenizer: Arc::new(tokenizer), tx, state })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn stats(&self) -> LlmStats {
        LlmStats {
            completed: self.counters.completed.load(Ordering::Relaxed),
            cancelled: self.counters.cancelled.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            decode_passes: self.counters.decode_passes.load(Ordering::Relaxed),
            decode_rows: self.counters.decode_rows.load(Ordering::Relaxed),
        }
    }

    pub fn state(&self) -> ModelState {
        self.state.borrow().clone()
    }

    /// Generations the model thread holds now, queued or running.
    pub fn in_flight(&self) -> u64 {
        self.counters.in_flight.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// Of those, the ones a new request of `priority` finds ahead of it:
    /// those of its priority or a more urgent one.
    pub fn ahead_of(&self, priority: Priority) -> u64 {
        let n = |p: Priority| self.counters.in_flight[p as usize].load(Ordering::Relaxed);
        n(Priority::Interactive) + if priority == Priority::Background { n(Priority::Background) } else { 0 }
    }

    /// Resolves once the model is loaded or has failed to load.
    pub async fn wait_loaded(&self) -> ModelState {
        wait_not_loading(self.state.clone()).await
    }

    /// Queues a generation. Dropping the returned future cancels it.
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        conversation: Option<String>,
        params: GenerateParams,
        stream: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<Generation, LlmError> {
        match self.state() {
            ModelState::Ready { .. } => {}
            ModelState::Loading => return Err(LlmError::NotReady),
            ModelState::Failed(e) => return Err(LlmError::LoadFailed(e)),
        }
        let _counted = InFlight::enter(&self.counters, &params);
        let (reply, rx) = oneshot::channel();
        let job = GenerateJob { prompt, conversation, params, stream, enqueued: Instant::now(), reply, forgotten: false };
        self.tx.send(Command::Generate(job)).map_err(|_| LlmError::WorkerGone)?;
        rx.await.map_err(|_| LlmError::WorkerGone)?
    }

    /// Drops the cached prompt and answer of `conversation`; generations of it
    /// already queued or running finish without keeping theirs. Whether
    /// anything was kept.
    pub async fn forget(&self, conversation: &str) -> Result<bool, LlmError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Forget { conversation: conversation.to_string(), reply }).map_err(|_| LlmError::WorkerGone)?;
        rx.await.map_err(|_| LlmError::WorkerGone)
    }
}

fn run(
    files: LlmFiles,
    device: Device,
    opts: LlmOptions,
    mut rx: mpsc::UnboundedReceiver<Command>,
    state: watch::Sender<ModelState>,
    counters: &Counters,
) {
    let t = Instant::now();
    let prefix_bytes = opts.prefix_cache_bytes.unwrap_or(if prompt_rows_exact(&device) { DEFAULT_PREFIX_CACHE_BYTES } else { 0 });
    let mut llm = match Llm::load(&files, &device, prefix_bytes) {
        Ok(m) => {
            tracing::info!(model = %files.id, secs = t.elapsed().as_secs_f32(), "model loaded");
            let _ = state.send(ModelState::Ready { context: m.context_len() });
            m
        }
        Err(e) => {
            tracing::error!(model = %files.id, error = %e, "model failed to load");
            let msg = e.to_string();
            let _ = state.send(ModelState::Failed(msg.clone()));
            while let Some(cmd) = rx.blocking_recv() {
                match cmd {
                    Command::Generate(job) => drop(job.reply.send(Err(LlmError::LoadFailed(msg.clone())))),
                    Command::Forget { reply, .. } => drop(reply.send(false)),
                }
            }
            return;
        }
    };
    let gauges = Exported::new(&files.id);
    let policy = opts.batch;
    let mut waiting: VecDeque<GenerateJob> = VecDeque::new();
    let mut batch: Vec<Member> = Vec::new();
    let mut sched = Scheduler::default();
    loop {
        // Idle: sleep until a request comes; busy: take what has arrived.
        if batch.is_empty() && waiting.is_empty() {
            gauges.update(0, 0, llm.prefix_cache_bytes());
            match rx.blocking_recv() {
                Some(cmd) => take(cmd, &mut llm, &mut waiting, &mut batch),
                None => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            take(cmd, &mut llm, &mut waiting, &mut batch);
        }
        apply_raises(&mut waiting, &mut batch, counters);
        // Callers that went away (client cancelled, deadline passed) leave now.
        waiting.retain(|j| {
            let gone = j.reply.is_closed();
            if gone {
                counters.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });
        for m in std::mem::take(&mut batch) {
            if m.job.reply.is_closed() {
                counters.cancelled.fetch_add(1, Ordering::Relaxed);
                llm.release(m.seq);
            } else {
                batch.push(m);
            }
        }
        // Admission in queue order under the sequence and token budgets.
        let view: Vec<_> = batch.iter().map(Member::view).collect();
        let needs: VecDeque<_> = waiting.iter().map(|j| (j.prompt.len() + j.params.max_new_tokens, j.params.priority)).collect();
        for _ in 0..policy.admit(&view, &needs) {
            let job = waiting.pop_front().expect("admitted from the queue");
            let queue = job.enqueued.elapsed();
            match llm.start(job.prompt.clone(), job.conversation.clone(), job.params.clone()) {
                Ok(mut seq) => {
                    if job.forgotten {
                        seq.forget();
                    }
                    batch.push(Member { job, seq, queue, overtaken: 0 })
                }
                Err(e) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        gauges.update(waiting.len(), batch.len(), llm.prefix_cache_bytes());
        let view: Vec<_> = batch.iter().map(Member::view).collect();
        let generating = policy.decode_competes(&view);
        let Some(pass) = sched.next(&policy, &view) else { continue };
        // The members a decode pass would step.
        let stepped = policy.stepped(&view);
        let rows = match pass {
            Pass::Prompt { member, tokens } => {
                for (m, n) in batch.iter_mut().zip(BatchPolicy::overtaken_after(&view, member)) {
                    m.overtaken = n;
                }
                tokens
            }
            Pass::Decode => {
                let rows = stepped.iter().filter(|&&s| s).count();
                counters.decode_passes.fetch_add(1, Ordering::Relaxed);
                counters.decode_rows.fetch_add(rows as u64, Ordering::Relaxed);
                rows
            }
        };
        gauges.pass(pass, rows as u64);
        // A panic inside candle must not take the model thread down with it.
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_pass(&mut llm, &mut batch, pass, &policy, &stepped)))
            .unwrap_or_else(|_| Err(LlmError::Candle(candle_core::Error::Msg("inference panicked".into()))));
        sched.record(&policy, pass, started.elapsed(), generating);
        let in_pass = |i: usize| match pass {
            Pass::Prompt { member, .. } => i == member,
            Pass::Decode => stepped[i],
        };
        if let Err(e) = outcome {
            // The pass failed: its sequences end with the error, the others go on.
            let failed: Vec<usize> = (0..batch.len()).filter(|&i| in_pass(i)).collect();
            for i in failed.into_iter().rev() {
                let m = batch.remove(i);
                counters.failed.fetch_add(1, Ordering::Relaxed);
                let _ = m.job.reply.send(Err(clone_error(&e)));
            }
            continue;
        }
        // Finished sequences leave the batch.
        let mut i = 0;
        while i < batch.len() {
            if !batch[i].seq.is_done() && !batch[i].streaming_gone() {
                i += 1;
                continue;
            }
            let m = batch.remove(i);
            if m.streaming_gone() && !m.seq.is_done() {
                counters.cancelled.fetch_add(1, Ordering::Relaxed);
                llm.release(m.seq);
                let _ = m.job.reply.send(Err(LlmError::Cancelled));
                continue;
            }
            let result = llm.finish(m.seq).map(|mut g| {
                g.queue = m.queue;
                g
            });
            let counter = if result.is_ok() { &counters.completed } else { &counters.failed };
            counter.fetch_add(1, Ordering::Relaxed);
            let _ = m.job.reply.send(result);
        }
    }
}

/// The model thread's series in `metrics`, looked up once.
struct Exported {
    waiting: Arc<metrics::Gauge>,
    running: Arc<metrics::Gauge>,
    prefix_bytes: Arc<metrics::Gauge>,
    passes: [Arc<metrics::Counter>; 2],
    rows: [Arc<metrics::Counter>; 2],
}

impl Exported {
    fn new(model: &str) -> Self {
        let m = metrics::global();
        let by_pass = |f: &metrics::Family<metrics::Counter>| [f.with(&[model, "prompt"]), f.with(&[model, "decode"])];
        Self {
            waiting: m.llm_sequences.with(&[model, "waiting"]),
            running: m.llm_sequences.with(&[model, "running"]),
            prefix_bytes: m.llm_prefix_cache_bytes.with(&[model]),
            passes: by_pass(&m.llm_passes),
            rows: by_pass(&m.llm_rows),
        }
    }

    fn update(&self, waiting: usize, running: usize, prefix_bytes: usize) {
        self.waiting.set(waiting as i64);
        self.running.set(running as i64);
        self.prefix_bytes.set(prefix_bytes as i64);
    }

    fn pass(&self, pass: Pass, rows: u64) {
        let i = usize::from(pass == Pass::Decode);
        self.passes[i].add(1);
        self.rows[i].add(rows);
    }
}

/// A request in the running batch.
struct Member {
    job: GenerateJob,
    seq: Sequence,
    queue: std::time::Duration,
    /// Prompt passes that went to later members while this one was reading.
    overtaken: usize,
}

impl Member {
    fn view(&self) -> batching::Member {
        batching::Member { prompt_left: self.seq.prompt_left(), reserved: self.seq.reserved(), overtaken: self.overtaken, priority: self.job.params.priority }
    }

    /// A streaming caller whose receiver is gone.
    fn streaming_gone(&self) -> bool {
        self.job.stream.as_ref().is_some_and(|s| s.is_closed())
    }

    fn emit(&self, piece: Option<String>) {
        if let (Some(p), Some(s)) = (piece, &self.job.stream) {
            let _ = s.send(p);
        }
    }
}

fn run_pass(llm: &mut Llm, batch: &mut [Member], pass: Pass, policy: &BatchPolicy, stepped: &[bool]) -> Result<(), LlmError> {
    match pass {
        Pass::Prompt { member, tokens } => {
            let m = &mut batch[member];
            let piece = llm.read_prompt(&mut m.seq, tokens, policy.prefill_draft)?;
            m.emit(piece);
        }
        Pass::Decode => {
            let mut members: Vec<&mut Member> = batch.iter_mut().zip(stepped).filter(|(_, &s)| s).map(|(m, _)| m).collect();
            let mut seqs: Vec<&mut Sequence> = members.iter_mut().map(|m| &mut m.seq).collect();
            let draft = policy.draft_per_sequence(seqs.len());
            let pieces = llm.decode(&mut seqs, draft)?;
            for (m, p) in members.iter().zip(pieces) {
                m.emit(p);
            }
        }
    }
    Ok(())
}

/// Errors carry candle errors that are not Clone; the text is what callers see.
fn clone_error(e: &LlmError) -> LlmError {
    match e {
        LlmError::ContextExceeded { tokens, limit } => LlmError::ContextExceeded { tokens: *tokens, limit: *limit },
        other => LlmError::Candle(candle_core::Error::Msg(other.to_string())),
    }
}
