//! Common library of the Tracker DCS services.
//!
//! Every binary of the suite builds on these pieces:
//! - [`config`]: YAML config files with errors that name file, key and line;
//! - [`mqtt`]: a self-healing MQTT session (reconnect, re-subscribe, last will, birth,
//!   retained state restored after a broker restart);
//! - [`command`]: the command/reply envelope every service speaks (SPEC 3.4);
//! - [`time`]: UTC nanosecond timestamps;
//! - [`logging`] and [`shutdown`]: `tracing` setup and SIGTERM/SIGINT handling;
//! - [`backoff`]: exponential backoff with jitter;
//! - [`line_protocol`] and [`influx`]: InfluxDB line protocol and its v1/v2 writer;
//! - [`inputs`]: named values from MQTT (topic filter, JSON field) with their ages;
//! - [`permit`]: the interlock's signed permit (HMAC-SHA256, freshness, sequence);
//! - [`spool`]: a durable on-disk queue (checksummed segments, persisted cursor), and
//!   [`outbox`]: a spool in front of a store that may be away, with delivery and retries.

pub mod backoff;
pub mod command;
pub mod config;
pub mod influx;
pub mod inputs;
pub mod line_protocol;
pub mod logging;
pub mod mqtt;
pub mod outbox;
pub mod permit;
pub mod program;
pub mod shutdown;
pub mod spool;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod time;
pub mod topic;

pub use command::{Command, CommandError, Reply};
pub use config::{ConfigError, Validate};
pub use mqtt::{Message, MqttSettings, QoS, Session, SessionEvent, SessionOptions};
pub use time::UtcNanos;
