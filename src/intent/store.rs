//! Where registered taxonomies and their trained heads live across restarts.
//!
//! `DirStore` keeps one JSON file per taxonomy in a folder. A write goes to a
//! temporary file that is fsynced, then renamed over the old one, then the
//! folder is fsynced: a crash at any point leaves either the old taxonomy or
//! the new one, never a mix. A file that fails to parse (a disk fault, a hand
//! edit) is reported and set aside rather than taking the server down.

use super::head::Head;
use super::taxonomy::Taxonomy;
use super::IntentError;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A registered taxonomy with the head trained on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub taxonomy: Taxonomy,
    pub content_hash: String,
    /// The encoder the head was trained on; another encoder means retraining.
    pub encoder: String,
    pub head: Head,
    /// Unix seconds.
    pub registered_at: i64,
}

/// Storage of taxonomies; small so another backend can replace it.
pub trait TaxonomyStore: Send + Sync {
    /// Everything stored, plus a message for each entry that could not be read.
    fn load_all(&self) -> Result<(Vec<Stored>, Vec<String>), IntentError>;
    /// Durable when it returns.
    fn put(&self, s: &Stored) -> Result<(), IntentError>;
    /// Whether there was something to delete.
    fn delete(&self, name: &str) -> Result<bool, IntentError>;
}

pub struct DirStore {
    dir: PathBuf,
}

const EXT: &str = "taxonomy.json";

fn store_err(path: &Path, e: impl std::fmt::Display) -> IntentError {
    IntentError::Store(format!("{}: {e}", path.display()))
}

impl DirStore {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, IntentError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| store_err(&dir, e))?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.{EXT}"))
    }

    fn sync_dir(&self) -> Result<(), IntentError> {
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| store_err(&self.dir, e))
    }
}

impl TaxonomyStore for DirStore {
    fn load_all(&self) -> Result<(Vec<Stored>, Vec<String>), IntentError> {
        let mut out = Vec::new();
        let mut problems = Vec::new();
        let mut entries: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map_err(|e| store_err(&self.dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // Left by a crash mid-write: the rename never happened, the old file stands.
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(EXT) {
                continue;
            }
            match fs::read(&path).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice::<Stored>(&b).map_err(|e| e.to_string())) {
                Ok(s) if s.content_hash == s.taxonomy.content_hash() => out.push(s),
                Ok(_) => problems.push(format!("{}: content does not match its hash; ignored", path.display())),
                Err(e) => problems.push(format!("{}: unreadable ({e}); ignored", path.display())),
            }
        }
        Ok((out, problems))
    }

    fn put(&self, s: &Stored) -> Result<(), IntentError> {
        let path = self.path(&s.taxonomy.name);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(s).map_err(|e| store_err(&path, e))?;
        let mut f = File::create(&tmp).map_err(|e| store_err(&tmp, e))?;
        f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(|e| store_err(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| store_err(&path, e))?;
        self.sync_dir()
    }

    fn delete(&self, name: &str) -> Result<bool, IntentError> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.sync_dir()?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(store_err(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::head::TrainOptions;
    use crate::intent::taxonomy::Intent;

    fn stored(name: &str) -> Stored {
        let taxonomy = Taxonomy {
            name: name.into(),
            version: "1".into(),
            description: String::new(),
            intents: vec![Intent { label: "a".into(), description: String::new(), examples: vec!["x".into()] }],
            out_of_scope: vec![],
        };
        let head = Head::train(&[vec![1.0, 0.0], vec![0.0, 1.0]], &[0, 1], vec!["a".into(), "b".into()], false, TrainOptions::default());
        Stored { content_hash: taxonomy.content_hash(), taxonomy, encoder: "e".into(), head, registered_at: 0 }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("palaver-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn put_load_delete_round_trip() {
        let dir = tmpdir("rt");
        let store = DirStore::open(&dir).unwrap();
        store.put(&stored("shop")).unwrap();
        store.put(&stored("bank")).unwrap();
        let (all, problems) = DirStore::open(&dir).unwrap().load_all().unwrap();
        assert!(problems.is_empty());
        assert_eq!(all.iter().map(|s| s.taxonomy.name.as_str()).collect::<Vec<_>>(), ["bank", "shop"]);
        assert!(store.delete("shop").unwrap());
        assert!(!store.delete("shop").unwrap());
        assert_eq!(store.load_all().unwrap().0.len(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn interrupted_write_keeps_the_old_taxonomy_and_corruption_is_reported() {
        let dir = tmpdir("crash");
        let store = DirStore::open(&dir).unwrap();
        store.put(&stored("shop")).unwrap();
        // A crash after writing part of the temporary file, before the rename.
        fs::write(dir.join("shop.taxonomy.json.tmp"), b"{\"taxonomy\": {\"na").unwrap();
        // And a file damaged on disk.
        fs::write(dir.join("bank.taxonomy.json"), b"{not json").unwrap();
        let (all, problems) = store.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].taxonomy.name, "shop");
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("bank.taxonomy.json"));
        assert!(!dir.join("shop.taxonomy.json.tmp").exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
