//! Where profiles live. The engine talks to a small interface so that a
//! server-backed store can replace the embedded one; only the engine's single
//! writer thread writes, so read-then-commit needs no locking here.

use super::prior::PriorCounts;
use super::profile::Profile;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("engagement store: {0}")]
    Backend(String),
    #[error("engagement store: a stored profile for {0:?} is unreadable")]
    Corrupt(String),
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Everything one group commit changes, applied atomically and durably.
#[derive(Default)]
pub struct Commit {
    pub profiles: Vec<(String, Profile)>,
    pub seen: Vec<String>,
    pub priors: Vec<(String, PriorCounts)>,
    /// Contacts to forget, with every duplicate key recorded for them.
    pub deletes: Vec<String>,
}

pub trait EngagementStore: Send + Sync + 'static {
    fn profile(&self, key: &str) -> Result<Option<Profile>, StoreError>;
    /// Which of these dedup keys were already recorded.
    fn seen(&self, keys: &[&str]) -> Result<Vec<bool>, StoreError>;
    fn priors(&self) -> Result<Vec<(String, PriorCounts)>, StoreError>;
    /// Returns only once the commit is durable.
    fn commit(&self, c: Commit) -> Result<(), StoreError>;
}

const PROFILES: TableDefinition<&str, &[u8]> = TableDefinition::new("profiles");
const SEEN: TableDefinition<&str, ()> = TableDefinition::new("seen");
const PRIORS: TableDefinition<&str, &[u8]> = TableDefinition::new("priors");

/// redb: an embedded, copy-on-write B-tree with checksummed, fsynced commits,
/// so a crash leaves the last committed state and nothing half-written.
pub struct RedbStore {
    db: redb::Database,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| backend(format!("{}: {e}", dir.display())))?;
        }
        let db = redb::Database::create(path).map_err(|e| backend(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(PROFILES).map_err(backend)?;
        tx.open_table(SEEN).map_err(backend)?;
        tx.open_table(PRIORS).map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(RedbStore { db })
    }
}

/// Keys of one contact's duplicate records share this prefix.
pub fn seen_prefix(contact_key: &str) -> String {
    format!("{contact_key}\u{1e}")
}

impl EngagementStore for RedbStore {
    fn profile(&self, key: &str) -> Result<Option<Profile>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(PROFILES).map_err(backend)?;
        match t.get(key).map_err(backend)? {
            Some(v) => Profile::from_bytes(v.value()).map(Some).ok_or_else(|| StoreError::Corrupt(key.to_string())),
            None => Ok(None),
        }
    }

    fn seen(&self, keys: &[&str]) -> Result<Vec<bool>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(SEEN).map_err(backend)?;
        keys.iter().map(|k| t.get(*k).map(|v| v.is_some()).map_err(backend)).collect()
    }

    fn priors(&self) -> Result<Vec<(String, PriorCounts)>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(PRIORS).map_err(backend)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            if let Some(p) = PriorCounts::from_bytes(v.value()) {
                out.push((k.value().to_string(), p));
            }
        }
        Ok(out)
    }

    fn commit(&self, c: Commit) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        {
            let mut profiles = tx.open_table(PROFILES).map_err(backend)?;
            let mut seen = tx.open_table(SEEN).map_err(backend)?;
            let mut priors = tx.open_table(PRIORS).map_err(backend)?;
            for key in &c.deletes {
                profiles.remove(key.as_str()).map_err(backend)?;
                let prefix = seen_prefix(key);
                let end = format!("{key}\u{1f}");
                seen.retain_in(prefix.as_str()..end.as_str(), |_, _| false).map_err(backend)?;
            }
            for (k, p) in &c.profiles {
                profiles.insert(k.as_str(), p.to_bytes().as_slice()).map_err(backend)?;
            }
            for k in &c.seen {
                seen.insert(k.as_str(), ()).map_err(backend)?;
            }
            for (k, p) in &c.priors {
                priors.insert(k.as_str(), p.to_bytes().as_slice()).map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

}
