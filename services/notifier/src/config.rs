//! The notifier's configuration (YAML): what to follow, the channels (e-mail, webhooks)
//! and which severities each gets, reminders, the watchdog, the rate limit, the outbox.

use std::path::PathBuf;

use dcs_shared::config::invalid;
use dcs_shared::{MqttSettings, Validate};
use serde::Deserialize;

/// Everything `notifier` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierConfig {
    /// MQTT name: `<name>/status`, `<name>/online`.
    #[serde(default = "default_name")]
    pub name: String,
    /// The station named in every message (a lab runs several).
    pub station: String,
    /// The interlock's alarm prefix (`alarms/<rule>`).
    #[serde(default = "default_alarm_prefix")]
    pub alarm_prefix: String,
    /// The interlock's MQTT name: `<interlock>/online` and its publications are watched.
    #[serde(default = "default_interlock")]
    pub interlock: String,
    /// Reminders, watchdog, daily message.
    #[serde(default)]
    pub timing: Timing,
    /// Other services whose `<name>/online` going false is worth a notice.
    #[serde(default)]
    pub watch: Vec<String>,
    /// Where messages go.
    pub channels: Vec<ChannelConfig>,
    /// Directory of the durable outboxes (one per channel) and the notifier's memory.
    pub state_dir: PathBuf,
    /// Where the alarm journal is kept.
    #[serde(default)]
    pub journal: JournalConfig,
    /// Broker settings when run alone (`dcs up` passes the stack's).
    #[serde(default)]
    pub mqtt: MqttSettings,
}

fn default_name() -> String {
    "notifier".into()
}
fn default_alarm_prefix() -> String {
    "alarms".into()
}
fn default_interlock() -> String {
    "interlock".into()
}

/// Reminders and the watchdog.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// While an alarm stays active and unacknowledged, a reminder at most this often.
    pub reminder_secs: f64,
    /// The interlock counts as silent after this long without a message from it (it
    /// signs its permit every 10 s).
    pub interlock_silence_secs: f64,
    /// A service (or the broker) away for this long is notified; shorter absences (a
    /// restart) are not.
    pub offline_grace_secs: f64,
    /// `HH:MM` local time: a daily message, "all quiet" or what is open (severity
    /// `info`). Unset: none.
    pub daily_at: Option<String>,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            reminder_secs: 3600.0,
            interlock_silence_secs: 60.0,
            offline_grace_secs: 30.0,
            daily_at: None,
        }
    }
}

impl Timing {
    /// `daily_at` as a time of day.
    pub fn daily(&self) -> Result<Option<chrono::NaiveTime>, String> {
        self.daily_at
            .as_deref()
            .map(|t| {
                chrono::NaiveTime::parse_from_str(t.trim(), "%H:%M")
                    .map_err(|_| format!("`{t}` is not a time of day as HH:MM (local time)"))
            })
            .transpose()
    }
}

/// The alarm journal (`journal:`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// MongoDB connection string; `DCS_MONGODB_URI` overrides it. Empty: the journal is
    /// the JSON-lines `file`.
    pub mongodb_uri: String,
    /// Database.
    pub database: String,
    /// Collection.
    pub collection: String,
    /// Server selection and connect timeout.
    pub timeout_secs: f64,
    /// The JSON-lines journal when there is no database (relative to `state_dir`).
    pub file: PathBuf,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            mongodb_uri: String::new(),
            database: "dcs".into(),
            collection: "alarm_journal".into(),
            timeout_secs: 5.0,
            file: "journal.jsonl".into(),
        }
    }
}

impl JournalConfig {
    /// The MongoDB URI with `DCS_MONGODB_URI` applied; `None`: the file.
    pub fn uri(&self) -> Option<String> {
        std::env::var("DCS_MONGODB_URI")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .or_else(|| Some(self.mongodb_uri.clone()).filter(|u| !u.trim().is_empty()))
    }
}

/// How bad a notification is: the alarm's severity, or `critical` for the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Clearances of warnings, notices.
    Info,
    /// Worth a look.
    Warning,
    /// Hardware at risk, or the safety system silent.
    Critical,
}

impl Severity {
    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One channel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Name (outbox directory, logs, status).
    pub name: String,
    /// Lowest severity sent here.
    #[serde(default = "default_min")]
    pub min_severity: Severity,
    /// At most this many messages per `rate_window_secs`; the rest are folded into one
    /// summary with their count.
    #[serde(default = "default_rate")]
    pub max_per_window: u32,
    /// The rate limit's window.
    #[serde(default = "default_window")]
    pub rate_window_secs: f64,
    /// An e-mail channel (give `email` or `webhook`).
    #[serde(default)]
    pub email: Option<EmailConfig>,
    /// A webhook channel.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// A JSON-lines file (the simulated stack's channel; a local record elsewhere).
    #[serde(default)]
    pub file: Option<FileConfig>,
}

impl ChannelConfig {
    /// The transport (validated: exactly one of `email`, `webhook`).
    pub fn kind(&self) -> Option<ChannelKind> {
        match (&self.email, &self.webhook, &self.file) {
            (Some(e), None, None) => Some(ChannelKind::Email(e.clone())),
            (None, Some(w), None) => Some(ChannelKind::Webhook(w.clone())),
            (None, None, Some(f)) => Some(ChannelKind::File(f.clone())),
            _ => None,
        }
    }
}

fn default_min() -> Severity {
    Severity::Info
}
fn default_rate() -> u32 {
    5
}
fn default_window() -> f64 {
    60.0
}

/// The transport of a channel.
#[derive(Debug, Clone)]
pub enum ChannelKind {
    /// SMTP (lettre, rustls).
    Email(EmailConfig),
    /// HTTP POST of JSON.
    Webhook(WebhookConfig),
    /// Appended to a file.
    File(FileConfig),
}

/// A JSON-lines file of notifications.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The file (relative to this config).
    pub path: PathBuf,
}

/// SMTP settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Mail server.
    pub host: String,
    /// Port (587 STARTTLS, 465 implicit TLS, 25 none).
    pub port: u16,
    /// `starttls`, `tls` (implicit) or `none` (a relay on the same host only).
    pub security: Security,
    /// Login; the password comes from `password_env` or `password_file`, never here.
    #[serde(default)]
    pub username: Option<String>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (relative to this config).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Sender.
    pub from: String,
    /// Recipients.
    pub to: Vec<String>,
    /// Connecting and each SMTP exchange.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
}

/// SMTP transport security.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Plain connection upgraded with STARTTLS (required).
    Starttls,
    /// TLS from the first byte.
    Tls,
    /// No TLS: only for a relay on this host.
    None,
}

/// Webhook settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// URL (`http://` or `https://`); `${VAR}` keeps a token out of the file.
    pub url: String,
    /// `mattermost` (`{"text": ...}`, also Slack) or `json` (the notification's fields).
    pub format: WebhookFormat,
    /// One POST.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
}

fn default_timeout() -> f64 {
    10.0
}

/// Webhook body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// `{"text": "..."}` (Mattermost, Slack).
    Mattermost,
    /// The notification's fields.
    Json,
}

impl Validate for NotifierConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        for (k, v) in [
            ("name", &self.name),
            ("alarm_prefix", &self.alarm_prefix),
            ("interlock", &self.interlock),
        ] {
            if let Err(m) = dcs_shared::topic::check_level(v) {
                return invalid(k, m);
            }
        }
        for (i, w) in self.watch.iter().enumerate() {
            if let Err(m) = dcs_shared::topic::check_level(w) {
                return invalid(format!("watch[{i}]"), m);
            }
        }
        if self.station.trim().is_empty() {
            return invalid("station", "name the station (it is in every message)");
        }
        let t = &self.timing;
        for (k, v, lo) in [
            ("timing.reminder_secs", t.reminder_secs, 1.0),
            // The interlock signs its permit every 10 s: less would cry wolf.
            (
                "timing.interlock_silence_secs",
                t.interlock_silence_secs,
                20.0,
            ),
            ("timing.offline_grace_secs", t.offline_grace_secs, 0.0),
        ] {
            if !(v.is_finite() && v >= lo && v <= 7.0 * 86_400.0) {
                return invalid(k, format!("must be {lo} .. 604800 s"));
            }
        }
        if let Err(m) = t.daily() {
            return invalid("timing.daily_at", m);
        }
        let j = &self.journal;
        let scheme_ok = ["mongodb://", "mongodb+srv://"]
            .iter()
            .any(|p| j.mongodb_uri.starts_with(p));
        if !j.mongodb_uri.is_empty() && !scheme_ok {
            return invalid(
                "journal.mongodb_uri",
                "must start with mongodb:// or mongodb+srv://",
            );
        }
        if !(j.timeout_secs.is_finite() && (0.1..=300.0).contains(&j.timeout_secs)) {
            return invalid("journal.timeout_secs", "must be 0.1 .. 300 s");
        }
        if j.file.as_os_str().is_empty() || j.database.is_empty() || j.collection.is_empty() {
            return invalid("journal", "file, database and collection must not be empty");
        }
        if self.channels.is_empty() {
            return invalid(
                "channels",
                "no channel: a notifier that tells nobody is a mistake",
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let k = |f: &str| format!("channels[{i}].{f}");
            if let Err(m) = dcs_shared::topic::check_level(&c.name) {
                return invalid(k("name"), m);
            }
            if c.name.starts_with('.') {
                return invalid(
                    k("name"),
                    "must not start with `.` (it names the channel's outbox directory)",
                );
            }
            if !names.insert(c.name.as_str()) {
                return invalid(k("name"), format!("`{}` is used twice", c.name));
            }
            if c.max_per_window == 0 {
                return invalid(k("max_per_window"), "must be > 0");
            }
            if !(c.rate_window_secs.is_finite() && (1.0..=86_400.0).contains(&c.rate_window_secs)) {
                return invalid(k("rate_window_secs"), "must be 1 .. 86400 s");
            }
            let Some(kind) = c.kind() else {
                return invalid(
                    format!("channels[{i}]"),
                    "give one of `email:`, `webhook:` or `file:`",
                );
            };
            let k = |f: &str| match kind {
                ChannelKind::Email(_) => format!("channels[{i}].email.{f}"),
                ChannelKind::Webhook(_) => format!("channels[{i}].webhook.{f}"),
                ChannelKind::File(_) => format!("channels[{i}].file.{f}"),
            };
            match &kind {
                ChannelKind::Email(e) => {
                    if e.host.trim().is_empty() {
                        return invalid(k("host"), "must not be empty");
                    }
                    if e.to.is_empty() {
                        return invalid(k("to"), "name at least one recipient");
                    }
                    for (j, a) in std::iter::once(&e.from).chain(&e.to).enumerate() {
                        if a.parse::<lettre::message::Mailbox>().is_err() {
                            let key = if j == 0 {
                                k("from")
                            } else {
                                k(&format!("to[{}]", j - 1))
                            };
                            return invalid(&key, format!("`{a}` is not an e-mail address"));
                        }
                    }
                    if e.password_env.is_some() && e.password_file.is_some() {
                        return invalid(
                            k("password_file"),
                            "give password_env or password_file, not both",
                        );
                    }
                    if e.username.is_none()
                        && (e.password_env.is_some() || e.password_file.is_some())
                    {
                        return invalid(k("username"), "a password needs a username");
                    }
                    let local = matches!(e.host.as_str(), "127.0.0.1" | "localhost" | "::1");
                    if e.security == Security::None && e.username.is_some() && !local {
                        return invalid(
                            k("security"),
                            "a login over `security: none` sends the password in clear: use starttls or tls (none is for a relay on this host)",
                        );
                    }
                    if !(e.timeout_secs.is_finite() && (0.1..=300.0).contains(&e.timeout_secs)) {
                        return invalid(k("timeout_secs"), "must be 0.1 .. 300 s");
                    }
                }
                ChannelKind::File(f) => {
                    if f.path.as_os_str().is_empty() {
                        return invalid(k("path"), "must not be empty");
                    }
                }
                ChannelKind::Webhook(w) => {
                    if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                        return invalid(k("url"), "must start with http:// or https://");
                    }
                    if !(w.timeout_secs.is_finite() && (0.1..=300.0).contains(&w.timeout_secs)) {
                        return invalid(k("timeout_secs"), "must be 0.1 .. 300 s");
                    }
                }
            }
        }
        self.mqtt.check().map_err(|(k, m)| (format!("mqtt.{k}"), m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "station: box1\nstate_dir: state\nchannels:\n  - name: mail\n    min_severity: warning\n    email: {host: 127.0.0.1, port: 2525, security: none, from: dcs@lab.invalid, to: [shift@lab.invalid]}\n  - name: chat\n    webhook: {url: 'https://chat.lab.invalid/hooks/x', format: mattermost}\n";

    fn err(text: &str) -> (String, String) {
        let e =
            dcs_shared::config::from_str::<NotifierConfig>(text, std::path::Path::new("n.yaml"))
                .unwrap_err();
        (e.key.unwrap_or_default(), e.message)
    }

    #[test]
    fn broken_configs_name_the_key() {
        let c: NotifierConfig =
            dcs_shared::config::from_str(GOOD, std::path::Path::new("n.yaml")).unwrap();
        assert_eq!(c.channels.len(), 2);
        assert!(matches!(c.channels[0].kind(), Some(ChannelKind::Email(_))));
        for (text, key, msg) in [
            (
                GOOD.replace("to: [shift@lab.invalid]", "to: []"),
                "channels[0].email.to",
                "at least one",
            ),
            (
                GOOD.replace("to: [shift@lab.invalid]", "to: [shift]"),
                "channels[0].email.to[0]",
                "not an e-mail address",
            ),
            (
                GOOD.replace("format: mattermost", "format: slackish"),
                "channels[1].webhook.format",
                "unknown variant",
            ),
            (
                GOOD.replace("https://chat", "ftp://chat"),
                "channels[1].webhook.url",
                "http",
            ),
            (
                GOOD.replace("  - name: chat\n", "  - name: mail\n"),
                "channels[1].name",
                "twice",
            ),
            (
                GOOD.replace("    webhook:", "    file: {path: x}\n    webhook:"),
                "channels[1]",
                "one of",
            ),
            (
                GOOD.replace("station: box1", "station: ' '"),
                "station",
                "name the station",
            ),
            (
                GOOD.replace("security: none", "security: none, password_env: P"),
                "channels[0].email.username",
                "needs a username",
            ),
            (
                "station: a\nstate_dir: s\nchannels: []\n".to_string(),
                "channels",
                "tells nobody",
            ),
            (
                GOOD.replace("host: 127.0.0.1", "host: smtp.lab.invalid, username: u"),
                "channels[0].email.security",
                "in clear",
            ),
            (
                GOOD.replace("name: chat", "name: .."),
                "channels[1].name",
                "must not start",
            ),
            (
                format!("timing: {{daily_at: '8h'}}\n{GOOD}"),
                "timing.daily_at",
                "HH:MM",
            ),
            (
                format!("journal: {{mongodb_uri: 'localhost:27017'}}\n{GOOD}"),
                "journal.mongodb_uri",
                "mongodb://",
            ),
            (
                format!("journal: {{collection: alarms, colection: x}}\n{GOOD}"),
                "journal.colection",
                "unknown field",
            ),
            (
                format!("timing: {{interlock_silence_secs: 5}}\n{GOOD}"),
                "timing.interlock_silence_secs",
                "20 .. 604800",
            ),
        ] {
            let (k, m) = err(&text);
            assert_eq!(k, key, "{m}");
            assert!(m.contains(msg), "{key}: {m}");
        }
    }
}
