//! The instruction given to the model. The instruction itself is English (the
//! language small instruction-tuned models follow best); the answer's language
//! is named explicitly and repeated right before the answer, which is what keeps
//! Qwen2.5 from drifting into English on Russian or Spanish threads.

use super::cut::Cut;
use super::thread::{Message, Role};
use crate::llm::chatml;

/// The field labels the model writes and the parser reads.
pub const SUMMARY: &str = "SUMMARY";
pub const ISSUE: &str = "ISSUE";
pub const ACTIONS: &str = "ACTIONS";
pub const STATUS: &str = "STATUS";
pub const NEXT: &str = "NEXT";

/// The STATUS values the prompt offers (`parse::Status`, snake case).
const STATUSES: [&str; 4] = ["waiting_on_agent", "waiting_on_customer", "resolved", "unknown"];

pub struct PromptSpec<'a> {
    pub language_name: &'a str,
    /// BCP-47 tag of the answer's language.
    pub language_tag: &'a str,
    pub max_words: u32,
    /// Facts a previous attempt invented; the retry is told not to repeat them.
    pub forbidden: &'a [String],
}

/// "Customer: ..." lines in thread order, the speakers named in the note's
/// language (`tag`), with markers where turns were left out.
pub fn transcript(messages: &[Message], cut: &Cut, tag: &str) -> String {
    let mut out = String::new();
    let mut next = 0usize;
    for k in &cut.kept {
        if k.index > next {
            out.push_str(&format!("[... {} messages omitted ...]\n", k.index - next));
        }
        let text = k.text.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push_str(&format!("{}: {}\n", role_label(messages[k.index].role, tag), text));
        next = k.index + 1;
    }
    if next < messages.len() {
        out.push_str(&format!("[... {} messages omitted ...]\n", messages.len() - next));
    }
    out
}

/// Everything that does not depend on the thread comes first: the cached
/// instructions are then shared by every thread in the same language and
/// answer length, and a thread re-summarised after a new message reads only
/// that message and the short request after it.
pub fn system(spec: &PromptSpec) -> String {
    format!(
        "You write hand-over notes for customer-support agents. You read a chat between a customer and a company \
         and report it to the next agent, in {lang}.\n\
         Rules:\n\
         - Write in {lang} only, even if the instructions are in English.\n\
         - Use only facts stated in the chat. Copy order numbers, amounts, dates, e-mails, phone numbers and links \
         exactly as written; never make one up. Do not promise anything the company did not promise.\n\
         - If the chat gives an order, ticket or protocol number, put it in the SUMMARY.\n\
         - Be short and concrete.\n\
         Write the note in exactly this format:\n\
         {SUMMARY}: <one to three sentences, at most {words} words>\n\
         {ISSUE}: <what the customer wants or what went wrong>\n\
         {ACTIONS}: <what the company has already done, or -> \n\
         {STATUS}: <one of: {statuses}>\n\
         {NEXT}: <the next step; separate several steps with ;>",
        lang = spec.language_name,
        words = spec.max_words,
        statuses = STATUSES.join(", "),
    )
}

pub fn user(spec: &PromptSpec, transcript: &str) -> String {
    let mut s = format!("Chat:\n{transcript}");
    if !spec.forbidden.is_empty() {
        s.push_str(&format!("Do not mention {}: they do not appear in the chat.\n", spec.forbidden.join(", ")));
    }
    // A compact copy of the format: far above, small models drop its details
    // (the status values, the id, the length) and pad the note.
    s.push_str(&format!(
        "Write the note for this chat in {lang}, five short lines: {SUMMARY} (at most {words} words, with any order, \
         ticket or protocol number), {ISSUE}, {ACTIONS}, {STATUS} ({first} or {last}), {NEXT}.",
        lang = spec.language_name,
        words = spec.max_words,
        first = STATUSES[..STATUSES.len() - 1].join(", "),
        last = STATUSES[STATUSES.len() - 1],
    ));
    s
}

/// How the note's lines after the first open, in order, as `tok`'s tokens:
/// given to the model as drafts for the line after each line break
/// (`GenerateParams::outline`), they let it write a label in one pass
/// instead of one pass a token.
pub fn outline(tok: &tokenizers::Tokenizer) -> tokenizers::Result<Vec<Vec<u32>>> {
    [ISSUE, ACTIONS, STATUS, NEXT].iter().map(|label| Ok(tok.encode(format!("{label}:"), false)?.get_ids().to_vec())).collect()
}

/// Words in a language: how the note starts, and the transcript's speaker
/// labels.
struct Words {
    /// "The customer". Starting the answer with it anchors the language:
    /// told "Russian", the 1.5B model otherwise slips into Ukrainian on some
    /// Russian threads (and into English on Spanish ones).
    note_start: &'static str,
    /// Speaker labels, in `Role`'s declaration order. With English labels the model copies
    /// "Agent" into Portuguese and Ukrainian notes.
    roles: [&'static str; 4],
}

fn words(tag: &str) -> Option<Words> {
    let primary = tag.split('-').next().unwrap_or(tag);
    let w = |note_start, roles| Some(Words { note_start, roles });
    match primary {
        "en" => w("The customer", ["Customer", "Agent", "Bot", "System"]),
        "pt" => w("O cliente", ["Cliente", "Atendente", "Bot", "Sistema"]),
        "es" => w("El cliente", ["Cliente", "Agente", "Bot", "Sistema"]),
        "ru" => w("Клиент", ["Клиент", "Оператор", "Бот", "Система"]),
        "uk" => w("Клієнт", ["Клієнт", "Оператор", "Бот", "Система"]),
        "hi" => w("ग्राहक", ["ग्राहक", "एजेंट", "बॉट", "सिस्टम"]),
        "fr" => w("Le client", ["Client", "Conseiller", "Bot", "Système"]),
        "de" => w("Der Kunde", ["Kunde", "Mitarbeiter", "Bot", "System"]),
        "it" => w("Il cliente", ["Cliente", "Operatore", "Bot", "Sistema"]),
        "pl" => w("Klient", ["Klient", "Konsultant", "Bot", "System"]),
        "tr" => w("Müşteri", ["Müşteri", "Temsilci", "Bot", "Sistem"]),
        "ro" => w("Clientul", ["Client", "Operator", "Bot", "Sistem"]),
        "nl" => w("De klant", ["Klant", "Medewerker", "Bot", "Systeem"]),
        "cs" => w("Zákazník", ["Zákazník", "Operátor", "Bot", "Systém"]),
        "id" => w("Pelanggan", ["Pelanggan", "Agen", "Bot", "Sistem"]),
        "vi" => w("Khách hàng", ["Khách hàng", "Nhân viên", "Bot", "Hệ thống"]),
        _ => None,
    }
}

/// A speaker's label in the transcript: in the note's language where known.
fn role_label(role: Role, tag: &str) -> &'static str {
    words(tag).map_or_else(|| role.label(), |w| w.roles[role as usize])
}

/// The full ChatML prompt and the text the answer is forced to start with
/// (after the first label): the label commits the model to the format, the
/// first words to the language.
pub fn build(spec: &PromptSpec, transcript: &str) -> (String, String) {
    let start = words(spec.language_tag).map(|w| format!(" {}", w.note_start)).unwrap_or_default();
    let prompt = chatml(&system(spec), &user(spec, transcript), &format!("{SUMMARY}:{start}"));
    (prompt, start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarize::cut::Kept;

    fn m(role: Role, text: &str) -> Message {
        Message { id: String::new(), role, sent_at: None, text: text.into(), channel: String::new() }
    }

    /// Every status the prompt offers is read back as the status of that name.
    #[test]
    fn offered_statuses_parse_to_themselves() {
        for value in STATUSES {
            let note = crate::summarize::parse::parse(&format!(" x\n{STATUS}: {value}\n"));
            assert_eq!(serde_json::to_value(note.status).unwrap(), value, "{value}");
        }
    }

    #[test]
    fn transcript_marks_omissions_in_order() {
        let msgs = vec![m(Role::Customer, "a"), m(Role::Agent, "b"), m(Role::Bot, "c"), m(Role::Customer, "d  \n e"), m(Role::Agent, "f")];
        let kept = |i: usize| Kept { index: i, text: msgs[i].text.clone(), shortened: false };
        let cut = Cut { kept: vec![kept(0), kept(3)], omitted: vec![1, 2, 4], tokens: 0 };
        assert_eq!(
            transcript(&msgs, &cut, "en-US"),
            "Customer: a\n[... 2 messages omitted ...]\nCustomer: d e\n[... 1 messages omitted ...]\n"
        );
        // Speakers are named in the note's language; unknown languages keep English.
        let all = Cut { kept: (0..5).map(kept).collect(), omitted: vec![], tokens: 0 };
        assert_eq!(transcript(&msgs, &all, "pt"), "Cliente: a\nAtendente: b\nBot: c\nCliente: d e\nAtendente: f\n");
        assert!(transcript(&msgs, &all, "ru").starts_with("Клиент: a\nОператор: b\nБот: c\n"));
        assert!(transcript(&msgs, &all, "sw").starts_with("Customer: a\nAgent: b\nBot: c\n"));
    }

    #[test]
    fn prompt_names_the_language_and_format() {
        let spec = PromptSpec { language_name: "Russian", language_tag: "ru", max_words: 40, forbidden: &["558813".to_string()] };
        let (p, start) = build(&spec, "Customer: hi\n");
        assert_eq!(start, " Клиент");
        assert!(p.starts_with("<|im_start|>system\n"));
        assert!(p.ends_with("<|im_start|>assistant\nSUMMARY: Клиент"));
        let other = PromptSpec { language_name: "Swahili", language_tag: "sw", max_words: 40, forbidden: &[] };
        assert!(build(&other, "").0.ends_with("assistant\nSUMMARY:"));
        assert!(p.contains("in Russian only"));
        assert!(p.contains("at most 40 words"));
        assert!(p.contains("Do not mention 558813"));
        // The thread comes after everything that does not depend on it.
        let chat = p.find("Customer: hi").unwrap();
        for fixed in ["Rules:", "in exactly this format", "NEXT: <"] {
            assert!(p.find(fixed).unwrap() < chat, "{fixed}");
        }
        let other = build(&PromptSpec { forbidden: &[], ..spec }, "Customer: something else\n").0;
        assert_eq!(&p[..chat], &other[..chat], "two threads share the prompt up to the transcript");
        // What a grown thread reads again after its new message stays short.
        let after = &p[chat + "Customer: hi\n".len()..];
        assert!(after.len() < 400 && after.contains("in Russian") && after.contains("waiting_on_customer"), "{after}");
        for label in [SUMMARY, ISSUE, ACTIONS, STATUS, NEXT] {
            assert!(p.contains(&format!("{label}: <")), "{label}");
        }
    }
}
