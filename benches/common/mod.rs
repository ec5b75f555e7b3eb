//! Shared by the load generators: an in-process server with the Assist
//! service (a summarizer and the default encoder) on 127.0.0.1:0.

use palaver::encoder::batching::BatchPolicy;
use palaver::encoder::{EncoderHandle, Precision};
use palaver::intent::store::DirStore;
use palaver::intent::{IntentConfig, Intents};
use palaver::llm::{LlmHandle, LlmOptions};
use palaver::models::{self, FetchOptions, HubOptions};
use palaver::server::{self, ServeOptions};
use palaver::summarize::{SummarizeConfig, Summarizer};
use std::time::Duration;

/// Fetches the models, starts the server on its own runtime thread and
/// returns its address and the summarizer's tokenizer.
pub fn start_server(summarizer: &str, llm: LlmOptions, cfg: SummarizeConfig) -> (String, tokenizers::Tokenizer) {
    let dir = std::env::var_os("PALAVER_MODELS_DIR").map(Into::into).unwrap_or_else(models::default_models_dir);
    models::fetch_models(&[summarizer, models::DEFAULT_ENCODER], &FetchOptions::new(dir.clone())).expect("fetch");
    let files = models::resolve_llm(summarizer, &dir, &HubOptions::default()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(&files.tokenizer).unwrap();
    let llm = LlmHandle::spawn(files, candle_core::Device::Cpu, llm).unwrap();
    let enc = models::resolve_encoder(models::DEFAULT_ENCODER, &dir).unwrap();
    let encoder =
        EncoderHandle::spawn(enc, candle_core::Device::Cpu, BatchPolicy::default(), Duration::from_millis(2), 256, Precision::Auto).unwrap();
    let store = std::env::temp_dir().join(format!("palaver-bench-{}", std::process::id()));
    let intents = Intents::new(encoder, Box::new(DirStore::open(&store).unwrap()), IntentConfig::default());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().to_string()).unwrap();
            let opts = ServeOptions { max_concurrent_requests: 256, max_background_requests: 64, max_request_bytes: 4 << 20, startup_taxonomies: vec![] };
            let services = server::Services { assist: Some((Summarizer::new(llm, cfg), intents)), engagement: None };
            server::serve(listener, services, opts, std::future::pending()).await.unwrap();
        });
    });
    (rx.recv().unwrap(), tok)
}
