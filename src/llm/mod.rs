//! Causal language models from GGUF files (candle's quantized Qwen2 and Llama),
//! greedy generation with streaming, and the thread that owns a loaded model.

mod worker;

pub use worker::{wait_not_loading, LlmHandle, LlmStats, ModelState};

use crate::models::LlmFiles;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use std::io::BufReader;
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("loading model: {0}")]
    Load(String),
    #[error("inference: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("prompt of {tokens} tokens exceeds the model context of {limit}")]
    ContextExceeded { tokens: usize, limit: usize },
    #[error("the model is still loading")]
    NotReady,
    #[error("the model failed to load: {0}")]
    LoadFailed(String),
    #[error("request cancelled")]
    Cancelled,
    #[error("model thread stopped")]
    WorkerGone,
}

enum Weights {
    Qwen2(quantized_qwen2::ModelWeights),
    Llama(quantized_llama::ModelWeights),
}

impl Weights {
    /// Logits of the last position. `index_pos == 0` starts a fresh sequence
    /// (both models then drop their KV cache).
    fn forward(&mut self, x: &Tensor, index_pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Qwen2(m) => m.forward(x, index_pos),
            Weights::Llama(m) => m.forward(x, index_pos),
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndOfText,
    MaxTokens,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub stop: StopReason,
    pub queue: Duration,
    pub prompt_time: Duration,
    pub generation_time: Duration,
}

/// Decoding parameters. Greedy by default, so the same thread gives the same summary.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    /// Penalty on tokens seen in the last `repeat_last_n` generated tokens
    /// (1.0 = none); keeps small models out of loops without losing determinism.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self { max_new_tokens: 320, repeat_penalty: 1.1, repeat_last_n: 64 }
    }
}

pub struct Llm {
    id: String,
    weights: Weights,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    context: usize,
    device: Device,
}

impl Llm {
    pub fn load(files: &LlmFiles, device: &Device) -> Result<Self, LlmError> {
        let load = |e: &dyn std::fmt::Display| LlmError::Load(format!("{}: {e}", files.gguf.display()));
        let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| load(&e))?;
        let mut r = BufReader::new(std::fs::File::open(&files.gguf).map_err(|e| load(&e))?);
        let content = gguf_file::Content::read(&mut r).map_err(|e| load(&e))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let ctx_key = format!("{arch}.context_length");
        let mut context = content.metadata.get(&ctx_key).and_then(|v| v.to_u32().ok()).unwrap_or(4096) as usize;
        let mut eos: Vec<u32> = content
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
            .into_iter()
            .collect();
        let weights = match arch.as_str() {
            "qwen2" => Weights::Qwen2(quantized_qwen2::ModelWeights::from_gguf(content, &mut r, device)?),
            "llama" => {
                // candle's quantized llama precomputes rotary tables for this many positions.
                context = context.min(quantized_llama::MAX_SEQ_LEN);
                Weights::Llama(quantized_llama::ModelWeights::from_gguf(content, &mut r, device)?)
            }
            other => return Err(LlmError::Load(format!("unsupported architecture `{other}` (qwen2, llama)"))),
        };
        // ChatML models end a turn with <|im_end|>; stop there whatever the GGUF says.
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = tokenizer.token_to_id(t) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Ok(Self { id: files.id.clone(), weights, tokenizer, eos, context, device: device.clone() })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn context_len(&self) -> usize {
        self.context
    }

    /// Greedy generation. `on_text` receives each new piece of decoded text and
    /// returns false to stop (the client went away).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, LlmError> {
        let max_new = params.max_new_tokens.min(self.context.saturating_sub(prompt.len()));
        if prompt.is_empty() || prompt.len() >= self.context {
            return Err(LlmError::ContextExceeded { tokens: prompt.len(), limit: self.context });
        }
        let t0 = Instant::now();
        let input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let mut logits = self.weights.forward(&input, 0)?;
        let prompt_time = t0.elapsed();

        let t1 = Instant::now();
        let mut out: Vec<u32> = Vec::with_capacity(max_new);
        let mut decoder = IncrementalDecoder::default();
        let mut stop = StopReason::MaxTokens;
        while out.len() < max_new {
            let mut l = logits.squeeze(0)?;
            if params.repeat_penalty != 1.0 && !out.is_empty() {
                let start = out.len().saturating_sub(params.repeat_last_n);
                l = candle_transformers::utils::apply_repeat_penalty(&l, params.repeat_penalty, &out[start..])?;
            }
            let next = l.argmax(0)?.to_scalar::<u32>()?;
            if self.eos.contains(&next) {
                stop = StopReason::EndOfText;
                break;
            }
            out.push(next);
            if let Some(piece) = decoder.push(&self.tokenizer, &out)? {
                if !on_text(&piece) {
                    return Err(LlmError::Cancelled);
                }
            }
            if out.len() == max_new {
                break;
            }
            let input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
            logits = self.weights.forward(&input, prompt.len() + out.len() - 1)?;
        }
        let text = self.tokenizer.decode(&out, true).map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        Ok(Generation {
            text,
            prompt_tokens: prompt.len(),
            generated_tokens: out.len(),
            stop,
            queue: Duration::ZERO,
            prompt_time,
            generation_time: t1.elapsed(),
        })
    }
}

/// Turns a growing token sequence into text pieces, holding back a piece while
/// it ends inside a multi-byte character (a token may carry half of one).
/// Decodes only a short window of recent tokens per step, not the whole
/// sequence, so streaming stays linear in the answer's length; the window starts
/// a few tokens back because a token's text can depend on its left neighbour.
#[derive(Default)]
struct IncrementalDecoder {
    /// Start of the decoding window.
    prefix: usize,
    /// Tokens already emitted as text.
    read: usize,
}

impl IncrementalDecoder {
    fn push(&mut self, tok: &Tokenizer, ids: &[u32]) -> Result<Option<String>, LlmError> {
        let decode = |s: &[u32]| tok.decode(s, true).map_err(|e| LlmError::Tokenizer(e.to_string()));
        let before = decode(&ids[self.prefix..self.read])?;
        let now = decode(&ids[self.prefix..])?;
        if now.ends_with('\u{FFFD}') || now.len() <= before.len() || !now.is_char_boundary(before.len()) {
            return Ok(None);
        }
        let piece = now[before.len()..].to_string();
        self.prefix = self.read;
        self.read = ids.len();
        Ok(Some(piece))
    }
}

/// ChatML, the template of both Qwen2.5 and SmolLM2. `assistant_prefix` is
/// text the answer is forced to start with.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_decoding_reassembles_the_full_text() {
        use crate::models::{self, FetchOptions, HubOptions};
        let dir = std::env::var_os("PALAVER_MODELS_DIR").map(Into::into).unwrap_or_else(models::default_models_dir);
        models::fetch_models(&[models::FIXTURE_LLM], &FetchOptions::new(dir.clone())).unwrap();
        let files = models::resolve_llm(models::FIXTURE_LLM, &dir, &HubOptions::default()).unwrap();
        let tok = Tokenizer::from_file(&files.tokenizer).unwrap();
        let text = "Olá, pedido nº 48213 — R$ 259,90; Привет, заказ 771045 👍 done.";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let mut d = IncrementalDecoder::default();
        let mut out = String::new();
        for n in 1..=ids.len() {
            if let Some(p) = d.push(&tok, &ids[..n]).unwrap() {
                out.push_str(&p);
            }
        }
        assert_eq!(out, tok.decode(&ids, true).unwrap());
    }
}

pub fn chatml(system: &str, user: &str, assistant_prefix: &str) -> String {
    format!(
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant_prefix}"
    )
}
