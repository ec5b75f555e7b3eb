//! Which queued sequences run together. A plain struct with no model so the
//! policy is unit-tested on its own.
//!
//! Cost on CPU grows with the padded size of the batch (longest sequence times
//! count), so the token budget counts padded tokens, not real ones.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Sequences in one forward pass.
    pub max_batch_size: usize,
    /// Padded tokens (longest x count) in one forward pass.
    pub max_batch_tokens: usize,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self { max_batch_size: 64, max_batch_tokens: 8192 }
    }
}

/// Anything queued that knows its length in tokens.
pub trait Queued {
    fn tokens(&self) -> usize;
}

impl BatchPolicy {
    /// Takes the next batch from the front of `queue` (FIFO, so nobody starves).
    /// The head is always taken, even alone over budget, so the queue moves.
    pub fn next_batch<T: Queued>(&self, queue: &mut VecDeque<T>) -> Vec<T> {
        let mut batch: Vec<T> = Vec::new();
        let mut longest = 0usize;
        while let Some(next) = queue.front() {
            let longest_after = longest.max(next.tokens());
            let padded = longest_after * (batch.len() + 1);
            if !batch.is_empty() && (batch.len() >= self.max_batch_size || padded > self.max_batch_tokens) {
                break;
            }
            longest = longest_after;
            batch.push(queue.pop_front().expect("front exists"));
        }
        batch
    }

    /// Whether `queue` already holds a full batch, so waiting longer gains nothing.
    pub fn is_full<T: Queued>(&self, queue: &VecDeque<T>) -> bool {
        let mut longest = 0usize;
        for (i, item) in queue.iter().enumerate() {
            longest = longest.max(item.tokens());
            if i + 1 >= self.max_batch_size || longest * (i + 1) >= self.max_batch_tokens {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Queued for usize {
        fn tokens(&self) -> usize {
            *self
        }
    }

    fn q(lens: &[usize]) -> VecDeque<usize> {
        lens.iter().copied().collect()
    }

    #[test]
    fn respects_size_budget() {
        let p = BatchPolicy { max_batch_size: 3, max_batch_tokens: 1000 };
        let mut queue = q(&[5, 5, 5, 5, 5]);
        assert_eq!(p.next_batch(&mut queue), vec![5, 5, 5]);
        assert_eq!(p.next_batch(&mut queue), vec![5, 5]);
        assert!(queue.is_empty());
    }

    #[test]
    fn counts_padded_tokens() {
        // 10 + 10 fits in 40, but a 30-token third makes 3 x 30 = 90 > 40.
        let p = BatchPolicy { max_batch_size: 100, max_batch_tokens: 40 };
        let mut queue = q(&[10, 10, 30, 5]);
        assert_eq!(p.next_batch(&mut queue), vec![10, 10]);
        assert_eq!(p.next_batch(&mut queue), vec![30]);
        assert_eq!(p.next_batch(&mut queue), vec![5]);
    }

    #[test]
    fn oversized_head_still_runs_alone() {
        let p = BatchPolicy { max_batch_size: 8, max_batch_tokens: 16 };
        let mut queue = q(&[100, 2]);
        assert_eq!(p.next_batch(&mut queue), vec![100]);
        assert_eq!(p.next_batch(&mut queue), vec![2]);
    }

    #[test]
    fn keeps_fifo_order_and_empty_queue_gives_empty_batch() {
        let p = BatchPolicy::default();
        let mut queue = q(&[3, 1, 2]);
        assert_eq!(p.next_batch(&mut queue), vec![3, 1, 2]);
        assert!(p.next_batch(&mut queue).is_empty());
    }

    #[test]
    fn full_when_either_budget_is_reached() {
        let p = BatchPolicy { max_batch_size: 2, max_batch_tokens: 100 };
        assert!(!p.is_full(&q(&[5])));
        assert!(p.is_full(&q(&[5, 5])));
        let p = BatchPolicy { max_batch_size: 10, max_batch_tokens: 20 };
        assert!(p.is_full(&q(&[10, 10])));
        assert!(!p.is_full(&q(&[5, 5])));
    }
}
