//! Writing line protocol to InfluxDB: v1 (`/write?db=&rp=`, optional basic auth) or
//! v2 (`/api/v2/write?org=&bucket=`, `Authorization: Token`), nanosecond precision.
//!
//! Blocking (ureq, no TLS stack compiled in): call it from `spawn_blocking`. The error
//! says whether retrying can help: timeouts, refused connections and 5xx can; a 4xx
//! cannot (the server's message says what is wrong with the data).

use crate::config::invalid;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

/// Where and how to write (the `influx:` section of a config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluxSettings {
    /// Base URL, `http://127.0.0.1:8086`.
    pub url: String,
    /// API: `v1` (default) or `v2`.
    #[serde(default)]
    pub api: InfluxApi,
    /// v1: database.
    #[serde(default)]
    pub database: Option<String>,
    /// v1: retention policy (default: the database's default).
    #[serde(default)]
    pub retention_policy: Option<String>,
    /// v1: user for basic auth.
    #[serde(default)]
    pub username: Option<String>,
    /// v1: password for basic auth (prefer `DCS_INFLUX_PASSWORD`).
    #[serde(default)]
    pub password: Option<String>,
    /// v2: organisation.
    #[serde(default)]
    pub org: Option<String>,
    /// v2: bucket.
    #[serde(default)]
    pub bucket: Option<String>,
    /// v2: API token (prefer `DCS_INFLUX_TOKEN`).
    #[serde(default)]
    pub token: Option<String>,
    /// Whole-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    10
}

/// InfluxDB write API version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InfluxApi {
    /// `/write` (InfluxDB 1.x, and 2.x's compatibility API).
    #[default]
    V1,
    /// `/api/v2/write`.
    V2,
}

impl InfluxSettings {
    /// Applies `DCS_INFLUX_URL`, `DCS_INFLUX_USERNAME`, `DCS_INFLUX_PASSWORD` and
    /// `DCS_INFLUX_TOKEN` when set.
    pub fn with_env_overrides(mut self) -> Self {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        if let Some(v) = var("DCS_INFLUX_URL") {
            self.url = v;
        }
        if let Some(v) = var("DCS_INFLUX_USERNAME") {
            self.username = Some(v);
        }
        if let Some(v) = var("DCS_INFLUX_PASSWORD") {
            self.password = Some(v);
        }
        if let Some(v) = var("DCS_INFLUX_TOKEN") {
            self.token = Some(v);
        }
        self
    }

    /// Checks the settings; errors are (key relative to this section, message).
    pub fn check(&self) -> Result<(), (String, String)> {
        if !self.url.starts_with("http://") {
            return invalid(
                "url",
                "must start with http:// (no TLS support is built in)",
            );
        }
        match self.api {
            InfluxApi::V1 if self.database.as_deref().unwrap_or("").is_empty() => {
                invalid("database", "the v1 API needs a database")
            }
            InfluxApi::V2 if self.org.is_none() || self.bucket.is_none() => {
                invalid("bucket", "the v2 API needs org and bucket")
            }
            _ if self.timeout_secs == 0 => invalid("timeout_secs", "must be > 0"),
            _ => Ok(()),
        }
    }
}

impl crate::Validate for InfluxSettings {
    fn validate(&self) -> Result<(), (String, String)> {
        self.check()
    }
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Worth retrying later: the server is down, slow or failing (5xx).
    #[error("InfluxDB unavailable: {0}")]
    Retry(String),
    /// The server refused the data (4xx); retrying the same data cannot help.
    #[error("InfluxDB refused the data (HTTP {status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The server's explanation.
        message: String,
    },
}

/// A configured InfluxDB write endpoint.
pub struct InfluxWriter {
    agent: ureq::Agent,
    settings: InfluxSettings,
    auth: Option<String>,
}

impl InfluxWriter {
    /// Builds a writer; `settings` must have passed [`InfluxSettings::check`].
    pub fn new(settings: InfluxSettings) -> InfluxWriter {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(settings.timeout_secs)))
            .http_status_as_error(false)
            .build()
            .into();
        let auth = match settings.api {
            InfluxApi::V2 => settings.token.as_ref().map(|t| format!("Token {t}")),
            InfluxApi::V1 => settings.username.as_ref().map(|u| {
                let pair = format!("{u}:{}", settings.password.as_deref().unwrap_or(""));
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                )
            }),
        };
        InfluxWriter {
            agent,
            settings,
            auth,
        }
    }

    /// Writes a body of line protocol (lines ending in `\n`), nanosecond precision.
    pub fn write(&self, lines: &str) -> Result<(), WriteError> {
        let s = &self.settings;
        let base = s.url.trim_end_matches('/');
        let mut req = match s.api {
            InfluxApi::V1 => {
                let mut r = self
                    .agent
                    .post(format!("{base}/write"))
                    .query("db", s.database.as_deref().unwrap_or(""))
                    .query("precision", "ns");
                if let Some(rp) = &s.retention_policy {
                    r = r.query("rp", rp);
                }
                r
            }
            InfluxApi::V2 => self
                .agent
                .post(format!("{base}/api/v2/write"))
                .query("org", s.org.as_deref().unwrap_or(""))
                .query("bucket", s.bucket.as_deref().unwrap_or(""))
                .query("precision", "ns"),
        };
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let mut resp = req
            .header("Content-Type", "text/plain; charset=utf-8")
            .send(lines)
            .map_err(|e| WriteError::Retry(e.to_string()))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        // InfluxDB explains in {"error": "..."} (v1) or {"message": "..."} (v2).
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("error")
                    .or(v.get("message"))
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or(body);
        if (400..500).contains(&status) && status != 408 && status != 429 {
            Err(WriteError::Rejected { status, message })
        } else {
            Err(WriteError::Retry(format!("HTTP {status}: {message}")))
        }
    }

    /// Runs an InfluxQL query through `/query` (InfluxDB 1.x, and 2.x's compatibility
    /// API with a DBRP mapping), timestamps as integer nanoseconds. Returns the JSON
    /// answer; an error in it (bad query, unknown database) is returned as `Rejected`.
    pub fn query(&self, influxql: &str) -> Result<serde_json::Value, WriteError> {
        let s = &self.settings;
        let db = match s.api {
            InfluxApi::V1 => s.database.as_deref(),
            InfluxApi::V2 => s.bucket.as_deref(),
        };
        let mut req = self
            .agent
            .get(format!("{}/query", s.url.trim_end_matches('/')))
            .query("db", db.unwrap_or(""))
            .query("epoch", "ns")
            .query("q", influxql);
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let mut resp = req.call().map_err(|e| WriteError::Retry(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        let json: Option<serde_json::Value> = serde_json::from_str(&body).ok();
        let error = json.as_ref().and_then(|v| {
            v.get("error")
                .or_else(|| v.pointer("/results/0/error"))
                .and_then(|m| m.as_str())
                .map(str::to_string)
        });
        match (status, json, error) {
            (200..=299, Some(v), None) => Ok(v),
            (500..=599, _, e) => Err(WriteError::Retry(format!(
                "HTTP {status}: {}",
                e.unwrap_or(body)
            ))),
            (_, _, e) => Err(WriteError::Rejected {
                status,
                message: e.unwrap_or(body),
            }),
        }
    }
}

/// Delivers a queue of line-protocol batches (one record = one batch) to InfluxDB with
/// the writer, until `shutdown`: a refused batch is set aside, anything else retried.
pub async fn deliver_outbox(
    queue: crate::outbox::Outbox,
    settings: InfluxSettings,
    shutdown: crate::shutdown::CancellationToken,
) {
    use crate::outbox::Delivery;
    let writer = std::sync::Arc::new(InfluxWriter::new(settings));
    queue
        .deliver(
            move |bytes| {
                let writer = writer.clone();
                async move {
                    let lines = String::from_utf8_lossy(&bytes).into_owned();
                    match tokio::task::spawn_blocking(move || writer.write(&lines)).await {
                        Ok(Ok(())) => Delivery::Done,
                        Ok(Err(e @ WriteError::Rejected { .. })) => Delivery::Reject(e.to_string()),
                        Ok(Err(e)) => Delivery::Retry(e.to_string()),
                        Err(e) => Delivery::Retry(format!("writer task: {e}")),
                    }
                }
            },
            shutdown,
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(yaml: &str) -> InfluxSettings {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn checks() {
        assert!(settings("{url: 'http://h:8086', database: dcs}")
            .check()
            .is_ok());
        assert_eq!(
            settings("{url: 'http://h:8086'}").check().unwrap_err().0,
            "database"
        );
        assert_eq!(
            settings("{url: 'https://h:8086', database: d}")
                .check()
                .unwrap_err()
                .0,
            "url"
        );
        assert_eq!(
            settings("{url: 'http://h', api: v2, org: o}")
                .check()
                .unwrap_err()
                .0,
            "bucket"
        );
        assert!(serde_yaml::from_str::<InfluxSettings>("{url: x, api: v3}").is_err());
    }

    #[test]
    fn unreachable_server_is_retryable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let w = InfluxWriter::new(settings(&format!(
            "{{url: 'http://127.0.0.1:{port}', database: d, timeout_secs: 2}}"
        )));
        assert!(matches!(w.write("m f=1i 1\n"), Err(WriteError::Retry(_))));
    }
}
