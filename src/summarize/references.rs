//! The thread's own references: order, ticket and protocol numbers, amounts,
//! dates, e-mails, phone numbers and links, copied verbatim from the messages
//! with the ids of the messages that quote them. A small model may leave an
//! id out of its note (it may not invent one: `faithful`); the agent still
//! sees every one the thread quotes, including those in messages the prompt
//! budget left out, and which of them the note mentions.

use super::faithful::{self, Fact, FactKind, Support};
use super::thread::Message;
use serde::Serialize;

/// More than this is a log dump, not a conversation; the first ones are kept.
pub const MAX_REFERENCES: usize = 32;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reference {
    /// As first written in the thread.
    pub text: String,
    pub kind: FactKind,
    /// Messages that quote it (in any formatting), in thread order.
    pub message_ids: Vec<String>,
    /// Whether the note mentions it.
    pub in_summary: bool,
    #[serde(skip)]
    key: String,
}

/// Worth showing an agent: contacts and links, and numbers with at least
/// three digits or a "#" ("#12"). Shorter ones ("2 days", "24h", "5pm") and
/// clock times are conversation, not references.
fn is_reference(f: &Fact) -> bool {
    if f.kind != FactKind::Number {
        return true;
    }
    let digits = f.raw.chars().filter(char::is_ascii_digit).count();
    let clock = f.raw.len() <= 5 && f.raw.split_once(':').is_some_and(|(h, m)| h.len() <= 2 && m.len() == 2);
    (digits >= 3 || f.raw.starts_with('#')) && !clock
}

/// The thread's references in order of first mention, `in_summary` not yet set.
pub fn collect(messages: &[Message]) -> Vec<Reference> {
    let facts: Vec<Vec<Fact>> = messages.iter().map(|m| faithful::extract(&m.text)).collect();
    from_facts(messages, &facts)
}

/// As [`collect`], from each message's facts (`faithful::extract`) already
/// extracted for the faithfulness check.
pub fn from_facts(messages: &[Message], facts: &[Vec<Fact>]) -> Vec<Reference> {
    let mut out: Vec<Reference> = Vec::new();
    for (m, facts) in messages.iter().zip(facts) {
        for f in facts.iter().filter(|f| is_reference(f)) {
            match out.iter().position(|r| same(r, f)) {
                Some(i) => {
                    let r = &mut out[i];
                    if r.message_ids.last() != Some(&m.id) {
                        r.message_ids.push(m.id.clone());
                    }
                }
                None if out.len() < MAX_REFERENCES => out.push(Reference {
                    text: f.raw.clone(),
                    kind: f.kind,
                    message_ids: vec![m.id.clone()],
                    in_summary: false,
                    key: f.key.clone(),
                }),
                None => {}
            }
        }
    }
    out
}

/// Whether `f` quotes `r` again: the same normalised form, or an id quoted
/// without its letters ("48213" for "BR-48213").
fn same(r: &Reference, f: &Fact) -> bool {
    let all_digits = |k: &str| k.bytes().all(|c| c.is_ascii_digit());
    // `digits` equals the digits of `id`, without building either string.
    let stripped = |digits: &str, id: &str| all_digits(digits) && id.chars().filter(char::is_ascii_digit).eq(digits.chars());
    let (a, b) = (r.key.as_str(), f.key.as_str());
    a == b || (r.kind == FactKind::Number && f.kind == FactKind::Number && (stripped(a, b) || stripped(b, a)))
}

/// Marks the references that the note (the text of its fields) mentions.
pub fn mark_in_summary<'a>(refs: &mut [Reference], note: impl IntoIterator<Item = &'a str>) {
    let mentioned = Support::from_texts(note);
    for r in refs {
        r.in_summary = mentioned.supports_key(&r.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarize::thread::Role;

    fn msg(id: &str, role: Role, text: &str) -> Message {
        Message { id: id.into(), role, sent_at: None, text: text.into(), channel: String::new() }
    }

    #[test]
    fn quotes_every_reference_once_with_its_messages() {
        let thread = [
            msg("m1", Role::Customer, "Pedido #BR-48213 de R$ 1.234,56 não chegou, já são 2 dias. Meu tel: +55 (11) 98765-4321"),
            msg("m2", Role::Agent, "Abri o protocolo 2024-7781 às 10:30. Rastreio: https://loja.com.br/r?id=48213"),
            msg("m3", Role::Customer, "ok, o pedido BR-48213 então. Escrevo para ana.souza@loja.com.br? Chega em 24h?"),
            msg("m4", Role::Agent, "Isso, 48213."),
        ];
        let mut refs = collect(&thread);
        mark_in_summary(&mut refs, ["Pedido BR48213 atrasado; protocolo 2024-7781 aberto."]);
        let got: Vec<(&str, FactKind, Vec<&str>, bool)> = refs
            .iter()
            .map(|r| (r.text.as_str(), r.kind, r.message_ids.iter().map(String::as_str).collect(), r.in_summary))
            .collect();
        assert_eq!(
            got,
            vec![
                ("#BR-48213", FactKind::Number, vec!["m1", "m3", "m4"], true),
                ("1.234,56", FactKind::Number, vec!["m1"], false),
                ("+55 (11) 98765-4321", FactKind::Phone, vec!["m1"], false),
                ("2024-7781", FactKind::Number, vec!["m2"], true),
                ("https://loja.com.br/r?id=48213", FactKind::Url, vec!["m2"], false),
                ("ana.souza@loja.com.br", FactKind::Email, vec!["m3"], false),
            ]
        );
    }

    #[test]
    fn a_long_digit_run_is_a_number_not_a_phone() {
        let refs = collect(&[msg("a", Role::Customer, "tracking 123456789012, card ending 4321, call 11 4002-8922")]);
        let kinds: Vec<(&str, FactKind)> = refs.iter().map(|r| (r.text.as_str(), r.kind)).collect();
        assert_eq!(
            kinds,
            vec![("123456789012", FactKind::Number), ("4321", FactKind::Number), ("11 4002-8922", FactKind::Phone)]
        );
    }

    #[test]
    fn stops_at_the_cap() {
        let text: String = (0..MAX_REFERENCES + 10).map(|i| format!("order {} ", 1000 + i)).collect();
        let refs = collect(&[msg("a", Role::Customer, &text)]);
        assert_eq!(refs.len(), MAX_REFERENCES);
        assert_eq!(refs[0].text, "1000");
        assert!(collect(&[msg("a", Role::Customer, "no numbers here, 2 days, 5pm")]).is_empty());
    }
}
