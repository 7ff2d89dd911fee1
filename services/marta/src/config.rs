//! The driver's configuration (YAML): the connection, timing, set-point limits and the
//! register map file.

use std::path::PathBuf;

use dcs_shared::config::invalid;
use dcs_shared::{MqttSettings, Validate};
use serde::Deserialize;

use crate::registers::RegisterMap;

/// Everything `marta` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MartaConfig {
    /// MQTT name: topics are `<name>/status`, `<name>/alarms`, `<name>/cmd/...`
    /// (`MARTA`, as the Python driver).
    #[serde(default = "default_name")]
    pub name: String,
    /// The register map (relative to this file).
    pub register_map: PathBuf,
    /// Where the PLC is.
    pub connection: Connection,
    /// Polling and publishing.
    #[serde(default)]
    pub timing: Timing,
    /// Set-point ranges enforced before anything is written.
    #[serde(default)]
    pub limits: Limits,
    /// Readings whose lowest value, with the set-point while CO2 runs, is published as
    /// `co2_coldest_temp` (the coldest surface the CO2 loop makes, for the interlock's
    /// dew-point rule).
    #[serde(default = "default_coldest")]
    pub coldest_of: Vec<String>,
    /// Broker settings when run alone (`dcs up` passes the stack's).
    #[serde(default)]
    pub mqtt: MqttSettings,
    /// The map read from `register_map` (by [`crate::Marta`]'s `load_files`).
    #[serde(skip)]
    pub map: Option<RegisterMap>,
}

fn default_name() -> String {
    "MARTA".into()
}

fn default_coldest() -> Vec<String> {
    [
        "TT01_CO2", "TT02_CO2", "TT03_CO2", "TT05_CO2", "TT06_CO2", "TT07_CO2",
    ]
    .map(String::from)
    .to_vec()
}

/// The PLC's address and how long to wait for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    /// Host name or address.
    pub host: String,
    /// Modbus TCP port (502 on the plant).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Modbus unit id.
    #[serde(default = "one")]
    pub unit_id: u8,
    /// Connecting.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// One request and its answer.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// First delay before reconnecting; it doubles up to `reconnect_max_secs`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    /// Longest delay between reconnects.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_secs: f64,
}

fn default_port() -> u16 {
    502
}
fn one() -> u8 {
    1
}
fn default_connect_timeout() -> u64 {
    3000
}
fn default_request_timeout() -> u64 {
    1000
}
fn default_reconnect_min() -> u64 {
    500
}
fn default_reconnect_max() -> f64 {
    30.0
}

/// Polling and publishing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// Time from the start of one poll (every reading and word) to the next.
    pub poll_interval_secs: f64,
    /// The status is published when a reading moves past its deadband or the state
    /// or alarms change, and at least this often (its `measured_at` keeps it fresh
    /// for the interlock).
    pub republish_secs: f64,
    /// How long the alarm-reset bit stays set in `clear_alarms` (the PLC must see it
    /// in one of its scans).
    pub reset_pulse_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            poll_interval_secs: 1.0,
            republish_secs: 10.0,
            reset_pulse_ms: 500,
        }
    }
}

/// Set-point ranges (SPEC 10).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// `set_temperature_setpoint`, degC.
    pub temperature: [f64; 2],
    /// `set_speed_setpoint`, rpm.
    pub speed: [f64; 2],
    /// `set_flow_setpoint`, g/s.
    pub flow: [f64; 2],
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            temperature: [-35.0, 25.0],
            speed: [0.0, 6000.0],
            flow: [0.0, 5.0],
        }
    }
}

impl Validate for MartaConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if let Err(m) = dcs_shared::topic::check_level(&self.name) {
            return invalid("name", m);
        }
        let c = &self.connection;
        if c.host.trim().is_empty() {
            return invalid("connection.host", "must not be empty");
        }
        if c.port == 0 {
            return invalid("connection.port", "must be 1..65535");
        }
        for (k, v) in [
            ("connection.connect_timeout_ms", c.connect_timeout_ms),
            ("connection.request_timeout_ms", c.request_timeout_ms),
            ("connection.reconnect_min_ms", c.reconnect_min_ms),
        ] {
            if v == 0 || v > 60_000 {
                return invalid(k, "must be between 1 and 60000");
            }
        }
        if !(c.reconnect_max_secs.is_finite() && (0.1..=3600.0).contains(&c.reconnect_max_secs)) {
            return invalid(
                "connection.reconnect_max_secs",
                "must be between 0.1 and 3600",
            );
        }
        let t = &self.timing;
        if !(t.poll_interval_secs.is_finite() && (0.05..=3600.0).contains(&t.poll_interval_secs)) {
            return invalid("timing.poll_interval_secs", "must be between 0.05 and 3600");
        }
        if !(t.republish_secs.is_finite() && (0.1..=3600.0).contains(&t.republish_secs)) {
            return invalid("timing.republish_secs", "must be between 0.1 and 3600");
        }
        if t.reset_pulse_ms == 0 || t.reset_pulse_ms > 10_000 {
            return invalid("timing.reset_pulse_ms", "must be between 1 and 10000");
        }
        for (k, [lo, hi]) in [
            ("limits.temperature", self.limits.temperature),
            ("limits.speed", self.limits.speed),
            ("limits.flow", self.limits.flow),
        ] {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                return invalid(k, "must be [low, high] with low < high");
            }
        }
        if self.coldest_of.is_empty() {
            return invalid("coldest_of", "name at least one CO2 temperature reading");
        }
        self.mqtt.check().map_err(|(k, m)| (format!("mqtt.{k}"), m))
    }
}
