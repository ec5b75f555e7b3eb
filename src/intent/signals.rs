//! Which chat to open first: sentiment (from a small built-in head on the
//! same embedding) and urgency (rules with reasons an agent can read).

use regex::Regex;
use std::sync::LazyLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sentiment {
    Negative,
    Neutral,
    Positive,
}

impl Sentiment {
    pub fn from_label(label: &str) -> Sentiment {
        match label {
            "negative" => Sentiment::Negative,
            "positive" => Sentiment::Positive,
            _ => Sentiment::Neutral,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Urgency {
    Low,
    Normal,
    High,
}

/// What urgency is judged from.
pub struct UrgencyInput<'a> {
    /// The customer's latest turns.
    pub text: &'a str,
    pub sentiment: Sentiment,
    pub sentiment_score: f32,
    /// Customer messages since the last agent or bot reply (1 for a single message).
    pub unanswered_customer_messages: usize,
    /// Labels of the top intent when in scope, lower-cased.
    pub top_intent: Option<&'a str>,
}

/// Words that ask for speed, in the languages palaver's markets write in.
static URGENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(urgent\w*|asap|immediately|right now|emergency|urgente\w*|urgência|imediatamente|agora mesmo|emergência|emergencia|inmediatamente|ya mismo|срочно|немедленно|сейчас же|терміново|негайно|зараз же)\b|तुरंत|जल्दी|अभी",
    )
    .expect("valid regex")
});

/// Threats to leave, escalate publicly or go to a regulator or court.
static THREAT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(cancel\w*|lawyer|sue|court|chargeback|consumer protection|never again|procon|reclame aqui|advogad\w*|processar|cancelar|abogad\w*|demanda\w*|denuncia\w*|profeco|отмен\w*|суд\w*|юрист\w*|роспотребнадзор|жалоб\w*|скасу\w*|юрист\w*|скарг\w*)\b|शिकायत|उपभोक्ता|रद्द",
    )
    .expect("valid regex")
});

/// The customer says they already asked before.
static REPEATED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(again|(second|third|fourth|\d+(st|nd|rd|th)) time|already (told|asked|sent|wrote|called)|still (no|not|waiting)|de novo|novamente|outra vez|já (falei|pedi|mandei|enviei|liguei)|ainda (não|nada)|otra vez|de nuevo|ya (les )?(dije|escribí|llamé)|todavía no|снова|опять|ещё раз|еще раз|уже (писал|писала|звонил|звонила|говорил)|до сих пор|знову|вже (писав|писала|дзвонив)|досі)\b|फिर से|दोबारा|कई बार",
    )
    .expect("valid regex")
});

/// Level and reasons, strongest first.
pub fn urgency(input: &UrgencyInput) -> (Urgency, Vec<String>) {
    let mut reasons = Vec::new();
    let mut points = 0u32;
    if let Some(m) = URGENT.find(input.text) {
        reasons.push(format!("asks for speed (\"{}\")", m.as_str()));
        points += 2;
    }
    if let Some(m) = THREAT.find(input.text) {
        reasons.push(format!("threatens to cancel or escalate (\"{}\")", m.as_str()));
        points += 2;
    } else if matches!(input.top_intent, Some(l) if l.contains("cancel") || l.contains("complaint")) {
        reasons.push(format!("intent is {}", input.top_intent.unwrap_or_default()));
        points += 1;
    }
    if let Some(m) = REPEATED.find(input.text) {
        reasons.push(format!("repeated contact (\"{}\")", m.as_str()));
        points += 2;
    }
    if input.unanswered_customer_messages >= 3 {
        reasons.push(format!("{} customer messages without a reply", input.unanswered_customer_messages));
        points += 1 + u32::from(input.unanswered_customer_messages >= 5);
    }
    if input.sentiment == Sentiment::Negative && input.sentiment_score >= 0.5 {
        reasons.push(format!("negative sentiment ({:.2})", input.sentiment_score));
        points += 1;
    }
    let shouting = input.text.matches('!').count() >= 3
        || input.text.split_whitespace().filter(|w| w.chars().count() >= 4 && w.chars().all(|c| c.is_uppercase())).count() >= 2;
    if shouting {
        reasons.push("writes in capitals or with many exclamation marks".into());
        points += 1;
    }
    let level = match points {
        0 if input.sentiment == Sentiment::Positive
            || matches!(input.top_intent, Some(l) if l.contains("thank") || l.contains("closing")) =>
        {
            reasons.push("no sign of urgency; the customer sounds satisfied or is closing".into());
            Urgency::Low
        }
        0..=1 => Urgency::Normal,
        _ => Urgency::High,
    };
    (level, reasons)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, sentiment: Sentiment, unanswered: usize, intent: Option<&str>) -> (Urgency, Vec<String>) {
        urgency(&UrgencyInput { text, sentiment, sentiment_score: 0.9, unanswered_customer_messages: unanswered, top_intent: intent })
    }

    #[test]
    fn urgent_words_in_several_languages_raise_urgency() {
        for text in ["preciso disso urgente, meu voo é amanhã", "Срочно верните деньги, это уже третий раз, опять ничего", "need it ASAP"] {
            let (level, reasons) = run(text, Sentiment::Negative, 1, None);
            assert_eq!(level, Urgency::High, "{text}: {reasons:?}");
            assert!(reasons.iter().any(|r| r.contains("speed")), "{reasons:?}");
        }
    }

    #[test]
    fn threats_and_repeated_contact_are_named() {
        let (level, reasons) = run("já falei três vezes, vou abrir reclamação no Procon", Sentiment::Negative, 1, None);
        assert_eq!(level, Urgency::High);
        assert!(reasons.iter().any(|r| r.contains("escalate")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("repeated")), "{reasons:?}");
        let (_, reasons) = run("hello?", Sentiment::Neutral, 4, None);
        assert!(reasons.iter().any(|r| r.contains("4 customer messages")), "{reasons:?}");
    }

    #[test]
    fn calm_questions_are_normal_and_thanks_are_low() {
        assert_eq!(run("what are your opening hours?", Sentiment::Neutral, 1, Some("store_hours")).0, Urgency::Normal);
        assert_eq!(run("obrigado, resolveu!", Sentiment::Positive, 1, Some("thanks_closing")).0, Urgency::Low);
    }
}
