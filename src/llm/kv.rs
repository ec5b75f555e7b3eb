//! Key/value caches: one per sequence, appended in place, and a store of
//! prompt caches per conversation so a thread that grew by one message is read
//! from where it left off.

use candle_core::{Device, Result, Tensor};
use std::collections::HashMap;

/// Grows capacity in steps of this many tokens (a copy per step, not per token).
const GROW: usize = 512;

/// The keys and values of one sequence, per layer (kv_heads, capacity, head_dim),
/// of which the first `len` positions are filled.
pub struct SeqCache {
    layers: usize,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    /// Positions written by the forward pass in progress, committed by `advance`.
    pending: usize,
    cap: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
}

impl SeqCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, device: &Device) -> Self {
        // Tensors are allocated on first use, so an idle cache costs nothing.
        Self { layers, k: Vec::new(), v: Vec::new(), len: 0, pending: 0, cap: 0, kv_heads, head_dim, device: device.clone() }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything after the first `len` positions (a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.pending = 0;
    }

    /// Room for `need` positions, so that a sequence whose length is known
    /// up front (prompt + answer budget) never copies its cache to grow.
    pub fn reserve(&mut self, need: usize) -> Result<()> {
        if need <= self.cap {
            return Ok(());
        }
        let cap = need.div_ceil(GROW) * GROW;
        let shape = (self.kv_heads, cap, self.head_dim);
        let zeros = || Tensor::zeros(shape, candle_core::DType::F32, &self.device);
        if self.k.is_empty() {
            self.k = (0..self.layers).map(|_| zeros()).collect::<Result<_>>()?;
            self.v = (0..self.layers).map(|_| zeros()).collect::<Result<_>>()?;
        } else {
            for t in self.k.iter_mut().chain(self.v.iter_mut()) {
                let grown = zeros()?;
                if self.len > 0 {
                    grown.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                *t = grown;
            }
        }
        self.cap = cap;
        Ok(())
    }

    /// Writes `t` new positions of `layer` ((kv_heads, t, head_dim) each) after
    /// the committed ones and returns views of all positions so far.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        self.reserve(self.len + t)?;
        self.k[layer].slice_set(k, 1, self.len)?;
        self.v[layer].slice_set(v, 1, self.len)?;
        self.pending = t;
        let n = self.len + t;
        Ok((self.k[layer].narrow(1, 0, n)?, self.v[layer].narrow(1, 0, n)?))
    }

    /// Commits the positions written by the last forward pass.
    pub fn advance(&mut self, t: usize) {
        debug_assert_eq!(t, self.pending);
        self.len += t;
        self.pending = 0;
    }

    /// A compact copy of the first `len` positions.
    pub fn snapshot(&self, len: usize) -> Result<Snapshot> {
        let len = len.min(self.len);
        let take = |ts: &[Tensor]| -> Result<Vec<Tensor>> {
            ts.iter().map(|t| t.narrow(1, 0, len)?.contiguous()).collect()
        };
        Ok(Snapshot { k: take(&self.k)?, v: take(&self.v)?, len })
    }

    /// Replaces the contents with the first `len` positions of `s`.
    pub fn restore(&mut self, s: &Snapshot, len: usize) -> Result<()> {
        let len = len.min(s.len);
        self.len = 0;
        self.pending = 0;
        self.reserve(len)?;
        for (dst, src) in self.k.iter().zip(&s.k).chain(self.v.iter().zip(&s.v)) {
            if len > 0 {
                dst.slice_set(&src.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
        }
        self.len = len;
        Ok(())
    }
}

/// The prompt cache of one conversation.
pub struct Snapshot {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
}

impl Snapshot {
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|t| t.elem_count() * 4).sum()
    }
}

struct Entry {
    tokens: Vec<u32>,
    snap: Snapshot,
    used: u64,
    /// The last answer generated after this conversation's prompt: drafts
    /// for the next one (`draft`).
    answer: Vec<u32>,
}

/// Prompt caches by conversation id, least recently used evicted first once
/// their total size passes the budget.
pub struct PrefixCache {
    entries: HashMap<String, Entry>,
    budget: usize,
    bytes: usize,
    clock: u64,
}

impl PrefixCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self { entries: HashMap::new(), budget: budget_bytes, bytes: 0, clock: 0 }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Loads into `cache` the longest cached prefix of `prompt` for `key` and
    /// returns its length; at least one prompt token is always left to run, as
    /// the last one's logits start generation.
    pub fn load(&mut self, key: &str, prompt: &[u32], cache: &mut SeqCache) -> Result<usize> {
        cache.truncate(0);
        self.clock += 1;
        let Some(e) = self.entries.get_mut(key) else { return Ok(0) };
        e.used = self.clock;
        let shared = common_prefix(&e.tokens, prompt).min(prompt.len().saturating_sub(1));
        if shared == 0 {
            return Ok(0);
        }
        cache.restore(&e.snap, shared)?;
        Ok(shared)
    }

    /// Keeps the cache of `prompt` (its first `prompt.len()` positions) for `key`.
    pub fn store(&mut self, key: &str, prompt: &[u32], cache: &SeqCache) -> Result<()> {
        if self.budget == 0 {
            return Ok(());
        }
        let snap = cache.snapshot(prompt.len())?;
        let size = snap.bytes();
        if size > self.budget {
            return Ok(());
        }
        self.clock += 1;
        let mut answer = Vec::new();
        if let Some(old) = self.entries.remove(key) {
            self.bytes -= old.snap.bytes();
            answer = old.answer;
        }
        while self.bytes + size > self.budget {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone()) else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.snap.bytes();
            }
        }
        self.bytes += size;
        self.entries.insert(key.to_string(), Entry { tokens: prompt.to_vec(), snap, used: self.clock, answer });
        Ok(())
    }

    /// The last answer kept for `key` (empty if none).
    pub fn answer(&self, key: &str) -> &[u32] {
        self.entries.get(key).map_or(&[], |e| &e.answer)
    }

    /// Keeps `answer` as the latest for `key`, if its prompt is cached.
    pub fn store_answer(&mut self, key: &str, answer: &[u32]) {
        if let Some(e) = self.entries.get_mut(key) {
            e.answer = answer.to_vec();
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: usize, base: f32) -> SeqCache {
        let mut c = SeqCache::new(2, 2, 4, &Device::Cpu);
        for layer in 0..2 {
            let k = Tensor::arange(0u32, (2 * n * 4) as u32, &Device::Cpu)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .affine(1.0, base as f64)
                .unwrap()
                .reshape((2, n, 4))
                .unwrap();
            c.append(layer, &k, &k).unwrap();
        }
        c.advance(n);
        c
    }

    #[test]
    fn appends_in_place_across_growth_and_truncates() {
        let mut c = filled(600, 0.0); // past one growth step
        assert_eq!(c.len(), 600);
        let k = Tensor::ones((2, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let (all, _) = c.append(0, &k, &k).unwrap();
        assert_eq!(all.dims(), &[2, 603, 4]);
        // The old positions survived the growth.
        let first: Vec<f32> = all.narrow(1, 599, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(first[..4], [2396.0, 2397.0, 2398.0, 2399.0]);
        c.truncate(10);
        assert_eq!(c.len(), 10);
    }

    #[test]
    fn prefix_cache_reuses_the_shared_prefix_and_evicts_least_recent() {
        let src = filled(8, 0.0);
        let per_entry = src.snapshot(8).unwrap().bytes();
        let mut pc = PrefixCache::new(per_entry * 2);
        let prompt: Vec<u32> = (0..8).collect();
        pc.store("a", &prompt, &src).unwrap();
        let mut c = SeqCache::new(2, 2, 4, &Device::Cpu);
        // Same prefix of 6, then new tokens.
        let grown: Vec<u32> = (0..6).chain([100, 101, 102]).collect();
        assert_eq!(pc.load("a", &grown, &mut c).unwrap(), 6);
        assert_eq!(c.len(), 6);
        let restored: Vec<f32> = c.snapshot(6).unwrap().k[1].flatten_all().unwrap().to_vec1().unwrap();
        let orig: Vec<f32> = src.snapshot(6).unwrap().k[1].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(restored, orig);
        // The identical prompt still leaves its last token to run.
        assert_eq!(pc.load("a", &prompt, &mut c).unwrap(), 7);
        assert_eq!(pc.load("unknown", &prompt, &mut c).unwrap(), 0);
        pc.store("b", &prompt, &src).unwrap();
        pc.load("a", &prompt, &mut c).unwrap(); // "a" is now the most recent
        pc.store("c", &prompt, &src).unwrap();
        assert_eq!(pc.len(), 2);
        assert!(pc.bytes() <= per_entry * 2);
        assert_eq!(pc.load("b", &prompt, &mut c).unwrap(), 0, "b was least recently used");
        assert_eq!(pc.load("a", &prompt, &mut c).unwrap(), 7);
    }

    #[test]
    fn an_answer_outlives_the_next_prompt_until_replaced() {
        let src = filled(4, 0.0);
        let mut pc = PrefixCache::new(1 << 20);
        pc.store_answer("a", &[9, 9]); // no prompt cached yet: nothing kept
        assert!(pc.answer("a").is_empty());
        pc.store("a", &[1, 2, 3, 4], &src).unwrap();
        pc.store_answer("a", &[7, 8]);
        // The grown thread's prompt replaces the cache; the answer stays as a draft.
        pc.store("a", &[1, 2, 3, 4], &src).unwrap();
        assert_eq!(pc.answer("a"), [7, 8]);
        pc.store_answer("a", &[5]);
        assert_eq!(pc.answer("a"), [5]);
        assert!(pc.answer("b").is_empty());
    }
}
