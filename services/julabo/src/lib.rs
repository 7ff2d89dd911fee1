//! `julabo`: the Julabo chiller driver.
//!
//! Layers, from the wire up: [`protocol`] (commands and replies, no I/O),
//! [`transport`] (serial port or TCP tunnel, and the paced [`transport::Link`]),
//! [`readings`] (what the unit said, field by field) and [`schedule`] (which
//! conversation gets the line next: commands first), both pure, [`chiller`] (reading
//! the unit, reconnecting, carrying out commands), [`fsm`] (the published state),
//! [`commands`] (MQTT commands, validated), [`service`] (MQTT).

pub mod chiller;
pub mod commands;
pub mod config;
pub mod fsm;
pub mod protocol;
pub mod readings;
pub mod schedule;
pub mod service;
pub mod transport;

pub use config::JulaboConfig;
