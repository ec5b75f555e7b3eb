//! The summary's language: the one the request names (validated as BCP-47 with
//! a known ISO 639 primary subtag) or the thread's own, detected with whatlang.

use super::thread::{invalid, Role, Thread};
use super::SummarizeError;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Language {
    /// BCP-47 tag: the request's as given (normalised case) or the detected ISO 639-1 code.
    pub tag: String,
    /// English name, used in the instruction to the model.
    pub name: String,
    /// "request" or "detected".
    pub source: &'static str,
}

/// Parses a BCP-47 tag such as `pt`, `pt-BR`, `uk`, `es-419`, `hi`.
pub fn from_request(tag: &str) -> Result<Language, SummarizeError> {
    let bad = |why: &str| invalid("language", format!("`{tag}` is not a BCP-47 language tag: {why}"));
    let mut parts = tag.split(['-', '_']);
    let primary = parts.next().unwrap_or_default().to_ascii_lowercase();
    let lang = match primary.len() {
        2 => isolang::Language::from_639_1(&primary),
        3 => isolang::Language::from_639_3(&primary),
        _ => return Err(bad("the primary subtag must have 2 or 3 letters")),
    }
    .ok_or_else(|| bad("unknown ISO 639 language code"))?;
    let mut normalised = vec![primary];
    for sub in parts {
        if sub.is_empty() || sub.len() > 8 || !sub.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(bad("a subtag must be 1 to 8 letters or digits"));
        }
        normalised.push(match sub.len() {
            2 => sub.to_ascii_uppercase(), // region
            4 => {
                let mut s = sub.to_ascii_lowercase(); // script: Latn, Cyrl
                s[..1].make_ascii_uppercase();
                s
            }
            _ => sub.to_string(),
        });
    }
    Ok(Language { tag: normalised.join("-"), name: lang.to_name().to_string(), source: "request" })
}

/// Languages detection may pick. Short chats are where detectors fail, and
/// mostly between close relatives (Russian read as Bulgarian, Portuguese as
/// Galician): a prior over the languages helpdesks actually receive fixes that.
/// A request can still name any ISO 639 language explicitly.
const DETECTABLE: &[whatlang::Lang] = {
    use whatlang::Lang::*;
    &[
        Eng, Por, Spa, Rus, Ukr, Hin, Fra, Deu, Ita, Pol, Tur, Ara, Ind, Vie, Tha, Ron, Nld, Ces, Ell, Heb,
        Jpn, Cmn, Kor, Ben, Tam, Tel, Mar, Urd, Guj, Pan, Kat, Hye, Aze, Uzb, Hun, Swe, Dan, Fin, Pes,
    ]
};

/// Detects the thread's language from what the customer wrote (agents may
/// answer from an English template), falling back to the whole thread, then English.
pub fn detect(thread: &Thread) -> Language {
    let detector = whatlang::Detector::with_allowlist(DETECTABLE.to_vec());
    let join = |customer_only: bool| -> String {
        thread
            .messages
            .iter()
            .filter(|m| !customer_only || m.role == Role::Customer)
            .map(|m| m.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let detected = [join(true), join(false)]
        .iter()
        .filter_map(|text| detector.detect(text))
        .filter_map(|info| isolang::Language::from_639_3(info.lang().code()))
        .next();
    match detected {
        Some(l) => Language {
            tag: l.to_639_1().map(str::to_string).unwrap_or_else(|| l.to_639_3().to_string()),
            name: l.to_name().to_string(),
            source: "detected",
        },
        None => Language { tag: "en".into(), name: "English".into(), source: "detected" },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summarize::thread::Message;

    fn thread(texts: &[(Role, &str)]) -> Thread {
        Thread {
            id: "t".into(),
            messages: texts
                .iter()
                .map(|(r, t)| Message { id: String::new(), role: *r, sent_at: None, text: t.to_string(), channel: String::new() })
                .collect(),
        }
    }

    #[test]
    fn detects_the_customers_language() {
        let cases = [
            ("Olá, meu pedido ainda não chegou e já faz duas semanas. Vocês podem verificar?", "pt"),
            ("Hola, mi pedido todavía no ha llegado y ya pasaron dos semanas. ¿Pueden revisarlo?", "es"),
            ("Здравствуйте, мой заказ до сих пор не пришёл, прошло уже две недели. Проверьте, пожалуйста.", "ru"),
            ("Добрий день, моє замовлення досі не прийшло, минуло вже два тижні. Перевірте, будь ласка.", "uk"),
            ("नमस्ते, मेरा ऑर्डर अभी तक नहीं आया है और दो हफ्ते हो गए हैं। कृपया जांच करें।", "hi"),
            ("Hi, my order still has not arrived and it has been two weeks. Can you check?", "en"),
        ];
        for (text, tag) in cases {
            // The agent answers in English: the customer's language must win.
            let t = thread(&[(Role::Customer, text), (Role::Agent, "Hello! We are checking your order status now, please wait.")]);
            assert_eq!(detect(&t).tag, tag, "{text}");
        }
    }

    #[test]
    fn validates_and_normalises_request_tags() {
        assert_eq!(from_request("pt-br").unwrap().tag, "pt-BR");
        assert_eq!(from_request("pt-BR").unwrap().name, "Portuguese");
        assert_eq!(from_request("ukr").unwrap().name, "Ukrainian");
        assert_eq!(from_request("sr-latn").unwrap().tag, "sr-Latn");
        for bad in ["", "xx", "english", "pt-", "p"] {
            match from_request(bad) {
                Err(SummarizeError::InvalidArgument { field, .. }) => assert_eq!(field, "language"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
