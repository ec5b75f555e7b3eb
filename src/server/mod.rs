//! The gRPC server: Assist, health (NOT_SERVING until the model is loaded) and
//! reflection (so grpcurl works without the proto files); every call counted
//! and timed for the metrics listener (`metrics`).

mod assist;
mod classify;
pub mod engagement;
pub mod metrics;
mod status;
mod taxonomies;

pub use assist::{to_input, to_response, to_thread, AssistService};
pub use taxonomies::{to_wire as taxonomy_to_wire, TaxonomiesService};

use crate::llm::ModelState;
use crate::intent::taxonomy::Taxonomy;
use crate::intent::Intents;
use crate::proto::v1::assist_server::AssistServer;
use crate::proto::v1::engagement_server::EngagementServer;
use crate::proto::v1::taxonomies_server::TaxonomiesServer;
use crate::sendtime::Engagement;
use engagement::EngagementService;
use crate::summarize::Summarizer;
use std::future::Future;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_concurrent_requests: usize,
    /// Admission slots of background summaries, apart from the others.
    pub max_background_requests: usize,
    pub max_request_bytes: usize,
    /// Registered (or confirmed unchanged) once the encoder is loaded.
    pub startup_taxonomies: Vec<Taxonomy>,
}

/// What one server runs; either part may be left out (`--services`).
pub struct Services {
    /// Assist and Taxonomies: the summarizer and the intent classifier.
    pub assist: Option<(Summarizer, Intents)>,
    /// Engagement (send times): needs no model.
    pub engagement: Option<Engagement>,
}

/// Serves until `shutdown` resolves. The models may still be loading: health
/// says NOT_SERVING and requests get UNAVAILABLE until they are ready.
/// `palaver.v1.Engagement` serves at once; `palaver.v1.Taxonomies` once the
/// encoder and the built-in taxonomies are ready; `palaver.v1.Assist` (and "")
/// once the summarizer is too ("" at once when Assist is not run).
pub async fn serve(
    listener: TcpListener,
    services: Services,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::NotServing).await;
    if services.engagement.is_some() {
        health.set_serving::<EngagementServer<EngagementService>>().await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let mut router = tonic::transport::Server::builder()
        .layer(metrics::ObserveLayer)
        .add_service(health_service)
        .add_service(reflection)
        .add_optional_service(
            services.engagement.clone().map(|e| EngagementServer::new(EngagementService::new(e)).max_decoding_message_size(opts.max_request_bytes)),
        );
    if let Some((summarizer, intents)) = services.assist {
        health.set_not_serving::<AssistServer<AssistService>>().await;
        health.set_not_serving::<TaxonomiesServer<TaxonomiesService>>().await;
        let llm = summarizer.llm().clone();
        let init = intents.clone();
        let startup = opts.startup_taxonomies.clone();
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(e) = init.init(startup).await {
                tracing::error!(error = %e, "intents unavailable; Taxonomies stays NOT_SERVING");
                return;
            }
            health.set_serving::<TaxonomiesServer<TaxonomiesService>>().await;
            match llm.wait_loaded().await {
                ModelState::Ready { .. } => {
                    health.set_serving::<AssistServer<AssistService>>().await;
                    health.set_service_status("", ServingStatus::Serving).await;
                }
                other => tracing::error!(state = ?other, "summarizer unavailable; Assist stays NOT_SERVING"),
            }
        });
        let assist = AssistServer::new(AssistService::new(summarizer, intents.clone(), opts.max_concurrent_requests, opts.max_background_requests))
            .max_decoding_message_size(opts.max_request_bytes);
        let taxonomies = TaxonomiesServer::new(TaxonomiesService::new(intents)).max_decoding_message_size(opts.max_request_bytes);
        router = router.add_service(assist).add_service(taxonomies);
    } else {
        health.set_service_status("", ServingStatus::Serving).await;
    }

    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
    // Small responses must not wait for the peer's delayed ACK (Nagle's
    // algorithm): without TCP_NODELAY a 2-segment reply took 44 ms on localhost.
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        s.and_then(|s| s.set_nodelay(true).map(|()| s))
    });
    router.serve_with_incoming_shutdown(incoming, shutdown).await?;
    if let Some(e) = services.engagement {
        // Everything acknowledged is already durable; this only releases the file.
        let _ = e.close().await;
    }
    Ok(())
}
