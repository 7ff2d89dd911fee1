//! The broker's configuration (the `broker:` section of the stack config, or a file of
//! its own for `dcs-broker --config`).

use dcs_shared::config::invalid;
use std::net::SocketAddr;
use std::path::PathBuf;

use dcs_shared::Validate;
use serde::Deserialize;

/// Everything `dcs-broker` needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where to listen. Loopback by default: exposing the broker is a decision.
    #[serde(default)]
    pub listeners: Listeners,
    /// Who may connect.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Memory and connection bounds.
    #[serde(default)]
    pub limits: Limits,
    /// How often to log (and publish on `dcs-broker/stats`) the broker's meters; 0 = never.
    #[serde(default = "default_meters_interval")]
    pub meters_interval_secs: u64,
}

fn default_meters_interval() -> u64 {
    60
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listeners: Listeners::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            meters_interval_secs: default_meters_interval(),
        }
    }
}

/// Listener addresses; a listener left out (or `null`) is not started.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    /// MQTT 3.1.1 over TCP (services use this one).
    #[serde(default = "default_mqtt")]
    pub mqtt: Option<SocketAddr>,
    /// MQTT 5 over TCP.
    #[serde(default = "default_mqtt5")]
    pub mqtt5: Option<SocketAddr>,
    /// MQTT 3.1.1 over websockets, for browser dashboards.
    #[serde(default = "default_ws")]
    pub websocket: Option<SocketAddr>,
}

fn default_mqtt() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 1883)))
}
fn default_mqtt5() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 1884)))
}
fn default_ws() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 8083)))
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            mqtt: default_mqtt(),
            mqtt5: default_mqtt5(),
            websocket: default_ws(),
        }
    }
}

impl Listeners {
    /// The configured listeners as (kind, address).
    pub fn all(&self) -> Vec<(&'static str, SocketAddr)> {
        [
            ("mqtt", self.mqtt),
            ("mqtt5", self.mqtt5),
            ("websocket", self.websocket),
        ]
        .into_iter()
        .filter_map(|(k, a)| a.map(|a| (k, a)))
        .collect()
    }
}

/// Authentication. Anonymous clients are refused unless `allow_anonymous` is true.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Accept clients that send no username (and, with no password file, anyone).
    #[serde(default)]
    pub allow_anonymous: bool,
    /// A Mosquitto password file (`mosquitto_passwd` format: `$7$` PBKDF2-SHA512 or
    /// `$6$` salted SHA-512); relative paths are relative to the config file.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Instead of a file: the name of an environment variable holding the file's
    /// content (a Kubernetes/podman Secret passed with `secretKeyRef`).
    #[serde(default)]
    pub password_env: Option<String>,
}

/// Bounds on what the broker holds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Connections accepted at once, all listeners together.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest PUBLISH payload accepted, bytes. A bigger one closes that client only.
    #[serde(default = "default_max_payload")]
    pub max_payload_size: usize,
    /// Unacknowledged QoS 1/2 messages per connection.
    #[serde(default = "default_inflight")]
    pub max_inflight_count: usize,
    /// Messages handed to one connection per router pass. Must exceed the number of
    /// retained topics a wildcard subscription matches, or some are not delivered.
    #[serde(default = "default_outgoing")]
    pub max_outgoing_packet_count: u64,
    /// Size of one in-memory log segment per topic, bytes.
    #[serde(default = "default_segment_size")]
    pub segment_size: usize,
    /// Segments kept per topic; the oldest is dropped when full (slow QoS 0
    /// subscribers then miss messages). Memory per busy topic <= size x count.
    #[serde(default = "default_segment_count")]
    pub segment_count: usize,
    /// Time a new connection has to send CONNECT, ms.
    #[serde(default = "default_connect_timeout")]
    pub connection_timeout_ms: u16,
}

fn default_max_connections() -> usize {
    1000
}
fn default_max_payload() -> usize {
    1024 * 1024
}
fn default_inflight() -> usize {
    100
}
fn default_outgoing() -> u64 {
    1000
}
fn default_segment_size() -> usize {
    4 * 1024 * 1024
}
fn default_segment_count() -> usize {
    4
}
fn default_connect_timeout() -> u16 {
    5000
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            max_payload_size: default_max_payload(),
            max_inflight_count: default_inflight(),
            max_outgoing_packet_count: default_outgoing(),
            segment_size: default_segment_size(),
            segment_count: default_segment_count(),
            connection_timeout_ms: default_connect_timeout(),
        }
    }
}

impl Validate for BrokerConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let listeners = self.listeners.all();
        if listeners.is_empty() {
            return invalid("listeners", "no listener configured: give at least `mqtt`");
        }
        for (i, (k, a)) in listeners.iter().enumerate() {
            if listeners[..i].iter().any(|(_, b)| b == a) {
                return Err((
                    format!("listeners.{k}"),
                    format!("{a} is used by two listeners"),
                ));
            }
        }
        if self.auth.password_file.is_some() && self.auth.password_env.is_some() {
            return invalid(
                "auth.password_env",
                "give either password_file or password_env, not both",
            );
        }
        if self.auth.password_env.as_deref() == Some("") {
            return invalid(
                "auth.password_env",
                "names an environment variable: not empty",
            );
        }
        let has_users = self.auth.password_file.is_some() || self.auth.password_env.is_some();
        if !self.auth.allow_anonymous && !has_users {
            return invalid(
                "auth",
                "no password_file and allow_anonymous is false: nobody could connect \
                 (create users with `mosquitto_passwd -c FILE USER`)",
            );
        }
        if self.auth.allow_anonymous && has_users {
            return invalid(
                "auth.allow_anonymous",
                "rumqttd cannot mix anonymous and password logins: with a password_file, \
                 clients without a username are refused; set allow_anonymous: false",
            );
        }
        let l = &self.limits;
        if l.max_connections == 0 {
            return invalid("limits.max_connections", "must be > 0");
        }
        if l.max_payload_size < 1024 {
            return invalid("limits.max_payload_size", "must be at least 1024 bytes");
        }
        if l.max_inflight_count == 0 || l.max_inflight_count > u16::MAX as usize {
            return invalid("limits.max_inflight_count", "must be between 1 and 65535");
        }
        if l.max_outgoing_packet_count == 0 {
            return invalid("limits.max_outgoing_packet_count", "must be > 0");
        }
        if l.segment_size < l.max_payload_size {
            return invalid(
                "limits.segment_size",
                "must be at least limits.max_payload_size (a segment holds whole messages)",
            );
        }
        if l.segment_count < 2 {
            return invalid("limits.segment_count", "must be at least 2");
        }
        if l.connection_timeout_ms == 0 {
            return invalid("limits.connection_timeout_ms", "must be > 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Result<BrokerConfig, dcs_shared::ConfigError> {
        dcs_shared::config::from_str(text, Path::new("broker.yaml"))
    }

    #[test]
    fn defaults_are_loopback_and_need_users() {
        let e = parse("meters_interval_secs: 5\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("auth"));
        let c = parse("auth: {allow_anonymous: true}\n").unwrap();
        for (_, a) in c.listeners.all() {
            assert!(a.ip().is_loopback(), "{a}");
        }
    }

    #[test]
    fn bad_listener_address_names_key_and_line() {
        let e =
            parse("auth: {allow_anonymous: true}\nlisteners:\n  mqtt: localhost\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("listeners.mqtt"));
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("invalid socket address"), "{e}");
    }

    #[test]
    fn listener_can_be_disabled_and_duplicates_refused() {
        let c = parse("auth: {allow_anonymous: true}\nlisteners: {websocket: null}\n").unwrap();
        assert_eq!(c.listeners.all().len(), 2);
        let e = parse(
            "auth: {allow_anonymous: true}\nlisteners: {mqtt: 127.0.0.1:1, mqtt5: 127.0.0.1:1}\n",
        )
        .unwrap_err();
        assert!(e.message.contains("used by two listeners"), "{e}");
    }

    #[test]
    fn limits_are_checked() {
        let e = parse("auth: {allow_anonymous: true}\nlimits:\n  segment_count: 1\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.segment_count"));
        assert_eq!(e.line, Some(3));
        let e = parse("auth: {allow_anonymous: true}\nlimits: {max_payload_size: 10000000}\n")
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.segment_size"));
        let e = parse("auth: {allow_anonymous: true}\nlimits: {max_conections: 3}\n").unwrap_err();
        assert!(e.message.contains("unknown field `max_conections`"), "{e}");
    }
}
