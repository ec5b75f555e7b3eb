//! Fitting a long thread into the prompt's token budget, keeping what an agent
//! needs: the customer's opening request, the latest turns, and the turns that
//! carry ids and amounts. What is left out is reported, never silently lost.

use super::faithful;
use super::thread::{Message, Role};

#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    /// Position in the thread.
    pub index: usize,
    /// The text given to the model (shortened when `shortened`).
    pub text: String,
    pub shortened: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    /// In thread order.
    pub kept: Vec<Kept>,
    /// Positions left out, in thread order.
    pub omitted: Vec<usize>,
    /// Estimated tokens of the kept transcript.
    pub tokens: usize,
}

impl Cut {
    pub fn truncated(&self) -> bool {
        !self.omitted.is_empty() || self.kept.iter().any(|k| k.shortened)
    }
}

/// Tokens a transcript line costs beyond its text ("Customer: ", newline).
pub const LINE_OVERHEAD: usize = 4;
/// Tokens reserved for the "[N messages omitted]" markers of a cut thread.
const MARKER_RESERVE: usize = 48;

/// Chooses the messages to show within `budget` tokens. `count` gives the
/// tokens of a text (the model's tokenizer in production).
pub fn fit(messages: &[Message], budget: usize, count: &dyn Fn(&str) -> usize) -> Cut {
    // No single message may take more than a quarter of the budget.
    let cap = (budget / 4).max(16);
    let mut items: Vec<(Kept, usize)> = messages
        .iter()
        .enumerate()
        .map(|(index, m)| {
            let n = count(&m.text);
            let (text, shortened, n) = if n > cap { (shorten(&m.text, n, cap), true, cap) } else { (m.text.clone(), false, n) };
            (Kept { index, text, shortened }, n + LINE_OVERHEAD)
        })
        .collect();

    let total: usize = items.iter().map(|(_, c)| c).sum();
    if total <= budget && !items.iter().any(|(k, _)| k.shortened) {
        let kept = items.into_iter().map(|(k, _)| k).collect();
        return Cut { kept, omitted: Vec::new(), tokens: total };
    }

    let budget = budget.saturating_sub(MARKER_RESERVE);
    let mut take = vec![false; items.len()];
    let mut used = 0usize;
    let try_take = |i: usize, used: &mut usize, take: &mut Vec<bool>| {
        if !take[i] && *used + items[i].1 <= budget {
            take[i] = true;
            *used += items[i].1;
        }
    };
    // 1. The customer's opening request.
    let opening = messages.iter().position(|m| m.role == Role::Customer).unwrap_or(0);
    try_take(opening, &mut used, &mut take);
    // 2. The latest turns, up to 60% of the budget.
    for i in (0..items.len()).rev() {
        if used + items[i].1 > budget * 6 / 10 {
            break;
        }
        try_take(i, &mut used, &mut take);
    }
    // 3. Turns carrying ids, amounts, contacts: newest first.
    for i in (0..items.len()).rev() {
        if !faithful::extract(&messages[i].text).is_empty() {
            try_take(i, &mut used, &mut take);
        }
    }
    // 4. Whatever else fits, newest first.
    for i in (0..items.len()).rev() {
        try_take(i, &mut used, &mut take);
    }

    let mut kept = Vec::new();
    let mut omitted = Vec::new();
    for (i, (k, _)) in items.drain(..).enumerate() {
        if take[i] {
            kept.push(k);
        } else {
            omitted.push(i);
        }
    }
    Cut { kept, omitted, tokens: used }
}

/// Keeps the head of an over-long message (the request usually comes first).
fn shorten(text: &str, tokens: usize, cap: usize) -> String {
    let chars = text.chars().count();
    let keep = chars * cap.saturating_sub(2) / tokens.max(1);
    let mut s: String = text.chars().take(keep).collect();
    s.push_str(" […]");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    fn msg(i: usize, role: Role, text: String) -> Message {
        Message { id: format!("m{i}"), role, sent_at: None, text, channel: String::new() }
    }

    #[test]
    fn short_threads_are_kept_whole() {
        let m: Vec<_> = (0..5).map(|i| msg(i, Role::Customer, "hello there".into())).collect();
        let cut = fit(&m, 1000, &words);
        assert_eq!(cut.kept.len(), 5);
        assert!(!cut.truncated());
        assert_eq!(cut.tokens, 5 * (2 + LINE_OVERHEAD));
    }

    #[test]
    fn long_threads_keep_opening_latest_and_facts() {
        // 300 messages: an agent greeting, the customer's request, chatter, one
        // message with an order id in the middle.
        let mut m = vec![msg(0, Role::Agent, "Welcome to the shop, how can we help".into())];
        m.push(msg(1, Role::Customer, "My parcel never arrived and I want my money back".into()));
        for i in 2..300 {
            let role = if i % 2 == 0 { Role::Agent } else { Role::Customer };
            let text = if i == 150 { "The order is BR-48213 for 259,90".to_string() } else { format!("just chatting along here about nothing in particular {}", "x") };
            m.push(msg(i, role, text));
        }
        let cut = fit(&m, 400, &words);
        let idx: Vec<usize> = cut.kept.iter().map(|k| k.index).collect();
        assert!(cut.truncated());
        assert!(cut.tokens <= 400, "{}", cut.tokens);
        assert!(idx.contains(&1), "opening request kept");
        assert!(idx.contains(&299) && idx.contains(&298), "latest turns kept");
        assert!(idx.contains(&150), "turn with the order id kept");
        assert!(idx.windows(2).all(|w| w[0] < w[1]), "thread order");
        assert_eq!(idx.len() + cut.omitted.len(), 300);
        assert!(cut.omitted.contains(&100));
    }

    #[test]
    fn an_overlong_message_is_shortened_not_dropped() {
        let long = vec!["word"; 1000].join(" ");
        let m = vec![msg(0, Role::Customer, long), msg(1, Role::Agent, "ok".into())];
        let cut = fit(&m, 200, &words);
        assert_eq!(cut.kept.len(), 2);
        assert!(cut.kept[0].shortened && cut.truncated());
        assert!(words(&cut.kept[0].text) <= 50);
        assert!(cut.kept[0].text.ends_with("[…]"));
    }
}
