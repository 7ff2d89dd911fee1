//! `notifier`: alarms for people (SPEC 12): e-mail and chat messages when an alarm is
//! raised, escalated, acknowledged or cleared, reminders, and a watchdog on the
//! interlock, the services and the broker. Separate from the interlock, so nothing
//! about mail or HTTP can slow or break the safety path.
//!
//! Layers: [`config`], [`engine`] (what to tell, pure), [`ratelimit`] (folding a
//! flood, pure), [`render`] (subject, text, JSON, pure), [`channel`] (SMTP, webhooks),
//! [`service`] (MQTT, durable outboxes, delivery), [`journal`] (every alarm event,
//! shelve and delivery, in MongoDB or a JSON-lines file).

pub mod channel;
pub mod config;
pub mod engine;
pub mod journal;
pub mod ratelimit;
pub mod render;
pub mod service;

pub use config::NotifierConfig;

/// The `notifier` service program (see [`dcs_shared::program`]).
pub struct Notifier;

impl dcs_shared::program::Program for Notifier {
    const NAME: &'static str = "notifier";
    const ABOUT: &'static str =
        "Alarm notifications by e-mail and webhooks, and a watchdog on the interlock.";
    type Config = NotifierConfig;

    fn resolve_paths(cfg: &mut NotifierConfig, file: &std::path::Path) {
        cfg.state_dir = dcs_shared::config::relative_to(file, &cfg.state_dir);
    }
    fn mqtt(cfg: &mut NotifierConfig) -> Option<&mut dcs_shared::MqttSettings> {
        Some(&mut cfg.mqtt)
    }
    fn client_id(cfg: &NotifierConfig) -> Option<String> {
        Some(cfg.name.clone())
    }
    fn summary(cfg: &NotifierConfig) -> String {
        format!("({} channels, station {})", cfg.channels.len(), cfg.station)
    }
    async fn run(
        cfg: NotifierConfig,
        file: std::path::PathBuf,
        mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        service::run(cfg, file, mqtt, shutdown).await
    }
}
