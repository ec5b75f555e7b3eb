//! Engagement events and contact attributes, with the validation every entry
//! point shares (gRPC, events files, the backtest).

use super::SendTimeError;

/// 2000-01-01T00:00:00Z: nothing older is a real messaging event.
pub const MIN_TIME: i64 = 946_684_800;
/// Events may run ahead of the server clock by this much (clock skew), no more.
pub const MAX_FUTURE_SECS: i64 = 24 * 3600;
pub const MAX_ID_BYTES: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// The customer wrote to the business (opens the service window).
    Inbound,
    /// The business sent a message; `message_id` names it.
    OutboundSent,
    Delivered,
    Read,
    /// The customer answered the outbound message `message_id`.
    Replied,
    Clicked,
    OptOut,
    OptIn,
    /// Only carries attributes.
    ContactUpdated,
}

impl EventType {
    pub const ALL: [EventType; 9] = [
        Self::Inbound,
        Self::OutboundSent,
        Self::Delivered,
        Self::Read,
        Self::Replied,
        Self::Clicked,
        Self::OptOut,
        Self::OptIn,
        Self::ContactUpdated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Inbound => "INBOUND_MESSAGE",
            Self::OutboundSent => "OUTBOUND_SENT",
            Self::Delivered => "DELIVERED",
            Self::Read => "READ",
            Self::Replied => "REPLIED",
            Self::Clicked => "CLICKED",
            Self::OptOut => "OPT_OUT",
            Self::OptIn => "OPT_IN",
            Self::ContactUpdated => "CONTACT_UPDATED",
        }
    }

    /// Accepts the wire names, case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s.trim()))
    }

    pub fn code(self) -> u8 {
        Self::ALL.iter().position(|t| *t == self).unwrap() as u8
    }

    /// How much this event says about the contact being reachable at its hour.
    /// Delivery only says the phone was on; a reply says the most.
    pub fn engagement_weight(self) -> f32 {
        match self {
            Self::Inbound | Self::Replied => 1.0,
            Self::Clicked => 0.75,
            Self::Read => 0.5,
            _ => 0.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Channel {
    #[default]
    Unspecified,
    WhatsApp,
    Telegram,
    Viber,
    Sms,
    Email,
    Other,
}

impl Channel {
    pub const ALL: [Channel; 7] =
        [Self::Unspecified, Self::WhatsApp, Self::Telegram, Self::Viber, Self::Sms, Self::Email, Self::Other];

    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "UNSPECIFIED",
            Self::WhatsApp => "WHATSAPP",
            Self::Telegram => "TELEGRAM",
            Self::Viber => "VIBER",
            Self::Sms => "SMS",
            Self::Email => "EMAIL",
            Self::Other => "OTHER",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Some(Self::Unspecified);
        }
        Self::ALL.into_iter().find(|c| c.name().eq_ignore_ascii_case(s))
    }

    pub fn code(self) -> u8 {
        Self::ALL.iter().position(|c| *c == self).unwrap() as u8
    }

    pub fn from_code(c: u8) -> Self {
        Self::ALL.get(c as usize).copied().unwrap_or(Self::Other)
    }

    /// How long after the customer's last message the business may write
    /// freely. WhatsApp's customer-service window is 24 hours; after it only
    /// a paid, pre-approved template may be sent. The other channels have no
    /// such rule.
    pub fn service_window_secs(self) -> Option<i64> {
        match self {
            Self::WhatsApp => Some(24 * 3600),
            _ => None,
        }
    }
}

/// Local quiet hours `[start, end)` in minutes after midnight; wraps past
/// midnight when `start > end` (21:00-08:00).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuietHours {
    pub start_min: u16,
    pub end_min: u16,
}

impl QuietHours {
    pub const NONE: QuietHours = QuietHours { start_min: 0, end_min: 0 };

    pub fn new(start_min: u32, end_min: u32, field: &str) -> Result<Self, SendTimeError> {
        for (v, which) in [(start_min, "start_minute"), (end_min, "end_minute")] {
            if v >= 24 * 60 {
                return Err(SendTimeError::invalid(format!("{field}.{which}"), format!("{v} is not a minute of the day (0-1439)")));
            }
        }
        Ok(QuietHours { start_min: start_min as u16, end_min: end_min as u16 })
    }

    /// "21:00-08:00".
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not HH:MM-HH:MM"))?;
        let min = |t: &str| -> Result<u16, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(|| format!("{t:?} is not HH:MM"))?;
            let (h, m): (u16, u16) = (h.parse().map_err(|_| format!("bad hour in {t:?}"))?, m.parse().map_err(|_| format!("bad minute in {t:?}"))?);
            if h > 23 || m > 59 {
                return Err(format!("{t:?} is not a time of day"));
            }
            Ok(h * 60 + m)
        };
        Ok(QuietHours { start_min: min(a)?, end_min: min(b)? })
    }

    pub fn is_empty(self) -> bool {
        self.start_min == self.end_min
    }

    pub fn contains(self, minute_of_day: u16) -> bool {
        if self.is_empty() {
            false
        } else if self.start_min < self.end_min {
            (self.start_min..self.end_min).contains(&minute_of_day)
        } else {
            minute_of_day >= self.start_min || minute_of_day < self.end_min
        }
    }
}

impl std::fmt::Display for QuietHours {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02}:{:02}-{:02}:{:02}", self.start_min / 60, self.start_min % 60, self.end_min / 60, self.end_min % 60)
    }
}

/// What is known about a contact beyond their events. `None` leaves a stored
/// value unchanged; an empty string clears it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContactAttrs {
    pub time_zone: Option<String>,
    pub country: Option<String>,
    pub phone: Option<String>,
    pub quiet_hours: Option<QuietHours>,
}

impl ContactAttrs {
    pub fn is_empty(&self) -> bool {
        *self == ContactAttrs::default()
    }

    /// Applies `update` on top of `self`.
    pub fn merge(&mut self, update: &ContactAttrs) {
        fn set(slot: &mut Option<String>, v: &Option<String>) {
            if let Some(v) = v {
                *slot = if v.is_empty() { None } else { Some(v.clone()) };
            }
        }
        set(&mut self.time_zone, &update.time_zone);
        set(&mut self.country, &update.country);
        set(&mut self.phone, &update.phone);
        if let Some(q) = update.quiet_hours {
            self.quiet_hours = if q.is_empty() { None } else { Some(q) };
        }
    }

    /// Checks names against the tz database, countries against ISO codes and
    /// phone numbers with libphonenumber's metadata; normalises them.
    pub fn validate(&mut self, field: &str) -> Result<(), SendTimeError> {
        if let Some(z) = self.time_zone.as_deref().filter(|z| !z.is_empty()) {
            jiff::tz::TimeZone::get(z)
                .map_err(|_| SendTimeError::invalid(format!("{field}.time_zone"), format!("unknown IANA time zone {z:?}")))?;
        }
        if let Some(c) = self.country.as_mut().filter(|c| !c.is_empty()) {
            *c = c.trim().to_ascii_uppercase();
            if super::tz::country_zone(c).is_none() {
                return Err(SendTimeError::invalid(format!("{field}.country"), format!("{c:?} is not an ISO 3166-1 alpha-2 country code")));
            }
        }
        if let Some(p) = self.phone.as_deref().filter(|p| !p.is_empty()) {
            if super::tz::phone_country(p).is_none() {
                return Err(SendTimeError::invalid(
                    format!("{field}.phone"),
                    format!("{p:?} is not a valid international phone number (E.164, such as +5511987654321)"),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub contact_id: String,
    pub kind: EventType,
    /// Unix seconds, UTC.
    pub at: i64,
    pub channel: Channel,
    /// The message this event is about (for READ, REPLIED...: the outbound one).
    pub message_id: String,
    pub attrs: ContactAttrs,
}

impl Event {
    /// `field` prefixes error names (`events[12]`).
    pub fn validate(&mut self, now: i64, field: &str) -> Result<(), SendTimeError> {
        validate_contact_id(&self.contact_id, &format!("{field}.contact_id"))?;
        validate_time(self.at, now, &format!("{field}.occurred_at"))?;
        if self.message_id.len() > MAX_ID_BYTES {
            return Err(SendTimeError::invalid(format!("{field}.message_id"), format!("{} bytes; the limit is {MAX_ID_BYTES}", self.message_id.len())));
        }
        if self.kind == EventType::ContactUpdated && self.attrs.is_empty() {
            return Err(SendTimeError::invalid(format!("{field}.attributes"), "a CONTACT_UPDATED event must set at least one attribute"));
        }
        self.attrs.validate(&format!("{field}.attributes"))
    }

    /// The identity duplicates share: the same message and type, or, for
    /// events without a message id, the same type at the same second.
    /// Attribute updates have none: applying one twice changes nothing, and
    /// two updates in one second must both count.
    pub fn dedup_key(&self) -> Option<String> {
        match (self.kind, self.message_id.is_empty()) {
            (EventType::ContactUpdated, _) => None,
            (_, true) => Some(format!("{}\u{1f}@{}", self.kind.code(), self.at)),
            (_, false) => Some(format!("{}\u{1f}{}", self.kind.code(), self.message_id)),
        }
    }
}

pub fn validate_contact_id(id: &str, field: &str) -> Result<(), SendTimeError> {
    if id.trim().is_empty() {
        return Err(SendTimeError::invalid(field, "must not be empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(SendTimeError::invalid(field, format!("{} bytes; the limit is {MAX_ID_BYTES}", id.len())));
    }
    if id.chars().any(char::is_control) {
        return Err(SendTimeError::invalid(field, "contains control characters"));
    }
    Ok(())
}

pub fn validate_time(at: i64, now: i64, field: &str) -> Result<(), SendTimeError> {
    if at < MIN_TIME {
        return Err(SendTimeError::invalid(field, format!("{} is before 2000-01-01", fmt_time(at))));
    }
    if at > now + MAX_FUTURE_SECS {
        return Err(SendTimeError::invalid(
            field,
            format!("{} is more than 24 hours ahead of the server clock ({})", fmt_time(at), fmt_time(now)),
        ));
    }
    Ok(())
}

pub fn fmt_time(t: i64) -> String {
    jiff::Timestamp::from_second(t).map(|t| t.to_string()).unwrap_or_else(|_| format!("{t} (unix seconds)"))
}

/// RFC 3339 ("2026-03-01T12:00:00Z", "...-03:00") or unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Some(n);
    }
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Some(t.as_second());
    }
    // Twitter's "Tue Oct 31 22:10:47 +0000 2017".
    jiff::fmt::strtime::parse("%a %b %d %H:%M:%S %z %Y", s).ok()?.to_timestamp().ok().map(|t| t.as_second())
}

pub fn now_secs() -> i64 {
    jiff::Timestamp::now().as_second()
}
