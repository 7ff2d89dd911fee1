//! The driver's configuration (YAML).

use dcs_shared::config::invalid;
use dcs_shared::{MqttSettings, Validate};
use serde::Deserialize;

/// Everything `julabo` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JulaboConfig {
    /// MQTT name: topics are `<name>/status`, `<name>/cmd/...`.
    #[serde(default = "default_name")]
    pub name: String,
    /// `/dev/ttyUSB0` (serial) or `tcp://host:port` (raw TCP tunnel: nc, socat, ser2net).
    pub port: String,
    /// Line settings for a serial port (ignored over TCP: set them where the port is).
    #[serde(default)]
    pub serial: SerialSettings,
    /// Pacing, timeouts and polling.
    #[serde(default)]
    pub timing: Timing,
    /// Set-point limits enforced before anything reaches the unit, degC.
    #[serde(default)]
    pub limits: Limits,
    /// Which of `IN_PV_01`/`IN_PV_02` is the power on this model (the other is the
    /// external Pt100).
    #[serde(default = "one")]
    pub power_pv: u8,
    /// Broker settings when run alone (`dcs up` passes the stack's).
    #[serde(default)]
    pub mqtt: MqttSettings,
}

fn default_name() -> String {
    "julabo".into()
}
fn one() -> u8 {
    1
}

/// Serial line settings. Defaults are the CF/FL/FP51 class: 4800 7E1, RTS/CTS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SerialSettings {
    /// Baud rate.
    pub baud: u32,
    /// 7 or 8.
    pub data_bits: u8,
    /// `none`, `even` or `odd`.
    pub parity: String,
    /// 1 or 2.
    pub stop_bits: u8,
    /// `rtscts`, `xonxoff` or `none`.
    pub flow_control: String,
}

impl Default for SerialSettings {
    fn default() -> Self {
        SerialSettings {
            baud: 4800,
            data_bits: 7,
            parity: "even".into(),
            stop_bits: 1,
            flow_control: "rtscts".into(),
        }
    }
}

/// Timing of the conversation with the unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// Spacing between commands; the unit drops commands closer than 250 ms.
    pub min_spacing_ms: u64,
    /// How long to wait for a reply.
    pub reply_timeout_ms: u64,
    /// Time from the start of one read of the unit (nine queries) to the start of the
    /// next. Shorter than a read (9 x `min_spacing_ms`), including 0, means
    /// continuously; commands take the next free slot either way.
    pub poll_interval_secs: f64,
    /// STATUS queries in a row without a valid reply before the unit counts as gone
    /// and the line is reopened (other queries failing only blank their field).
    pub failures_before_reconnect: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            min_spacing_ms: 260,
            reply_timeout_ms: 1000,
            poll_interval_secs: 5.0,
            failures_before_reconnect: 3,
        }
    }
}

/// Set-point limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Lowest set-point accepted, degC.
    pub temp_min: f64,
    /// Highest set-point accepted, degC.
    pub temp_max: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            temp_min: -50.0,
            temp_max: 50.0,
        }
    }
}

impl Validate for JulaboConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if let Err(m) = dcs_shared::topic::check_level(&self.name) {
            return invalid("name", m);
        }
        crate::transport::Endpoint::parse(&self.port).map_err(|m| ("port".to_string(), m))?;
        let s = &self.serial;
        if !matches!(s.data_bits, 7 | 8) {
            return invalid("serial.data_bits", "must be 7 or 8");
        }
        if !matches!(s.parity.as_str(), "none" | "even" | "odd") {
            return invalid("serial.parity", "must be none, even or odd");
        }
        if !matches!(s.stop_bits, 1 | 2) {
            return invalid("serial.stop_bits", "must be 1 or 2");
        }
        if !matches!(s.flow_control.as_str(), "rtscts" | "xonxoff" | "none") {
            return invalid("serial.flow_control", "must be rtscts, xonxoff or none");
        }
        if s.baud == 0 {
            return invalid("serial.baud", "must be > 0");
        }
        let t = &self.timing;
        if t.min_spacing_ms < 250 {
            tracing::warn!(
                min_spacing_ms = t.min_spacing_ms,
                "below the unit's 250 ms: it will drop commands"
            );
        }
        if t.min_spacing_ms > 10_000 {
            return invalid("timing.min_spacing_ms", "must be at most 10000");
        }
        if t.reply_timeout_ms == 0 || t.reply_timeout_ms > 60_000 {
            return invalid("timing.reply_timeout_ms", "must be between 1 and 60000");
        }
        // Written so that NaN and infinity fail too.
        if !(t.poll_interval_secs.is_finite() && (0.0..=3600.0).contains(&t.poll_interval_secs)) {
            return invalid(
                "timing.poll_interval_secs",
                "must be between 0 (poll continuously) and 3600",
            );
        }
        if t.failures_before_reconnect == 0 {
            return invalid("timing.failures_before_reconnect", "must be > 0");
        }
        let (lo, hi) = (self.limits.temp_min, self.limits.temp_max);
        if !(lo.is_finite() && hi.is_finite()) || lo >= hi {
            return invalid("limits.temp_max", "must be above limits.temp_min");
        }
        if !matches!(self.power_pv, 1 | 2) {
            return invalid("power_pv", "must be 1 or 2");
        }
        self.mqtt.check().map_err(|(k, m)| (format!("mqtt.{k}"), m))
    }
}
