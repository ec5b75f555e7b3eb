//! The Assist service over real gRPC, on the real default summarizer
//! (Qwen2.5-Coder-1.5B-Instruct Q4_K_M) and, for plumbing, the SmolLM2 fixture.

use crate::common;

use crate::common::{default_server, fixture_server, llm_files, TestServer};
use palaver::models;
use palaver::proto::v1::{self as pb, summarize_chunk::Chunk};
use palaver::server::ServeOptions;
use palaver::summarize::{faithful, language, SummarizeConfig};
use prost_types::Timestamp;
use tonic::Code;

const T0: i64 = 1_763_640_000; // 2025-11-20

fn msg(i: usize, role: pb::Role, text: &str) -> pb::Message {
    pb::Message {
        id: format!("m{i}"),
        role: role as i32,
        sent_at: Some(Timestamp { seconds: T0 + 60 * i as i64, nanos: 0 }),
        text: text.into(),
        channel: "whatsapp".into(),
    }
}

fn thread(id: &str, turns: &[(pb::Role, &str)]) -> pb::SummarizeRequest {
    pb::SummarizeRequest {
        thread: Some(pb::Thread {
            thread_id: id.into(),
            messages: turns.iter().enumerate().map(|(i, (r, t))| msg(i, *r, t)).collect(),
        }),
        ..Default::default()
    }
}

use pb::Role::{Agent, Customer};

const PT: &[(pb::Role, &str)] = &[
    (Customer, "Olá, boa tarde! Comprei um fone de ouvido Bluetooth no dia 12/11, pedido nº 48213, no valor de R$ 259,90. O prazo de entrega era de 5 dias úteis e até agora não chegou nada."),
    (Agent, "Boa tarde! Sinto muito pelo transtorno. Poderia me confirmar o CEP de entrega, por favor?"),
    (Customer, "Claro, o CEP é 04538-132. Já é a segunda vez que entro em contato sobre isso."),
    (Agent, "Obrigado. Verifiquei aqui e o pedido 48213 ficou retido no centro de distribuição da transportadora. Abri uma reclamação com a transportadora."),
    (Customer, "E quando vai chegar? Se não chegar até sexta-feira eu quero o reembolso."),
];

const RU: &[(pb::Role, &str)] = &[
    (Customer, "Здравствуйте! Я заказал кофемашину, номер заказа 771045, оплатил 18 990 рублей. Сегодня пришла посылка, а машина не включается."),
    (Agent, "Добрый день! Очень жаль. Подскажите, пожалуйста, вы пробовали включить её в другую розетку?"),
    (Customer, "Да, пробовал две разные розетки. Индикатор не загорается."),
    (Agent, "Понятно, спасибо. Я оформил заявку на возврат по заказу 771045. Курьер заберёт кофемашину в течение трёх дней."),
    (Customer, "Хорошо, а деньги когда вернут?"),
];

const ES: &[(pb::Role, &str)] = &[
    (Customer, "Hola, me cobraron dos veces la suscripción de este mes, 2 cargos de 15,99 euros. ¿Me pueden devolver uno?"),
    (Agent, "Hola, lamento la molestia. Ya revisé su cuenta y veo el cargo duplicado. Solicité el reembolso de 15,99 euros."),
    (Customer, "Perfecto, ¿cuánto tarda en llegar?"),
];

fn note_text(r: &pb::SummarizeResponse) -> String {
    let mut parts = vec![r.summary.clone(), r.customer_issue.clone(), r.actions_taken.clone()];
    parts.extend(r.next_steps.iter().cloned());
    parts.join("\n")
}

/// The checks every real summary must pass: structure, language, faithfulness.
fn assert_good_summary(req: &pb::SummarizeRequest, r: &pb::SummarizeResponse, lang: &str, order: &str) {
    let thread_text: Vec<&str> = req.thread.as_ref().unwrap().messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(r.language, lang, "{r:#?}");
    assert_eq!(r.language_source, "detected");
    assert!(!r.summary.trim().is_empty(), "{r:#?}");
    assert!(!r.customer_issue.trim().is_empty(), "{r:#?}");
    assert!(r.status != pb::ThreadStatus::Unspecified as i32);
    let note = note_text(r);
    assert_eq!(language::detect_text(&note).as_deref(), Some(lang), "summary not in {lang}: {note}");
    assert!(note.contains(order), "order number {order} missing: {note}");
    // Every number, id, amount or contact in the output appears in the thread.
    let support = faithful::Support::from_texts(thread_text.iter().copied());
    let invented: Vec<String> = support.unsupported(&note).into_iter().map(|f| f.raw).collect();
    assert!(invented.is_empty(), "invented {invented:?} in {note}");
    // The thread's references are quoted verbatim with the messages that
    // carry them; the order number is among them, marked as in the summary.
    let msgs = &req.thread.as_ref().unwrap().messages;
    for rf in &r.references {
        let first = msgs.iter().find(|m| m.id == rf.message_ids[0]).expect("reference's message");
        assert!(first.text.contains(&rf.text), "{rf:?} not in {first:?}");
    }
    let rf = r.references.iter().find(|rf| rf.text.contains(order)).unwrap_or_else(|| panic!("{order} not in {:?}", r.references));
    let quoting: Vec<&str> = msgs.iter().filter(|m| m.text.contains(order)).map(|m| m.id.as_str()).collect();
    assert_eq!(rf.message_ids, quoting);
    assert_eq!(rf.kind, pb::reference::Kind::Number as i32);
    assert!(rf.in_summary, "{rf:?}");
    let cov = r.coverage.as_ref().unwrap();
    assert_eq!(cov.used_message_ids.len(), thread_text.len());
    assert!(!cov.truncated);
    let tokens = r.tokens.as_ref().unwrap();
    assert!(tokens.prompt_tokens > 100 && tokens.generated_tokens > 10, "{tokens:?}");
    let t = r.timings.as_ref().unwrap();
    assert!(t.prompt_ms > 0.0 && t.generation_ms > 0.0 && t.total_ms >= t.prompt_ms + t.generation_ms);
    assert_eq!(r.model, models::DEFAULT_SUMMARIZER);
}

/// Summarises a thread on the default model and checks the note.
async fn summarize_and_check(id: &str, turns: &[(pb::Role, &str)], lang: &str, order: &str) {
    let s = default_server();
    s.wait_serving().await;
    let req = thread(id, turns);
    let r = s.client().await.summarize(req.clone()).await.expect("summarize").into_inner();
    eprintln!("{r:#?}");
    assert_good_summary(&req, &r, lang, order);
}

#[tokio::test]
async fn portuguese_thread_is_summarised_in_portuguese() {
    summarize_and_check("pt-1", PT, "pt", "48213").await;
}

#[tokio::test]
async fn russian_thread_is_summarised_in_russian() {
    summarize_and_check("ru-1", RU, "ru", "771045").await;
}

#[tokio::test]
async fn stream_sends_text_then_the_structured_response() {
    let s = default_server();
    s.wait_serving().await;
    let req = thread("es-1", ES);
    let mut stream = s.client().await.summarize_stream(req).await.expect("stream").into_inner();
    let mut text = String::new();
    let mut deltas = 0;
    let mut last = None;
    let first = stream.message().await.expect("chunk").expect("a first chunk");
    let Some(Chunk::Preview(preview)) = first.chunk else { panic!("the first chunk must be the preview: {first:?}") };
    while let Some(chunk) = stream.message().await.expect("chunk") {
        assert!(last.is_none(), "the response must be the last chunk");
        match chunk.chunk.expect("chunk body") {
            Chunk::Preview(p) => panic!("a second preview: {p:?}"),
            Chunk::TextDelta(t) => {
                deltas += 1;
                text.push_str(&t);
            }
            Chunk::Restart(_) => text.clear(),
            Chunk::Response(r) => last = Some(r),
        }
    }
    let r = last.expect("final response");
    eprintln!("{preview:#?}\n{text}\n{r:#?}");
    assert!(deltas >= 5, "{deltas} deltas");
    assert_eq!(r.language, "es");
    // The preview told, before any text, what the response confirms.
    assert_eq!((preview.thread_id.as_str(), preview.language.as_str(), preview.language_source.as_str()), ("es-1", "es", "detected"));
    assert_eq!(preview.coverage, r.coverage);
    let texts = |refs: &[pb::Reference]| refs.iter().map(|x| (x.text.clone(), x.message_ids.clone())).collect::<Vec<_>>();
    assert!(texts(&preview.references).iter().any(|(t, _)| t.contains("15,99")), "{preview:?}");
    assert_eq!(texts(&preview.references), texts(&r.references));
    assert!(preview.references.iter().all(|x| !x.in_summary));
    let words: Vec<&str> = r.customer_issue.split_whitespace().take(3).collect();
    assert!(text.contains(&words.join(" ")), "streamed text {text:?} lacks the issue {:?}", r.customer_issue);
    // At most one piece per generated token (pieces inside a character are held
    // back), plus the forced opening words of each attempt.
    let attempts = r.faithfulness.unwrap().attempts;
    assert!(attempts >= 1);
    assert!(deltas as u32 <= r.tokens.unwrap().generated_tokens + attempts);
}

#[tokio::test]
async fn requested_language_overrides_the_threads() {
    let s = fixture_server();
    s.wait_serving().await;
    let mut req = thread("en-1", &[(Customer, "Hi, my parcel 5521 never arrived."), (Agent, "Sorry! I opened a claim.")]);
    req.language = "pt-br".into();
    let r = s.client().await.summarize(req).await.expect("summarize").into_inner();
    assert_eq!(r.language, "pt-BR");
    assert_eq!(r.language_source, "request");
    assert_eq!(r.model, models::FIXTURE_LLM);
}

#[tokio::test]
async fn a_300_message_thread_is_cut_to_fit_and_still_summarised() {
    let s = fixture_server();
    s.wait_serving().await;
    let mut turns: Vec<(pb::Role, String)> = vec![(Customer, "Hello, I want a refund for order 99120, the blender arrived broken.".into())];
    for i in 1..300 {
        let (role, text) = if i % 2 == 1 {
            (Agent, format!("Update {i}: we are still checking with the warehouse, thank you for your patience."))
        } else {
            (Customer, format!("Message {i}: any news? I have been waiting for a long time now."))
        };
        turns.push((role, text));
    }
    let refs: Vec<(pb::Role, &str)> = turns.iter().map(|(r, t)| (*r, t.as_str())).collect();
    let r = s.client().await.summarize(thread("long-1", &refs)).await.expect("summarize").into_inner();
    let cov = r.coverage.unwrap();
    assert!(cov.truncated);
    assert!(cov.used_message_ids.contains(&"m0".to_string()), "opening request kept");
    // References come from the whole thread, in order, up to their cap.
    assert_eq!(r.references.len(), 32);
    assert_eq!((r.references[0].text.as_str(), r.references[0].message_ids.as_slice()), ("99120", &["m0".to_string()][..]));
    assert_eq!((r.references[1].text.as_str(), r.references[1].message_ids.as_slice()), ("100", &["m100".to_string()][..]));
    assert!(cov.used_message_ids.contains(&"m299".to_string()), "latest turn kept");
    assert_eq!(cov.used_message_ids.len() + cov.omitted_message_ids.len(), 300);
    assert!(!r.summary.trim().is_empty());
    let budget = SummarizeConfig::default().prompt_token_budget as u32;
    assert!(r.tokens.unwrap().prompt_tokens < budget + 400, "prompt stays within the budget plus instructions");
}

async fn expect_invalid(req: pb::SummarizeRequest, code: Code, field: &str) {
    let s = fixture_server();
    let err = s.client().await.summarize(req).await.expect_err("must be rejected");
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(field), "message {:?} should name {field}", err.message());
}

#[tokio::test]
async fn bad_input_is_rejected_with_the_field_and_limit() {
    let ok = || thread("bad", &[(Customer, "hello"), (Agent, "hi")]);

    let mut r = ok();
    r.thread = None;
    expect_invalid(r, Code::InvalidArgument, "thread").await;

    let mut r = ok();
    r.thread.as_mut().unwrap().messages.clear();
    expect_invalid(r, Code::InvalidArgument, "thread.messages").await;

    let mut r = ok();
    r.thread.as_mut().unwrap().messages[1].text = "   ".into();
    expect_invalid(r, Code::InvalidArgument, "thread.messages[1].text").await;

    let mut r = ok();
    r.thread.as_mut().unwrap().messages[0].role = pb::Role::Unspecified as i32;
    expect_invalid(r, Code::InvalidArgument, "thread.messages[0].role").await;

    let mut r = ok();
    r.thread.as_mut().unwrap().messages[1].role = 42;
    expect_invalid(r, Code::InvalidArgument, "thread.messages[1].role").await;

    let mut r = ok();
    r.thread.as_mut().unwrap().messages[1].sent_at = Some(Timestamp { seconds: T0 - 3600, nanos: 0 });
    expect_invalid(r, Code::InvalidArgument, "thread.messages[1].sent_at").await;

    let mut r = ok();
    r.thread.as_mut().unwrap().messages[0].sent_at = Some(Timestamp { seconds: 12, nanos: 0 });
    expect_invalid(r, Code::InvalidArgument, "thread.messages[0].sent_at").await;

    let mut r = ok();
    r.thread.as_mut().unwrap().messages[1].sent_at = Some(Timestamp { seconds: 4_000_000_000, nanos: 0 });
    expect_invalid(r, Code::InvalidArgument, "thread.messages[1].sent_at").await;

    let mut r = ok();
    r.language = "xx".into();
    expect_invalid(r, Code::InvalidArgument, "language").await;

    let mut r = ok();
    r.max_words = 5000;
    expect_invalid(r, Code::InvalidArgument, "max_words").await;

    let limits = SummarizeConfig::default().limits;
    let mut r = ok();
    let m = r.thread.as_ref().unwrap().messages[0].clone();
    r.thread.as_mut().unwrap().messages = (0..=limits.max_messages).map(|_| pb::Message { sent_at: None, ..m.clone() }).collect();
    expect_invalid(r, Code::InvalidArgument, "--max-messages").await;

    let mut r = ok();
    r.thread.as_mut().unwrap().messages[0].text = "a".repeat(limits.max_message_chars + 1);
    expect_invalid(r, Code::InvalidArgument, "--max-message-chars").await;

    // Bigger than the gRPC message limit (4 MiB by default).
    let mut r = ok();
    r.thread.as_mut().unwrap().messages[0].text = "a".repeat(5 << 20);
    expect_invalid(r, Code::ResourceExhausted, "--max-request-bytes").await;
}

#[tokio::test]
async fn overload_fails_fast_and_cancellation_frees_the_slot() {
    let s = TestServer::start(
        llm_files(models::FIXTURE_LLM),
        SummarizeConfig::default(),
        ServeOptions { max_concurrent_requests: 1, ..common::default_opts() },
    );
    s.wait_serving().await;
    let req = thread("busy", &[(Customer, "Please write me a very long story about my lost parcel."), (Agent, "Sure.")]);
    // Hold the only slot with a stream that is generating: past the preview,
    // the first text is sent as the request goes to the model.
    let mut client = s.client().await;
    let mut stream = client.summarize_stream(req.clone()).await.expect("stream").into_inner();
    while !matches!(stream.message().await.expect("chunk").expect("a chunk").chunk, Some(Chunk::TextDelta(_))) {}
    let err = s.client().await.summarize(req.clone()).await.expect_err("must be refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-concurrent-requests"), "{}", err.message());
    // The client goes away: its work stops and the slot is free again.
    drop(stream);
    drop(client);
    for _ in 0..1200 {
        if s.llm.stats().cancelled > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(s.llm.stats().cancelled, 1, "the generation must stop when its client goes away");
    let mut freed = false;
    for _ in 0..100 {
        match s.client().await.summarize(req.clone()).await {
            Ok(_) => {
                freed = true;
                break;
            }
            Err(e) if e.code() == Code::ResourceExhausted => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(freed, "the cancelled request kept its slot");
}

#[tokio::test]
async fn background_summaries_have_their_own_slots() {
    let s = TestServer::start(
        llm_files(models::FIXTURE_LLM),
        SummarizeConfig::default(),
        ServeOptions { max_concurrent_requests: 1, max_background_requests: 1, ..common::default_opts() },
    );
    s.wait_serving().await;
    let req = thread("bulk", &[(Customer, "Please write me a very long story about my lost parcel."), (Agent, "Sure.")]);
    let background = pb::SummarizeRequest { priority: pb::Priority::Background as i32, ..req.clone() };
    // A background summary holds the only background slot...
    let mut client = s.client().await;
    let mut stream = client.summarize_stream(background.clone()).await.expect("stream").into_inner();
    stream.message().await.expect("first chunk").expect("chunk");
    let err = s.client().await.summarize(background.clone()).await.expect_err("a second background one must be refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-background-requests"), "{}", err.message());
    // ...but not the agent's: an interactive summary is admitted and answered.
    let r = s.client().await.summarize(req.clone()).await.expect("interactive summary").into_inner();
    assert_eq!(r.thread_id, "bulk");
    drop(stream);
    // An unknown priority names the field.
    let bad = pb::SummarizeRequest { priority: 7, ..req };
    let err = s.client().await.summarize(bad).await.expect_err("unknown priority");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("priority: ") && err.message().contains("BACKGROUND"), "{}", err.message());
}

/// Chunks of a stream: the text after the last restart, and the last response.
async fn collect(stream: &mut tonic::Streaming<pb::SummarizeChunk>) -> (Vec<Chunk>, String, pb::SummarizeResponse) {
    let (mut chunks, mut text, mut last) = (Vec::new(), String::new(), None);
    while let Some(c) = stream.message().await.expect("chunk") {
        let c = c.chunk.expect("a chunk");
        match &c {
            Chunk::TextDelta(t) => text.push_str(t),
            Chunk::Restart(_) => text.clear(),
            Chunk::Response(r) => last = Some(r.clone()),
            Chunk::Preview(_) => {}
        }
        chunks.push(c);
    }
    (chunks, text, last.expect("a response"))
}

#[tokio::test]
async fn an_unchanged_thread_is_answered_from_its_stored_note() {
    let s = TestServer::start(
        llm_files(models::FIXTURE_LLM),
        SummarizeConfig::default(),
        ServeOptions { max_concurrent_requests: 1, ..common::default_opts() },
    );
    s.wait_serving().await;
    let req = thread("note-1", &[(Customer, "My order 7710 arrived late and the box was wet."), (Agent, "Sorry! I logged a complaint.")]);
    let (_, text, first) = collect(&mut s.client().await.summarize_stream(req.clone()).await.expect("stream").into_inner()).await;
    assert!(!first.cached && first.tokens.unwrap().generated_tokens > 0, "{first:?}");
    let done = s.llm.stats().completed;

    let same_note = |r: &pb::SummarizeResponse| {
        assert!(r.cached, "{r:?}");
        let fields = |r: &pb::SummarizeResponse| {
            (r.summary.clone(), r.customer_issue.clone(), r.actions_taken.clone(), r.status, r.next_steps.clone(), r.language.clone())
        };
        assert_eq!(fields(r), fields(&first));
        assert_eq!((&r.references, &r.coverage, &r.model), (&first.references, &first.coverage, &first.model));
        // No model work, and the numbers say so.
        let t = r.tokens.unwrap();
        assert_eq!((t.generated_tokens, t.drafted_tokens), (0, 0), "{t:?}");
        assert_eq!((t.prompt_tokens, t.reused_prompt_tokens), (first.tokens.unwrap().prompt_tokens, t.prompt_tokens));
        let tm = r.timings.unwrap();
        assert_eq!((tm.queue_ms, tm.prompt_ms, tm.generation_ms), (0.0, 0.0, 0.0), "{tm:?}");
        assert!(tm.total_ms < 1000.0, "{tm:?}");
        assert_eq!(r.faithfulness.as_ref().unwrap().attempts, 0);
    };
    let again = s.client().await.summarize(req.clone()).await.expect("summarize").into_inner();
    same_note(&again);
    // A stream gets the preview, the stored text in one piece, the response.
    let stream_hit = |label: &'static str| {
        let (req, text, client) = (req.clone(), text.clone(), s.client());
        async move {
            let (chunks, streamed, last) = collect(&mut client.await.summarize_stream(req).await.expect(label).into_inner()).await;
            assert!(matches!(chunks.as_slice(), [Chunk::Preview(_), Chunk::TextDelta(_), Chunk::Response(_)]), "{label}: {chunks:?}");
            assert_eq!(streamed, text, "{label}");
            last
        }
    };
    same_note(&stream_hit("stream").await);
    assert_eq!(s.llm.stats().completed, done, "the model ran for a stored note");

    // Every request slot taken: the stored note is still served...
    let busy = thread("note-busy", &[(Customer, "Please write me a very long story about my lost parcel."), (Agent, "Sure.")]);
    let mut client = s.client().await;
    let mut holder = client.summarize_stream(busy).await.expect("stream").into_inner();
    while !matches!(holder.message().await.expect("chunk").expect("a chunk").chunk, Some(Chunk::TextDelta(_))) {}
    same_note(&s.client().await.summarize(req.clone()).await.expect("a stored note under overload").into_inner());
    same_note(&stream_hit("stream under overload").await);
    // ...but the thread grown by one message needs the model, and waits its turn.
    let mut grown = req.clone();
    grown.thread.as_mut().unwrap().messages.push(msg(2, Customer, "Any news about 7710?"));
    let err = s.client().await.summarize(grown).await.expect_err("a changed thread is not the stored note");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

/// An agent asks for the thread whose background note is being written: it
/// waits for that note, raised to interactive, instead of a second generation.
#[tokio::test]
async fn a_note_being_written_is_shared_with_the_agent_who_asks() {
    let s = TestServer::start(llm_files(models::FIXTURE_LLM), SummarizeConfig::default(), common::default_opts());
    s.wait_serving().await;
    let req = thread("note-shared", &[(Customer, "My order 7710 arrived late and the box was wet."), (Agent, "Sorry! I logged a complaint.")]);
    let background = pb::SummarizeRequest { priority: pb::Priority::Background as i32, ..req.clone() };
    let mut client = s.client().await;
    let mut writing = client.summarize_stream(background).await.expect("stream").into_inner();
    let opening = loop {
        if let Some(Chunk::TextDelta(t)) = writing.message().await.expect("chunk").expect("a chunk").chunk {
            break t;
        }
    };
    let done = s.llm.stats().completed;
    let (mut agent, waited) = (s.client().await, tokio::spawn(async move { collect(&mut writing).await }));
    let (chunks, text, shared) = collect(&mut agent.summarize_stream(req).await.expect("agent's stream").into_inner()).await;
    let (_, background_text, written) = waited.await.unwrap();
    assert!(matches!(chunks.as_slice(), [Chunk::Preview(_), Chunk::TextDelta(_), Chunk::Response(_)]), "{chunks:?}");
    assert_eq!(text, opening + &background_text);
    assert!(!shared.cached, "written for this request's thread while it waited, not stored before");
    assert_eq!((&shared.summary, &shared.next_steps, &shared.tokens), (&written.summary, &written.next_steps, &written.tokens));
    let attempts = written.faithfulness.as_ref().unwrap().attempts as u64;
    assert_eq!(s.llm.stats().completed, done + attempts, "the background request's generations only");
}

/// Six agents open the same chat at once: one generation serves them all.
#[tokio::test]
async fn concurrent_requests_for_one_thread_share_one_generation() {
    let s = TestServer::start(llm_files(models::FIXTURE_LLM), SummarizeConfig::default(), common::default_opts());
    s.wait_serving().await;
    let req = thread("note-crowd", &[(Customer, "My order 7710 arrived late and the box was wet."), (Agent, "Sorry! I logged a complaint.")]);
    let before = s.llm.stats().completed;
    let mut calls = Vec::new();
    for _ in 0..6 {
        let (mut client, req) = (s.client().await, req.clone());
        calls.push(tokio::spawn(async move { client.summarize(req).await.expect("summarize").into_inner() }));
    }
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    let attempts = answers.iter().map(|a| a.faithfulness.as_ref().unwrap().attempts).max().unwrap() as u64;
    assert_eq!(s.llm.stats().completed - before, attempts, "one writer's generations only");
    for a in &answers {
        assert_eq!((&a.summary, &a.next_steps, a.status), (&answers[0].summary, &answers[0].next_steps, answers[0].status));
    }
}

/// ForgetThread drops the stored note and the cached prompt and answer, also
/// of a summary being written when it comes.
#[tokio::test]
async fn a_forgotten_thread_keeps_nothing() {
    let s = TestServer::start(llm_files(models::FIXTURE_LLM), SummarizeConfig::default(), common::default_opts());
    s.wait_serving().await;
    let exact = palaver::llm::prompt_rows_exact(&candle_core::Device::Cpu);
    let req = thread("forget-1", &[(Customer, "My order 7710 arrived late and the box was wet."), (Agent, "Sorry! I logged a complaint.")]);
    let forget = |id: &str| {
        let (client, id) = (s.client(), id.to_string());
        async move { client.await.forget_thread(pb::ForgetThreadRequest { thread_id: id }).await.map(|r| r.into_inner()) }
    };
    s.client().await.summarize(req.clone()).await.expect("summarize");
    assert!(s.client().await.summarize(req.clone()).await.expect("summarize").into_inner().cached);
    let f = forget("forget-1").await.expect("forget");
    assert_eq!((f.note_forgotten, f.prompt_forgotten), (true, exact));
    // Asked again: no note, and no prompt to reuse (the only one cached was this thread's).
    let after = s.client().await.summarize(req.clone()).await.expect("summarize").into_inner();
    assert!(!after.cached);
    assert_eq!(after.tokens.unwrap().reused_prompt_tokens, 0);
    let f = forget("never-seen").await.expect("forget");
    assert_eq!((f.note_forgotten, f.prompt_forgotten), (false, false));
    let err = forget("").await.expect_err("no thread id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("thread_id: "), "{}", err.message());

    // Forgotten while its summary is written (its prompt read and cached, its
    // answer under way): the summary is answered, nothing of it is kept.
    let long = thread("forget-2", &[(Customer, "Please write me a very long story about my lost parcel."), (Agent, "Sure.")]);
    let mut client = s.client().await;
    let mut stream = client.summarize_stream(long.clone()).await.expect("stream").into_inner();
    let mut deltas = 0;
    while deltas < 2 {
        deltas += usize::from(matches!(stream.message().await.expect("chunk").expect("a chunk").chunk, Some(Chunk::TextDelta(_))));
    }
    let f = forget("forget-2").await.expect("forget");
    assert_eq!(f.prompt_forgotten, exact, "the prompt was read and cached before the first answer token");
    let (_, _, written) = collect(&mut stream).await;
    assert!(!written.summary.is_empty());
    let after = s.client().await.summarize(long).await.expect("summarize").into_inner();
    assert!(!after.cached, "the note written while forgetting was not stored");
    // Its kept prompt would lend all but the last token; the instructions
    // before the transcript still come from forget-1's prompt.
    let t = after.tokens.unwrap();
    assert!(t.reused_prompt_tokens + 30 < t.prompt_tokens, "{t:?}");
}

#[tokio::test]
async fn same_thread_gives_the_same_summary() {
    // Stored notes off: the second call runs the model.
    let cfg = SummarizeConfig { note_cache_bytes: 0, ..SummarizeConfig::default() };
    let s = TestServer::start(llm_files(models::FIXTURE_LLM), cfg, common::default_opts());
    s.wait_serving().await;
    let req = thread("det-1", &[(Customer, "My order 7710 arrived late and the box was wet."), (Agent, "Sorry! I logged a complaint.")]);
    let a = s.client().await.summarize(req.clone()).await.expect("summarize").into_inner();
    let b = s.client().await.summarize(req).await.expect("summarize").into_inner();
    assert!(!b.cached);
    assert_eq!(a.summary, b.summary);
    assert_eq!(a.next_steps, b.next_steps);
    let (ta, tb) = (a.tokens.unwrap(), b.tokens.unwrap());
    assert_eq!((ta.prompt_tokens, ta.generated_tokens), (tb.prompt_tokens, tb.generated_tokens));
    // Where reuse is exact it is on by default: the second call reads the
    // cached prompt instead of the model, yet answers the same. (The first
    // may reuse too: a regenerated answer shares its first attempt's prefix.)
    if palaver::llm::prompt_rows_exact(&candle_core::Device::Cpu) {
        assert!(tb.reused_prompt_tokens > 0 && tb.reused_prompt_tokens < tb.prompt_tokens, "{tb:?}");
        // The first answer, kept for the thread, was checked as a draft with
        // the prompt's last token (`--prefill-draft`, 64 tokens by default):
        // all of its opening came with that one pass.
        assert!(tb.drafted_tokens >= tb.generated_tokens.min(64), "{tb:?}");
    }
}

#[tokio::test]
async fn a_new_thread_reads_only_its_transcript() {
    if !palaver::llm::prompt_rows_exact(&candle_core::Device::Cpu) {
        return; // reuse is off where it would not be exact
    }
    let s = fixture_server();
    s.wait_serving().await;
    let a = thread("share-a", &[(Customer, "My order 7710 arrived late and the box was wet."), (Agent, "Sorry! I logged a complaint.")]);
    let b = thread("share-b", &[(Customer, "I was charged twice for plan PLN-3301."), (Agent, "I see both payments.")]);
    s.client().await.summarize(a).await.expect("summarize");
    let t = s.client().await.summarize(b).await.expect("summarize").into_inner().tokens.unwrap();
    // The instructions before the transcript (some 200 tokens) come from the
    // first thread's cache; the second thread's own words never do.
    assert!(t.reused_prompt_tokens > 150, "{t:?}");
    assert!(t.prompt_tokens - t.reused_prompt_tokens > 20, "{t:?}");
}

#[tokio::test]
async fn a_passed_deadline_stops_the_generation() {
    let cfg = SummarizeConfig { max_new_tokens: 2000, ..Default::default() };
    let s = TestServer::start(llm_files(models::FIXTURE_LLM), cfg, common::default_opts());
    s.wait_serving().await;
    let long: String = (0..60).map(|i| format!("Line {i} of my complaint about the parcel. ")).collect();
    let mut req = tonic::Request::new(thread("deadline", &[(Customer, long.as_str()), (Agent, "We are looking into it.")]));
    req.set_timeout(std::time::Duration::from_millis(300));
    let err = s.client().await.summarize(req).await.expect_err("deadline passes first");
    assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled), "{err:?}");
    // The model notices between tokens, after its prompt: on 2 cores shared
    // with the other tests' 1.5B generations that prompt alone can take over
    // a minute, so wait for the outcome rather than for a fixed time.
    for _ in 0..12_000 {
        let st = s.llm.stats();
        if st.cancelled + st.completed + st.failed > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let st = s.llm.stats();
    assert_eq!((st.cancelled, st.completed), (1, 0), "the model must drop the request, not finish it: {st:?}");
}
