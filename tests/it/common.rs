//! Shared by the integration tests: real models from the cache (fetched and
//! prepared on first use) and real servers on 127.0.0.1:0.
#![allow(dead_code)]

use palaver::encoder::batching::BatchPolicy;
use palaver::encoder::{EncoderHandle, Precision};
use palaver::intent::store::DirStore;
use palaver::intent::{IntentConfig, Intents};
use palaver::llm::LlmHandle;
use palaver::models::{self, FetchOptions, HubOptions};
use palaver::proto::v1::assist_client::AssistClient;
use palaver::proto::v1::taxonomies_client::TaxonomiesClient;
use palaver::server::{self, ServeOptions};
use palaver::summarize::{SummarizeConfig, Summarizer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use tonic::transport::Channel;

pub fn models_dir() -> PathBuf {
    std::env::var_os("PALAVER_MODELS_DIR").map(PathBuf::from).unwrap_or_else(models::default_models_dir)
}

/// Fetches and prepares a manifest model once (a lock file serialises test binaries).
pub fn llm_files(name: &str) -> models::LlmFiles {
    models::fetch_models(&[name], &FetchOptions::new(models_dir())).expect("fetch model");
    models::resolve_llm(name, &models_dir(), &HubOptions::default()).expect("resolve model")
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub llm: LlmHandle,
    pub encoder: EncoderHandle,
    pub store: PathBuf,
}

/// The real default encoder, batching as `palaver serve` does by default.
pub fn encoder() -> EncoderHandle {
    let name = models::DEFAULT_ENCODER;
    models::fetch_models(&[name], &FetchOptions::new(models_dir())).expect("fetch encoder");
    let files = models::resolve_encoder(name, &models_dir()).expect("resolve encoder");
    EncoderHandle::spawn(files, candle_core::Device::Cpu, BatchPolicy::default(), std::time::Duration::from_millis(2), 256, Precision::Auto)
        .expect("spawn encoder")
}

/// A fresh, empty folder under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("palaver-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl TestServer {
    /// Starts a server on its own thread and runtime, so it outlives any one test.
    pub fn start(files: models::LlmFiles, cfg: SummarizeConfig, opts: ServeOptions) -> TestServer {
        Self::start_with(files, cfg, opts, temp_dir(&format!("store{}", next_id())), IntentConfig::default())
    }

    /// With a given taxonomy store (a restart reuses one) and intent settings.
    pub fn start_with(files: models::LlmFiles, cfg: SummarizeConfig, opts: ServeOptions, store: PathBuf, icfg: IntentConfig) -> TestServer {
        let (tx, rx) = std::sync::mpsc::channel();
        let llm = LlmHandle::spawn(files, candle_core::Device::Cpu, palaver::llm::LlmOptions::default()).expect("spawn model");
        let handle = llm.clone();
        let enc = encoder();
        let intents = Intents::new(enc.clone(), Box::new(DirStore::open(&store).expect("store")), icfg);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let services = server::Services { assist: Some((Summarizer::new(llm, cfg), intents)), engagement: None };
                server::serve(listener, services, opts, std::future::pending()).await.unwrap();
            });
        });
        TestServer { addr: rx.recv().expect("server started"), llm: handle, encoder: enc, store }
    }

    pub async fn taxonomies(&self) -> TaxonomiesClient<Channel> {
        TaxonomiesClient::new(self.channel().await).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
    }

    /// Waits until the intents side (encoder and built-in taxonomies) serves.
    pub async fn wait_intents(&self) {
        self.wait_for("palaver.v1.Taxonomies").await
    }

    pub async fn client(&self) -> AssistClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap();
        AssistClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    /// Waits until health says SERVING (the models are loaded).
    pub async fn wait_serving(&self) {
        self.wait_for("palaver.v1.Assist").await
    }

    async fn wait_for(&self, service: &str) {
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let mut h = HealthClient::new(self.channel().await);
        for _ in 0..1200 {
            let r = h.check(HealthCheckRequest { service: service.into() }).await.unwrap();
            if r.into_inner().status == 1 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("server never became SERVING");
    }
}

pub fn default_opts() -> ServeOptions {
    ServeOptions { max_concurrent_requests: 64, max_background_requests: 64, max_request_bytes: 4 << 20, startup_taxonomies: Vec::new() }
}

fn next_id() -> usize {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One server with the real default summarizer, shared by the tests of a binary.
pub fn default_server() -> &'static TestServer {
    static S: OnceLock<TestServer> = OnceLock::new();
    S.get_or_init(|| TestServer::start(llm_files(models::DEFAULT_SUMMARIZER), SummarizeConfig::default(), default_opts()))
}

/// One server with the tiny SmolLM2 fixture: for plumbing, never for quality.
pub fn fixture_server() -> &'static TestServer {
    static S: OnceLock<TestServer> = OnceLock::new();
    S.get_or_init(|| TestServer::start(llm_files(models::FIXTURE_LLM), SummarizeConfig::default(), default_opts()))
}

/// `GET path` over plain HTTP/1.1, the whole response (head and body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("listening");
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    out
}
