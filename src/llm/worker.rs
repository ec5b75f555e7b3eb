//! One thread owns the model; requests reach it through a channel and get
//! their result through a one-shot reply. A request whose caller went away
//! (client cancelled, deadline passed) is skipped or stopped mid-generation.

use super::{GenerateParams, Generation, Llm, LlmError};
use crate::models::LlmFiles;
use candle_core::Device;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
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

struct GenerateJob {
    prompt: Vec<u32>,
    params: GenerateParams,
    /// Receives decoded text pieces as they are generated.
    stream: Option<mpsc::UnboundedSender<String>>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Generation, LlmError>>,
}

/// Counters of the model thread, for metrics and tests.
#[derive(Debug, Default)]
struct Counters {
    completed: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlmStats {
    pub completed: u64,
    /// Stopped because the caller went away (queued or mid-generation).
    pub cancelled: u64,
    pub failed: u64,
}

/// Cheap to clone; every clone talks to the same model thread.
#[derive(Clone)]
pub struct LlmHandle {
    id: Arc<str>,
    counters: Arc<Counters>,
    tokenizer: Arc<Tokenizer>,
    tx: mpsc::UnboundedSender<GenerateJob>,
    state: watch::Receiver<ModelState>,
}

impl LlmHandle {
    /// Starts the model thread; the model loads there, so the caller (and the
    /// health service) does not wait for it.
    pub fn spawn(files: LlmFiles, device: Device) -> Result<Self, LlmError> {
        let tokenizer = Tokenizer::from_file(&files.tokenizer)
            .map_err(|e| LlmError::Load(format!("{}: {e}", files.tokenizer.display())))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(ModelState::Loading);
        let id: Arc<str> = files.id.clone().into();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name("palaver-llm".into())
            .spawn(move || run(files, device, rx, state_tx, &c))
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
        }
    }

    pub fn state(&self) -> ModelState {
        self.state.borrow().clone()
    }

    /// Resolves once the model is loaded or has failed to load.
    pub async fn wait_loaded(&self) -> ModelState {
        wait_not_loading(self.state.clone()).await
    }

    /// Queues a generation. Dropping the returned future cancels it.
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        stream: Option<mpsc::UnboundedSender<String>>,
    ) -> Result<Generation, LlmError> {
        match self.state() {
            ModelState::Ready { .. } => {}
            ModelState::Loading => return Err(LlmError::NotReady),
            ModelState::Failed(e) => return Err(LlmError::LoadFailed(e)),
        }
        let (reply, rx) = oneshot::channel();
        let job = GenerateJob { prompt, params, stream, enqueued: Instant::now(), reply };
        self.tx.send(job).map_err(|_| LlmError::WorkerGone)?;
        rx.await.map_err(|_| LlmError::WorkerGone)?
    }
}

fn run(
    files: LlmFiles,
    device: Device,
    mut rx: mpsc::UnboundedReceiver<GenerateJob>,
    state: watch::Sender<ModelState>,
    counters: &Counters,
) {
    let t = Instant::now();
    let mut llm = match Llm::load(&files, &device) {
        Ok(m) => {
            tracing::info!(model = %files.id, secs = t.elapsed().as_secs_f32(), "model loaded");
            let _ = state.send(ModelState::Ready { context: m.context_len() });
            m
        }
        Err(e) => {
            tracing::error!(model = %files.id, error = %e, "model failed to load");
            let msg = e.to_string();
            let _ = state.send(ModelState::Failed(msg.clone()));
            while let Some(job) = rx.blocking_recv() {
                let _ = job.reply.send(Err(LlmError::LoadFailed(msg.clone())));
            }
            return;
        }
    };
    while let Some(job) = rx.blocking_recv() {
        if job.reply.is_closed() {
            counters.cancelled.fetch_add(1, Ordering::Relaxed); // cancelled while queued
            continue;
        }
        let queue = job.enqueued.elapsed();
        let reply = &job.reply;
        let stream = &job.stream;
        // A panic inside candle must not take the model thread down with it.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            llm.generate(&job.prompt, &job.params, |piece| {
                if reply.is_closed() {
                    return false;
                }
                stream.as_ref().is_none_or(|s| s.send(piece.to_string()).is_ok())
            })
        }))
        .unwrap_or_else(|_| Err(LlmError::Candle(candle_core::Error::Msg("inference panicked".into()))));
        let counter = match &result {
            Ok(_) => &counters.completed,
            Err(LlmError::Cancelled) => &counters.cancelled,
            Err(_) => &counters.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let _ = job.reply.send(result.map(|mut g| {
            g.queue = queue;
            g
        }));
    }
}
