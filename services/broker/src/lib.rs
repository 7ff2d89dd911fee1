//! `dcs-broker`: the suite's embedded MQTT broker, rumqttd with the settings a lab needs
//! (loopback by default, Mosquitto password files, bounded memory, meters).
//!
//! The `dcs` launcher uses this library to start the broker in its own process; the
//! `dcs-broker` binary is the same thing for a container of its own.

pub mod auth;
pub mod config;
pub mod front;
pub mod proxy;
pub mod server;

pub use config::BrokerConfig;
pub use server::{start, RunningBroker};
