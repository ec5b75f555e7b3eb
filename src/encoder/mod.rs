//! Sentence embeddings: a BERT-family encoder (multilingual-e5-small by
//! default), masked mean pooling, L2 normalisation. `batching` decides what
//! runs together, `worker` owns the model on its own thread.

pub mod batching;
mod bert;
pub mod int8;
mod worker;

pub use worker::{EncodeTimings, EncoderHandle, EncoderStats, Encoded};

use crate::models::EncoderFiles;
use bert::PackedBert;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("loading the encoder: {0}")]
    Load(String),
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("encoder inference: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("the encoder thread stopped")]
    WorkerGone,
}

/// The loaded encoder. Not thread-safe by design: one thread owns it.
pub struct Encoder {
    model: PackedBert,
}

/// Tokens per forward pass inside one `embed` call.
const CHUNK_TOKENS: usize = 1024;

/// Arithmetic of the dense layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// int8 where the CPU has AVX-512 VNNI, f32 elsewhere.
    Auto,
    F32,
    /// Falls back to f32 on CPUs without AVX-512 VNNI and on GPUs.
    Int8,
}

impl Precision {
    /// Whether the dense layers will actually run in int8 on `device`.
    pub fn int8_on(self, device: &Device) -> bool {
        self != Precision::F32 && device.is_cpu() && crate::cpu::avx512_vnni()
    }

    /// Encoder id as reported and stored with trained heads: int8 embeddings
    /// differ slightly, so heads are retrained when the precision changes.
    pub fn model_id(self, name: &str, device: &Device) -> String {
        if self.int8_on(device) { format!("{name}+int8") } else { name.to_string() }
    }
}

impl Encoder {
    pub fn load(files: &EncoderFiles, device: &Device, precision: Precision) -> Result<Self, EncoderError> {
        let config: Config = std::fs::read_to_string(&files.config)
            .map_err(|e| EncoderError::Load(format!("{}: {e}", files.config.display())))
            .and_then(|s| serde_json::from_str(&s).map_err(|e| EncoderError::Load(format!("config.json: {e}"))))?;
        // SAFETY: the file is memory-mapped read-only and was verified by hash when prepared.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, device)? };
        Ok(Self { model: PackedBert::load(vb, &config, precision.int8_on(device))? })
    }

    /// Embeds token sequences (each with its special tokens): mean-pooled
    /// over each sequence's own tokens and L2-normalised, so a row does not
    /// depend on what else is in the batch.
    pub fn embed(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EncoderError> {
        // Large batches run as consecutive chunks of about a thousand tokens:
        // past that, activations outgrow the caches and throughput drops
        // (measured: 185 messages/s at 32 messages of 28 tokens, 139 at 128).
        // Rows do not depend on their batch, so chunking changes no result.
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let mut end = start;
            let mut tokens = 0;
            while end < seqs.len() && (end == start || tokens + seqs[end].len() <= CHUNK_TOKENS) {
                tokens += seqs[end].len();
                end += 1;
            }
            out.extend(self.model.embed(&seqs[start..end])?);
            start = end;
        }
        Ok(out)
    }
}

/// Turns text into encoder input off the model thread: prefix, special
/// tokens, and a cut at `max_tokens` that keeps the closing special token.
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: std::sync::Arc<Tokenizer>,
    prefix: String,
    max_tokens: usize,
}

impl TextEncoder {
    pub fn new(files: &EncoderFiles, max_tokens: usize) -> Result<Self, EncoderError> {
        let mut tokenizer = Tokenizer::from_file(&files.tokenizer)
            .map_err(|e| EncoderError::Load(format!("{}: {e}", files.tokenizer.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| EncoderError::Load(format!("tokenizer truncation: {e}")))?;
        Ok(Self { tokenizer: std::sync::Arc::new(tokenizer), prefix: files.query_prefix.clone(), max_tokens: max_tokens.max(3) })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EncoderError> {
        let input = format!("{}{}", self.prefix, text);
        let enc = self.tokenizer.encode(input, true).map_err(|e| EncoderError::Tokenize(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_tokens {
            let last = *ids.last().expect("non-empty");
            ids.truncate(self.max_tokens - 1);
            ids.push(last);
        }
        Ok(ids)
    }
}

/// Cosine of two L2-normalised vectors.
pub use crate::cpu::dot;
