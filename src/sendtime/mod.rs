//! When to write to a contact next: send windows in the contact's own time
//! zone from their engagement history, the messaging (service) window, and an
//! engagement score, from a durable embedded store.
//!
//! One thread owns all writes (group commit: many callers' events share one
//! fsync); reads go straight to the store from any thread.

pub mod batch;
mod countries;
pub mod events;
pub mod file;
pub mod model;
pub mod prior;
pub mod profile;
pub mod store;
pub mod tz;

use events::{Channel, ContactAttrs, Event, QuietHours};
use model::{ModelConfig, Request, Suggestion};
use prior::PriorCounts;
use profile::Profile;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use store::{Commit, EngagementStore, StoreError};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum SendTimeError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("contact {0:?} has no recorded events or attributes; record some first or pass the contact inline")]
    UnknownContact(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the engagement writer has stopped")]
    WriterGone,
    #[error("too many pending writes ({0}); retry later")]
    Overloaded(usize),
}

impl SendTimeError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SendTimeError::Invalid { field: field.into(), reason: reason.into() }
    }
}

#[derive(Clone, Debug)]
pub struct EngagementConfig {
    pub model: ModelConfig,
    /// Quiet hours when neither the request nor the contact sets them.
    pub quiet_hours: QuietHours,
    /// Zone for contacts with nothing to go on.
    pub default_tz: String,
    /// Longest horizon a request may ask about.
    pub max_horizon_secs: i64,
    /// Write batches waiting for the writer before callers are turned away.
    pub max_pending_writes: usize,
}

impl Default for EngagementConfig {
    fn default() -> Self {
        EngagementConfig {
            model: ModelConfig::default(),
            quiet_hours: QuietHours { start_min: 21 * 60, end_min: 8 * 60 },
            default_tz: "UTC".into(),
            max_horizon_secs: 31 * 86_400,
            max_pending_writes: 256,
        }
    }
}

/// Counts for one acknowledged write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    pub accepted: u64,
    pub duplicates: u64,
}

enum Write {
    Events { tenant: String, events: Vec<Event>, reply: oneshot::Sender<Result<Recorded, SendTimeError>> },
    Delete { tenant: String, contact_id: String, reply: oneshot::Sender<Result<Recorded, SendTimeError>> },
    /// Finish what is queued before it, then release the store.
    Close { reply: oneshot::Sender<Result<Recorded, SendTimeError>> },
}

/// The subject of a question: a stored contact, or one given inline.
pub enum Subject {
    Stored { tenant: String, contact_id: String },
    Inline { contact_id: String, attrs: ContactAttrs, events: Vec<Event> },
}

#[derive(Clone)]
pub struct Engagement {
    store: Arc<dyn EngagementStore>,
    priors: Arc<RwLock<HashMap<String, PriorCounts>>>,
    tx: mpsc::Sender<Write>,
    cfg: Arc<EngagementConfig>,
    default_tz: tz::ResolvedTz,
}

pub fn contact_key(tenant: &str, contact_id: &str) -> String {
    format!("{tenant}\u{1f}{contact_id}")
}

impl Engagement {
    pub fn open(store: Arc<dyn EngagementStore>, cfg: EngagementConfig) -> Result<Engagement, SendTimeError> {
        let tz = jiff::tz::TimeZone::get(&cfg.default_tz)
            .map_err(|_| SendTimeError::invalid("default_tz", format!("unknown IANA time zone {:?}", cfg.default_tz)))?;
        let default_tz = tz::ResolvedTz { tz, name: cfg.default_tz.clone(), source: tz::TzSource::Default, country: None, approximate: false };
        let priors = Arc::new(RwLock::new(store.priors()?.into_iter().collect::<HashMap<_, _>>()));
        let (tx, rx) = mpsc::channel(cfg.max_pending_writes.max(1));
        let cfg = Arc::new(cfg);
        let writer = Writer { store: store.clone(), priors: priors.clone(), cfg: cfg.clone() };
        std::thread::Builder::new()
            .name("palaver-engagement-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| SendTimeError::Store(StoreError::Backend(format!("writer thread: {e}"))))?;
        Ok(Engagement { store, priors, tx, cfg, default_tz })
    }

    pub fn config(&self) -> &EngagementConfig {
        &self.cfg
    }

    async fn send(&self, w: Write, rx: oneshot::Receiver<Result<Recorded, SendTimeError>>) -> Result<Recorded, SendTimeError> {
        self.tx.try_send(w).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendTimeError::Overloaded(self.cfg.max_pending_writes),
            mpsc::error::TrySendError::Closed(_) => SendTimeError::WriterGone,
        })?;
        rx.await.map_err(|_| SendTimeError::WriterGone)?
    }

    /// Records validated events; resolves once they are durable.
    pub async fn record(&self, tenant: &str, events: Vec<Event>) -> Result<Recorded, SendTimeError> {
        if events.is_empty() {
            return Ok(Recorded::default());
        }
        let (reply, rx) = oneshot::channel();
        let r = self.send(Write::Events { tenant: tenant.to_string(), events, reply }, rx).await?;
        let m = crate::metrics::global();
        m.engagement_events.with(&["accepted"]).add(r.accepted);
        m.engagement_events.with(&["duplicate"]).add(r.duplicates);
        Ok(r)
    }

    /// Forgets a contact (profile and duplicate records); durable on return.
    pub async fn delete(&self, tenant: &str, contact_id: &str) -> Result<bool, SendTimeError> {
        let (reply, rx) = oneshot::channel();
        let r = self.send(Write::Delete { tenant: tenant.into(), contact_id: contact_id.into(), reply }, rx).await?;
        Ok(r.accepted > 0)
    }

    /// Stops the writer once everything queued before is durable and releases
    /// the store (other handles then get `WriterGone`).
    pub async fn close(self) -> Result<(), SendTimeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Write::Close { reply }).await.map_err(|_| SendTimeError::WriterGone)?;
        drop(self.store);
        rx.await.map_err(|_| SendTimeError::WriterGone)?.map(|_| ())
    }

    pub fn profile(&self, tenant: &str, contact_id: &str) -> Result<Option<Profile>, SendTimeError> {
        Ok(self.store.profile(&contact_key(tenant, contact_id))?)
    }

    /// Answers for a stored or inline contact. Blocking (a store read): call
    /// it off the async runtime for large batches.
    pub fn suggest(&self, tenant: &str, subject: Subject, req: &Request) -> Result<Suggestion, SendTimeError> {
        let profile = match subject {
            Subject::Stored { tenant, contact_id } => {
                self.store.profile(&contact_key(&tenant, &contact_id))?.ok_or(SendTimeError::UnknownContact(contact_id))?
            }
            Subject::Inline { attrs, mut events, .. } => fold(attrs, &mut events, self.cfg.model.half_life_secs),
        };
        Ok(self.answer(tenant, &profile, req))
    }

    /// The model on a profile, with this tenant's prior.
    pub fn answer(&self, tenant: &str, profile: &Profile, req: &Request) -> Suggestion {
        let priors = self.priors.read().unwrap_or_else(|e| e.into_inner());
        let known = tz::from_attrs(&profile.attrs);
        let channel = profile.main_channel();
        let channel_name = (channel != Channel::Unspecified).then(|| channel.name());
        let view = prior::view(&priors, tenant, channel_name, known.as_ref().and_then(|t| t.country.as_deref()));
        let resolved = known.unwrap_or_else(|| tz::infer(&profile.utc, &view.hours, &self.default_tz));
        let mut req = req.clone();
        if let Some(q) = profile.attrs.quiet_hours {
            req.quiet = q;
        }
        model::suggest(profile, &view, resolved, &req, &self.cfg.model)
    }
}

/// A profile from events alone (inline contacts, files, the backtest).
pub fn fold(attrs: ContactAttrs, events: &mut [Event], half_life_secs: f64) -> Profile {
    let mut p = Profile { attrs, ..Profile::default() };
    events.sort_by_key(|e| e.at);
    let mut seen = HashSet::new();
    let mut zones = ZoneCache::default();
    for e in events.iter() {
        if e.dedup_key().is_some_and(|k| !seen.insert(k)) {
            continue;
        }
        apply_event(&mut p, e, &mut zones, half_life_secs);
    }
    p
}

/// The zone a contact's local hours are binned in, resolved again only when
/// their attributes change: parsing a phone number costs far more than an event.
#[derive(Default)]
struct ZoneCache {
    attrs: Option<ContactAttrs>,
    zone: Option<tz::ResolvedTz>,
}

impl ZoneCache {
    fn get(&mut self, attrs: &ContactAttrs) -> Option<&tz::ResolvedTz> {
        if self.attrs.as_ref() != Some(attrs) {
            self.zone = tz::from_attrs(attrs);
            self.attrs = Some(attrs.clone());
        }
        self.zone.as_ref()
    }
}

/// Folds one event in, binned in the zone the contact's attributes (with the
/// event's own updates) give. Returns what the prior learns and the country.
fn apply_event(p: &mut Profile, e: &Event, zones: &mut ZoneCache, half_life_secs: f64) -> (profile::Applied, Option<String>) {
    let merged;
    let attrs = if e.attrs.is_empty() {
        &p.attrs
    } else {
        merged = {
            let mut a = p.attrs.clone();
            a.merge(&e.attrs);
            a
        };
        &merged
    };
    let zone = zones.get(attrs);
    let country = zone.and_then(|z| z.country.clone());
    let applied = p.apply(e, zone.map(|z| &z.tz), zone.map_or("", |z| z.name.as_str()), half_life_secs);
    (applied, country)
}

struct Writer {
    store: Arc<dyn EngagementStore>,
    priors: Arc<RwLock<HashMap<String, PriorCounts>>>,
    cfg: Arc<EngagementConfig>,
}

impl Writer {
    fn run(self, mut rx: mpsc::Receiver<Write>) {
        let mut closing = None;
        while let Some(first) = rx.blocking_recv() {
            // Group commit: everything already waiting shares one fsync.
            let mut jobs = vec![first];
            while jobs.len() < 256 {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            if let Some(i) = jobs.iter().position(|j| matches!(j, Write::Close { .. })) {
                // Later jobs are refused (their callers see WriterGone).
                if let Write::Close { reply } = jobs.drain(i..).next().unwrap() {
                    closing = Some(reply);
                }
                rx.close();
            }
            let mut state = Batch::default();
            let results: Vec<Result<Recorded, SendTimeError>> = jobs.iter().map(|j| self.apply(j, &mut state)).collect();
            let commit = Commit {
                profiles: state.profiles.into_iter().filter_map(|(k, p)| p.map(|p| (k, p))).collect(),
                seen: state.seen.into_iter().collect(),
                priors: state.priors.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                deletes: state.deletes,
            };
            let outcome = self.store.commit(commit);
            if outcome.is_ok() {
                let mut shared = self.priors.write().unwrap_or_else(|e| e.into_inner());
                shared.extend(state.priors);
            }
            for (job, res) in jobs.into_iter().zip(results) {
                let res = match (&outcome, res) {
                    (Err(e), Ok(_)) => Err(SendTimeError::Store(StoreError::Backend(e.to_string()))),
                    (_, r) => r,
                };
                let reply = match job {
                    Write::Events { reply, .. } | Write::Delete { reply, .. } | Write::Close { reply } => reply,
                };
                let _ = reply.send(res);
            }
            if closing.is_some() {
                break;
            }
        }
        let store = self.store;
        drop(store);
        if let Some(reply) = closing {
            let _ = reply.send(Ok(Recorded::default()));
        }
    }

    fn apply(&self, job: &Write, b: &mut Batch) -> Result<Recorded, SendTimeError> {
        match job {
            Write::Close { .. } => Ok(Recorded::default()),
            Write::Delete { tenant, contact_id, .. } => {
                let key = contact_key(tenant, contact_id);
                let existed = b.take(&*self.store, &key)?.is_some();
                b.profiles.insert(key.clone(), None);
                b.zones.remove(&key);
                b.seen.retain(|s| !s.starts_with(&store::seen_prefix(&key)));
                b.deletes.push(key);
                Ok(Recorded { accepted: existed as u64, duplicates: 0 })
            }
            Write::Events { tenant, events, .. } => {
                let mut r = Recorded::default();
                let hl = self.cfg.model.half_life_secs;
                // One store read for the job's duplicate check, not one per event.
                let dkeys: Vec<Option<String>> = events
                    .iter()
                    .map(|e| e.dedup_key().map(|k| format!("{}{k}", store::seen_prefix(&contact_key(tenant, &e.contact_id)))))
                    .collect();
                let lookup: Vec<&str> = dkeys.iter().flatten().map(String::as_str).collect();
                let stored: HashSet<&str> = lookup.iter().zip(self.store.seen(&lookup)?).filter(|(_, s)| *s).map(|(k, _)| *k).collect();
                for (e, dkey) in events.iter().zip(&dkeys) {
                    let key = contact_key(tenant, &e.contact_id);
                    if let Some(d) = dkey {
                        if b.seen.contains(d) || (!b.deleted(&key) && stored.contains(d.as_str())) {
                            r.duplicates += 1;
                            continue;
                        }
                    }
                    let mut profile = b.take(&*self.store, &key)?.unwrap_or_default();
                    let zones = b.zones.entry(key.clone()).or_default();
                    let (applied, country) = apply_event(&mut profile, e, zones, hl);
                    let shared = self.priors.read().unwrap_or_else(|e| e.into_inner());
                    let mut levels = vec![prior::key(tenant, "*")];
                    let ch = profile.main_channel();
                    if ch != Channel::Unspecified {
                        levels.push(prior::key(tenant, &format!("channel:{}", ch.name())));
                    }
                    if let Some(c) = country {
                        levels.push(prior::key(tenant, &format!("country:{c}")));
                    }
                    for level in levels {
                        let p = b.priors.entry(level.clone()).or_insert_with(|| shared.get(&level).cloned().unwrap_or_default());
                        for c in &applied.hours {
                            p.add(c, hl);
                        }
                        if let Some(t) = applied.sent_at {
                            p.add_sent(t, false, hl);
                        }
                        if let Some(t) = applied.answered_sent_at {
                            p.add_sent(t, true, hl);
                        }
                    }
                    drop(shared);
                    b.profiles.insert(key, Some(profile));
                    if let Some(d) = dkey {
                        b.seen.insert(d.clone());
                    }
                    r.accepted += 1;
                }
                Ok(r)
            }
        }
    }
}

/// The state one group commit builds up.
#[derive(Default)]
struct Batch {
    /// `None`: deleted in this batch.
    profiles: HashMap<String, Option<Profile>>,
    seen: HashSet<String>,
    priors: HashMap<String, PriorCounts>,
    deletes: Vec<String>,
    zones: HashMap<String, ZoneCache>,
}

impl Batch {
    /// Deleted in this batch: the store's duplicate records for it are going,
    /// even if events re-created the contact after the delete.
    fn deleted(&self, key: &str) -> bool {
        self.deletes.iter().any(|d| d == key)
    }

    /// The contact's latest state, moved out of the batch (put it back after).
    fn take(&mut self, store: &dyn EngagementStore, key: &str) -> Result<Option<Profile>, SendTimeError> {
        match self.profiles.remove(key) {
            Some(p) => Ok(p),
            None => Ok(store.profile(key)?),
        }
    }
}

/// Validates a request's horizon.
pub fn validate_horizon(secs: i64, max: i64, field: &str) -> Result<(), SendTimeError> {
    if secs <= 0 {
        return Err(SendTimeError::invalid(field, "must be positive"));
    }
    if secs > max {
        return Err(SendTimeError::invalid(field, format!("{} hours; the limit is {} hours", secs / 3600, max / 3600)));
    }
    Ok(())
}

pub use model::Request as SuggestRequest;

/// Default `max_windows` when a request leaves it at zero, and its limit.
pub const DEFAULT_WINDOWS: usize = 5;
pub const MAX_WINDOWS: usize = 24;

#[cfg(test)]
mod tests;
