//! Causal language models from GGUF files (Qwen2 and Llama architectures, run
//! by palaver's own forward in `transformer`), greedy generation with
//! streaming, prompt reuse per conversation, and the thread that owns a model.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod batching;
pub mod draft;
pub mod embed;
pub mod kv;
pub mod q4k;
pub mod q6k;
pub mod qgemm;
pub mod swiglu;
pub mod transformer;
mod worker;

pub use worker::{prompt_rows_exact, wait_not_loading, LlmHandle, LlmOptions, LlmStats, ModelState, Raise, DEFAULT_PREFIX_CACHE_BYTES};

use crate::models::LlmFiles;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use kv::{PrefixCache, SeqCache};
use std::io::BufReader;
pub use transformer::Kernels;
use transformer::{Step, Transformer};
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
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub reused_prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Generated tokens that came from accepted drafts (no pass of their own).
    pub drafted_tokens: usize,
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
    /// Who waits for it: the model thread serves interactive requests first.
    pub priority: batching::Priority,
    /// For a background generation: lets its caller raise it to interactive.
    pub raise: Option<Raise>,
    /// What the answer's lines open with, in order (the labels of a
    /// structured answer): after the answer's `i`-th line break, entry `i - 1`
    /// is offered as a draft when no other source has one.
    pub outline: Vec<Vec<u32>>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 320,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            priority: batching::Priority::Interactive,
            raise: None,
            outline: Vec::new(),
        }
    }
}

pub struct Llm {
    id: String,
    model: Transformer,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    /// Caches of finished sequences, reused to keep their buffers.
    spare: Vec<SeqCache>,
    prefixes: PrefixCache,
}

impl Llm {
    /// Loads a GGUF model; `prefix_cache_bytes` bounds the prompt caches kept
    /// per conversation (0 turns reuse off).
    pub fn load(files: &LlmFiles, device: &Device, prefix_cache_bytes: usize) -> Result<Self, LlmError> {
        Self::load_with(files, device, prefix_cache_bytes, Kernels::Native)
    }

    /// As [`load`](Self::load), on the given [`Kernels`].
    pub fn load_with(files: &LlmFiles, device: &Device, prefix_cache_bytes: usize, kernels: Kernels) -> Result<Self, LlmError> {
        let load = |e: &dyn std::fmt::Display| LlmError::Load(format!("{}: {e}", files.gguf.display()));
        let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| load(&e))?;
        let mut r = BufReader::new(std::fs::File::open(&files.gguf).map_err(|e| load(&e))?);
        let content = gguf_file::Content::read(&mut r).map_err(|e| load(&e))?;
        let mut eos: Vec<u32> = content
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok())
            .into_iter()
            .collect();
        let model = Transformer::from_gguf_with(&content, &mut r, device, kernels).map_err(|e| load(&e))?;
        // ChatML models end a turn with <|im_end|>; stop there whatever the GGUF says.
        for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(id) = tokenizer.token_to_id(t) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Ok(Self {
            id: files.id.clone(),
            model,
            tokenizer,
            eos,
            spare: Vec::new(),
            prefixes: PrefixCache::new(prefix_cache_bytes),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Drops what is kept of `conversation` (its cached prompt and answer);
    /// whether anything was.
    pub fn forget(&mut self, conversation: &str) -> bool {
        self.prefixes.remove(conversation)
    }

    /// Bytes of prompt caches kept for reuse.
    pub fn prefix_cache_bytes(&self) -> usize {
        self.prefixes.bytes()
    }

    pub fn context_len(&self) -> usize {
        self.model.config().context
    }

    pub fn transformer(&self) -> &Transformer {
        &self.model
    }

    /// Greedy generation. `on_text` receives each new piece of decoded text and
    /// returns false to stop (the client went away). The longest prefix of
    /// `prompt` in the prefix cache (the conversation's own earlier prompt, or
    /// instructions shared with any other) is not recomputed, and this
    /// prompt's cache replaces the conversation's (`None`: one shared slot).
    /// The model thread runs the same steps for many sequences at once
    /// (`worker`); this is the one-sequence loop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        conversation: Option<&str>,
        params: &GenerateParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, LlmError> {
        let mut s = self.start(prompt.to_vec(), conversation.map(str::to_string), params.clone())?;
        let policy = batching::BatchPolicy::default();
        while !s.is_done() {
            let piece = if s.prompt_left() > 0 {
                self.read_prompt(&mut s, policy.prompt_chunk, policy.prefill_draft)?
            } else {
                self.decode(&mut [&mut s], policy.draft_per_sequence(1))?.pop().flatten()
            };
            if let Some(p) = piece {
                if !on_text(&p) {
                    self.release(s);
                    return Err(LlmError::Cancelled);
                }
            }
        }
        self.finish(s)
    }

    /// Begins a sequence: checks its length and loads the longest cached
    /// prefix of its prompt, if any.
    pub fn start(
        &mut self,
        prompt: Vec<u32>,
        conversation: Option<String>,
        params: GenerateParams,
    ) -> Result<Sequence, LlmError> {
        let context = self.context_len();
        if prompt.is_empty() || prompt.len() >= context {
            return Err(LlmError::ContextExceeded { tokens: prompt.len(), limit: context });
        }
        let mut cache = self.spare.pop().unwrap_or_else(|| self.model.new_cache());
        let reused = self.prefixes.load(conversation.as_deref().unwrap_or(ANONYMOUS), &prompt, &mut cache)?;
        let previous = conversation.as_deref().map_or_else(Vec::new, |key| self.prefixes.answer(key).to_vec());
        let max_new = params.max_new_tokens.min(context - prompt.len());
        // Drafts never reach past the answer budget (`next_input`), so the
        // cache is sized once here and never copied to grow mid-answer.
        cache.reserve(prompt.len() + max_new)?;
        Ok(Sequence {
            read: reused,
            reused,
            max_new,
            prompt,
            conversation,
            params,
            cache,
            out: Vec::new(),
            previous,
            drafted: 0,
            draft_len: usize::MAX,
            lines: 0,
            line_start: false,
            decoder: IncrementalDecoder::default(),
            stop: None,
            started: Instant::now(),
            prompt_time: Duration::ZERO,
            generation_started: None,
            keep: true,
        })
    }

    /// Reads up to `n` more prompt tokens of `s`; once the prompt is read,
    /// chooses the first answer token and returns its text, if any yet.
    ///
    /// The pass that reads the prompt's last chunk also checks the opening
    /// of the conversation's previous answer, up to `draft` tokens, as a
    /// draft: re-summarising a grown thread mostly rewrites the same first
    /// lines, and here they cost a row of a wide pass each (about 7 ms for
    /// the 1.5B on 2 cores after 1,200 tokens) instead of a share of a
    /// 5-row decode pass (about 12). The answer is the same as without
    /// (`keep_checked`).
    pub fn read_prompt(&mut self, s: &mut Sequence, n: usize, draft: usize) -> Result<Option<String>, LlmError> {
        let end = s.prompt.len().min(s.read + n.max(1));
        let guess = if end == s.prompt.len() && s.out.is_empty() {
            // Drafts never reach past the answer budget (as in `next_input`).
            &s.previous[..s.previous.len().min(draft).min(s.max_new.saturating_sub(1))]
        } else {
            &[][..]
        };
        let mut tokens = s.prompt[s.read..end].to_vec();
        tokens.extend_from_slice(guess);
        let tail = guess.len() + 1;
        let logits = self.model.forward_tails(&mut [Step { tokens: &tokens, cache: &mut s.cache }], true, &[tail])?;
        s.read = end;
        if s.read < s.prompt.len() {
            return Ok(None);
        }
        // Only the prompt's positions are kept for the conversation.
        if s.keep {
            self.prefixes.store(s.conversation.as_deref().unwrap_or(ANONYMOUS), &s.prompt, &s.cache)?;
        }
        s.prompt_time = s.started.elapsed();
        s.generation_started = Some(Instant::now());
        let mut input = vec![s.prompt[end - 1]];
        input.extend_from_slice(guess);
        self.keep_checked(s, &logits, 0, &input)
    }

    /// One decode step for every sequence given (all past their prompt): one
    /// pass over the weights for all of them. Each sequence also checks up to
    /// `draft` guessed tokens ([`draft`]) in the same pass and keeps those
    /// its greedy choice agrees with, so a pass may give it several tokens,
    /// the same ones as one pass each. Returns each one's new text.
    pub fn decode(&mut self, seqs: &mut [&mut Sequence], draft: usize) -> Result<Vec<Option<String>>, LlmError> {
        let inputs: Vec<Vec<u32>> = seqs.iter().map(|s| s.next_input(draft.min(s.draft_len), draft)).collect();
        let tails: Vec<usize> = inputs.iter().map(Vec::len).collect();
        let mut steps: Vec<Step> =
            seqs.iter_mut().zip(&inputs).map(|(s, t)| Step { tokens: t, cache: &mut s.cache }).collect();
        let logits = self.model.forward_tails(&mut steps, false, &tails)?;
        drop(steps);
        let mut pieces = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for (s, input) in seqs.iter_mut().zip(&inputs) {
            pieces.push(self.keep_checked(s, &logits, row, input)?);
            row += input.len();
        }
        Ok(pieces)
    }

    /// After a pass whose last `input.len()` positions of `s` were `input`
    /// (a token already chosen, then drafted ones) and whose logits for them
    /// start at `row`: chooses the next token after each input, keeping a
    /// drafted one only if it is that choice, so every kept token is the one
    /// a pass per token would give. Returns the kept tokens' text.
    fn keep_checked(&self, s: &mut Sequence, logits: &Tensor, row: usize, input: &[u32]) -> Result<Option<String>, LlmError> {
        let start = s.cache.len() - input.len();
        let mut text: Option<String> = None;
        let mut used = 0;
        // Row j holds the model's choice after input j; input j+1 (a
        // drafted token) is kept only if that choice is it.
        while used < input.len() {
            let piece = self.accept(s, &logits.get(row + used)?)?;
            if let Some(p) = piece {
                text.get_or_insert_with(String::new).push_str(&p);
            }
            used += 1;
            if s.is_done() || used == input.len() || s.out.last() != Some(&input[used]) {
                break;
            }
            s.drafted += 1;
        }
        // Positions past the last kept input were computed for rejected
        // guesses: they leave the cache.
        s.cache.truncate(start + used);
        // A draft kept whole may grow by one; one cut short shrinks to
        // what was kept, so a source that guesses badly stops costing
        // rows (the next guess is one token, and none after a miss).
        let (offered, kept) = (input.len() - 1, used - 1);
        if offered > 0 {
            s.draft_len = if kept == offered { offered + 1 } else { kept };
        } else if s.draft_len == 0 {
            s.draft_len = 1;
        }
        Ok(text)
    }

    /// Chooses the next token from `logits` (greedy with a repeat penalty).
    fn accept(&self, s: &mut Sequence, logits: &Tensor) -> Result<Option<String>, LlmError> {
        if s.out.len() >= s.max_new {
            s.stop = Some(StopReason::MaxTokens);
            return Ok(None);
        }
        let p = &s.params;
        let mut l = logits.clone();
        if p.repeat_penalty != 1.0 && !s.out.is_empty() {
            let start = s.out.len().saturating_sub(p.repeat_last_n);
            l = candle_transformers::utils::apply_repeat_penalty(&l, p.repeat_penalty, &s.out[start..])?;
        }
        let next = transformer::argmax(&l)?;
        if self.eos.contains(&next) {
            s.stop = Some(StopReason::EndOfText);
            return Ok(None);
        }
        s.out.push(next);
        if s.out.len() >= s.max_new {
            s.stop = Some(StopReason::MaxTokens);
        }
        let piece = s.decoder.push(&self.tokenizer, &s.out)?;
        // A piece held back ends inside a character, not a line.
        s.line_start = piece.as_ref().is_some_and(|p| p.ends_with('\n'));
        s.lines += piece.as_ref().map_or(0, |p| p.matches('\n').count());
        Ok(piece)
    }

    /// The finished sequence's result; its cache goes back to the pool.
    pub fn finish(&mut self, s: Sequence) -> Result<Generation, LlmError> {
        if let Some(key) = s.conversation.as_ref().filter(|_| s.keep) {
            self.prefixes.store_answer(key, &s.out);
        }
        let text = self.tokenizer.decode(&s.out, true).map_err(|e| LlmError::Tokenizer(e.to_string()));
        let g = Generation {
            text: text?,
            prompt_tokens: s.prompt.len(),
            reused_prompt_tokens: s.reused,
            generated_tokens: s.out.len(),
            drafted_tokens: s.drafted,
            stop: s.stop.unwrap_or(StopReason::MaxTokens),
            queue: Duration::ZERO,
            prompt_time: s.prompt_time,
            generation_time: s.generation_started.map(|t| t.elapsed()).unwrap_or_default(),
        };
        self.release(s);
        Ok(g)
    }

    /// Drops a sequence, keeping its cache buffers for the next one.
    pub fn release(&mut self, s: Sequence) {
        if self.spare.len() < MAX_SPARE_CACHES {
            self.spare.push(s.cache);
        }
    }
}

/// Idle sequence caches kept for reuse (each holds its largest size so far).
const MAX_SPARE_CACHES: usize = 4;

/// One request being generated: its cache, its answer so far, its timings.
pub struct Sequence {
    prompt: Vec<u32>,
    conversation: Option<String>,
    params: GenerateParams,
    cache: SeqCache,
    /// Prompt tokens in the cache (reused ones included).
    read: usize,
    reused: usize,
    max_new: usize,
    out: Vec<u32>,
    /// The conversation's previous answer: the first source of drafts.
    previous: Vec<u32>,
    /// Tokens of `out` that came from accepted drafts.
    drafted: usize,
    /// Longest draft to offer next: follows how much of the last was kept.
    draft_len: usize,
    /// Line breaks in the answer so far, and whether it ends with one: where
    /// in `params.outline` the next line starts.
    lines: usize,
    line_start: bool,
    decoder: IncrementalDecoder,
    stop: Option<StopReason>,
    started: Instant,
    prompt_time: Duration,
    generation_started: Option<Instant>,
    /// Whether its prompt and answer are kept for its conversation; off once
    /// the conversation is forgotten.
    keep: bool,
}

impl Sequence {
    pub fn conversation(&self) -> Option<&str> {
        self.conversation.as_deref()
    }

    /// Its prompt and answer are not kept when it ends.
    pub fn forget(&mut self) {
        self.keep = false;
    }

    pub fn prompt_left(&self) -> usize {
        self.prompt.len() - self.read
    }

    pub fn is_done(&self) -> bool {
        self.stop.is_some()
    }

    /// Tokens this sequence may occupy in its cache: prompt + answer budget.
    pub fn reserved(&self) -> usize {
        self.prompt.len() + self.max_new
    }

    /// The next decode pass's input: the last chosen token, then up to
    /// `draft` guessed ones (never past the answer budget). A line's opening
    /// from the outline may take up to `outline_draft`: it is not a guess
    /// from text that a miss has shown to be unreliable.
    fn next_input(&self, draft: usize, outline_draft: usize) -> Vec<u32> {
        let last = *self.out.last().expect("decode after the first token");
        let room = self.max_new.saturating_sub(self.out.len() + 1);
        let history = &self.out[self.out.len().saturating_sub(draft::HISTORY)..];
        // While the answer is shorter than a lookup, the prompt's tail
        // (the template's opening of the answer) completes it.
        let mut h: Vec<u32> = self.prompt[self.prompt.len().saturating_sub(draft::HISTORY - history.len())..].to_vec();
        h.extend_from_slice(history);
        let mut input = vec![last];
        input.extend(draft::propose(&h, &self.previous, &self.prompt, draft.min(room), self.out.len()));
        if input.len() == 1 && self.line_start {
            if let Some(opening) = self.params.outline.get(self.lines.wrapping_sub(1)) {
                input.extend_from_slice(&opening[..opening.len().min(outline_draft.min(room))]);
            }
        }
        input
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

/// The prefix-cache slot of requests without a conversation: the latest one's
/// prompt, kept so that the next shares its instructions.
const ANONYMOUS: &str = "";

/// ChatML, the template of both Qwen2.5 and SmolLM2. `assistant_prefix` is
/// text the answer is forced to start with.
pub fn chatml(system: &str, user: &str, assistant_prefix: &str) -> String {
    format!(
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant_prefix}"
    )
}

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

