//! The population prior: what a tenant's contacts do, overall, by country and
//! by channel, kept as decayed counters updated with every event.

use super::model::{builtin_prior, normalise, PriorView};
use super::profile::{decay, Contribution, HOURS};
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub struct PriorCounts {
    pub ref_time: i64,
    pub hours: [f32; HOURS],
    pub sent: f32,
    pub replied: f32,
}

impl Default for PriorCounts {
    fn default() -> Self {
        PriorCounts { ref_time: 0, hours: [0.0; HOURS], sent: 0.0, replied: 0.0 }
    }
}

impl PriorCounts {
    fn weight_at(&mut self, at: i64, half_life_secs: f64) -> f32 {
        if at > self.ref_time {
            let f = if self.ref_time == 0 { 1.0 } else { decay(at - self.ref_time, half_life_secs) };
            self.hours.iter_mut().for_each(|v| *v *= f);
            self.sent *= f;
            self.replied *= f;
            self.ref_time = at;
        }
        decay(self.ref_time - at, half_life_secs)
    }

    pub fn add(&mut self, c: &Contribution, half_life_secs: f64) {
        let w = self.weight_at(c.at, half_life_secs);
        self.hours[c.hour] += c.weight * w;
    }

    pub fn add_sent(&mut self, at: i64, replied: bool, half_life_secs: f64) {
        let w = self.weight_at(at, half_life_secs);
        if replied {
            self.replied += w;
        } else {
            self.sent += w;
        }
    }

    pub fn mass(&self) -> f32 {
        self.hours.iter().sum()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 4 * (HOURS + 2));
        b.extend_from_slice(&self.ref_time.to_le_bytes());
        for v in self.hours.iter().chain([&self.sent, &self.replied]) {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<PriorCounts> {
        if b.len() != 8 + 4 * (HOURS + 2) {
            return None;
        }
        let f = |i: usize| f32::from_le_bytes(b[8 + 4 * i..12 + 4 * i].try_into().unwrap());
        let mut p = PriorCounts { ref_time: i64::from_le_bytes(b[..8].try_into().unwrap()), ..Default::default() };
        for (i, v) in p.hours.iter_mut().enumerate() {
            *v = f(i);
        }
        p.sent = f(HOURS);
        p.replied = f(HOURS + 1);
        Some(p)
    }
}

/// Pseudo-events each level of the hierarchy is weighed against its parent.
const LEVEL_STRENGTH: f32 = 50.0;

pub fn key(tenant: &str, level: &str) -> String {
    format!("{tenant}\u{1f}{level}")
}

/// Built-in → tenant → channel → country: each level shrinks toward its parent,
/// so a country with a handful of contacts leans on the tenant's pattern.
pub fn view(priors: &HashMap<String, PriorCounts>, tenant: &str, channel: Option<&str>, country: Option<&str>) -> PriorView {
    let mut v = builtin_prior();
    let mut levels = vec![("tenant".to_string(), key(tenant, "*"))];
    if let Some(c) = channel {
        levels.push((format!("channel {c}"), key(tenant, &format!("channel:{c}"))));
    }
    if let Some(c) = country {
        levels.push((format!("country {c}"), key(tenant, &format!("country:{c}"))));
    }
    let mut used = Vec::new();
    for (label, k) in levels {
        let Some(p) = priors.get(&k) else { continue };
        let n = p.mass();
        if n <= 0.0 {
            continue;
        }
        let mut hours: [f32; HOURS] = std::array::from_fn(|h| (p.hours[h] + LEVEL_STRENGTH * v.hours[h]) / (n + LEVEL_STRENGTH));
        normalise(&mut hours);
        v.hours = hours;
        v.reply_rate = (p.replied + v.reply_strength * v.reply_rate) / (p.sent + v.reply_strength);
        used.push(format!("{label} ({n:.0} weighted events)"));
    }
    if !used.is_empty() {
        v.label = format!("{} over the built-in pattern", used.join(", "));
    }
    v
}
