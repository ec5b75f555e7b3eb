//! Models from the Hugging Face hub, for real users: `hf:ORG/REPO/FILE.gguf`.
//! Offline mode reads only the local hub cache (the layout `huggingface-cli`
//! writes), which is also how this path is tested without a network.

use super::{LlmFiles, ModelsError, Result, TOKENIZER_JSON};
use hf_hub::{api::sync::ApiBuilder, Cache};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Never touch the network; fail if the files are not cached.
    pub offline: bool,
    /// Hub cache directory; default `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
}

/// Splits `ORG/REPO/FILE` (FILE may contain `/`).
fn split_ref(hub_ref: &str) -> Result<(String, String)> {
    let mut it = hub_ref.splitn(3, '/');
    match (it.next(), it.next(), it.next()) {
        (Some(org), Some(repo), Some(file)) if !org.is_empty() && !repo.is_empty() && file.ends_with(".gguf") => {
            Ok((format!("{org}/{repo}"), file.to_string()))
        }
        _ => Err(ModelsError::Hub(format!(
            "`hf:{hub_ref}` is not of the form hf:ORG/REPO/FILE.gguf"
        ))),
    }
}

pub fn resolve_hub(hub_ref: &str, opts: &HubOptions, derived_dir: &Path) -> Result<LlmFiles> {
    let (repo, file) = split_ref(hub_ref)?;
    let cache = match &opts.cache_dir {
        Some(d) => Cache::new(d.clone()),
        None => Cache::from_env(),
    };
    let fetch = |name: &str| -> Result<PathBuf> {
        if let Some(p) = cache.model(repo.clone()).get(name) {
            return Ok(p);
        }
        if opts.offline {
            return Err(ModelsError::Hub(format!(
                "{repo}/{name} is not in the hub cache {} and offline mode is on",
                cache.path().display()
            )));
        }
        let api = ApiBuilder::from_cache(cache.clone())
            .build()
            .map_err(|e| ModelsError::Hub(e.to_string()))?;
        api.model(repo.clone()).get(name).map_err(|e| ModelsError::Hub(format!("{repo}/{name}: {e}")))
    };
    let gguf = fetch(&file)?;
    // GGUF repos rarely carry tokenizer.json: build it from the file's metadata
    // once, next to palaver's own prepared models.
    let tokenizer = match fetch(TOKENIZER_JSON) {
        Ok(p) => p,
        Err(_) => {
            let dir = derived_dir.join("hub").join(repo.replace('/', "--"));
            std::fs::create_dir_all(&dir).map_err(super::io_err(&dir))?;
            let out = dir.join(TOKENIZER_JSON);
            if !out.is_file() {
                super::prepare::tokenizer_from_gguf(&gguf, &out)
                    .map_err(|e| ModelsError::Hub(format!("tokenizer from {}: {e}", gguf.display())))?;
            }
            out
        }
    };
    Ok(LlmFiles { id: format!("hf:{hub_ref}"), gguf, tokenizer })
}
