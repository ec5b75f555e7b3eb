//! gRPC adapter of the `Assist` service: wire types in, domain types out,
//! admission, streaming. No model code and no summarisation logic here.

use crate::proto::v1 as pb;
use crate::summarize::parse::Status as NoteStatus;
use crate::summarize::thread::{invalid, Message, Role, SummarizeInput, Thread};
use crate::summarize::{StreamEvent, SummarizeError, Summarizer, Summary};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct AssistService {
    summarizer: Summarizer,
    admission: Arc<Semaphore>,
    max_concurrent: usize,
}

impl AssistService {
    pub fn new(summarizer: Summarizer, max_concurrent: usize) -> Self {
        Self { summarizer, admission: Arc::new(Semaphore::new(max_concurrent)), max_concurrent }
    }

    /// Fails fast: an overloaded server says so rather than queueing without bound.
    fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.admission.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "server busy: all {} request slots are in use (--max-concurrent-requests); retry later",
                self.max_concurrent
            ))
        })
    }

    fn input(&self, req: pb::SummarizeRequest) -> Result<SummarizeInput, Status> {
        let input = to_input(req)?;
        self.summarizer.validate(&input)?;
        Ok(input)
    }
}

/// Converts the wire request; rejects what the domain types cannot express.
pub fn to_input(req: pb::SummarizeRequest) -> Result<SummarizeInput, SummarizeError> {
    let thread = req.thread.ok_or_else(|| invalid("thread", "missing"))?;
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
    Ok(SummarizeInput {
        thread: Thread { id: thread.thread_id, messages },
        language: (!req.language.trim().is_empty()).then(|| req.language.trim().to_string()),
        max_words: (req.max_words != 0).then_some(req.max_words),
    })
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
        coverage: Some(pb::ThreadCoverage {
            used_message_ids: s.coverage.used_message_ids,
            omitted_message_ids: s.coverage.omitted_message_ids,
            truncated: s.coverage.truncated,
            shortened_message_ids: s.coverage.shortened_message_ids,
        }),
        tokens: Some(pb::TokenCounts {
            prompt_tokens: t.prompt_tokens as u32,
            generated_tokens: t.generated_tokens as u32,
            reused_prompt_tokens: 0,
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
    }
}

type ChunkStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SummarizeChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::assist_server::Assist for AssistService {
    async fn summarize(&self, req: Request<pb::SummarizeRequest>) -> Result<Response<pb::SummarizeResponse>, Status> {
        let input = self.input(req.into_inner())?;
        let _permit = self.admit()?;
        // Dropping this future (client cancelled, deadline passed) stops the generation.
        let summary = self.summarizer.summarize(input, None).await?;
        log_done(&summary);
        Ok(Response::new(to_response(summary)))
    }

    type SummarizeStreamStream = ChunkStream;

    async fn summarize_stream(&self, req: Request<pb::SummarizeRequest>) -> Result<Response<ChunkStream>, Status> {
        let input = self.input(req.into_inner())?;
        let permit = self.admit()?;
        let summarizer = self.summarizer.clone();
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
                        let chunk = match ev {
                            StreamEvent::Text(t) => pb::summarize_chunk::Chunk::TextDelta(t),
                            StreamEvent::Restart(why) => pb::summarize_chunk::Chunk::Restart(why),
                        };
                        if tx.send(Ok(pb::SummarizeChunk { chunk: Some(chunk) })).await.is_err() {
                            return; // client gone: dropping `work` cancels the generation
                        }
                    }
                    _ = tx.closed() => return,
                }
            };
            // Text generated after the last event was drained.
            while let Ok(StreamEvent::Text(t)) = ev_rx.try_recv() {
                let _ = tx.send(Ok(pb::SummarizeChunk { chunk: Some(pb::summarize_chunk::Chunk::TextDelta(t)) })).await;
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

fn log_done(s: &Summary) {
    let t = &s.timings;
    tracing::info!(
        thread = %s.thread_id, lang = %s.language.tag, prompt_tokens = t.prompt_tokens,
        generated = t.generated_tokens, queue_ms = t.queue_ms as u64, prompt_ms = t.prompt_ms as u64,
        generation_ms = t.generation_ms as u64, total_ms = t.total_ms as u64,
        regenerated = s.faithfulness.regenerated, removed = s.faithfulness.removed_facts.len(),
        "summarized"
    );
}
