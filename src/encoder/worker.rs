//! The encoder thread: owns the model, gathers queued sequences into batches
//! (a short wait lets concurrent callers share one forward pass), and answers
//! each sequence through its own one-shot reply. Tokenization happens on the
//! blocking pool before a sequence is queued, never on this thread or the
//! async runtime.

use super::batching::{BatchPolicy, Queued};
use super::{Encoder, EncoderError, Precision, TextEncoder};
use crate::llm::ModelState;
use crate::models::EncoderFiles;
use candle_core::Device;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

struct Job {
    ids: Vec<u32>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Done, EncoderError>>,
}

impl Queued for Job {
    fn tokens(&self) -> usize {
        self.ids.len()
    }
}

struct Done {
    embedding: Vec<f32>,
    queue: Duration,
    inference: Duration,
    batch_size: usize,
}

/// One embedded text.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub embedding: Vec<f32>,
    pub tokens: usize,
}

/// Where the time of one `encode` call went; the slowest text of the call decides.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodeTimings {
    pub tokenize: Duration,
    pub queue: Duration,
    pub inference: Duration,
    /// Largest forward pass any of the call's texts ran in.
    pub batch_size: usize,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    sequences: AtomicU64,
    cancelled: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderStats {
    /// Forward passes run.
    pub batches: u64,
    /// Sequences embedded; `sequences / batches` is the mean batch size.
    pub sequences: u64,
    /// Skipped because the caller went away while queued.
    pub cancelled: u64,
}

/// Cheap to clone; every clone talks to the same encoder thread.
#[derive(Clone)]
pub struct EncoderHandle {
    id: Arc<str>,
    text: TextEncoder,
    /// A call's texts travel as one message, so they reach the queue
    /// together: sent one by one, a caller descheduled between sends (a busy
    /// 2-core machine) had its call split across batches.
    tx: mpsc::Sender<Vec<Job>>,
    state: watch::Receiver<ModelState>,
    counters: Arc<Counters>,
}

impl EncoderHandle {
    /// Starts the encoder thread; the model loads there.
    pub fn spawn(
        files: EncoderFiles,
        device: Device,
        policy: BatchPolicy,
        max_wait: Duration,
        max_tokens: usize,
        precision: Precision,
    ) -> Result<Self, EncoderError> {
        let text = TextEncoder::new(&files, max_tokens)?;
        let (tx, rx) = mpsc::channel();
        let (state_tx, state) = watch::channel(ModelState::Loading);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let id: Arc<str> = precision.model_id(&files.id, &device).into();
        std::thread::Builder::new()
            .name("palaver-encoder".into())
            .spawn(move || run(files, device, precision, policy, max_wait, rx, state_tx, max_tokens, &c))
            .map_err(|e| EncoderError::Load(e.to_string()))?;
        Ok(Self { id, text, tx, state, counters })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn state(&self) -> ModelState {
        self.state.borrow().clone()
    }

    /// Resolves once the encoder is loaded or has failed to load.
    pub async fn wait_loaded(&self) -> ModelState {
        crate::llm::wait_not_loading(self.state.clone()).await
    }

    pub fn stats(&self) -> EncoderStats {
        EncoderStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            sequences: self.counters.sequences.load(Ordering::Relaxed),
            cancelled: self.counters.cancelled.load(Ordering::Relaxed),
        }
    }

    pub fn max_tokens(&self) -> usize {
        self.text.max_tokens()
    }

    /// Embeds texts. Each text is queued on its own, so a large call shares
    /// batches with other callers and nobody waits behind it for long.
    /// Dropping the future skips whatever is still queued.
    pub async fn encode(&self, texts: Vec<String>) -> Result<(Vec<Encoded>, EncodeTimings), EncoderError> {
        match self.state() {
            ModelState::Ready { .. } => {}
            ModelState::Loading => return Err(EncoderError::Load("the encoder is still loading".into())),
            ModelState::Failed(e) => return Err(EncoderError::Load(e)),
        }
        let started = Instant::now();
        let text = self.text.clone();
        let ids = tokio::task::spawn_blocking(move || texts.iter().map(|t| text.tokenize(t)).collect::<Result<Vec<_>, _>>())
            .await
            .map_err(|_| EncoderError::Tokenize("tokenizer task panicked".into()))??;
        let tokenize = started.elapsed();
        let mut waits = Vec::with_capacity(ids.len());
        let mut lens = Vec::with_capacity(ids.len());
        let mut jobs = Vec::with_capacity(ids.len());
        let enqueued = Instant::now();
        for ids in ids {
            let (reply, rx) = oneshot::channel();
            lens.push(ids.len());
            jobs.push(Job { ids, enqueued, reply });
            waits.push(rx);
        }
        if !jobs.is_empty() {
            self.tx.send(jobs).map_err(|_| EncoderError::WorkerGone)?;
        }
        let mut out = Vec::with_capacity(waits.len());
        let mut timings = EncodeTimings { tokenize, ..Default::default() };
        for (rx, tokens) in waits.into_iter().zip(lens) {
            let done = rx.await.map_err(|_| EncoderError::WorkerGone)??;
            timings.queue = timings.queue.max(done.queue);
            timings.inference = timings.inference.max(done.inference);
            timings.batch_size = timings.batch_size.max(done.batch_size);
            out.push(Encoded { embedding: done.embedding, tokens });
        }
        Ok((out, timings))
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    files: EncoderFiles,
    device: Device,
    precision: Precision,
    policy: BatchPolicy,
    max_wait: Duration,
    rx: mpsc::Receiver<Vec<Job>>,
    state: watch::Sender<ModelState>,
    max_tokens: usize,
    counters: &Counters,
) {
    let t = Instant::now();
    let encoder = match Encoder::load(&files, &device, precision) {
        Ok(e) => {
            tracing::info!(model = %files.id, secs = t.elapsed().as_secs_f32(), "encoder loaded");
            let _ = state.send(ModelState::Ready { context: max_tokens });
            e
        }
        Err(e) => {
            tracing::error!(model = %files.id, error = %e, "encoder failed to load");
            let msg = e.to_string();
            let _ = state.send(ModelState::Failed(msg.clone()));
            for job in rx.iter().flatten() {
                let _ = job.reply.send(Err(EncoderError::Load(msg.clone())));
            }
            return;
        }
    };
    let mut queue: VecDeque<Job> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(jobs) => queue.extend(jobs),
                Err(_) => return, // every handle dropped
            }
        }
        // Wait briefly for company, measured from the oldest job, unless a
        // full batch is already here.
        let deadline = queue.front().map(|j| j.enqueued + max_wait).unwrap_or_else(Instant::now);
        while !policy.is_full(&queue) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(jobs) => queue.extend(jobs),
                Err(_) => break,
            }
        }
        // Drain what else arrived without waiting.
        while let Ok(jobs) = rx.try_recv() {
            queue.extend(jobs);
        }
        queue.retain(|j| {
            let live = !j.reply.is_closed();
            if !live {
                counters.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            live
        });
        let batch = policy.next_batch(&mut queue);
        let m = crate::metrics::global();
        m.encoder_queue.with(&[]).set(queue.len() as i64);
        if batch.is_empty() {
            continue;
        }
        m.encoder_batch_size.with(&[]).observe(batch.len() as f64);
        let started = Instant::now();
        let seqs: Vec<&[u32]> = batch.iter().map(|j| j.ids.as_slice()).collect();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| encoder.embed(&seqs)))
            .unwrap_or_else(|_| Err(EncoderError::Candle(candle_core::Error::Msg("encoder panicked".into()))));
        let inference = started.elapsed();
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.sequences.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let n = batch.len();
        match result {
            Ok(rows) => {
                for (job, embedding) in batch.into_iter().zip(rows) {
                    let queue = started.duration_since(job.enqueued);
                    let _ = job.reply.send(Ok(Done { embedding, queue, inference, batch_size: n }));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for job in batch {
                    let _ = job.reply.send(Err(EncoderError::Candle(candle_core::Error::Msg(msg.clone()))));
                }
            }
        }
    }
}
