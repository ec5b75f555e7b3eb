//! The CPU work around the model, per request: fitting a 300-message thread
//! into the budget, building the prompt, the faithfulness check and the
//! thread's references, and the metrics a request feeds. These must stay
//! negligible next to inference.
//!
//!   cargo bench --bench pipeline

use criterion::{criterion_group, criterion_main, Criterion};
use palaver::summarize::thread::{Message, Role};
use palaver::summarize::{cut, faithful, parse, prompt, record_metrics, references, Faithfulness, Timings};
use std::hint::black_box;

fn thread(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message {
            id: format!("m{i}"),
            role: if i % 2 == 0 { Role::Customer } else { Role::Agent },
            sent_at: None,
            text: if i % 17 == 0 {
                format!("Order BR-{} for R$ {},90 - call +55 11 9{:04}-1234", 40000 + i, 100 + i, i)
            } else {
                "Any update on my delivery? It has been a week and nobody answers my e-mails.".into()
            },
            channel: "whatsapp".into(),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let msgs = thread(300);
    let count = |s: &str| s.split_whitespace().count() * 4 / 3 + 1;
    c.bench_function("cut 300 messages to 1536 tokens", |b| b.iter(|| cut::fit(black_box(&msgs), 1536, &count)));
    let c300 = cut::fit(&msgs, 1536, &count);
    c.bench_function("transcript + prompt", |b| {
        b.iter(|| {
            let t = prompt::transcript(black_box(&msgs), &c300, "pt");
            prompt::build(&prompt::PromptSpec { language_name: "Portuguese", language_tag: "pt", max_words: 60, forbidden: &[] }, &t)
        })
    });
    c.bench_function("faithfulness support from 300 messages", |b| {
        b.iter(|| faithful::Support::from_texts(black_box(&msgs).iter().map(|m| m.text.as_str())))
    });
    c.bench_function("references of 300 messages, marked against a note", |b| {
        b.iter(|| {
            let mut refs = references::collect(black_box(&msgs));
            references::mark_in_summary(&mut refs, ["Cliente cobra o pedido BR-40017 de R$ 117,90."]);
            refs
        })
    });
    // What a request does: one extraction for both.
    c.bench_function("support + references from one extraction of 300 messages", |b| {
        b.iter(|| {
            let facts: Vec<Vec<faithful::Fact>> = black_box(&msgs).iter().map(|m| faithful::extract(&m.text)).collect();
            (faithful::Support::from_facts(facts.iter().flatten()), references::from_facts(&msgs, &facts))
        })
    });
    let support = faithful::Support::from_texts(msgs.iter().map(|m| m.text.as_str()));
    let out = " Cliente cobra o pedido BR-40017 de R$ 117,90; ligar +55 11 90017-1234.\nISSUE: Atraso\nACTIONS: -\nSTATUS: waiting_on_agent\nNEXT: Verificar; Responder";
    c.bench_function("parse + check an answer", |b| {
        b.iter(|| {
            let n = parse::parse(black_box(out));
            support.unsupported(&n.summary).len()
        })
    });
    let timings = Timings { tokenize_ms: 2.0, queue_ms: 1.0, prompt_ms: 900.0, generation_ms: 1500.0, total_ms: 2410.0, ..Timings::default() };
    let faith = Faithfulness { passed_first_time: true, ..Faithfulness::default() };
    c.bench_function("a summary's metrics recorded", |b| b.iter(|| record_metrics(black_box(&timings), &faith)));
    c.bench_function("a scrape of every metric rendered", |b| b.iter(|| palaver::metrics::global().render().len()));
}

criterion_group!(benches, bench);
criterion_main!(benches);
