//! Intents over gRPC on the real multilingual-e5-small encoder: registration,
//! persistence across a restart, cross-lingual classification, out of scope,
//! sentiment and urgency, batching, streaming, Analyze, and every bad input.
//! The summarizer is the tiny fixture: these tests are not about summaries.

use crate::common;

use crate::common::{fixture_server, llm_files, temp_dir, TestServer};
use palaver::intent::IntentConfig;
use palaver::models;
use palaver::proto::v1::{self as pb, classify_intent_request::Input};
use palaver::summarize::SummarizeConfig;
use tonic::Code;

/// An English-only taxonomy of a telecom, written for these tests.
fn telecom(name: &str) -> pb::Taxonomy {
    let intent = |label: &str, examples: &[&str]| pb::Intent {
        label: label.into(),
        description: String::new(),
        examples: examples.iter().map(|e| e.to_string()).collect(),
    };
    pb::Taxonomy {
        name: name.into(),
        version: "1".into(),
        description: "telecom support".into(),
        intents: vec![
            intent("internet_down", &["my internet is not working", "no connection since this morning", "the wifi keeps dropping", "the router lights are red and nothing loads", "internet outage at my house"]),
            intent("bill_too_high", &["my bill is much higher than usual", "why was I charged so much this month", "there is an extra fee on my invoice", "the amount on my bill is wrong", "I was overcharged"]),
            intent("cancel_contract", &["I want to cancel my contract", "how do I end my plan", "please terminate my subscription", "I am switching to another provider, cancel my service", "close my account"]),
            intent("port_number", &["can I keep my phone number if I switch", "I want to transfer my number to you", "how long does number portability take", "port my mobile number", "move my number from my old carrier"]),
            intent("roaming", &["does my plan work abroad", "how much is roaming in Europe", "my phone has no signal when travelling", "activate international roaming", "data abroad is not working"]),
        ],
        out_of_scope_examples: vec![],
    }
}

fn text_req(text: &str, taxonomy: &str) -> pb::ClassifyIntentRequest {
    pb::ClassifyIntentRequest { input: Some(Input::Text(text.into())), taxonomy: taxonomy.into(), top_k: 3, request_id: String::new() }
}

async fn ready() -> &'static TestServer {
    let s = fixture_server();
    s.wait_intents().await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn english_examples_classify_portuguese_and_russian_messages() {
    let s = ready().await;
    let put = s.taxonomies().await.put_taxonomy(pb::PutTaxonomyRequest { taxonomy: Some(telecom("telecom-xl")) }).await.unwrap().into_inner();
    assert_eq!(put.info.as_ref().unwrap().intents, 5);
    let mut c = s.client().await;
    for (text, expected) in [
        ("minha internet caiu desde ontem e nada carrega", "internet_down"),
        ("a conta deste mês veio muito mais cara, cobraram a mais", "bill_too_high"),
        ("quero cancelar meu contrato", "cancel_contract"),
        ("интернет не работает с утра, роутер мигает красным", "internet_down"),
        ("хочу перенести свой номер к вам от другого оператора", "port_number"),
        ("не работает мобильный интернет за границей", "roaming"),
    ] {
        let r = c.classify_intent(text_req(text, "telecom-xl")).await.unwrap().into_inner();
        assert_eq!(r.intents[0].label, expected, "{text}: {:?}", r.intents);
        assert!(!r.out_of_scope, "{text} flagged out of scope: {r:?}");
        assert!(r.intents[0].score > r.intents[1].score);
        assert_eq!(r.taxonomy, "telecom-xl");
        assert!(r.timings.as_ref().unwrap().inference_ms > 0.0);
    }
    let r = c.classify_intent(text_req("a conta deste mês veio muito mais cara", "telecom-xl")).await.unwrap().into_inner();
    assert_eq!(r.language, "pt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_topic_messages_are_out_of_scope() {
    let s = ready().await;
    s.taxonomies().await.put_taxonomy(pb::PutTaxonomyRequest { taxonomy: Some(telecom("telecom-oos")) }).await.unwrap();
    let mut c = s.client().await;
    let mut flagged = 0;
    let off_topic = [
        "what is a good recipe for chocolate cake",
        "who painted the Mona Lisa",
        "qual é a capital da Austrália",
        "расскажи анекдот про кота",
    ];
    for text in off_topic {
        let r = c.classify_intent(text_req(text, "telecom-oos")).await.unwrap().into_inner();
        flagged += usize::from(r.out_of_scope);
        assert!((0.0..=1.0).contains(&r.out_of_scope_score));
    }
    assert!(flagged >= 3, "only {flagged} of {} off-topic messages flagged", off_topic.len());
    let r = c.classify_intent(text_req("my wifi is not working again", "telecom-oos")).await.unwrap().into_inner();
    assert!(!r.out_of_scope && r.out_of_scope_score < 0.5, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_taxonomy_with_sentiment_and_urgency() {
    let s = ready().await;
    let mut c = s.client().await;
    let r = c.classify_intent(text_req("Fui cobrado duas vezes no cartão pela mesma compra!! Quero o dinheiro de volta URGENTE", "")).await.unwrap().into_inner();
    assert_eq!(r.taxonomy, "support");
    let top: Vec<&str> = r.intents.iter().map(|i| i.label.as_str()).collect();
    assert!(top[..2].contains(&"double_charge"), "{top:?}");
    assert_eq!(r.sentiment.as_ref().unwrap().label, pb::SentimentLabel::Negative as i32, "{r:?}");
    let u = r.urgency.as_ref().unwrap();
    assert_eq!(u.level, pb::UrgencyLevel::High as i32, "{u:?}");
    assert!(u.reasons.iter().any(|x| x.contains("URGENTE")), "{u:?}");

    let r = c.classify_intent(text_req("Спасибо большое, всё получилось, вопрос решён!", "")).await.unwrap().into_inner();
    assert_eq!(r.intents[0].label, "thanks_closing", "{r:?}");
    assert_eq!(r.sentiment.as_ref().unwrap().label, pb::SentimentLabel::Positive as i32);
    assert_eq!(r.urgency.as_ref().unwrap().level, pb::UrgencyLevel::Low as i32);

    // A thread: the customer's turns since the last agent reply decide, and
    // three unanswered messages count as repeated contact.
    let msg = |role: pb::Role, text: &str| pb::Message { role: role as i32, text: text.into(), ..Default::default() };
    let thread = pb::Thread {
        thread_id: "t1".into(),
        messages: vec![
            msg(pb::Role::Customer, "hola, quiero cambiar la dirección de envío"),
            msg(pb::Role::Agent, "¡Listo! Dirección actualizada."),
            msg(pb::Role::Customer, "mi pedido no llegó"),
            msg(pb::Role::Customer, "¿hola?"),
            msg(pb::Role::Customer, "el paquete sigue sin llegar, el seguimiento no cambia hace una semana"),
        ],
    };
    let r = c
        .classify_intent(pb::ClassifyIntentRequest { input: Some(Input::Thread(thread)), top_k: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let top: Vec<&str> = r.intents.iter().map(|i| i.label.as_str()).collect();
    assert_eq!(top.len(), 2);
    assert!(top.contains(&"delivery_problem") || top.contains(&"order_status"), "{top:?}");
    assert!(!top.contains(&"change_address"), "an answered old request decided: {top:?}");
    assert!(r.urgency.unwrap().reasons.iter().any(|x| x.contains("3 customer messages")));
    assert_eq!(r.language, "es");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_idempotent_and_survives_a_restart() {
    let store = temp_dir("restart");
    let files = || llm_files(models::FIXTURE_LLM);
    let opts = common::default_opts();
    let first = TestServer::start_with(files(), SummarizeConfig::default(), opts.clone(), store.clone(), IntentConfig::default());
    first.wait_intents().await;
    let mut t = first.taxonomies().await;
    let a = t.put_taxonomy(pb::PutTaxonomyRequest { taxonomy: Some(telecom("persisted")) }).await.unwrap().into_inner();
    assert!(a.trained);
    let again = t.put_taxonomy(pb::PutTaxonomyRequest { taxonomy: Some(telecom("persisted")) }).await.unwrap().into_inner();
    assert!(!again.trained, "identical taxonomy trained again");
    assert_eq!(again.info.as_ref().unwrap().content_hash, a.info.as_ref().unwrap().content_hash);
    let before = first.client().await.classify_intent(text_req("o wifi caiu de novo", "persisted")).await.unwrap().into_inner();

    // A second server on the same store: a restart.
    let second = TestServer::start_with(files(), SummarizeConfig::default(), opts, store.clone(), IntentConfig::default());
    second.wait_intents().await;
    let mut t2 = second.taxonomies().await;
    let got = t2.get_taxonomy(pb::GetTaxonomyRequest { name: "persisted".into() }).await.unwrap().into_inner();
    assert_eq!(got.taxonomy.unwrap(), telecom("persisted"));
    let names: Vec<String> = t2.list_taxonomies(pb::ListTaxonomiesRequest {}).await.unwrap().into_inner().taxonomies.into_iter().map(|i| i.name).collect();
    assert!(names.contains(&"persisted".to_string()) && names.contains(&"support".to_string()), "{names:?}");
    let after = second.client().await.classify_intent(text_req("o wifi caiu de novo", "persisted")).await.unwrap().into_inner();
    assert_eq!(after.intents[0].label, before.intents[0].label);
    assert!((after.intents[0].score - before.intents[0].score).abs() < 1e-4, "the stored head differs");
    let re = t2.put_taxonomy(pb::PutTaxonomyRequest { taxonomy: Some(telecom("persisted")) }).await.unwrap().into_inner();
    assert!(!re.trained, "restart lost the trained head");

    // A changed taxonomy retrains; deletion is durable too.
    let mut changed = telecom("persisted");
    changed.intents[0].examples.push("a internet está muito lenta".into());
    assert!(t2.put_taxonomy(pb::PutTaxonomyRequest { taxonomy: Some(changed) }).await.unwrap().into_inner().trained);
    assert!(t2.delete_taxonomy(pb::DeleteTaxonomyRequest { name: "persisted".into() }).await.unwrap().into_inner().deleted);
    assert!(!t2.delete_taxonomy(pb::DeleteTaxonomyRequest { name: "persisted".into() }).await.unwrap().into_inner().deleted);
    assert!(!store.join("persisted.taxonomy.json").exists());
    let e = t2.get_taxonomy(pb::GetTaxonomyRequest { name: "persisted".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_names_the_field() {
    let s = ready().await;
    let mut t = s.taxonomies().await;
    let put = |tax: pb::Taxonomy| pb::PutTaxonomyRequest { taxonomy: Some(tax) };
    let check = |r: Result<tonic::Response<pb::PutTaxonomyResponse>, tonic::Status>, needle: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(needle), "`{}` does not name `{needle}`", e.message());
    };
    let mut dup = telecom("bad");
    dup.intents[1].label = "Internet_Down".into();
    check(t.put_taxonomy(put(dup)).await, "taxonomy.intents[1].label: duplicate label");
    let mut empty = telecom("bad");
    empty.intents[2].examples.clear();
    check(t.put_taxonomy(put(empty)).await, "taxonomy.intents[2].examples");
    let mut blank = telecom("bad");
    blank.intents[0].examples[3] = "   ".into();
    check(t.put_taxonomy(put(blank)).await, "taxonomy.intents[0].examples[3]");
    let mut many = telecom("bad");
    many.intents = (0..501).map(|i| pb::Intent { label: format!("i{i}"), description: String::new(), examples: vec!["x".into()] }).collect();
    check(t.put_taxonomy(put(many)).await, "501 intents, the limit is 500");
    let mut long = telecom("bad");
    long.intents[0].examples = vec!["e".into(); 501];
    check(t.put_taxonomy(put(long)).await, "501 examples, the limit is 500");
    check(t.put_taxonomy(put(telecom("../../etc/passwd"))).await, "taxonomy.name");
    check(t.put_taxonomy(put(telecom("palaver.sentiment"))).await, "reserved");
    let e = t.put_taxonomy(pb::PutTaxonomyRequest { taxonomy: None }).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::InvalidArgument, "taxonomy: missing"));
    assert_eq!(t.get_taxonomy(pb::GetTaxonomyRequest { name: "nope".into() }).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(t.get_taxonomy(pb::GetTaxonomyRequest { name: "palaver.sentiment".into() }).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(t.delete_taxonomy(pb::DeleteTaxonomyRequest { name: "".into() }).await.unwrap_err().code(), Code::InvalidArgument);

    let mut c = s.client().await;
    let bad = |r: Result<tonic::Response<pb::ClassifyIntentResponse>, tonic::Status>, code: Code, needle: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(needle), "`{}` does not name `{needle}`", e.message());
    };
    bad(c.classify_intent(text_req("  ", "")).await, Code::InvalidArgument, "text: is empty");
    bad(c.classify_intent(text_req(&"a".repeat(8001), "")).await, Code::InvalidArgument, "limit is 8000");
    bad(c.classify_intent(text_req("hi", "no-such-taxonomy")).await, Code::NotFound, "taxonomy: no taxonomy named `no-such-taxonomy`");
    bad(c.classify_intent(pb::ClassifyIntentRequest { top_k: 51, ..text_req("hi", "") }).await, Code::InvalidArgument, "top_k");
    bad(c.classify_intent(pb::ClassifyIntentRequest::default()).await, Code::InvalidArgument, "input");
    let agent_only = pb::Thread { thread_id: "t".into(), messages: vec![pb::Message { role: pb::Role::Agent as i32, text: "hello".into(), ..Default::default() }] };
    bad(c.classify_intent(pb::ClassifyIntentRequest { input: Some(Input::Thread(agent_only)), ..Default::default() }).await, Code::InvalidArgument, "ROLE_CUSTOMER");
    let bad_role = pb::Thread { thread_id: "t".into(), messages: vec![pb::Message { role: 9, text: "hello".into(), ..Default::default() }] };
    bad(c.classify_intent(pb::ClassifyIntentRequest { input: Some(Input::Thread(bad_role)), ..Default::default() }).await, Code::InvalidArgument, "thread.messages[0].role");
    let batch = |texts: Vec<String>| pb::ClassifyIntentBatchRequest { texts, taxonomy: String::new(), top_k: 1 };
    let e = c.classify_intent_batch(batch(vec![])).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::InvalidArgument, "texts: is empty"));
    let e = c.classify_intent_batch(batch(vec!["hi".into(); 1025])).await.unwrap_err();
    assert!(e.message().contains("1025 messages, the limit is 1024"), "{e:?}");
    let e = c.classify_intent_batch(batch(vec!["hi".into(), "".into()])).await.unwrap_err();
    assert!(e.message().contains("texts[1]"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_stream_answer_in_order() {
    let s = ready().await;
    let mut c = s.client().await;
    let texts = ["where is my order", "quero cancelar a assinatura", "не могу войти в аккаунт", "hola"];
    let r = c
        .classify_intent_batch(pb::ClassifyIntentBatchRequest { texts: texts.iter().map(|t| t.to_string()).collect(), taxonomy: String::new(), top_k: 1 })
        .await
        .unwrap()
        .into_inner();
    let labels: Vec<&str> = r.results.iter().map(|x| x.intents[0].label.as_str()).collect();
    assert_eq!(labels, ["order_status", "cancellation", "account_access", "greeting"]);

    let mut reqs: Vec<pb::ClassifyIntentRequest> = (0..40)
        .map(|i| pb::ClassifyIntentRequest { request_id: format!("r{i}"), ..text_req(texts[i % texts.len()], "") })
        .collect();
    reqs[7].input = Some(Input::Text(String::new()));
    let out: Vec<pb::ClassifyIntentResponse> = {
        use tokio_stream::StreamExt;
        let mut stream = c.classify_intent_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
        let mut v = Vec::new();
        while let Some(r) = stream.next().await {
            v.push(r.unwrap());
        }
        v
    };
    assert_eq!(out.len(), 40);
    for (i, r) in out.iter().enumerate() {
        assert_eq!(r.request_id, format!("r{i}"));
        if i == 7 {
            assert_eq!(r.error, "text: is empty");
        } else {
            assert!(r.error.is_empty());
            assert_eq!(r.intents[0].label, labels[i % texts.len()]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_forward_passes() {
    let s = ready().await;
    let before = s.encoder.stats();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut c = s.client().await;
        tasks.push(tokio::spawn(async move {
            c.classify_intent(text_req(&format!("what is the status of my order number {i}?"), "")).await.unwrap().into_inner()
        }));
    }
    let mut max_batch = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.intents[0].label, "order_status");
        max_batch = max_batch.max(r.timings.unwrap().batch_size);
    }
    let after = s.encoder.stats();
    assert!(max_batch > 1, "no request shared a forward pass");
    assert!(after.batches - before.batches < 32, "{before:?} -> {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_returns_summary_and_intent_together() {
    let s = ready().await;
    s.wait_serving().await;
    let msg = |role: pb::Role, text: &str| pb::Message { role: role as i32, text: text.into(), ..Default::default() };
    let thread = pb::Thread {
        thread_id: "a1".into(),
        messages: vec![
            msg(pb::Role::Customer, "Hi, I was charged twice for order 5521."),
            msg(pb::Role::Agent, "Sorry about that, I am checking."),
            msg(pb::Role::Customer, "Please refund the second charge."),
        ],
    };
    let r = s
        .client()
        .await
        .analyze(pb::AnalyzeRequest { thread: Some(thread), language: String::new(), max_words: 40, taxonomy: String::new(), top_k: 3 })
        .await
        .unwrap()
        .into_inner();
    let summary = r.summary.unwrap();
    assert_eq!(summary.thread_id, "a1");
    assert!(!summary.summary.is_empty());
    let intent = r.intent.unwrap();
    let labels: Vec<&str> = intent.intents.iter().map(|i| i.label.as_str()).collect();
    assert!(labels.contains(&"refund") || labels.contains(&"double_charge"), "{labels:?}");
    assert!(r.total_ms >= intent.timings.unwrap().total_ms);
    let e = s.client().await.analyze(pb::AnalyzeRequest { taxonomy: "nope".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::InvalidArgument, "thread: missing"));
}
