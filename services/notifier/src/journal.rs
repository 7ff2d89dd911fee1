//! The alarm journal: every alarm event (raised, escalated, acknowledged, cleared),
//! every shelve and unshelve, every watchdog notice, and every notification sent or
//! failed, with the operator's name and the instant in ns. Kept in MongoDB (through a
//! durable outbox: a database that is away loses nothing) or, without a database, in a
//! JSON-lines file that is appended and fsynced entry by entry. `dcs alarms log` reads
//! either.
//!
//! File format: one [`Entry`] as JSON per line. A crash can leave a torn last line;
//! [`read_file`] skips unreadable lines and counts them.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcs_shared::outbox::{Delivery, Outbox};
use mongodb::bson::{doc, Document};
use mongodb::options::{ClientOptions, FindOptions, IndexOptions, ReplaceOptions};
use mongodb::{Client, Collection, IndexModel};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::config::JournalConfig;

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Unique per station: `<at_ns>-<n>` (a retried write replaces, never duplicates).
    #[serde(default)]
    pub id: String,
    /// The instant, UTC ns.
    pub at_ns: i64,
    /// The same, RFC 3339 UTC, for people and queries.
    pub time: String,
    /// The station.
    pub station: String,
    /// The alarm's rule, a service, or the notification's subject.
    pub subject: String,
    /// `raised`, `escalated`, `acknowledged`, `cleared`, `shelved`, `unshelved`,
    /// `shelve_expired`, `watchdog`, `back`, `notification_sent`, `notification_failed`,
    /// `notification_rejected`.
    pub event: String,
    /// The operator, for acknowledgements and shelving.
    #[serde(default)]
    pub by: Option<String>,
    /// The alarm's severity.
    #[serde(default)]
    pub severity: Option<String>,
    /// One line.
    pub text: String,
    /// What else is known (values, actions, channel, error, reason).
    #[serde(default)]
    pub details: Json,
}

/// RFC 3339 with ns, UTC.
pub fn rfc3339(at_ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(at_ns)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Where entries go.
#[derive(Clone)]
pub enum Journal {
    /// Appended to a local file.
    File(Arc<Mutex<FileJournal>>),
    /// Queued for MongoDB.
    Mongo(Outbox),
}

/// An append-only JSON-lines file.
pub struct FileJournal {
    path: PathBuf,
    file: std::fs::File,
}

impl Journal {
    /// Appends an entry; an error is logged (the notifications themselves go on).
    pub fn append(&self, e: &Entry) {
        let line = match serde_json::to_vec(e) {
            Ok(l) => l,
            Err(err) => return tracing::error!(error = %err, "cannot encode a journal entry"),
        };
        let r = match self {
            Journal::Mongo(outbox) => outbox.push(&line).map_err(|e| e.to_string()),
            Journal::File(f) => match f.lock() {
                Ok(mut f) => f.append(&line).map_err(|e| e.to_string()),
                Err(_) => Err("journal lock poisoned".into()),
            },
        };
        if let Err(err) = r {
            tracing::error!(error = %err, event = %e.event, subject = %e.subject, "journal entry not written");
        }
    }
}

impl FileJournal {
    /// Opens (creates) the file for appending.
    pub fn open(path: &Path) -> std::io::Result<FileJournal> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(FileJournal {
            path: path.to_path_buf(),
            file,
        })
    }

    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        // One write per entry (O_APPEND: a line is never interleaved), on disk before
        // the event is considered journaled.
        self.file.write_all(&buf)?;
        self.file.sync_data()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What `dcs alarms log` asks for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Entries at or after this instant (UTC ns).
    pub since_ns: Option<i64>,
    /// Only this rule (subject).
    pub rule: Option<String>,
    /// At most this many, the latest.
    pub limit: usize,
}

impl Query {
    fn matches(&self, e: &Entry) -> bool {
        self.since_ns.is_none_or(|s| e.at_ns >= s)
            && self.rule.as_ref().is_none_or(|r| *r == e.subject)
    }
}

/// Reads the file's entries matching `q`, oldest first, and the number of unreadable
/// lines skipped (a torn tail after a crash).
pub fn read_file(path: &Path, q: &Query) -> std::io::Result<(Vec<Entry>, usize)> {
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    let mut bad = 0;
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Entry>(&line) {
            Ok(e) if q.matches(&e) => out.push(e),
            Ok(_) => {}
            Err(_) => bad += 1,
        }
    }
    out.sort_by_key(|e| e.at_ns);
    if q.limit > 0 && out.len() > q.limit {
        out.drain(..out.len() - q.limit);
    }
    Ok((out, bad))
}

/// The MongoDB collection of the journal.
pub struct MongoJournal {
    entries: Collection<Document>,
    indexed: bool,
}

impl MongoJournal {
    /// Prepares a client (no I/O until the first use).
    pub async fn new(c: &JournalConfig, uri: &str) -> Result<MongoJournal, String> {
        let mut opts = ClientOptions::parse(uri)
            .await
            .map_err(|e| format!("journal.mongodb_uri: {e}"))?;
        let t = Duration::from_secs_f64(c.timeout_secs);
        opts.server_selection_timeout = Some(t);
        opts.connect_timeout = Some(t);
        opts.app_name = Some("notifier".into());
        let client = Client::with_options(opts).map_err(|e| format!("mongodb: {e}"))?;
        Ok(MongoJournal {
            entries: client.database(&c.database).collection(&c.collection),
            indexed: false,
        })
    }

    /// Stores one queued entry (upserted by station and id: a retry never duplicates).
    pub async fn store(&mut self, record: &[u8]) -> Delivery {
        let e: Entry = match serde_json::from_slice(record) {
            Ok(e) => e,
            Err(err) => return Delivery::Reject(format!("not a journal entry: {err}")),
        };
        let mut d = match mongodb::bson::to_document(&e) {
            Ok(d) => d,
            Err(err) => return Delivery::Reject(format!("journal entry to BSON: {err}")),
        };
        let key = format!("{}/{}", e.station, e.id);
        d.insert("_id", key.clone());
        if !self.indexed {
            let r = self
                .entries
                .create_indexes([
                    IndexModel::builder().keys(doc! {"at_ns": 1}).build(),
                    IndexModel::builder()
                        .keys(doc! {"subject": 1, "at_ns": 1})
                        .options(IndexOptions::builder().build())
                        .build(),
                ])
                .await;
            if let Err(err) = r {
                return Delivery::Retry(format!("MongoDB journal indexes: {err}"));
            }
            self.indexed = true;
        }
        match self
            .entries
            .replace_one(doc! {"_id": key}, d)
            .with_options(ReplaceOptions::builder().upsert(true).build())
            .await
        {
            Ok(_) => Delivery::Done,
            Err(err) => Delivery::Retry(format!("MongoDB journal: {err}")),
        }
    }

    /// The entries matching `q`, oldest first.
    pub async fn query(&self, q: &Query) -> Result<Vec<Entry>, String> {
        let mut filter = Document::new();
        if let Some(s) = q.since_ns {
            filter.insert("at_ns", doc! {"$gte": s});
        }
        if let Some(r) = &q.rule {
            filter.insert("subject", r.clone());
        }
        let mut opts = FindOptions::builder().sort(doc! {"at_ns": -1}).build();
        if q.limit > 0 {
            opts.limit = Some(i64::try_from(q.limit).unwrap_or(i64::MAX));
        }
        let mut cursor = self
            .entries
            .find(filter)
            .with_options(opts)
            .await
            .map_err(|e| format!("MongoDB journal query: {e}"))?;
        let mut out = Vec::new();
        while cursor
            .advance()
            .await
            .map_err(|e| format!("MongoDB journal query: {e}"))?
        {
            let d = cursor
                .deserialize_current()
                .map_err(|e| format!("MongoDB journal entry: {e}"))?;
            match mongodb::bson::from_document::<Entry>(d) {
                Ok(e) => out.push(e),
                Err(e) => tracing::warn!(error = %e, "unreadable journal entry skipped"),
            }
        }
        out.reverse();
        Ok(out)
    }
}

/// One line for a terminal: local time, event, subject, who, text.
pub fn render_line(e: &Entry) -> String {
    let local = chrono::DateTime::from_timestamp_nanos(e.at_ns).with_timezone(&chrono::Local);
    format!(
        "{}  {:<22} {:<16} {:<12} {}",
        local.format("%Y-%m-%d %H:%M:%S%.3f"),
        e.event,
        e.subject,
        e.by.as_deref().unwrap_or("-"),
        e.text
    )
}

/// `--since`: `30m`, `12h`, `7d`, `90s`, or an RFC 3339 instant; `now_ns` for the
/// relative forms.
pub fn parse_since(text: &str, now_ns: i64) -> Result<i64, String> {
    let t = text.trim();
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(t) {
        return at
            .timestamp_nanos_opt()
            .ok_or_else(|| format!("`{t}` is out of range"));
    }
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("`{t}`: give 30m, 12h, 7d, 90s or an RFC 3339 instant"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "`{t}`: the unit is s, m, h or d (or an RFC 3339 instant)"
            ))
        }
    };
    Ok(now_ns.saturating_sub(n.saturating_mul(secs).saturating_mul(1_000_000_000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_ns: i64, subject: &str, event: &str) -> Entry {
        Entry {
            id: format!("{at_ns}-0"),
            at_ns,
            time: rfc3339(at_ns),
            station: "box1".into(),
            subject: subject.into(),
            event: event.into(),
            by: Some("ana".into()),
            severity: Some("critical".into()),
            text: "t".into(),
            details: Json::Null,
        }
    }

    #[test]
    fn file_appends_and_reads_back_with_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j/journal.jsonl");
        let j = Journal::File(Arc::new(Mutex::new(FileJournal::open(&path).unwrap())));
        j.append(&entry(3, "dew_point", "raised"));
        j.append(&entry(5, "cooling", "raised"));
        j.append(&entry(7, "dew_point", "acknowledged"));
        // A crash mid-write leaves half a line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(br#"{"id":"9-0","at_ns":9,"ti"#)
            .unwrap();
        let all = Query::default();
        let (got, bad) = read_file(&path, &all).unwrap();
        assert_eq!((got.len(), bad), (3, 1));
        assert_eq!(got[2], entry(7, "dew_point", "acknowledged"));
        let q = Query {
            since_ns: Some(4),
            rule: Some("dew_point".into()),
            limit: 0,
        };
        let (got, _) = read_file(&path, &q).unwrap();
        assert_eq!(got.iter().map(|e| e.at_ns).collect::<Vec<_>>(), [7]);
        let last = Query {
            limit: 2,
            ..Query::default()
        };
        let (got, _) = read_file(&path, &last).unwrap();
        assert_eq!(got.iter().map(|e| e.at_ns).collect::<Vec<_>>(), [5, 7]);
    }

    #[test]
    fn since_takes_durations_and_instants() {
        let now = 10_000 * 1_000_000_000;
        assert_eq!(parse_since("90s", now), Ok(now - 90_000_000_000));
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000_000_000));
        assert_eq!(parse_since("1970-01-01T00:00:01Z", now), Ok(1_000_000_000));
        assert!(parse_since("2w", now).unwrap_err().contains("unit"));
        assert!(parse_since("yesterday", now).unwrap_err().contains("give"));
    }
}
