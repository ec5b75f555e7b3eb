//! gRPC adapter of the `Assist` service: wire types in, domain types out,
//! admission, streaming. No model code and no summarisation logic here.

use crate::proto::v1 as pb;
use crate::summarize::parse::Status as NoteStatus;
use crate::summarize::faithful::FactKind;
use crate::summarize::references::Reference;
use crate::llm::batching::Priority;
use crate::summarize::thread::{invalid, Message, Role, SummarizeInput, Thread};
use super::classify::{classify_one, log_classified, to_classify_input, to_classify_response};
use crate::intent::Intents;
use crate::metrics::GaugeGuard;
use crate::summarize::{replay, Coverage, Preview, StreamEvent, SummarizeError, Summarizer, Summary};
use tokio_stream::StreamExt;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// An admission slot, counted in `palaver_admitted_requests` while held.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    _gauge: GaugeGuard,
}

impl Admitted {
    /// A slot of `slots`, counted under `service`; none free: RESOURCE_EXHAUSTED saying `why`.
    fn take(slots: &Arc<Semaphore>, service: &str, why: impl FnOnce() -> String) -> Result<Self, Status> {
        let permit =
            slots.clone().try_acquire_owned().map_err(|_| Status::resource_exhausted(format!("server busy: {}; retry later", why())))?;
        Ok(Self { _permit: permit, _gauge: GaugeGuard::new(crate::metrics::global().in_flight.with(&[service])) })
    }
}

pub struct AssistService {
    summarizer: Summarizer,
    intents: Intents,
    admission: Arc<Semaphore>,
    max_concurrent: usize,
    /// Background summaries' own slots.
    background: Arc<Semaphore>,
    max_background: usize,
    /// Requests a ClassifyIntentStream classifies at once.
    stream_window: usize,
}

impl AssistService {
    pub fn new(summarizer: Summarizer, intents: Intents, max_concurrent: usize, max_background: usize) -> Self {
        Self {
            summarizer,
            intents,
            admission: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            background: Arc::new(Semaphore::new(max_background)),
            max_background,
            stream_window: 64,
        }
    }

    /// A summary's slot: background ones have their own, so a bulk job never
    /// takes an agent's.
    fn admit_summary(&self, input: &SummarizeInput) -> Result<Admitted, Status> {
        match input.priority {
            Priority::Background => {
                Admitted::take(&self.background, "assist_background", || {
                    format!("all {} background summary slots are in use (--max-background-requests)", self.max_background)
                })
            }
            Priority::Interactive => self.admit(),
        }
    }

    /// Fails fast: an overloaded server says so rather than queueing without bound.
    fn admit(&self) -> Result<Admitted, Status> {
        Admitted::take(&self.admission, "assist", || format!("all {} request slots are in use (--max-concurrent-requests)", self.max_concurrent))
    }

    fn input(&self, req: pb::SummarizeRequest) -> Result<SummarizeInput, Status> {
        let input = to_input(req)?;
        self.summarizer.validate(&input)?;
        Ok(input)
    }
}

/// Converts the wire request; rejects what the domain types cannot express.
pub fn to_input(req: pb::SummarizeRequest) -> Result<SummarizeInput, SummarizeError> {
    let thread = to_thread(req.thread.ok_or_else(|| invalid("thread", "missing"))?)?;
    Ok(SummarizeInput {
        thread,
        language: (!req.language.trim().is_empty()).then(|| req.language.trim().to_string()),
        max_words: (req.max_words != 0).then_some(req.max_words),
        priority: match pb::Priority::try_from(req.priority) {
            Ok(pb::Priority::Unspecified | pb::Priority::Interactive) => Priority::Interactive,
            Ok(pb::Priority::Background) => Priority::Background,
            Err(_) => return Err(invalid("priority", format!("unknown value {}: expected 0, 1 (INTERACTIVE) or 2 (BACKGROUND)", req.priority))),
        },
    })
}

pub fn to_thread(thread: pb::Thread) -> Result<Thread, SummarizeError> {
    let messages = thread
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match pb::Role::try_from(m.role) {
                Ok(pb::Role::Customer) => Role::Customer,
                Ok(pb::Role::Agent) => Role::Agent,
                Ok(pb::Role::Bot) => Role::Bot,
                Ok(pb::Role::System) => Role::System,
                _ => {
                    return Err(invalid(
                        format!("thread.messages[{i}].role"),
                        format!("{} is not one of ROLE_CUSTOMER, ROLE_AGENT, ROLE_BOT, ROLE_SYSTEM", m.role),
                    ))
                }
            };
            Ok(Message {
                id: if m.id.is_empty() { format!("#{i}") } else { m.id },
                role,
                sent_at: m.sent_at.map(|t| t.seconds),
                text: m.text,
                channel: m.channel,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Thread { id: thread.thread_id, messages })
}

pub fn to_response(s: Summary) -> pb::SummarizeResponse {
    let status = match s.note.status {
        NoteStatus::WaitingOnAgent => pb::ThreadStatus::WaitingOnAgent,
        NoteStatus::WaitingOnCustomer => pb::ThreadStatus::WaitingOnCustomer,
        NoteStatus::Resolved => pb::ThreadStatus::Resolved,
        NoteStatus::Unknown => pb::ThreadStatus::Unknown,
    };
    let t = &s.timings;
    let per_s = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    pb::SummarizeResponse {
        thread_id: s.thread_id,
        summary: s.note.summary,
        customer_issue: s.note.customer_issue,
        actions_taken: s.note.actions_taken,
        status: status as i32,
        next_steps: s.note.next_steps,
        language: s.language.tag,
        language_source: s.language.source.to_string(),
        coverage: Some(coverage(s.coverage)),
        tokens: Some(pb::TokenCounts {
            prompt_tokens: t.prompt_tokens as u32,
            generated_tokens: t.generated_tokens as u32,
            reused_prompt_tokens: t.reused_prompt_tokens as u32,
            drafted_tokens: t.drafted_tokens as u32,
        }),
        model: s.model,
        timings: Some(pb::Timings {
            tokenize_ms: t.tokenize_ms,
            queue_ms: t.queue_ms,
            prompt_ms: t.prompt_ms,
            generation_ms: t.generation_ms,
            total_ms: t.total_ms,
            prompt_tokens_per_s: per_s(t.prompt_tokens_processed, t.prompt_ms),
            generated_tokens_per_s: per_s(t.generated_tokens, t.generation_ms),
        }),
        faithfulness: Some(pb::Faithfulness {
            regenerated: s.faithfulness.regenerated,
            removed_facts: s.faithfulness.removed_facts,
            passed_first_time: s.faithfulness.passed_first_time,
            attempts: t.attempts,
        }),
        references: s.references.into_iter().map(reference).collect(),
        cached: s.cached,
    }
}

fn to_chunk(thread_id: &str, ev: StreamEvent) -> pb::SummarizeChunk {
    let chunk = match ev {
        StreamEvent::Preview(p) => pb::summarize_chunk::Chunk::Preview(to_preview(thread_id, *p)),
        StreamEvent::Text(t) => pb::summarize_chunk::Chunk::TextDelta(t),
        StreamEvent::Restart(why) => pb::summarize_chunk::Chunk::Restart(why),
    };
    pb::SummarizeChunk { chunk: Some(chunk) }
}

fn to_preview(thread_id: &str, p: Preview) -> pb::SummarizePreview {
    pb::SummarizePreview {
        thread_id: thread_id.to_string(),
        language: p.language.tag,
        language_source: p.language.source.to_string(),
        coverage: Some(coverage(p.coverage)),
        references: p.references.into_iter().map(reference).collect(),
        summaries_ahead: u32::try_from(p.ahead).unwrap_or(u32::MAX),
    }
}

fn coverage(c: Coverage) -> pb::ThreadCoverage {
    pb::ThreadCoverage {
        used_message_ids: c.used_message_ids,
        omitted_message_ids: c.omitted_message_ids,
        truncated: c.truncated,
        shortened_message_ids: c.shortened_message_ids,
    }
}

fn reference(r: Reference) -> pb::Reference {
    let kind = match r.kind {
        FactKind::Number => pb::reference::Kind::Number,
        FactKind::Email => pb::reference::Kind::Email,
        FactKind::Phone => pb::reference::Kind::Phone,
        FactKind::Url => pb::reference::Kind::Url,
    };
    pb::Reference { text: r.text, kind: kind as i32, message_ids: r.message_ids, in_summary: r.in_summary }
}

type ClassifyStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ClassifyIntentResponse, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SummarizeChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::assist_server::Assist for AssistService {
    async fn summarize(&self, req: Request<pb::SummarizeRequest>) -> Result<Response<pb::SummarizeResponse>, Status> {
        let input = self.input(req.into_inner())?;
        let _permit = match self.admit_summary(&input) {
            Ok(p) => p,
            Err(refused) => {
                // A note already written for this exact thread costs no slot.
                let s = self.summarizer.stored(&input).ok_or(refused)?;
                log_done(&s);
                return Ok(Response::new(to_response(s)));
            }
        };
        // Dropping this future (client cancelled, deadline passed) stops the generation.
        let summary = self.summarizer.summarize(input, None).await?;
        log_done(&summary);
        Ok(Response::new(to_response(summary)))
    }

    async fn forget_thread(&self, req: Request<pb::ForgetThreadRequest>) -> Result<Response<pb::ForgetThreadResponse>, Status> {
        let thread_id = req.into_inner().thread_id;
        let f = self.summarizer.forget(&thread_id).await?;
        tracing::info!(thread = %thread_id, note = f.note, prompt = f.prompt, "forgotten");
        Ok(Response::new(pb::ForgetThreadResponse { note_forgotten: f.note, prompt_forgotten: f.prompt }))
    }

    async fn classify_intent(&self, req: Request<pb::ClassifyIntentRequest>) -> Result<Response<pb::ClassifyIntentResponse>, Status> {
        Ok(Response::new(self.classify_intent_impl(req.into_inner()).await?))
    }

    async fn classify_intent_batch(
        &self,
        req: Request<pb::ClassifyIntentBatchRequest>,
    ) -> Result<Response<pb::ClassifyIntentBatchResponse>, Status> {
        Ok(Response::new(self.classify_batch_impl(req.into_inner()).await?))
    }

    type ClassifyIntentStreamStream = ClassifyStream;

    async fn classify_intent_stream(
        &self,
        req: Request<tonic::Streaming<pb::ClassifyIntentRequest>>,
    ) -> Result<Response<ClassifyStream>, Status> {
        let permit = self.admit()?;
        Ok(Response::new(self.classify_stream_impl(req.into_inner(), permit)))
    }

    async fn analyze(&self, req: Request<pb::AnalyzeRequest>) -> Result<Response<pb::AnalyzeResponse>, Status> {
        Ok(Response::new(self.analyze_impl(req.into_inner()).await?))
    }

    type SummarizeStreamStream = ChunkStream;

    async fn summarize_stream(&self, req: Request<pb::SummarizeRequest>) -> Result<Response<ChunkStream>, Status> {
        let input = self.input(req.into_inner())?;
        let permit = match self.admit_summary(&input) {
            Ok(p) => p,
            Err(refused) => {
                let s = self.summarizer.stored(&input).ok_or(refused)?;
                log_done(&s);
                let thread_id = s.thread_id.clone();
                let mut chunks: Vec<Result<pb::SummarizeChunk, Status>> = replay(&s).into_iter().map(|ev| Ok(to_chunk(&thread_id, ev))).collect();
                chunks.push(Ok(pb::SummarizeChunk { chunk: Some(pb::summarize_chunk::Chunk::Response(to_response(s))) }));
                return Ok(Response::new(Box::pin(tokio_stream::iter(chunks))));
            }
        };
        let summarizer = self.summarizer.clone();
        let thread_id = input.thread.id.clone();
        let (tx, rx) = mpsc::channel::<Result<pb::SummarizeChunk, Status>>(64);
        tokio::spawn(async move {
            let _permit = permit;
            let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
            let work = summarizer.summarize(input, Some(ev_tx));
            tokio::pin!(work);
            let result = loop {
                tokio::select! {
                    r = &mut work => break r,
                    Some(ev) = ev_rx.recv() => {
                        if tx.send(Ok(to_chunk(&thread_id, ev))).await.is_err() {
                            return; // client gone: dropping `work` cancels the generation
                        }
                    }
                    _ = tx.closed() => return,
                }
            };
            // Events sent after the last one was drained (all of them, for a stored note).
            while let Ok(ev) = ev_rx.try_recv() {
                let _ = tx.send(Ok(to_chunk(&thread_id, ev))).await;
            }
            let last = result.map(|s| {
                log_done(&s);
                pb::SummarizeChunk { chunk: Some(pb::summarize_chunk::Chunk::Response(to_response(s))) }
            });
            let _ = tx.send(last.map_err(Status::from)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl AssistService {
    async fn classify_intent_impl(&self, req: pb::ClassifyIntentRequest) -> Result<pb::ClassifyIntentResponse, Status> {
        let request_id = req.request_id.clone();
        let input = to_classify_input(req)?;
        self.intents.validate(&input)?;
        let _permit = self.admit()?;
        let c = self.intents.classify(input).await?;
        log_classified(&c);
        Ok(to_classify_response(c, self.intents.encoder().id(), request_id))
    }

    async fn classify_batch_impl(&self, req: pb::ClassifyIntentBatchRequest) -> Result<pb::ClassifyIntentBatchResponse, Status> {
        let _permit = self.admit()?;
        let taxonomy = Some(req.taxonomy).filter(|t| !t.is_empty());
        let all = self.intents.classify_batch(req.texts, taxonomy.as_deref(), req.top_k as usize).await?;
        let model = self.intents.encoder().id();
        Ok(pb::ClassifyIntentBatchResponse {
            results: all.into_iter().enumerate().map(|(i, c)| to_classify_response(c, model, i.to_string())).collect(),
        })
    }

    /// Keeps up to `stream_window` requests in flight and answers in request
    /// order; a slow reader stops the reading of new requests (backpressure).
    fn classify_stream_impl(&self, input: tonic::Streaming<pb::ClassifyIntentRequest>, permit: Admitted) -> ClassifyStream {
        let intents = self.intents.clone();
        let window = self.stream_window;
        let (tx, rx) = mpsc::channel::<Result<pb::ClassifyIntentResponse, Status>>(window);
        tokio::spawn(async move {
            let _permit = permit;
            let mut input = input;
            let mut in_flight = futures_ordered();
            let mut input_done = false;
            loop {
                tokio::select! {
                    req = input.next(), if !input_done && in_flight.len() < window => match req {
                        Some(Ok(req)) => {
                            let intents = intents.clone();
                            in_flight.push_back(Box::pin(async move { classify_one(&intents, req).await }));
                        }
                        Some(Err(status)) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        None => input_done = true,
                    },
                    Some(resp) = in_flight.next(), if !in_flight.is_empty() => {
                        if tx.send(Ok(resp)).await.is_err() {
                            return; // client gone
                        }
                    }
                    else => break,
                }
                if input_done && in_flight.is_empty() {
                    break;
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    async fn analyze_impl(&self, req: pb::AnalyzeRequest) -> Result<pb::AnalyzeResponse, Status> {
        let started = std::time::Instant::now();
        let summarize = to_input(pb::SummarizeRequest { thread: req.thread, language: req.language, max_words: req.max_words, ..Default::default() })?;
        let classify = crate::intent::ClassifyInput {
            source: crate::intent::Source::Thread(summarize.thread.clone()),
            taxonomy: Some(req.taxonomy).filter(|t| !t.is_empty()),
            top_k: req.top_k as usize,
        };
        self.summarizer.validate(&summarize)?;
        self.intents.validate(&classify)?;
        let _permit = self.admit()?;
        let (summary, intent) = tokio::join!(self.summarizer.summarize(summarize, None), self.intents.classify(classify));
        let (summary, intent) = (summary?, intent?);
        log_done(&summary);
        Ok(pb::AnalyzeResponse {
            summary: Some(to_response(summary)),
            intent: Some(to_classify_response(intent, self.intents.encoder().id(), String::new())),
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

type PendingClassify = Pin<Box<dyn std::future::Future<Output = pb::ClassifyIntentResponse> + Send>>;

fn futures_ordered() -> futures_util::stream::FuturesOrdered<PendingClassify> {
    futures_util::stream::FuturesOrdered::new()
}

fn log_done(s: &Summary) {
    let t = &s.timings;
    tracing::info!(
        thread = %s.thread_id, lang = %s.language.tag, prompt_tokens = t.prompt_tokens,
        generated = t.generated_tokens, queue_ms = t.queue_ms as u64, prompt_ms = t.prompt_ms as u64,
        generation_ms = t.generation_ms as u64, total_ms = t.total_ms as u64,
        regenerated = s.faithfulness.regenerated, removed = s.faithfulness.removed_facts.len(), cached = s.cached,
        "summarized"
    );
}
