//! `interlock`: headless safety rules over what the suite publishes, acting on the
//! other services over MQTT, with latched alarms.
//!
//! Layers, from the data up: [`inputs`] (values and their ages, publishers online),
//! [`plant`] (the CAEN channels and the chiller as their services publish them),
//! [`rules`] (conditions, pure), [`alarm`] (hold time, latching, acknowledgement),
//! [`escalation`] (actions in order, confirmed from status, escalated on failure),
//! [`engine`] (all of it without I/O), [`service`] (MQTT). [`config`] is the rules file.

pub mod alarm;
pub mod commands;
pub mod config;
pub mod engine;
pub mod escalation;
pub mod inputs;
pub mod plant;
pub mod rules;
pub mod service;

pub use config::InterlockConfig;
