//! Sentence embeddings: a BERT-family encoder (multilingual-e5-small by
//! default), masked mean pooling, L2 normalisation. `batching` decides what
//! runs together, `worker` owns the model on its own thread.

pub mod batching;
mod worker;

pub use worker::{EncodeTimings, EncoderHandle, EncoderStats, Encoded};

use crate::models::EncoderFiles;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
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
    model: BertModel,
    device: Device,
    hidden: usize,
}

impl Encoder {
    pub fn load(files: &EncoderFiles, device: &Device) -> Result<Self, EncoderError> {
        let config: Config = std::fs::read_to_string(&files.config)
            .map_err(|e| EncoderError::Load(format!("{}: {e}", files.config.display())))
            .and_then(|s| serde_json::from_str(&s).map_err(|e| EncoderError::Load(format!("config.json: {e}"))))?;
        // SAFETY: the file is memory-mapped read-only and was verified by hash when prepared.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, device)? };
        let model = BertModel::load(vb, &config)?;
        Ok(Self { model, device: device.clone(), hidden: config.hidden_size })
    }

    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// Embeds token sequences (each with its special tokens). Sequences are
    /// padded to the longest one and masked, so each row equals its own run.
    pub fn embed(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, EncoderError> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let n = seqs.len();
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0f32; n * len];
        for (i, s) in seqs.iter().enumerate() {
            ids[i * len..i * len + s.len()].copy_from_slice(s);
            mask[i * len..i * len + s.len()].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let types = ids.zeros_like()?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        // Masked mean: padding positions contribute nothing.
        let m = mask.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        let out = mean.broadcast_div(&norm)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        debug_assert!(out.iter().all(|r| r.len() == self.hidden));
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
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
