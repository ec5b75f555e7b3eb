//! Wire conversions of intent classification, and the per-request logic of
//! the streaming variant.

use super::assist::to_thread;
use crate::intent::signals::{Sentiment, Urgency};
use crate::intent::{Classification, ClassifyInput, Intents, Source};
use crate::proto::v1 as pb;
use tonic::Status;

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn to_classify_input(req: pb::ClassifyIntentRequest) -> Result<ClassifyInput, Status> {
    let source = match req.input {
        Some(pb::classify_intent_request::Input::Text(t)) => Source::Text(t),
        Some(pb::classify_intent_request::Input::Thread(th)) => Source::Thread(to_thread(th)?),
        None => return Err(Status::invalid_argument("input: set either `text` or `thread`")),
    };
    Ok(ClassifyInput { source, taxonomy: Some(req.taxonomy).filter(|t| !t.is_empty()), top_k: req.top_k as usize })
}

pub fn to_classify_response(c: Classification, model: &str, request_id: String) -> pb::ClassifyIntentResponse {
    let sentiment = match c.sentiment {
        Sentiment::Negative => pb::SentimentLabel::Negative,
        Sentiment::Neutral => pb::SentimentLabel::Neutral,
        Sentiment::Positive => pb::SentimentLabel::Positive,
    };
    let urgency = match c.urgency {
        Urgency::Low => pb::UrgencyLevel::Low,
        Urgency::Normal => pb::UrgencyLevel::Normal,
        Urgency::High => pb::UrgencyLevel::High,
    };
    let t = c.timings;
    pb::ClassifyIntentResponse {
        intents: c.intents.into_iter().map(|(label, score)| pb::IntentScore { label, score }).collect(),
        out_of_scope: c.out_of_scope,
        out_of_scope_score: c.out_of_scope_score,
        sentiment: Some(pb::Sentiment { label: sentiment as i32, score: c.sentiment_score }),
        urgency: Some(pb::Urgency { level: urgency as i32, reasons: c.urgency_reasons }),
        language: c.language,
        taxonomy: c.taxonomy,
        taxonomy_version: c.taxonomy_version,
        timings: Some(pb::ClassifyTimings {
            tokenize_ms: ms(t.tokenize),
            queue_ms: ms(t.queue),
            inference_ms: ms(t.inference),
            total_ms: ms(t.total),
            batch_size: t.batch_size as u32,
        }),
        request_id,
        model: model.to_string(),
        error: String::new(),
    }
}

/// One request of a stream: its answer, or a response carrying the error.
pub async fn classify_one(intents: &Intents, req: pb::ClassifyIntentRequest) -> pb::ClassifyIntentResponse {
    let request_id = req.request_id.clone();
    let result = match to_classify_input(req) {
        Ok(input) => intents.classify(input).await.map_err(Status::from),
        Err(s) => Err(s),
    };
    match result {
        Ok(c) => to_classify_response(c, intents.encoder().id(), request_id),
        Err(s) => pb::ClassifyIntentResponse { request_id, error: s.message().to_string(), ..Default::default() },
    }
}

pub fn log_classified(c: &Classification) {
    tracing::debug!(
        taxonomy = %c.taxonomy, top = ?c.intents.first(), oos = c.out_of_scope, lang = %c.language,
        queue_ms = ms(c.timings.queue), inference_ms = ms(c.timings.inference), batch = c.timings.batch_size,
        "classified"
    );
}
