use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use palaver::config::{EncoderArgs, IntentArgs, ModelArgs, ServeArgs, SummarizeArgs};
use palaver::eval::intent as intent_eval;
use palaver::intent::head::Head;
use palaver::intent::taxonomy::Taxonomy;
use palaver::intent::TrainingSet;
use palaver::eval::{check_note, rouge, LabelledThread, TweetSummDialog};
use palaver::llm::{LlmHandle, ModelState};
use palaver::models::{self, Manifest};
use palaver::server::{self, ServeOptions};
use palaver::summarize::{faithful, Summarizer};
use std::io::Read;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "palaver", version, about = "Agent-assist engine: multilingual thread summaries over gRPC, on local models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare the models (first run only) and serve gRPC.
    Serve(Box<ServeArgs>),
    /// Download, verify and prepare models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Summarise a JSON thread file (or - for stdin) in-process and print JSON.
    Summarize {
        /// Thread JSON: {"thread_id", "language", "max_words", "messages": [{"id", "role", "sent_at", "text", "channel"}]}
        file: String,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        summarize: SummarizeArgs,
    },
    /// Build taxonomy TOML files.
    Taxonomy {
        #[command(subcommand)]
        command: TaxonomyCommand,
    },
    /// Score every contact of an events file (CSV, JSONL or Parquet): best
    /// window, next good moment, messaging window and engagement score.
    Score {
        /// Events: columns contact_id, type, occurred_at (RFC 3339 or unix
        /// seconds), channel, message_id, and optionally time_zone, country, phone.
        #[arg(long)]
        events: PathBuf,
        /// Scores: .csv or .jsonl. Written to a temporary file and renamed into
        /// place only when the job succeeds.
        #[arg(long)]
        out: PathBuf,
        /// Override the input format guessed from the extension.
        #[arg(long, value_parser = parse_format)]
        format: Option<palaver::sendtime::file::Format>,
        /// The moment scores are for (RFC 3339); default: now.
        #[arg(long)]
        now: Option<String>,
        /// How far ahead the next good moment may be, in hours.
        #[arg(long, default_value_t = 168)]
        horizon_hours: u32,
        /// Channel of the message to send (decides the messaging window); default:
        /// the one each contact last wrote on.
        #[arg(long, default_value = "")]
        channel: String,
        /// What a broken row does: skip it (reported with its row number) or stop.
        #[arg(long, value_enum, default_value = "skip")]
        on_error: palaver::sendtime::batch::OnError,
        /// The input lists each contact's rows together: memory stays bounded
        /// instead of growing with the number of contacts.
        #[arg(long)]
        grouped: bool,
        #[command(flatten)]
        engagement: palaver::config::EngagementArgs,
    },
    /// Quality evaluations on public data.
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Fetch and prepare models (all known models when none is named).
    Fetch {
        names: Vec<String>,
        /// Prepare again even if the cache verifies.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// List known models and whether each is prepared and intact.
    List {
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(Subcommand)]
enum TaxonomyCommand {
    /// A taxonomy from a labelled training split, k examples per intent, on stdout.
    Build {
        /// CSV (text|utterance, label|intent), JSONL ({"text", "label"}) or a JSON object of splits.
        #[arg(long)]
        data: PathBuf,
        /// JSON keys to read, comma-separated (CLINC150: `train`).
        #[arg(long)]
        split: Option<String>,
        /// Examples per intent, the first k in file order; all when absent.
        #[arg(long)]
        k: Option<usize>,
        /// Out-of-scope rows to keep as "none of these" examples.
        #[arg(long, default_value_t = 0)]
        oos_examples: usize,
        #[arg(long, default_value = "oos")]
        oos_label: String,
        #[arg(long, default_value = "evaluation")]
        name: String,
    },
}

fn parse_format(s: &str) -> Result<palaver::sendtime::file::Format, String> {
    palaver::sendtime::file::Format::of(std::path::Path::new(&format!("x.{s}"))).ok_or_else(|| format!("{s}: expected csv, jsonl or parquet"))
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Backtest send windows: fit each customer on earlier activity, score the
    /// share of later activity inside the top-1 and top-3 windows, against a
    /// global best hour and the customer's own most frequent hour.
    SendTime {
        /// twcs-format CSV (tweet_id, author_id, inbound, created_at, in_response_to_tweet_id).
        #[arg(long)]
        twcs: Option<PathBuf>,
        /// IBM customer-care threads JSON (dialogContent with client/agent turns).
        #[arg(long)]
        ibm: Option<PathBuf>,
        /// Customers need at least this many messages of their own.
        #[arg(long, default_value_t = 3)]
        min_activity: usize,
        /// Share of each customer's activity used to fit; the rest is scored.
        #[arg(long, default_value_t = 0.5)]
        train_share: f64,
        #[command(flatten)]
        engagement: palaver::config::EngagementArgs,
    },
    /// Accuracy, macro-F1, out-of-scope precision/recall and confusions of a taxonomy on labelled data.
    Intent {
        /// Taxonomy TOML (see `palaver taxonomy build`).
        #[arg(long)]
        taxonomy: PathBuf,
        /// Labelled messages: CSV, JSONL or a JSON object of splits.
        #[arg(long)]
        data: PathBuf,
        /// JSON keys to read, comma-separated (CLINC150: `test,oos_test`).
        #[arg(long)]
        split: Option<String>,
        /// Label of out-of-scope rows.
        #[arg(long, default_value = "oos")]
        oos_label: String,
        /// Skip evaluation rows whose text is one of the taxonomy's examples.
        #[arg(long)]
        drop_seen: bool,
        /// Rename a label of the data, FROM=TO (datasets that spell one intent two ways). Repeatable.
        #[arg(long, value_parser = parse_rename)]
        rename: Vec<(String, String)>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        encoder: EncoderArgs,
        #[command(flatten)]
        intent: IntentArgs,
    },
    /// ROUGE-1/2/L of `summary` against TweetSumm's human summaries, and invented facts.
    Summaries {
        /// TweetSumm JSONL (conversation_id, abstractive_summaries, turns_exact).
        #[arg(long, default_value = "../shared/data/summaries/tweetsumm_train.jsonl")]
        data: PathBuf,
        /// Dialogs to evaluate (the first N).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        summarize: SummarizeArgs,
    },
    /// Per language: is the note in the thread's language, complete, does it keep the key id, and did
    /// the first answer pass the faithfulness check.
    Languages {
        #[arg(long, default_value = "tests/data/multilingual_threads.jsonl")]
        data: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        summarize: SummarizeArgs,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    palaver::cpu::keep_freed_memory();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(*args)),
        Command::Models { command: ModelsCommand::Fetch { names, force, model } } => {
            let manifest = Manifest::embedded()?;
            let names: Vec<&str> = if names.is_empty() {
                manifest.models.iter().map(|m| m.name.as_str()).collect()
            } else {
                names.iter().map(String::as_str).collect()
            };
            let opts = models::FetchOptions { force, ..model.fetch_options() };
            models::fetch_models(&names, &opts)?;
            Ok(())
        }
        Command::Models { command: ModelsCommand::List { model } } => {
            for m in Manifest::embedded()?.models {
                let dir = models::model_dir(&model.models_dir, &m.name);
                let state = if models::verify_prepared(&dir).is_ok() { "ready" } else { "not prepared" };
                println!("{:<30} {:<8} {:<12} {:<14} {}", m.name, m.kind, m.license, state, m.description);
            }
            Ok(())
        }
        Command::Summarize { file, model, summarize } => rt.block_on(summarize_file(file, model, summarize)),
        Command::Taxonomy { command: TaxonomyCommand::Build { data, split, k, oos_examples, oos_label, name } } => {
            let rows = intent_eval::load_labelled(&data, split.as_deref(), &oos_label)?;
            print!("{}", intent_eval::build_taxonomy(&name, &rows, k, oos_examples).to_toml());
            Ok(())
        }
        Command::Eval { command: EvalCommand::Intent { taxonomy, data, split, oos_label, drop_seen, rename, model, encoder, intent } } => {
            rt.block_on(eval_intent(taxonomy, data, split, oos_label, drop_seen, rename, model, encoder, intent))
        }
        Command::Score { events, out, format, now, horizon_hours, channel, on_error, grouped, engagement } => {
            score(events, out, format, now, horizon_hours, channel, on_error, grouped, engagement)
        }
        Command::Eval { command: EvalCommand::SendTime { twcs, ibm, min_activity, train_share, engagement } } => {
            let mut h = palaver::eval::sendtime::Histories::new();
            if let Some(p) = &twcs {
                palaver::eval::sendtime::load_twcs(p, &mut h).map_err(anyhow::Error::msg)?;
            }
            if let Some(p) = &ibm {
                palaver::eval::sendtime::load_ibm(p, &mut h).map_err(anyhow::Error::msg)?;
            }
            anyhow::ensure!(!h.is_empty(), "give --twcs and/or --ibm");
            palaver::eval::sendtime::backtest(&h, min_activity, train_share, &engagement.config().model).print();
            Ok(())
        }
        Command::Eval { command: EvalCommand::Summaries { data, limit, model, summarize } } => {
            rt.block_on(eval_summaries(data, limit, model, summarize))
        }
        Command::Eval { command: EvalCommand::Languages { data, model, summarize } } => {
            rt.block_on(eval_languages(data, model, summarize))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn score(
    events: PathBuf,
    out: PathBuf,
    format: Option<palaver::sendtime::file::Format>,
    now: Option<String>,
    horizon_hours: u32,
    channel: String,
    on_error: palaver::sendtime::batch::OnError,
    grouped: bool,
    engagement: palaver::config::EngagementArgs,
) -> Result<()> {
    use palaver::sendtime::{batch, events::parse_time, file::Format};
    let format = format.or_else(|| Format::of(&events)).with_context(|| format!("{}: unknown format; pass --format", events.display()))?;
    let now = match now {
        Some(s) => parse_time(&s).with_context(|| format!("--now: {s:?} is not RFC 3339"))?,
        None => palaver::sendtime::events::now_secs(),
    };
    let cfg = engagement.config();
    let horizon = horizon_hours as i64 * 3600;
    palaver::sendtime::validate_horizon(horizon, cfg.max_horizon_secs, "--horizon-hours")?;
    let channel = palaver::sendtime::events::Channel::parse(&channel).with_context(|| format!("--channel: unknown channel {channel:?}"))?;
    let job = batch::ScoreJob {
        events,
        format,
        out: out.clone(),
        now,
        horizon_secs: horizon,
        channel,
        quiet: cfg.quiet_hours,
        default_tz: cfg.default_tz,
        model: cfg.model,
        on_error,
        grouped,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let t = std::time::Instant::now();
    let s = batch::score_file(&job)?;
    for e in &s.errors {
        eprintln!("skipped {e}");
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "{} contacts from {} rows ({} skipped) in {secs:.1} s: {:.0} contacts/s, {:.0} rows/s -> {}",
        s.contacts,
        s.rows,
        s.bad_rows,
        s.contacts as f64 / secs,
        s.rows as f64 / secs,
        out.display()
    );
    Ok(())
}

async fn load(model: &ModelArgs, summarize: &SummarizeArgs) -> Result<Summarizer> {
    model.init_threads();
    let m = model.clone();
    let files = tokio::task::spawn_blocking(move || m.summarizer_files()).await??;
    let device = model.device()?;
    tracing::info!(device = ?device, "summarizer device");
    let llm = LlmHandle::spawn(files, device, summarize.llm_options())?;
    Ok(Summarizer::new(llm, summarize.config()))
}

async fn serve(args: ServeArgs) -> Result<()> {
    use palaver::config::Service;
    let engagement = if args.services.contains(&Service::Engagement) {
        let store = palaver::sendtime::store::RedbStore::open(&args.engagement.engagement_db)?;
        Some(palaver::sendtime::Engagement::open(std::sync::Arc::new(store), args.engagement.config())?)
    } else {
        None
    };
    let mut startup = Vec::new();
    let assist = if args.services.contains(&Service::Assist) {
        // Bad taxonomy files fail the start, not the first request.
        startup = palaver::intent::taxonomy::load_paths(&args.intent.taxonomies)?;
        let limits = args.intent.config().limits;
        for t in &startup {
            t.clone().normalise_and_validate(&limits).with_context(|| format!("taxonomy `{}`", t.name))?;
        }
        let summarizer = load(&args.model, &args.summarize).await?;
        let (m, e) = (args.model.clone(), args.encoder.clone());
        let encoder = tokio::task::spawn_blocking(move || e.spawn(&m)).await?.map_err(|e| anyhow::anyhow!(e))?;
        let store = palaver::intent::store::DirStore::open(&args.intent.taxonomy_store)?;
        Some((summarizer, palaver::intent::Intents::new(encoder, Box::new(store), args.intent.config())))
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("binding {}", args.addr))?;
    if let Some(addr) = args.metrics_addr.0 {
        let metrics = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding --metrics-addr {addr} (`off` disables it)"))?;
        tracing::info!(%addr, "metrics at GET /metrics");
        tokio::spawn(server::metrics::serve_metrics(metrics, std::future::pending()));
    }
    let opts = ServeOptions {
        max_concurrent_requests: args.max_concurrent_requests,
        max_background_requests: args.max_background_requests,
        max_request_bytes: args.max_request_bytes,
        startup_taxonomies: startup,
    };
    // Drain on Ctrl-C or SIGTERM (what systemd, Docker and Kubernetes send):
    // stop accepting, let admitted requests finish, release the store.
    let shutdown = async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    };
    server::serve(listener, server::Services { assist, engagement }, opts, shutdown).await?;
    Ok(())
}

async fn summarize_file(file: String, model: ModelArgs, summarize: SummarizeArgs) -> Result<()> {
    let mut text = String::new();
    if file == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    }
    let thread: palaver::cli::ThreadJson = serde_json::from_str(&text).context("parsing the thread JSON")?;
    let req = thread.into_request().map_err(anyhow::Error::msg)?;
    let input = server::to_input(req)?;
    let summarizer = load(&model, &summarize).await?;
    summarizer.validate(&input)?;
    if let ModelState::Failed(e) = summarizer.llm().wait_loaded().await {
        bail!("model failed to load: {e}");
    }
    let summary = summarizer.summarize(input, None).await?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

async fn eval_summaries(data: PathBuf, limit: usize, model: ModelArgs, summarize: SummarizeArgs) -> Result<()> {
    let text = std::fs::read_to_string(&data).with_context(|| format!("reading {}", data.display()))?;
    let dialogs: Vec<TweetSummDialog> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str::<TweetSummDialog>)
        .collect::<Result<Vec<_>, _>>()
        .context("parsing TweetSumm JSONL")?
        .into_iter()
        .filter(TweetSummDialog::usable)
        .take(limit)
        .collect();
    let summarizer = load(&model, &summarize).await?;
    if let ModelState::Failed(e) = summarizer.llm().wait_loaded().await {
        bail!("model failed to load: {e}");
    }
    let (mut r1, mut r2, mut rl) = (0.0, 0.0, 0.0);
    let (mut flagged, mut removed, mut regenerated, mut english) = (0usize, 0usize, 0usize, 0usize);
    let (mut prompt_ms, mut gen_ms, mut prompt_tok, mut gen_tok) = (0.0, 0.0, 0usize, 0usize);
    for (i, d) in dialogs.iter().enumerate() {
        let input = d.to_input();
        let support = faithful::Support::from_texts(input.thread.messages.iter().map(|m| m.text.as_str()));
        let s = summarizer.summarize(input, None).await?;
        let (a, b, c) = rouge(&s.note.summary, d.abstractive_summaries.as_deref().unwrap_or_default());
        r1 += a;
        r2 += b;
        rl += c;
        flagged += usize::from(!s.faithfulness.passed_first_time);
        regenerated += usize::from(s.faithfulness.regenerated);
        removed += s.faithfulness.removed_facts.len();
        english += usize::from(s.language.tag == "en");
        debug_assert!(faithful::extract(&s.note.summary).iter().all(|f| support.supports(f)));
        prompt_ms += s.timings.prompt_ms;
        gen_ms += s.timings.generation_ms;
        prompt_tok += s.timings.prompt_tokens;
        gen_tok += s.timings.generated_tokens;
        eprintln!("[{}/{}] R1 {:.1} R2 {:.1} RL {:.1}  {}", i + 1, dialogs.len(), a * 100.0, b * 100.0, c * 100.0, s.note.summary);
    }
    let n = dialogs.len().max(1) as f64;
    println!("dialogs: {}", dialogs.len());
    println!("model: {}", summarizer.llm().id());
    println!("ROUGE-1/2/L F1 (summary field, best over references): {:.1} / {:.1} / {:.1}", r1 / n * 100.0, r2 / n * 100.0, rl / n * 100.0);
    println!("first answers with a fact absent from the thread: {flagged}; regenerated: {regenerated}; facts removed from final answers: {removed}");
    println!("language detected as English: {english}/{}", dialogs.len());
    println!(
        "prompt {:.1} tokens/s, generation {:.1} tokens/s (means over the run)",
        prompt_tok as f64 * 1e3 / prompt_ms.max(1.0),
        gen_tok as f64 * 1e3 / gen_ms.max(1.0)
    );
    Ok(())
}

async fn eval_languages(data: PathBuf, model: ModelArgs, summarize: SummarizeArgs) -> Result<()> {
    let text = std::fs::read_to_string(&data).with_context(|| format!("reading {}", data.display()))?;
    let threads: Vec<LabelledThread> =
        text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let summarizer = load(&model, &summarize).await?;
    if let ModelState::Failed(e) = summarizer.llm().wait_loaded().await {
        bail!("model failed to load: {e}");
    }
    println!("model: {}", summarizer.llm().id());
    println!("| thread | language | in language | complete | keeps `{{id}}` | `{{id}}` in references | status (expected) | first answer faithful | seconds |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut totals = [0usize; 6];
    let n = threads.len();
    for t in threads {
        let input = server::to_input(t.request().map_err(anyhow::Error::msg)?)?;
        let s = summarizer.summarize(input, None).await?;
        let c = check_note(&s, &t);
        let yes = |b: bool| if b { "yes" } else { "NO" };
        let checks = [c.in_language, c.complete, c.kept, c.referenced, c.status_right, c.passed_first_time];
        for (total, b) in totals.iter_mut().zip(checks) {
            *total += usize::from(b);
        }
        println!(
            "| {} | {} | {} | {} | {} (`{}`) | {} | {} {} ({}) | {} | {:.0} |",
            t.thread_id,
            t.expected_language,
            yes(c.in_language),
            yes(c.complete),
            yes(c.kept),
            t.must_keep,
            yes(c.referenced),
            yes(c.status_right),
            c.status,
            t.expected_status,
            yes(c.passed_first_time),
            s.timings.total_ms / 1e3
        );
        eprintln!("{}: {}", t.thread_id, serde_json::to_string(&s.note)?);
    }
    let all: Vec<String> = totals.iter().map(|t| format!("{t}/{n}")).collect();
    println!("| all | | {} | {} | {} | {} | {} | {} | |", all[0], all[1], all[2], all[3], all[4], all[5]);
    Ok(())
}

/// Embeds what is not cached yet, in chunks so progress shows and a crash keeps what was done.
async fn embed_cached(
    enc: &palaver::encoder::EncoderHandle,
    cache: &mut intent_eval::EmbeddingCache,
    texts: &[String],
) -> Result<Vec<Vec<f32>>> {
    let mut missing: Vec<String> = texts.iter().filter(|t| cache.get(t).is_none()).cloned().collect();
    missing.sort();
    missing.dedup();
    let started = std::time::Instant::now();
    for (i, chunk) in missing.chunks(512).enumerate() {
        let (encoded, _) = enc.encode(chunk.to_vec()).await?;
        cache.insert_all(chunk.iter().cloned().zip(encoded.into_iter().map(|e| e.embedding)).collect())?;
        let done = (i * 512 + chunk.len()) as f64;
        eprintln!("embedded {done}/{} ({:.0} messages/s)", missing.len(), done / started.elapsed().as_secs_f64());
    }
    Ok(texts.iter().map(|t| cache.get(t).expect("embedded above").clone()).collect())
}

#[allow(clippy::too_many_arguments)]
async fn eval_intent(
    taxonomy: PathBuf,
    data: PathBuf,
    split: Option<String>,
    oos_label: String,
    drop_seen: bool,
    rename: Vec<(String, String)>,
    model: ModelArgs,
    encoder: EncoderArgs,
    intent: IntentArgs,
) -> Result<()> {
    model.init_threads();
    let tax = Taxonomy::from_file(&taxonomy)?.normalise_and_validate(&intent.config().limits)?;
    let mut rows = intent_eval::load_labelled(&data, split.as_deref(), &oos_label)?;
    for r in rows.iter_mut() {
        if let Some((_, to)) = rename.iter().find(|(from, _)| r.label.as_deref() == Some(from.as_str())) {
            r.label = Some(to.clone());
        }
    }
    let set = TrainingSet::of(&tax);
    if drop_seen {
        let seen: std::collections::HashSet<&String> = set.texts.iter().collect();
        let before = rows.len();
        rows.retain(|r| !seen.contains(&r.text));
        eprintln!("dropped {} evaluation rows that are taxonomy examples", before - rows.len());
    }
    let labels: std::collections::HashSet<&str> = tax.intents.iter().map(|i| i.label.as_str()).collect();
    if let Some(r) = rows.iter().find(|r| r.label.as_deref().is_some_and(|l| !labels.contains(l))) {
        bail!("{}: label `{}` is not an intent of taxonomy `{}`", data.display(), r.label.as_deref().unwrap_or_default(), tax.name);
    }
    let (m, e) = (model.clone(), encoder.clone());
    let enc = tokio::task::spawn_blocking(move || e.spawn(&m)).await?.map_err(|e| anyhow::anyhow!(e))?;
    if let ModelState::Failed(e) = enc.wait_loaded().await {
        bail!("encoder failed to load: {e}");
    }
    let mut cache = intent_eval::EmbeddingCache::open(&model.models_dir.join("..").join("embeddings"), enc.id())?;
    let train_x = embed_cached(&enc, &mut cache, &set.texts).await?;
    let test_texts: Vec<String> = rows.iter().map(|r| r.text.clone()).collect();
    let test_x = embed_cached(&enc, &mut cache, &test_texts).await?;
    let opts = intent.config().train;
    let started = std::time::Instant::now();
    let head = Head::train(&train_x, &set.y, set.labels, set.has_none, opts);
    let truth: Vec<Option<String>> = rows.into_iter().map(|r| r.label).collect();
    println!("taxonomy {} ({} intents, {} examples, out-of-scope examples: {})", tax.name, tax.intents.len(), set.y.len(), tax.out_of_scope.len());
    println!(
        "encoder {}; head trained in {:.2} s: cross-validated accuracy {:.2}%, alpha {}, temperature {:.4}, threshold {:.3} (quantile {})",
        enc.id(), started.elapsed().as_secs_f64(), 100.0 * head.cv_accuracy.unwrap_or(f32::NAN), head.alpha, head.temperature, head.threshold, opts.oos_quantile
    );
    print!("{}", intent_eval::evaluate(&head, &test_x, &truth));
    Ok(())
}

fn parse_rename(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| format!("`{s}`: expected FROM=TO"))
}
