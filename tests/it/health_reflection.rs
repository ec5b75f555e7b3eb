//! Health reports NOT_SERVING until the model is loaded (and keeps saying so
//! when it cannot load); reflection lets grpcurl work without the protos.


use crate::common::{default_opts, fixture_server, llm_files, TestServer};
use palaver::models::{self, LlmFiles};
use palaver::proto::v1 as pb;
use palaver::summarize::SummarizeConfig;
use tokio_stream::StreamExt;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

fn request() -> pb::SummarizeRequest {
    pb::SummarizeRequest {
        thread: Some(pb::Thread {
            thread_id: "h".into(),
            messages: vec![pb::Message { id: "1".into(), role: pb::Role::Customer as i32, text: "hello".into(), ..Default::default() }],
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn health_is_not_serving_while_the_model_cannot_serve() {
    // A model file that cannot load: the server must still answer health and
    // refuse work with UNAVAILABLE rather than hang.
    let good = llm_files(models::FIXTURE_LLM);
    let dir = std::env::temp_dir().join(format!("palaver-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gguf = dir.join("broken.gguf");
    std::fs::write(&gguf, b"GGUF but not really").unwrap();
    let s = TestServer::start(LlmFiles { id: "broken".into(), gguf, tokenizer: good.tokenizer }, SummarizeConfig::default(), default_opts());
    let mut h = HealthClient::new(s.channel().await);
    for service in ["", "palaver.v1.Assist"] {
        let r = h.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::NotServing as i32, "{service:?}");
    }
    let err = s.client().await.summarize(request()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn health_turns_serving_once_loaded() {
    let s = fixture_server();
    s.wait_serving().await;
    let mut h = HealthClient::new(s.channel().await);
    let r = h.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[tokio::test]
async fn reflection_lists_and_describes_the_services() {
    let s = fixture_server();
    let mut client = ServerReflectionClient::new(s.channel().await);
    let reqs = vec![
        ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol("palaver.v1.Assist".into())),
        },
    ];
    let mut responses = client.server_reflection_info(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let mut services = Vec::new();
    let mut files = 0;
    while let Some(r) = responses.next().await {
        match r.unwrap().message_response.unwrap() {
            MessageResponse::ListServicesResponse(l) => services.extend(l.service.into_iter().map(|s| s.name)),
            MessageResponse::FileDescriptorResponse(f) => files += f.file_descriptor_proto.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    for name in ["palaver.v1.Assist", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == name), "{name} missing from {services:?}");
    }
    assert!(files >= 1, "no descriptor for palaver.v1.Assist");
}
