//! Key/value caches: one per sequence, appended in place, and a store of
//! prompt caches per conversation so a thread that grew by one message is read
//! from where it left off.

use candle_core::{Device, Result, Tensor};
use half::{f16, slice::HalfFloatSliceExt};
use crate::lru::Lru;
use std::collections::HashMap;

/// Grows capacity in steps of this many tokens (a copy per step, not per token).
const GROW: usize = 512;

/// Positions per block of the CPU key layout (one 512-bit vector once widened to f32).
pub const KEY_BLOCK: usize = 16;

/// The keys and values of one sequence, per layer, of which the first `len`
/// positions are filled.
///
/// On the CPU the cache is palaver's own memory, laid out for
/// [`attention::causal`](super::attention::causal): keys per KV head in blocks
/// of [`KEY_BLOCK`] positions stored dimension-major (`[block][dim][16]`), so
/// that the scores of 16 keys are built up in one vector with no horizontal
/// sums, and values per KV head position-major (`[pos][dim]`), both in f16:
/// decoding reads the whole cache for every token, and after 1,024 tokens the
/// 1.5B model's cache in f32 (59 MB) was 6% of the bytes a token reads; f16
/// halves that and the memory a cached thread holds, and its rounding (2^-11
/// relative) is far below that of the 8-bit activations the matmuls take.
/// Elsewhere each layer is a (kv_heads, capacity, head_dim) f32 tensor for
/// candle's matmuls.
pub struct SeqCache {
    layers: usize,
    store: Store,
    len: usize,
    /// Positions written by the forward pass in progress, committed by `advance`.
    pending: usize,
    cap: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
}

enum Store {
    /// Per layer: keys `[kv_head][cap / 16][head_dim][16]`, values `[kv_head][cap][head_dim]`.
    Host { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
    Device { k: Vec<Tensor>, v: Vec<Tensor> },
}

/// One layer's keys and values on the CPU after an append (see [`SeqCache`]).
pub struct HostKv<'a> {
    pub keys: &'a [f16],
    pub values: &'a [f16],
    /// Positions per KV head in the buffers (a multiple of 2 x [`KEY_BLOCK`]).
    pub cap: usize,
    /// Positions filled, the new ones included.
    pub len: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A layer after an append: the CPU buffers, or views of the device tensors
/// ((kv_heads, len, head_dim) each).
pub enum LayerKv<'a> {
    Host(HostKv<'a>),
    Device(Tensor, Tensor),
}

impl HostKv<'_> {
    /// Element `c` of the key of position `pos`, KV head `h`.
    pub fn key(&self, h: usize, pos: usize, c: usize) -> f32 {
        let d = self.head_dim;
        self.keys[h * self.cap * d + pos / KEY_BLOCK * d * KEY_BLOCK + c * KEY_BLOCK + pos % KEY_BLOCK].to_f32()
    }

    /// Element `c` of the value of position `pos`, KV head `h`.
    pub fn value(&self, h: usize, pos: usize, c: usize) -> f32 {
        self.values[(h * self.cap + pos) * self.head_dim + c].to_f32()
    }
}

impl SeqCache {
    /// palaver's own buffers on the CPU, tensors elsewhere.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, device: &Device) -> Self {
        Self::build(layers, kv_heads, head_dim, device, device.is_cpu())
    }

    /// A cache of f32 tensors whatever the device: the one candle's matmul
    /// attention reads (a GPU's; on the CPU, the portable path's).
    pub fn of_tensors(layers: usize, kv_heads: usize, head_dim: usize, device: &Device) -> Self {
        Self::build(layers, kv_heads, head_dim, device, false)
    }

    fn build(layers: usize, kv_heads: usize, head_dim: usize, device: &Device, host: bool) -> Self {
        // Buffers are allocated on first use, so an idle cache costs nothing.
        let store = if host { Store::Host { k: Vec::new(), v: Vec::new() } } else { Store::Device { k: Vec::new(), v: Vec::new() } };
        Self { layers, store, len: 0, pending: 0, cap: 0, kv_heads, head_dim, device: device.clone() }
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
        let (layers, heads, hd, old) = (self.layers, self.kv_heads, self.head_dim, self.cap);
        match &mut self.store {
            Store::Host { k, v } => {
                // Per head, the old positions are a prefix of the head's
                // region in both layouts (whole key blocks, GROW being a
                // multiple of KEY_BLOCK).
                let grow = |bufs: &mut Vec<Vec<f16>>| {
                    if bufs.is_empty() {
                        *bufs = (0..layers).map(|_| vec![f16::ZERO; heads * cap * hd]).collect();
                        return;
                    }
                    for b in bufs.iter_mut() {
                        let mut grown = vec![f16::ZERO; heads * cap * hd];
                        for h in 0..heads {
                            grown[h * cap * hd..][..old * hd].copy_from_slice(&b[h * old * hd..][..old * hd]);
                        }
                        *b = grown;
                    }
                };
                grow(k);
                grow(v);
            }
            Store::Device { k, v } => {
                let shape = (heads, cap, hd);
                let zeros = || Tensor::zeros(shape, candle_core::DType::F32, &self.device);
                if k.is_empty() {
                    *k = (0..self.layers).map(|_| zeros()).collect::<Result<_>>()?;
                    *v = (0..self.layers).map(|_| zeros()).collect::<Result<_>>()?;
                } else {
                    for t in k.iter_mut().chain(v.iter_mut()) {
                        let grown = zeros()?;
                        if self.len > 0 {
                            grown.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                        }
                        *t = grown;
                    }
                }
            }
        }
        self.cap = cap;
        Ok(())
    }

    /// Writes `t` new positions of `layer` ((kv_heads, t, head_dim) each) after
    /// the committed ones and returns the layer with all positions so far.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<LayerKv<'_>> {
        let t = k.dim(1)?;
        self.reserve(self.len + t)?;
        self.pending = t;
        let n = self.len + t;
        let (heads, hd, cap, at) = (self.kv_heads, self.head_dim, self.cap, self.len);
        match &mut self.store {
            Store::Host { k: ks, v: vs } => {
                let (kn, vn): (Vec<f32>, Vec<f32>) = (k.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?);
                let (kb, vb) = (&mut ks[layer], &mut vs[layer]);
                for h in 0..heads {
                    for i in 0..t {
                        let (pos, src) = (at + i, (h * t + i) * hd);
                        vb[(h * cap + pos) * hd..][..hd].convert_from_f32_slice(&vn[src..][..hd]);
                        let block = &mut kb[h * cap * hd + pos / KEY_BLOCK * hd * KEY_BLOCK..][..hd * KEY_BLOCK];
                        for (c, &x) in kn[src..][..hd].iter().enumerate() {
                            block[c * KEY_BLOCK + pos % KEY_BLOCK] = f16::from_f32(x);
                        }
                    }
                }
                Ok(LayerKv::Host(HostKv { keys: kb, values: vb, cap, len: n, kv_heads: heads, head_dim: hd }))
            }
            Store::Device { k: ks, v: vs } => {
                ks[layer].slice_set(k, 1, at)?;
                vs[layer].slice_set(v, 1, at)?;
                Ok(LayerKv::Device(ks[layer].narrow(1, 0, n)?, vs[layer].narrow(1, 0, n)?))
            }
        }
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
        let (heads, hd, cap) = (self.kv_heads, self.head_dim, self.cap);
        let data = match &self.store {
            Store::Host { k, v } => {
                // Keys to the end of the block holding the last position.
                let kl = len.next_multiple_of(KEY_BLOCK);
                let take = |bufs: &[Vec<f16>], per: usize| -> Vec<Vec<f16>> {
                    bufs.iter().map(|b| (0..heads).flat_map(|h| &b[h * cap * hd..][..per * hd]).copied().collect()).collect()
                };
                Saved::Host { k: take(k, kl), v: take(v, len) }
            }
            Store::Device { k, v } => {
                let take = |ts: &[Tensor]| -> Result<Vec<Tensor>> {
                    ts.iter().map(|t| t.narrow(1, 0, len)?.contiguous()).collect()
                };
                Saved::Device { k: take(k)?, v: take(v)? }
            }
        };
        Ok(Snapshot { data, len })
    }

    /// Replaces the contents with the first `len` positions of `s`.
    pub fn restore(&mut self, s: &Snapshot, len: usize) -> Result<()> {
        let len = len.min(s.len);
        self.len = 0;
        self.pending = 0;
        self.reserve(len)?;
        let (heads, hd, cap) = (self.kv_heads, self.head_dim, self.cap);
        match (&mut self.store, &s.data) {
            (Store::Host { k, v }, Saved::Host { k: sk, v: sv }) => {
                let (kl, skl) = (len.next_multiple_of(KEY_BLOCK), s.len.next_multiple_of(KEY_BLOCK));
                let put = |dst: &mut [Vec<f16>], src: &[Vec<f16>], per: usize, saved: usize| {
                    for (d, s) in dst.iter_mut().zip(src) {
                        for h in 0..heads {
                            d[h * cap * hd..][..per * hd].copy_from_slice(&s[h * saved * hd..][..per * hd]);
                        }
                    }
                };
                put(k, sk, kl, skl);
                put(v, sv, len, s.len);
            }
            (Store::Device { k, v }, Saved::Device { k: sk, v: sv }) => {
                for (dst, src) in k.iter().zip(sk).chain(v.iter().zip(sv)) {
                    if len > 0 {
                        dst.slice_set(&src.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                    }
                }
            }
            _ => candle_core::bail!("a snapshot restored on another kind of device"),
        }
        self.len = len;
        Ok(())
    }
}

/// The prompt cache of one conversation.
pub struct Snapshot {
    data: Saved,
    len: usize,
}

/// Per layer, in the layout of the cache it came from, cut to its length.
enum Saved {
    Host { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
    Device { k: Vec<Tensor>, v: Vec<Tensor> },
}

impl Snapshot {
    pub fn bytes(&self) -> usize {
        match &self.data {
            Saved::Host { k, v } => k.iter().chain(v).map(|b| b.len() * 2).sum(),
            Saved::Device { k, v } => k.iter().chain(v).map(|t| t.elem_count() * 4).sum(),
        }
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
/// their total size passes the budget. An evicted conversation keeps its last
/// answer (`Answers`), so that its next one is still drafted from it.
pub struct PrefixCache {
    entries: HashMap<String, Entry>,
    /// Bytes for the prompt caches: the budget less the answers' share.
    budget: usize,
    bytes: usize,
    clock: u64,
    answers: Answers,
}

/// Share of the budget (1 / this) that keeps the answers of evicted
/// conversations: 1/64 of 1 GiB holds ~20,000 notes of ~150 tokens, where the
/// rest holds ~28 prompt caches of 1,300 tokens of the 1.5B.
const ANSWER_SHARE: usize = 64;

impl PrefixCache {
    pub fn new(budget_bytes: usize) -> Self {
        let answers = budget_bytes / ANSWER_SHARE;
        Self { entries: HashMap::new(), budget: budget_bytes - answers, bytes: 0, clock: 0, answers: Answers(Lru::new(answers)) }
    }

    /// Memory held: the prompt caches and the kept answers.
    pub fn bytes(&self) -> usize {
        self.bytes + self.answers.0.bytes()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Loads into `cache` the longest cached prefix of `prompt` and returns its
    /// length; at least one prompt token is always left to run, as the last
    /// one's logits start generation. The prefix may come from any entry, the
    /// conversation `key`'s own winning ties: the cache of a position is a
    /// function of the tokens up to it, so every thread shares the cached
    /// instructions that precede its transcript, and a grown thread its own
    /// earlier prompt. (What another conversation can learn is only that its
    /// prefix was seen before, from the time it took.)
    pub fn load(&mut self, key: &str, prompt: &[u32], cache: &mut SeqCache) -> Result<usize> {
        cache.truncate(0);
        self.clock += 1;
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter_mut()
            .map(|(k, e)| (common_prefix(&e.tokens, prompt).min(limit), k == key, e))
            .max_by_key(|(shared, own, _)| (*shared, *own));
        let Some((shared, _, e)) = best else { return Ok(0) };
        if shared == 0 {
            return Ok(0);
        }
        e.used = self.clock;
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
        let answer = match self.entries.remove(key) {
            Some(old) => {
                self.bytes -= old.snap.bytes();
                old.answer
            }
            None => self.answers.0.remove(key).unwrap_or_default(),
        };
        while self.bytes + size > self.budget {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone()) else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.snap.bytes();
                self.answers.put(&oldest, e.answer);
            }
        }
        self.bytes += size;
        self.entries.insert(key.to_string(), Entry { tokens: prompt.to_vec(), snap, used: self.clock, answer });
        Ok(())
    }

    /// Drops `key`'s prompt and answer; whether it held any.
    pub fn remove(&mut self, key: &str) -> bool {
        let answer = self.answers.0.remove(key).is_some();
        let Some(e) = self.entries.remove(key) else { return answer };
        self.bytes -= e.snap.bytes();
        true
    }

    /// The last answer kept for `key` (empty if none).
    pub fn answer(&self, key: &str) -> &[u32] {
        self.entries.get(key).map_or_else(|| self.answers.get(key), |e| &e.answer)
    }

    /// Keeps `answer` as the latest for `key`: with its prompt cache, or
    /// alone if that was evicted while the answer was being written.
    pub fn store_answer(&mut self, key: &str, answer: &[u32]) {
        match self.entries.get_mut(key) {
            Some(e) => e.answer = answer.to_vec(),
            None => self.answers.put(key, answer.to_vec()),
        }
    }
}

/// Last answers of conversations whose prompt cache was evicted, the oldest
/// stored dropped first within a byte budget. An answer is ~4 bytes a token
/// against 28 KiB a token for the 1.5B's prompt cache, so many more
/// conversations keep one: a thread re-summarised after its cache was evicted
/// reads its whole prompt again, but its note mostly comes from drafts.
struct Answers(Lru<Vec<u32>>);

impl Answers {
    /// What an answer holds: its tokens, its key, and the map entries.
    fn size(key: &str, answer: &[u32]) -> usize {
        answer.len() * 4 + 2 * key.len() + 96
    }

    fn put(&mut self, key: &str, answer: Vec<u32>) {
        if answer.is_empty() {
            self.0.remove(key);
        } else {
            let size = Self::size(key, &answer);
            self.0.put(key, answer, size);
        }
    }

    fn get(&self, key: &str) -> &[u32] {
        self.0.peek(key).map_or(&[], |a| a)
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
        assert_eq!(c.cap, 1024);
        // 500 more positions grow the buffers (copying the old ones).
        let k = Tensor::ones((2, 500, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let v = (k.clone() * 2.0).unwrap();
        let LayerKv::Host(kv) = c.append(0, &k, &v).unwrap() else { panic!("a CPU cache keeps host buffers") };
        assert_eq!(kv.len, 1100);
        assert!(kv.cap >= 1100 && kv.cap.is_multiple_of(2 * KEY_BLOCK));
        // The old positions survived the growth, in both heads and layouts:
        // filled() wrote (head, pos, c) = (head * 600 + pos) * 4 + c.
        for (h, pos) in [(0, 0), (0, 15), (0, 16), (0, 599), (1, 0), (1, 333), (1, 599)] {
            for c in 0..4 {
                // (f16 keeps integers to 2,048 exactly, these to a few units.)
                let want = f16::from_f32(((h * 600 + pos) * 4 + c) as f32).to_f32();
                assert_eq!((kv.key(h, pos, c), kv.value(h, pos, c)), (want, want), "head {h} position {pos} dim {c}");
            }
        }
        for (h, pos) in [(0, 600), (1, 617), (1, 1099)] {
            assert_eq!((kv.key(h, pos, 3), kv.value(h, pos, 3)), (1.0, 2.0));
        }
        c.advance(500);
        c.truncate(10);
        assert_eq!(c.len(), 10);
    }

    /// The cache a GPU keeps, exercised on the CPU: appended in place across
    /// growth, truncated, saved and restored, with every position intact.
    #[test]
    fn a_cache_of_tensors_keeps_every_position_across_growth_and_snapshots() {
        let dev = Device::Cpu;
        let (heads, hd) = (2, 4);
        // Position p of head h holds (h * 10_000 + p) * 4 + c: distinct everywhere.
        let chunk = |from: usize, n: usize| -> Tensor {
            let v: Vec<f32> = (0..heads)
                .flat_map(|h| (from..from + n).flat_map(move |p| (0..hd).map(move |c| ((h * 10_000 + p) * hd + c) as f32)))
                .collect();
            Tensor::from_vec(v, (heads, n, hd), &dev).unwrap()
        };
        let mut c = SeqCache::of_tensors(2, heads, hd, &dev);
        let mut len = 0;
        for n in [300, 250, 1, 600] {
            // 300 + 250 passes the first growth step, + 600 the second.
            for layer in 0..2 {
                let LayerKv::Device(k, v) = c.append(layer, &chunk(len, n), &(chunk(len, n) * 2.0).unwrap()).unwrap() else {
                    panic!("a cache of tensors")
                };
                assert_eq!(k.dims(), [heads, len + n, hd]);
                let (k, v) = (k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                let want = chunk(0, len + n).flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(k, want, "keys after {} positions", len + n);
                assert!(v.iter().zip(&want).all(|(v, w)| *v == 2.0 * w), "values after {} positions", len + n);
            }
            c.advance(n);
            len += n;
        }
        assert_eq!((c.len(), c.cap), (1151, 1536));
        let snap = c.snapshot(700).unwrap();
        assert_eq!(snap.bytes(), 2 * 2 * heads * 700 * hd * 4);
        c.truncate(5);
        let mut d = SeqCache::of_tensors(2, heads, hd, &dev);
        d.restore(&snap, 650).unwrap();
        assert_eq!(d.len(), 650);
        let LayerKv::Device(k, _) = d.append(1, &chunk(650, 1), &chunk(650, 1)).unwrap() else { panic!("a cache of tensors") };
        assert_eq!(k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), chunk(0, 651).flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(c.restore(&filled(3, 0.0).snapshot(3).unwrap(), 3).is_err(), "a host snapshot does not fit a cache of tensors");
    }

    fn host(s: &Snapshot) -> (Vec<Vec<f16>>, Vec<Vec<f16>>) {
        match &s.data {
            Saved::Host { k, v } => (k.clone(), v.clone()),
            Saved::Device { .. } => panic!("a CPU cache saves host buffers"),
        }
    }

    #[test]
    fn prefix_cache_reuses_the_shared_prefix_and_evicts_least_recent() {
        let src = filled(8, 0.0);
        let per_entry = src.snapshot(8).unwrap().bytes();
        // Room for two prompt caches, not three, once the answers' share is set aside.
        let mut pc = PrefixCache::new(per_entry * 5 / 2);
        let prompt: Vec<u32> = (0..8).collect();
        pc.store("a", &prompt, &src).unwrap();
        let mut c = SeqCache::new(2, 2, 4, &Device::Cpu);
        // Same prefix of 6, then new tokens.
        let grown: Vec<u32> = (0..6).chain([100, 101, 102]).collect();
        assert_eq!(pc.load("a", &grown, &mut c).unwrap(), 6);
        assert_eq!(c.len(), 6);
        let (restored, orig) = (host(&c.snapshot(6).unwrap()), host(&src.snapshot(6).unwrap()));
        assert_eq!(restored, orig);
        assert!(orig.0.iter().flatten().any(|&x| x != f16::ZERO));
        // The identical prompt still leaves its last token to run.
        assert_eq!(pc.load("a", &prompt, &mut c).unwrap(), 7);
        // Another conversation shares only the tokens in common (in the
        // service: the instructions before the transcript).
        assert_eq!(pc.load("unknown", &grown, &mut c).unwrap(), 6);
        assert_eq!(host(&c.snapshot(6).unwrap()), orig);
        assert_eq!(pc.load("unknown", &[50, 51, 52], &mut c).unwrap(), 0);
        assert_eq!(c.len(), 0);
        let (pb, pcc): (Vec<u32>, Vec<u32>) = ((10..18).collect(), (20..28).collect());
        pc.store("b", &pb, &src).unwrap();
        pc.load("a", &prompt, &mut c).unwrap(); // "a" is now the most recent
        pc.store("c", &pcc, &src).unwrap();
        assert_eq!(pc.len(), 2);
        assert!(pc.bytes() <= per_entry * 2);
        assert_eq!(pc.load("b", &pb, &mut c).unwrap(), 0, "b was least recently used");
        assert_eq!(pc.load("a", &prompt, &mut c).unwrap(), 7);
        assert_eq!(pc.load("c", &pcc, &mut c).unwrap(), 7);
    }

    #[test]
    fn a_removed_conversation_lends_nothing() {
        let mut pc = PrefixCache::new(1 << 30);
        pc.store("a", &[1, 2, 3, 4], &filled(4, 1.0)).unwrap();
        pc.store_answer("a", &[9, 9]);
        assert!(pc.remove("a") && !pc.remove("a"));
        assert_eq!((pc.len(), pc.bytes()), (0, 0));
        assert!(pc.answer("a").is_empty());
        let mut c = SeqCache::new(2, 2, 4, &Device::Cpu);
        assert_eq!(pc.load("a", &[1, 2, 3, 4, 5], &mut c).unwrap(), 0);
    }

    #[test]
    fn the_conversations_own_entry_wins_a_tie() {
        let (mine, other) = (filled(4, 0.0), filled(4, 1000.0));
        let mut pc = PrefixCache::new(1 << 20);
        pc.store("other", &[1, 2, 3, 4], &other).unwrap();
        pc.store("mine", &[1, 2, 3, 4], &mine).unwrap();
        let mut c = SeqCache::new(2, 2, 4, &Device::Cpu);
        assert_eq!(pc.load("mine", &[1, 2, 3, 9], &mut c).unwrap(), 3);
        assert_eq!(host(&c.snapshot(3).unwrap()), host(&mine.snapshot(3).unwrap()));
        assert_eq!(pc.load("other", &[1, 2, 3, 9], &mut c).unwrap(), 3);
        assert_eq!(host(&c.snapshot(3).unwrap()), host(&other.snapshot(3).unwrap()));
    }

    #[test]
    fn an_answer_outlives_the_next_prompt_until_replaced() {
        let src = filled(4, 0.0);
        let mut pc = PrefixCache::new(1 << 20);
        // No prompt cached (evicted while the answer was written): kept alone,
        // then taken by the conversation's next prompt cache.
        pc.store_answer("a", &[9, 9]);
        assert_eq!(pc.answer("a"), [9, 9]);
        pc.store("a", &[1, 2, 3, 4], &src).unwrap();
        assert_eq!(pc.answer("a"), [9, 9]);
        pc.store_answer("a", &[7, 8]);
        // The grown thread's prompt replaces the cache; the answer stays as a draft.
        pc.store("a", &[1, 2, 3, 4], &src).unwrap();
        assert_eq!(pc.answer("a"), [7, 8]);
        pc.store_answer("a", &[5]);
        assert_eq!(pc.answer("a"), [5]);
        assert!(pc.answer("b").is_empty());
    }

    /// An evicted conversation reads its prompt again but keeps its last
    /// answer as drafts; the kept answers stay within their share of the
    /// budget, oldest dropped first, and a removed conversation keeps none.
    #[test]
    fn an_evicted_conversation_keeps_its_answer() {
        let src = filled(128, 0.0);
        let per_entry = src.snapshot(128).unwrap().bytes();
        // One prompt cache; the answers' share (1/64) holds one answer of
        // 20 tokens and a one-letter key (80 + 2 + 96 bytes), not two.
        let budget = per_entry * 3 / 2;
        assert!((178..356).contains(&(budget / ANSWER_SHARE)), "{per_entry}");
        let mut pc = PrefixCache::new(budget);
        let (pa, pb, pz): (Vec<u32>, Vec<u32>, Vec<u32>) = ((0..128).collect(), (1000..1128).collect(), (2000..2128).collect());
        let answer: Vec<u32> = (100..120).collect();
        pc.store("a", &pa, &src).unwrap();
        pc.store_answer("a", &answer);
        pc.store("b", &pb, &src).unwrap(); // evicts a's prompt cache
        assert_eq!(pc.len(), 1);
        let mut c = SeqCache::new(2, 2, 4, &Device::Cpu);
        assert_eq!(pc.load("a", &pa, &mut c).unwrap(), 0, "a's prompt is read again");
        assert_eq!(pc.answer("a"), answer, "but its answer still drafts the next");
        assert!(pc.bytes() <= budget);
        // Stored again, a's prompt cache takes its answer back (and evicts b,
        // which had none to keep).
        pc.store("a", &pa, &src).unwrap();
        assert_eq!(pc.answer("a"), answer);
        assert_eq!(pc.load("b", &pb, &mut c).unwrap(), 0);
        assert!(pc.answer("b").is_empty());
        // A newer kept answer drops the oldest one past the share.
        let later: Vec<u32> = (200..220).collect();
        pc.store_answer("b", &later); // b's answer came after its cache was evicted
        pc.store("z", &pz, &src).unwrap(); // evicts a: its answer replaces b's
        assert_eq!((pc.answer("a"), pc.answer("b")), (&answer[..], &[][..]));
        assert!(pc.bytes() <= budget);
        assert!(pc.remove("a") && !pc.remove("a"), "removing a drops its kept answer");
        assert!(pc.answer("a").is_empty());
    }
}
