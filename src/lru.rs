//! A map by string key whose values each count some bytes against a budget;
//! the least recently used go first when a new one needs room. The stored
//! notes and the prefix cache's kept answers are both this.

use std::collections::{BTreeMap, HashMap};

pub struct Lru<V> {
    entries: HashMap<String, Slot<V>>,
    /// Last use -> key, oldest first.
    order: BTreeMap<u64, String>,
    bytes: usize,
    budget: usize,
    clock: u64,
}

struct Slot<V> {
    value: V,
    bytes: usize,
    used_at: u64,
}

impl<V> Lru<V> {
    /// `budget` bytes; 0 keeps nothing.
    pub fn new(budget: usize) -> Self {
        Self { entries: HashMap::new(), order: BTreeMap::new(), bytes: 0, budget, clock: 0 }
    }

    /// Stores `value`, counted as `bytes`, in place of `key`'s previous one,
    /// dropping the least recently used to make room. A value larger than
    /// the whole budget is not kept (the previous one is gone all the same).
    pub fn put(&mut self, key: &str, value: V, bytes: usize) {
        self.remove(key);
        if bytes > self.budget {
            return;
        }
        while self.bytes + bytes > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some(s) = self.entries.remove(&oldest) {
                self.bytes -= s.bytes;
            }
        }
        self.clock += 1;
        self.bytes += bytes;
        self.order.insert(self.clock, key.to_string());
        self.entries.insert(key.to_string(), Slot { value, bytes, used_at: self.clock });
    }

    /// `key`'s value, now the most recently used.
    pub fn get(&mut self, key: &str) -> Option<&V> {
        let s = self.entries.get_mut(key)?;
        self.order.remove(&s.used_at);
        self.clock += 1;
        s.used_at = self.clock;
        self.order.insert(self.clock, key.to_string());
        Some(&s.value)
    }

    /// `key`'s value, its recency unchanged.
    pub fn peek(&self, key: &str) -> Option<&V> {
        self.entries.get(key).map(|s| &s.value)
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        let s = self.entries.remove(key)?;
        self.order.remove(&s.used_at);
        self.bytes -= s.bytes;
        Some(s.value)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn budget(&self) -> usize {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn the_least_recently_used_go_first_within_the_budget() {
        let mut l = Lru::new(30);
        l.put("a", 1, 10);
        l.put("b", 2, 10);
        l.put("c", 3, 10);
        assert_eq!(l.get("a"), Some(&1)); // b is now the oldest
        assert_eq!(l.peek("b"), Some(&2)); // and peeking leaves it so
        l.put("d", 4, 15);
        assert_eq!((l.peek("b"), l.peek("c")), (None, None), "b, then c made room");
        assert_eq!((l.len(), l.bytes()), (2, 25));
        l.put("a", 5, 12); // replaces a's value and its size
        assert_eq!((l.peek("a"), l.bytes()), (Some(&5), 27));
        l.put("a", 6, 31); // larger than the budget: not kept, and a's old value is gone
        assert_eq!((l.peek("a"), l.len(), l.bytes()), (None, 1, 15));
        assert_eq!(l.remove("d"), Some(4));
        assert!(l.is_empty() && l.bytes() == 0 && l.remove("d").is_none());
        let mut off = Lru::new(0);
        off.put("x", 1, 1);
        assert!(off.is_empty());
    }
}
