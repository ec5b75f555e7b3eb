//! Reading the model's labelled answer back into fields. Tolerant of what small
//! models do: markdown bold, bullets, lower-case labels, steps on several lines.

use super::prompt::{ACTIONS, ISSUE, NEXT, STATUS, SUMMARY};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    WaitingOnAgent,
    WaitingOnCustomer,
    Resolved,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Note {
    pub summary: String,
    pub customer_issue: String,
    pub actions_taken: String,
    pub status: Status,
    pub next_steps: Vec<String>,
}

fn label_of(line: &str) -> Option<(&'static str, &str)> {
    let l = line.trim_start_matches(|c: char| c == '-' || c == '*' || c == '#' || c.is_whitespace());
    for label in [SUMMARY, ISSUE, ACTIONS, STATUS, NEXT] {
        if l.len() > label.len() && l.get(..label.len()).is_some_and(|p| p.eq_ignore_ascii_case(label)) {
            let rest = l[label.len()..].trim_start_matches(['*', ' ']);
            if let Some(value) = rest.strip_prefix(':') {
                return Some((label, value.trim_start_matches(['*', ' ']).trim()));
            }
        }
    }
    None
}

fn parse_status(s: &str) -> Status {
    let s = s.to_lowercase();
    if s.contains("customer") {
        Status::WaitingOnCustomer
    } else if s.contains("agent") || s.contains("company") {
        Status::WaitingOnAgent
    } else if s.contains("resolv") || s.contains("closed") {
        Status::Resolved
    } else {
        Status::Unknown
    }
}

/// "-", "none", "нет"... mean nothing was done.
fn empty_marker(s: &str) -> bool {
    let t = s.trim().trim_matches(['-', '.', '—', '<', '>']).to_lowercase();
    t.is_empty() || ["none", "nothing", "n/a", "nenhuma", "nada", "ninguna", "нет", "ничего", "немає", "कुछ नहीं"].contains(&t.as_str())
}

/// `text` is the generated answer; the prompt started it with "SUMMARY:".
pub fn parse(text: &str) -> Note {
    let full = format!("{SUMMARY}:{text}");
    let mut fields: Vec<(&str, String)> = Vec::new();
    for line in full.lines() {
        match label_of(line) {
            Some((label, value)) => fields.push((label, value.to_string())),
            None if !line.trim().is_empty() => match fields.last_mut() {
                Some((_, v)) => {
                    v.push('\n');
                    v.push_str(line.trim());
                }
                None => fields.push((SUMMARY, line.trim().to_string())),
            },
            None => {}
        }
    }
    let get = |label: &str| -> String {
        fields.iter().find(|(l, _)| *l == label).map(|(_, v)| v.trim().to_string()).unwrap_or_default()
    };
    let oneline = |s: String| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let actions = get(ACTIONS);
    let next_steps = get(NEXT)
        .split(['\n', ';'])
        .map(|s| s.trim().trim_start_matches(['-', '*', '•', ' ']).trim().to_string())
        .filter(|s| !empty_marker(s))
        .collect();
    drop_repeats(Note {
        summary: oneline(get(SUMMARY)),
        customer_issue: oneline(get(ISSUE)),
        actions_taken: if empty_marker(&actions) { String::new() } else { oneline(actions) },
        status: parse_status(&get(STATUS)),
        next_steps,
    })
}

/// Letters and digits only, lower-cased: "Order 1 paid." and "order 1 paid"
/// are the same text.
fn normalized(s: &str) -> String {
    s.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

/// When a small model runs out of things to say it copies one field into the
/// next (the 1.5B does on some Hindi threads: summary, issue, actions and
/// next step the same sentence). A copied line in ACTIONS or NEXT states
/// the customer's words as something the company did or will do, so a field
/// that repeats an earlier one is left empty; the issue may restate the
/// summary and is kept.
fn drop_repeats(mut n: Note) -> Note {
    let mut seen: Vec<String> = vec![normalized(&n.summary), normalized(&n.customer_issue)];
    // True for a text seen before, which is then dropped; a new one is remembered.
    let mut repeated = |s: &str| {
        let t = normalized(s);
        let again = !t.is_empty() && seen.contains(&t);
        if !again {
            seen.push(t);
        }
        again
    };
    if repeated(&n.actions_taken) {
        n.actions_taken.clear();
    }
    n.next_steps.retain(|step| !repeated(step));
    n
}

/// The summary is one to three sentences: later ones are dropped.
pub fn limit_sentences(text: &str, max: usize) -> String {
    let s = super::faithful::split_sentences(text);
    if s.len() <= max {
        return text.to_string();
    }
    s[..max].join(" ")
}

/// Cuts `text` to at most `max_words` words, at a sentence end when one is close.
pub fn limit_words(text: &str, max_words: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() <= max_words {
        return text.to_string();
    }
    let head = &words[..max_words];
    match head.iter().rposition(|w| w.ends_with(['.', '!', '?', '।'])) {
        Some(i) if i + 1 >= max_words / 2 => head[..=i].join(" "),
        _ => format!("{}…", head.join(" ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_requested_format() {
        let out = " Клиент не получил заказ 558812.\nISSUE: Заказ не доставлен.\nACTIONS: -\nSTATUS: waiting_on_agent\nNEXT: Проверить доставку; Ответить клиенту";
        let n = parse(out);
        assert_eq!(n.summary, "Клиент не получил заказ 558812.");
        assert_eq!(n.customer_issue, "Заказ не доставлен.");
        assert_eq!(n.actions_taken, "");
        assert_eq!(n.status, Status::WaitingOnAgent);
        assert_eq!(n.next_steps, vec!["Проверить доставку", "Ответить клиенту"]);
    }

    #[test]
    fn tolerates_markdown_bullets_and_case() {
        let out = " O cliente pediu reembolso.\n**Issue:** Produto com defeito\n- **Actions**: Agente abriu o chamado 7781\n**Status**: Waiting on customer\nNext:\n- Aguardar fotos\n- Aprovar reembolso\n";
        let n = parse(out);
        assert_eq!(n.customer_issue, "Produto com defeito");
        assert_eq!(n.actions_taken, "Agente abriu o chamado 7781");
        assert_eq!(n.status, Status::WaitingOnCustomer);
        assert_eq!(n.next_steps, vec!["Aguardar fotos", "Aprovar reembolso"]);
        assert_eq!(parse(" x\nSTATUS: resolved").status, Status::Resolved);
        assert_eq!(parse(" x\nSTATUS: ???").status, Status::Unknown);
    }

    #[test]
    fn unformatted_output_still_gives_a_summary() {
        let n = parse(" The customer wants a refund.\nThe agent agreed.");
        assert_eq!(n.summary, "The customer wants a refund. The agent agreed.");
        assert_eq!(n.status, Status::Unknown);
    }

    #[test]
    fn a_field_that_copies_an_earlier_one_is_dropped() {
        let same = "ग्राहक ने 3 दिन पहले ऑर्डर 55012 का भुगतान किया।";
        let n = parse(&format!(" {same}\nISSUE: {same}\nACTIONS: {same}\nSTATUS: waiting_on_agent\nNEXT: {same}; Call the courier; call the courier."));
        assert_eq!(n.summary, same);
        assert_eq!(n.customer_issue, same, "the issue may restate the summary");
        assert_eq!(n.actions_taken, "");
        assert_eq!(n.next_steps, vec!["Call the courier"]);
        // Different texts, however similar, all stay.
        let n = parse(" Refund of order 7 asked.\nISSUE: Order 7 broken.\nACTIONS: Refund of order 7 approved.\nNEXT: Refund of order 7 sent");
        assert_eq!(n.actions_taken, "Refund of order 7 approved.");
        assert_eq!(n.next_steps, vec!["Refund of order 7 sent"]);
    }

    #[test]
    fn limits_sentences() {
        assert_eq!(limit_sentences("A. B! C? D.", 3), "A. B! C?");
        assert_eq!(limit_sentences("Total 1.234,56 paid. Done.", 3), "Total 1.234,56 paid. Done.");
    }

    #[test]
    fn limits_words() {
        assert_eq!(limit_words("a b c", 5), "a b c");
        assert_eq!(limit_words("One two three. Four five six seven", 5), "One two three.");
        assert_eq!(limit_words("one two three four five six", 3), "one two three…");
    }
}
