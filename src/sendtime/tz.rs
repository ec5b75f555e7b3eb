//! Which time zone a contact lives in: theirs if known, else their phone
//! number's or country's, else inferred from when they are active.

use super::countries::COUNTRY_ZONES;
use super::events::ContactAttrs;
use super::profile::{shift, HOURS};
use jiff::tz::{Offset, TimeZone};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TzSource {
    /// The contact's own IANA zone attribute.
    Contact,
    /// The country of the contact's phone number.
    PhoneNumber,
    /// The contact's country attribute.
    Country,
    /// The UTC offset that best lines their activity up with the population's day.
    InferredFromActivity,
    /// Nothing to go on: the service default.
    Default,
}

impl TzSource {
    pub fn name(self) -> &'static str {
        match self {
            Self::Contact => "contact",
            Self::PhoneNumber => "phone number",
            Self::Country => "country",
            Self::InferredFromActivity => "inferred from activity",
            Self::Default => "default",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ResolvedTz {
    pub tz: TimeZone,
    /// An IANA name, or "UTC+05:30" for an inferred fixed offset.
    pub name: String,
    pub source: TzSource,
    /// ISO country the zone came from, if it came from one.
    pub country: Option<String>,
    /// The country spans several zones: the most populous one was taken.
    pub approximate: bool,
}

pub fn country_zone(country: &str) -> Option<(&'static str, bool)> {
    COUNTRY_ZONES
        .binary_search_by(|(c, _, _)| (*c).cmp(country))
        .ok()
        .map(|i| (COUNTRY_ZONES[i].1, COUNTRY_ZONES[i].2))
}

/// ISO country of an international phone number ("+55 11 98765-4321" → BR),
/// checked against libphonenumber's metadata.
pub fn phone_country(phone: &str) -> Option<String> {
    let n = phonenumber::parse(None, phone).ok()?;
    if !phonenumber::is_valid(&n) {
        return None;
    }
    n.country().id().map(|id| id.as_ref().to_string())
}

fn named(name: &str, source: TzSource, country: Option<String>, approximate: bool) -> Option<ResolvedTz> {
    let tz = TimeZone::get(name).ok()?;
    Some(ResolvedTz { tz, name: name.to_string(), source, country, approximate })
}

/// The zone known without looking at activity (what ingest bins local hours in).
pub fn from_attrs(attrs: &ContactAttrs) -> Option<ResolvedTz> {
    let country_of_phone = attrs.phone.as_deref().and_then(phone_country);
    if let Some(z) = attrs.time_zone.as_deref() {
        let country = attrs.country.clone().or(country_of_phone.clone());
        if let Some(r) = named(z, TzSource::Contact, country, false) {
            return Some(r);
        }
    }
    if let Some(c) = country_of_phone {
        if let Some((z, multi)) = country_zone(&c) {
            return named(z, TzSource::PhoneNumber, Some(c), multi);
        }
    }
    let c = attrs.country.as_deref()?;
    let (z, multi) = country_zone(c)?;
    named(z, TzSource::Country, Some(c.to_string()), multi)
}

/// Fewer engagement events than this and the activity says too little.
const MIN_INFER_WEIGHT: f32 = 6.0;

/// Known zone, else the whole-hour UTC offset whose shift of the contact's UTC
/// activity correlates best with the population's local day, else `default`.
pub fn resolve(attrs: &ContactAttrs, utc: &[f32; HOURS], population_local: &[f32; HOURS], default: &ResolvedTz) -> ResolvedTz {
    from_attrs(attrs).unwrap_or_else(|| infer(utc, population_local, default))
}

/// For a contact with no known zone: from their activity, else `default`.
pub fn infer(utc: &[f32; HOURS], population_local: &[f32; HOURS], default: &ResolvedTz) -> ResolvedTz {
    if utc.iter().sum::<f32>() >= MIN_INFER_WEIGHT {
        if let Some(off) = infer_offset(utc, population_local) {
            let o = Offset::from_hours(off as i8).unwrap_or(Offset::UTC);
            return ResolvedTz {
                tz: TimeZone::fixed(o),
                name: format!("UTC{}{:02}:00", if off < 0 { '-' } else { '+' }, off.abs()),
                source: TzSource::InferredFromActivity,
                country: None,
                approximate: true,
            };
        }
    }
    default.clone()
}

/// Offsets -12..=+14 hours; ties go to the smaller shift from UTC.
fn infer_offset(utc: &[f32; HOURS], population_local: &[f32; HOURS]) -> Option<i64> {
    // Compare day shapes (hour of day), which are far less sparse than weeks.
    let day = |w: &[f32; HOURS]| -> [f32; 24] {
        let mut d = [0.0; 24];
        for (h, v) in w.iter().enumerate() {
            d[h % 24] += v;
        }
        d
    };
    let pop = day(population_local);
    let pm = pop.iter().sum::<f32>() / 24.0;
    let mut best: Option<(f32, i64)> = None;
    for off in -12..=14i64 {
        let c = day(&shift(utc, off));
        let cm = c.iter().sum::<f32>() / 24.0;
        let score: f32 = c.iter().zip(&pop).map(|(a, b)| (a - cm) * (b - pm)).sum();
        let better = match best {
            None => true,
            Some((s, o)) => score > s + 1e-6 || ((score - s).abs() <= 1e-6 && off.abs() < o.abs()),
        };
        if better {
            best = Some((score, off));
        }
    }
    best.filter(|(s, _)| *s > 0.0).map(|(_, o)| o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn countries_are_sorted_and_resolvable() {
        assert!(COUNTRY_ZONES.windows(2).all(|w| w[0].0 < w[1].0));
        for (c, z, _) in COUNTRY_ZONES {
            assert!(TimeZone::get(z).is_ok(), "{c}: {z}");
        }
        assert_eq!(country_zone("BR"), Some(("America/Sao_Paulo", true)));
        assert_eq!(country_zone("IN"), Some(("Asia/Kolkata", false)));
    }

    #[test]
    fn phone_numbers_give_their_country() {
        assert_eq!(phone_country("+55 11 98765-4321").as_deref(), Some("BR"));
        assert_eq!(phone_country("+91 98765 43210").as_deref(), Some("IN"));
        assert_eq!(phone_country("+380 67 123 4567").as_deref(), Some("UA"));
        assert_eq!(phone_country("12345"), None);
        assert_eq!(phone_country("not a number"), None);
    }

    #[test]
    fn explicit_zone_wins_then_phone_then_country() {
        let mut a = ContactAttrs { phone: Some("+5511987654321".into()), country: Some("IN".into()), ..Default::default() };
        assert_eq!(from_attrs(&a).unwrap().source, TzSource::PhoneNumber);
        assert_eq!(from_attrs(&a).unwrap().name, "America/Sao_Paulo");
        a.time_zone = Some("Asia/Kolkata".into());
        assert_eq!(from_attrs(&a).unwrap().source, TzSource::Contact);
        a.time_zone = None;
        a.phone = None;
        let r = from_attrs(&a).unwrap();
        assert_eq!((r.source, r.name.as_str()), (TzSource::Country, "Asia/Kolkata"));
    }

    #[test]
    fn offset_is_inferred_from_a_daytime_pattern() {
        // Population: active 09-21 local. Contact: active 12-24 UTC = 09-21 at UTC-3.
        let mut pop = [0.0; HOURS];
        let mut utc = [0.0; HOURS];
        for d in 0..7 {
            for h in 9..21 {
                pop[d * 24 + h] = 1.0;
                utc[(d * 24 + h + 3) % HOURS] = 1.0;
            }
        }
        let default = ResolvedTz { tz: TimeZone::UTC, name: "UTC".into(), source: TzSource::Default, country: None, approximate: false };
        let r = resolve(&ContactAttrs::default(), &utc, &pop, &default);
        assert_eq!((r.source, r.name.as_str()), (TzSource::InferredFromActivity, "UTC-03:00"));
        // Too little activity: the default, said as such.
        let r = resolve(&ContactAttrs::default(), &[0.0; HOURS], &pop, &default);
        assert_eq!(r.source, TzSource::Default);
    }
}
