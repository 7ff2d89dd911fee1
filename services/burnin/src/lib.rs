//! `burnin`: burn-in sequences (thermal cycles, IV scans, Ph2_ACF calibrations) run
//! unattended over MQTT, checkpointed at every step, paused when the interlock trips or
//! data goes stale, and resumed by themselves once conditions are back.
//!
//! Layers: [`sequence`] (the sequence files, pure), [`world`] (what the other services
//! publish), [`engine`] (the run, pure: messages and clock in, commands out),
//! [`checkpoint`] (atomic file), [`commands`] (operator commands), [`store`] (MongoDB),
//! [`service`] (MQTT, the durable queues in front of MongoDB and InfluxDB).
//! [`config`] is `burnin.yaml`. See `docs/burnin.md`.

pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod engine;
pub mod sequence;
pub mod service;
pub mod show;
pub mod store;
pub mod world;

pub use config::BurninConfig;

/// The `burnin` program (see [`dcs_shared::program`]).
pub struct Burnin;

impl dcs_shared::program::Program for Burnin {
    const NAME: &'static str = "burnin";
    const ABOUT: &'static str =
        "Burn-in sequencer: thermal cycles, IV scans, calibrations; checkpointed, paused on trips.";
    type Config = BurninConfig;

    fn resolve_paths(cfg: &mut BurninConfig, file: &std::path::Path) {
        cfg.state_dir = dcs_shared::config::relative_to(file, &cfg.state_dir);
        cfg.sequences_dir = dcs_shared::config::relative_to(file, &cfg.sequences_dir);
    }
    fn load_files(
        cfg: &mut BurninConfig,
        file: &std::path::Path,
    ) -> Result<(), dcs_shared::ConfigError> {
        if let Err(e) = std::fs::read_dir(&cfg.sequences_dir) {
            return Err(dcs_shared::ConfigError {
                line: dcs_shared::config::key_line(
                    &std::fs::read_to_string(file).unwrap_or_default(),
                    "sequences_dir",
                ),
                ..dcs_shared::ConfigError::invalid(
                    file,
                    "sequences_dir",
                    format!("cannot read {}: {e}", cfg.sequences_dir.display()),
                )
            });
        }
        // Every shipped sequence must load: a broken one is found at start, not when an
        // operator picks it at 3 a.m.
        for (_, f) in cfg.sequences() {
            let (seq, text) = sequence::load(&f, cfg.limits)?;
            // A `require` reads environment inputs by name: they must exist.
            for (name, key) in seq.inputs_needed() {
                if !cfg.environment.contains_key(name) {
                    return Err(dcs_shared::ConfigError {
                        line: dcs_shared::config::key_line(&text, &key),
                        ..dcs_shared::ConfigError::invalid(
                            &f,
                            &key,
                            format!(
                                "reads the environment input `{name}`, which {} does not define (`environment:`)",
                                file.display()
                            ),
                        )
                    });
                }
            }
        }
        Ok(())
    }
    fn mqtt(cfg: &mut BurninConfig) -> Option<&mut dcs_shared::MqttSettings> {
        Some(&mut cfg.mqtt)
    }
    fn client_id(cfg: &BurninConfig) -> Option<String> {
        Some(cfg.name.clone())
    }
    fn summary(cfg: &BurninConfig) -> String {
        format!("({} sequences)", cfg.sequences().len())
    }
    async fn run(
        cfg: BurninConfig,
        _file: std::path::PathBuf,
        mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        service::run(cfg, mqtt, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequences_are_checked_with_the_config() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("burnin.yaml");
        std::fs::write(
            &file,
            "sequences_dir: seqs\nstate_dir: state\nenvironment:\n  dew_point: {topic: a/b, max_age_secs: 30}\n",
        )
        .unwrap();
        let e = dcs_shared::program::load::<Burnin>(&file).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("sequences_dir"), "{e}");
        assert_eq!(e.line, Some(1), "{e}");
        std::fs::create_dir(d.path().join("seqs")).unwrap();
        std::fs::write(
            d.path().join("seqs/ok.yaml"),
            "steps:\n  - soak: {secs: 1}\n",
        )
        .unwrap();
        assert!(dcs_shared::program::load::<Burnin>(&file).is_ok());
        std::fs::write(
            d.path().join("seqs/dry.yaml"),
            "steps:\n  - require: {rh_below: 10}\n",
        )
        .unwrap();
        let e = dcs_shared::program::load::<Burnin>(&file).unwrap_err();
        assert!(e.message.contains("`humidity`"), "{e}");
        assert_eq!(e.line, Some(2), "{e}");
        std::fs::remove_file(d.path().join("seqs/dry.yaml")).unwrap();
        std::fs::write(
            d.path().join("seqs/bad.yaml"),
            "steps:\n  - hv: {set: 5000}\n",
        )
        .unwrap();
        let e = dcs_shared::program::load::<Burnin>(&file).unwrap_err();
        assert!(e.origin.ends_with("seqs/bad.yaml"), "{e}");
        assert_eq!(e.line, Some(2), "{e}");
    }
}
